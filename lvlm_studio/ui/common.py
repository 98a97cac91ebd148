"""Small helpers shared by the tabs: error mapping, choices, tables."""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable
from typing import Any

import gradio as gr

from lvlm_studio.config import counted
from lvlm_studio.service import Studio, whole_number

# The project's own error classes a user's input can raise (by name: importing them all here would
# load torch-side modules at UI import time). Subclasses count (RoundBusyError is a JobError).
_USER_ERROR_NAMES = frozenset({
    "StoreError", "NotFoundError", "ImageRejected", "DataImportError", "DataExportError", "UnsafePathError",
    "ModelLoadError", "MissingDependencyError", "JobError",
})


# Handlers that load a model and fill the cores (Generate, Compare's Evaluate, the /generate API)
# share one queue slot: a second click waits instead of halving the first one's speed.
MODEL_JOBS = "model"


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause (bad input, missing role, unknown id) into gr.Error so the
    page shows a message instead of a generic failure."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except PermissionError as exc:
            raise _refusal(f"Not allowed: {exc}") from exc
        except (ValueError, LookupError, TypeError, OverflowError) as exc:
            raise _refusal(str(exc)) from exc
        except Exception as exc:  # store, job and model errors: say what failed
            if any(cls.__name__ in _USER_ERROR_NAMES for cls in type(exc).__mro__):
                raise _refusal(str(exc)) from exc
            from lvlm_studio.models.base import out_of_memory

            if (message := out_of_memory(exc)) is not None:
                raise _refusal(message) from exc
            raise

    return wrapper


def _refusal(message: str) -> gr.Error:
    # The user sees the message; the server log is no place for a traceback of their typo.
    # gr.Error renders its message as HTML, and messages quote what the user typed or a file held
    # (a reviewer name, a path, a record's text): escaped, it shows as the text it is. Quotes need
    # no escaping in element text, so "'bob'" reads (and matches) as it did.
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def clear_on_click(button: gr.Button, summary: gr.Markdown) -> None:
    """Empty ``summary`` the moment ``button`` is clicked. A refused run raises (a toast) and never
    reaches the step that writes the summary, which would otherwise keep the previous result."""
    button.click(lambda: "", None, [summary], api_name=False, queue=False, show_progress="hidden")


def rounded(value: Any, digits: int = 4) -> Any:
    """A figure to read by in a table (raw floats widen it until its last column is clipped); any
    other value, a missing figure included, as it is."""
    return round(value, digits) if isinstance(value, float) else value


def round_choices(studio: Studio, with_all: bool = False, done_only: bool = False,
                  rounds: list[dict] | None = None) -> list[tuple[str, str]]:
    """The rounds as dropdown choices; ``rounds``: ``studio.rounds()`` when the caller has it already
    (each call checks the active rounds' processes under the write lock)."""
    out = [("all rounds", "all")] if with_all else []
    for r in studio.rounds() if rounds is None else rounds:
        if done_only and r["status"] != "done":
            continue
        name = "round 0 (base model)" if r["id"] == 0 else f"round {r['id']} ({r['status']})"
        out.append((name, str(r["id"])))
    return out


def ticked_methods(now: list[str], current: list[str] | None, known: list[str] | None) -> list[str]:
    """A methods box's ticks after the store's methods changed from ``known`` to ``now``: what the
    user had ticked that still exists, plus every method that appeared since (an import names its
    own), ticked."""
    ticked = [m for m in (current or []) if m in now] + [m for m in now if m not in (known or [])]
    return list(dict.fromkeys(ticked))


def number_field(value: Any, label: str, cast: type = float) -> Any:
    """A number field's value, or a message naming the field (an emptied gr.Number sends None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: enter a number") from None
    if not math.isfinite(number):  # 1e999 from a JSON client is inf, and int(inf) raises OverflowError
        raise ValueError(f"{label}: enter a finite number, not {value}")
    if cast is int:
        if number != int(number):
            raise ValueError(f"{label}: enter a whole number, not {value}")
        return int(number)
    return number


def parse_round(value: Any) -> int | None:
    if value in (None, "", "all"):
        return None
    try:
        return whole_number(value, "round")  # bounded: a 30-digit round would overflow SQLite
    except ValueError:  # the dropdowns accept typed values
        raise ValueError(f"no round {str(value)[:40]!r}: pick a round from the list (a round number)") from None


def bar(progress: Any) -> Callable[[int, int | None, str], None]:
    """A ``gr.Progress`` as the service's progress callback (done, total or None, message)."""
    return lambda done, total, message: progress((done, total), desc=message)


def report_markdown(report: dict | None) -> str:
    """A few readable lines for the reports the Generate and Data tabs get back (generate, import,
    upload, export); the JSON stays one click away. Every value from the report is escaped for Markdown."""
    from lvlm_studio.ui.highlight import escape_markdown as esc

    def n(count: Any, noun: str) -> str:  # "1 pair", "2 pairs"
        return esc(counted(count, noun))

    if not isinstance(report, dict) or not report:
        return ""
    lines: list[str] = []
    if "method" in report and "no_pair" in report:  # generate
        lines.append(f"**{esc(str(report['method']).upper())}** from round {esc(report.get('round'))}: "
                     f"**{n(report.get('pairs'), 'pair')}** from {n(report.get('items'), 'item')} "
                     f"in {esc(report.get('seconds'))} s; {esc(report.get('skipped'))} skipped (already done), "
                     f"{esc(report['no_pair'])} without a pair")
        if report.get("existence_pairs"):
            lines.append(f"plus {esc(report['existence_pairs'])} yes/no pairs")
        if report.get("note"):
            lines.append(esc(report["note"]))
    elif "imported" in report:  # import
        lines.append(f"Import **{esc(report.get('status'))}** ({esc(report.get('format'))}): "
                     f"{esc(report['imported'])} records ({esc(report.get('new_items'))} new items), "
                     f"{esc(report.get('pairs'))} new pairs, "
                     f"{esc(report.get('skipped'))} refused, {esc(report.get('ignored'))} files ignored")
        errors = report.get("errors") or []
        lines += [f"- {esc(e)}" for e in errors[:10]]
        if len(errors) > 10:
            lines.append(f"- … and {len(errors) - 10} more (see the JSON)")
    elif "rejected" in report and "items" in report:  # upload
        added = len(report["items"])
        lines.append(f"**{n(added, 'image')} added**, {len(report['rejected'])} refused")
        lines += [f"- {esc(r.get('file'))}: {esc(r.get('reason'))}" for r in report["rejected"][:10]]
    elif "probes" in report and "strategy" in report:  # POPE probes
        lines.append(f"**{n(report['probes'], 'POPE probe')}** ({esc(report['strategy'])}, {esc(report.get('yes'))} yes) "
                     f"on {n(report.get('images'), 'image')} of {esc(report.get('dataset'))}/{esc(report.get('split'))}: "
                     f"{esc(report.get('added'))} new; rounds evaluated on this set now report POPE")
        if report.get("note"):
            lines.append(esc(report["note"]))
    elif "pairs" in report and "format" in report:  # export
        lines.append(f"Exported **{n(report['pairs'], 'pair')}** ({n(report.get('images'), 'image')}) as "
                     f"{esc(report['format'])}: download the zip beside")
    out = ""
    for prev, line in zip(["", *lines], lines, strict=False):  # a bullet list stays one list
        out += ("\n" if prev.startswith("- ") and line.startswith("- ") else "\n\n" if out else "") + line
    return out
