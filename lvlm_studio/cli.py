"""The ``lvlm-studio`` command line (typer).

Every command reads the data root from ``LVLM_STUDIO_HOME`` (default ./storage) through
``config.Settings`` and takes ``--json`` for a machine-readable result on stdout.

Exit codes: 0 ok, 1 failure (a clear message on stderr, no stack trace for user errors), 3 a
partial import (some records were refused), 2 a usage error (typer/click).

Extending: write a function, decorate it with ``@cli_command`` (error handling + exit codes), and
register it in ``_register`` at the bottom of this file (or add a sub-app with
``app.add_typer``). Use ``settings()``, ``open_store()``, ``studio()`` and ``emit()`` for the
common parts. Commands stay thin: they parse options and call io/store/service/jobs functions.

Options given as ``key=value`` (``generate --param``, ``train --config``) are JSON-decoded and
checked against the config dataclass's field names and types here, so a typo fails at once
instead of minutes later in a background job. Progress bars (tqdm) go to stderr and show only on
a terminal. Admin-only actions (train, cancel) act as ``--user`` / ``LVLM_STUDIO_USER`` when
accounts are configured (LVLM_STUDIO_USERS / LVLM_STUDIO_ADMINS); with none, everyone is admin.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lvlm_studio.config import (
    MAX_ID,
    MAX_SEED,
    MAX_WORLD_SCENES,
    Settings,
    counted,
    debug_enabled,
    listen_address,
)
from lvlm_studio.evaluation import evaluation_label, evaluation_set_label, no_mentions_note

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # typer's own usage errors use 2 as well
EXIT_PARTIAL = 3

app = typer.Typer(
    name="lvlm-studio",
    help="LVLM Studio: build, review and train on preference pairs against VLM hallucination.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]


class CLIError(Exception):
    """A user-facing failure: printed without a stack trace, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ shared helpers
def settings() -> Settings:
    """Settings from the environment (LVLM_STUDIO_HOME etc.)."""
    return Settings()


def existing_settings() -> Settings:
    """Settings for a command that reads or reviews what is stored: a data root without a store is
    an error, not a new empty one (a mistyped LVLM_STUDIO_HOME used to show zeros, and leave a
    folder behind)."""
    s = settings().check_home()
    if not s.db_path.is_file():
        raise CLIError(f"no LVLM Studio store at {s.home} (LVLM_STUDIO_HOME): `lvlm-studio init` creates one, "
                       "`lvlm-studio demo seed` fills it with the demo world")
    return s


def open_store(s: Settings | None = None):
    """Create the data root's folders and open (and migrate) its store."""
    from lvlm_studio.store import Store

    s = (s or settings()).ensure_dirs()
    return Store(s.db_path)


# Characters a terminal acts on instead of showing: C0/C1 controls other than newline and tab
# (ANSI escapes can rewrite the screen or the title) and the bidirectional overrides that make text
# read in another order than it is stored. Imported answers, prompts and notes are untrusted text.
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def say(text: str, err: bool = False) -> None:
    """Print ``text`` with every terminal control character shown as an escape (\\x1b, \\u202e)."""
    typer.echo(_TERMINAL_CONTROLS.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text), err=err)


def emit(result: dict[str, Any], as_json: bool, human: str | Callable[[], str] | None = None) -> None:
    """Print ``result`` as JSON (``--json``) or the human text."""
    if as_json:
        # JSON escapes C0 controls itself; the rest become \\u escapes, the same string to a parser
        text = json.dumps(result, ensure_ascii=False, indent=2, default=str)
        typer.echo(_TERMINAL_CONTROLS.sub(lambda m: f"\\u{ord(m[0]):04x}", text))
    elif human is not None:
        say(human() if callable(human) else human)


def _is_usage_error(exc: BaseException) -> bool:
    """A library refusal of what was typed (a misspelt method name): exit 2, like a bad option."""
    from lvlm_studio.service import UnknownMethodError

    return isinstance(exc, UnknownMethodError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lvlm_studio.io import DataExportError, DataImportError, UnsafePathError
    from lvlm_studio.jobs import JobError
    from lvlm_studio.media import ImageRejected
    from lvlm_studio.models.base import MissingDependencyError, ModelLoadError
    from lvlm_studio.store import StoreError

    return (
        CLIError,
        ModelLoadError,
        MissingDependencyError,
        JobError,
        TimeoutError,
        DataImportError,
        DataExportError,
        UnsafePathError,
        ImageRejected,
        StoreError,
        FileNotFoundError,
        PermissionError,
        sqlite3.Error,
        ValueError,
        OverflowError,  # a number too large for SQLite, whatever option it came from
    )


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def cli_command(func: F) -> F:
    """Turn user errors into a one-line message and exit code (JSON on stdout with --json).
    Set LVLM_STUDIO_DEBUG=1 to see the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except _user_errors() as exc:
            if debug_enabled():
                raise
            code = exc.code if isinstance(exc, CLIError) else EXIT_USAGE if _is_usage_error(exc) else EXIT_FAILURE
            fail(str(exc) or type(exc).__name__, code, as_json)
        except (MemoryError, RuntimeError) as exc:
            from lvlm_studio.models.base import out_of_memory

            message = out_of_memory(exc)
            if message is None or debug_enabled():
                raise
            fail(message, EXIT_FAILURE, as_json)

    return wrapper  # type: ignore[return-value]


def show_failure(message: str, as_json: bool, result: dict | None = None) -> None:
    """One 'error:' line on stderr, and with --json the JSON error object on stdout: ``result`` when
    the command has more to report (a round's id and status), else ``{"ok": false, "error": ...}``."""
    if as_json:
        emit({"ok": False, "error": message} if result is None else result, True)
    say(f"error: {message}", err=True)


def fail(message: str, code: int, as_json: bool, result: dict | None = None) -> None:
    """``show_failure``, then exit with ``code``."""
    show_failure(message, as_json, result)
    raise typer.Exit(code) from None


def require_round(store: Any, round_id: int | None) -> None:
    """A round named by an option must exist (None: the option was not given)."""
    if round_id is not None and store.get_round(round_id) is None:
        raise CLIError(f"round {round_id} does not exist (see lvlm-studio rounds)")


# ------------------------------------------------------------------------------ commands
@cli_command
def init_cmd(as_json: JsonOption = False) -> None:
    """Create the data root (LVLM_STUDIO_HOME) and its database."""
    s = settings()
    store = open_store(s)
    store.ensure_base_round(s.model)  # round 0, the base model, as the app and the other commands make it
    result = {
        "ok": True,
        "home": str(s.home.resolve()),
        "db": str(s.db_path.resolve()),
        "migrations": store.applied_migrations(),
    }
    store.close()
    emit(result, as_json, f"initialised {result['home']} (database {result['db']})")


@cli_command
def import_cmd(
    path: Annotated[Path, typer.Argument(help="Folder, JSON/JSONL file or saved HF dataset.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="auto|folder|coco|jsonl|hf|trl|llava|llamafactory")
    ] = "auto",
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name (default: from the file, else 'default').")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split (default: from the file, else 'train').")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt for images without one.")] = None,
    images: Annotated[Path | None, typer.Option(help="Root that image paths are relative to.")] = None,
    method: Annotated[str | None, typer.Option(help="Method name for imported pairs without one.")] = None,
    limit: Annotated[int | None, typer.Option(help="Import at most this many records.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Import images, items and pairs. Exit 3 when some records were refused (partial)."""
    from lvlm_studio import io

    if format not in io.IMPORT_FORMATS:
        raise CLIError(f"unknown import format {format!r}; expected one of {', '.join(io.IMPORT_FORMATS)}", EXIT_USAGE)
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be 1 or more, not {limit}", EXIT_USAGE)
    s = settings()
    store = open_store(s)
    try:
        with Progress("import", unit="record") as bar:
            report = io.import_path(
                store,
                s,
                path,
                format,
                dataset=dataset,
                split=split,
                prompt=prompt or io.DEFAULT_PROMPT,
                images_dir=images,
                method=method,
                limit=limit,
                progress=bar,
            )
    finally:
        store.close()
    result = {"ok": report.status == "ok", **report.to_dict()}

    def human() -> str:
        lines = [
            f"import {report.status}: {report.imported} imported ({counted(report.new_items, 'new item')}), "
            f"{report.skipped} refused, {counted(report.pairs, 'new pair')} ({report.format}: {report.source})"
        ]
        lines += [f"  - {e}" for e in report.errors]
        return "\n".join(lines)

    emit(result, as_json, human)
    if report.status == "partial":
        raise typer.Exit(EXIT_PARTIAL)
    if report.status == "failed":
        # stderr says so in --json mode too, as every other failing command does
        say("error: nothing was imported" + (f" ({report.errors[0]})" if report.errors else ""), err=True)
        raise typer.Exit(EXIT_FAILURE)


@cli_command
def export_cmd(
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist or be empty).")],
    format: Annotated[str, typer.Option("--format", "-f", help="trl|llava|llamafactory")] = "trl",
    include_auto: Annotated[
        bool, typer.Option("--include-auto", help="Also export pairs nobody reviewed.")
    ] = False,
    method: Annotated[list[str] | None, typer.Option(help="Only these methods (repeatable).")] = None,
    round: Annotated[int | None, typer.Option(help="Only pairs generated in this round.", min=0, max=MAX_ID)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export labelled pairs for training (TRL, LLaVA JSON, LLaMA-Factory)."""
    from lvlm_studio import io
    from lvlm_studio.service import check_methods

    if format not in io.EXPORT_FORMATS:
        raise CLIError(f"unknown export format {format!r}; expected one of {', '.join(io.EXPORT_FORMATS)}", EXIT_USAGE)
    store = open_store(existing_settings())
    try:
        check_methods(store, method)  # the service's check: io.export_pairs below is called directly
        # any round a pair carries, not only the rounds table's (an import keeps its export's rounds)
        if round is not None and store.get_round(round) is None and not store.count_pairs(round=round):
            raise CLIError(f"no round {round}: the rounds table has none and no pair carries it (see lvlm-studio "
                           "rounds)")
        report = io.export_pairs(
            store,
            format,
            out,
            methods=method or None,
            include_auto=include_auto,
            round=round,
            overwrite=overwrite,
        )
    finally:
        store.close()
    emit(
        {"ok": True, **report.to_dict()},
        as_json,
        f"exported {counted(report.pairs, 'pair')} ({counted(report.images, 'image')}) as {report.format} to {report.path}",
    )


@cli_command
def stats_cmd(as_json: JsonOption = False) -> None:
    """Counts per table, per method, per decision and per label."""
    store = open_store(existing_settings())
    try:
        stats = store.stats()
    finally:
        store.close()

    def human() -> str:
        lines = ["tables: " + ", ".join(f"{k} {v}" for k, v in stats["tables"].items())]
        if stats["pairs_by_method"]:
            lines.append(
                "pairs by method: " + ", ".join(f"{k} {v}" for k, v in stats["pairs_by_method"].items())
            )
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in stats["labels"].items()))
        if stats["reviews_by_decision"]:
            lines.append("reviews: " + ", ".join(f"{k} {v}" for k, v in stats["reviews_by_decision"].items()))
        for name, splits in stats["datasets"].items():
            lines.append(f"dataset {name}: " + ", ".join(f"{k} {v}" for k, v in splits.items()))
        return "\n".join(lines)

    emit({"ok": True, **stats}, as_json, human)


# ------------------------------------------------------------------------------ studio helpers
def studio(model: str | None = None, clip: str | None = None, existing: bool = False):
    """A ``service.Studio`` on the data root, with ``--model`` / ``--clip`` overriding
    LVLM_STUDIO_MODEL / LVLM_STUDIO_CLIP. Accounts and admins come from the environment.
    ``existing``: the data root must already hold a store (``existing_settings``)."""
    from lvlm_studio.service import Studio

    if existing:
        existing_settings()
    overrides = {k: v for k, v in (("model", model), ("clip", clip)) if v}
    return Studio(Settings(**overrides))


def studio_call(call: Callable[[Any], T]) -> T:
    """``call(studio())`` on a data root that holds a store, the studio's store closed afterwards."""
    s = studio(existing=True)
    try:
        return call(s)
    finally:
        s.store.close()


class Progress:
    """A ``service.ProgressFn`` drawn as a tqdm bar on stderr (hidden when stderr is not a
    terminal, so pipes and logs stay clean). One bar per task; a new total starts a new task."""

    def __init__(self, desc: str, unit: str = "item", disable: bool | None = None):
        self.desc, self.unit, self.disable = desc, unit, disable
        self.bar: Any = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, disable=self.disable,
                            dynamic_ncols=True)
        elif total != self.bar.total or done < self.bar.n:
            self.bar.reset(total=total)
        if message:
            self.bar.set_description_str(f"{self.desc}: {message.split(':')[0]}", refresh=False)
        self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Python's spellings of JSON's null/true/false, which users type as often (eval_limit=None).
_PYTHON_LITERALS = {"None": None, "True": True, "False": False}


def parse_value(text: str) -> Any:
    """A ``key=value`` value: JSON when it parses (numbers, true/false, null, lists), Python's
    None/True/False, else text."""
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(values: list[str] | None, option: str, allowed: set[str] | None = None,
                owner: str = "") -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; a malformed entry or (with ``allowed``) an
    unknown key is a CLIError naming the option and the valid keys."""
    out: dict[str, Any] = {}
    for raw in values or []:
        key, sep, value = raw.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"{option} {raw!r}: expected key=value (e.g. {option} {key or 'name'}=VALUE)", EXIT_USAGE)
        if allowed is not None and key not in allowed:
            raise CLIError(f"{option} {key!r}: unknown {owner} option; valid: {', '.join(sorted(allowed))}",
                           EXIT_USAGE)
        out[key] = parse_value(value.strip())
    return out


def check_types(cls: type, values: dict[str, Any], option: str) -> dict[str, Any]:
    """``config.check_option_types`` with a CLIError naming the option."""
    from lvlm_studio.config import check_option_types

    try:
        return check_option_types(cls, values, option)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def parse_ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CLIError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,2,3", EXIT_USAGE) from None
    if not values:
        raise CLIError(f"{option} is empty", EXIT_USAGE)
    return values


def parse_names(text: str | None, option: str) -> list[str] | None:
    """Comma-separated names; None when the option is not given. Given but empty (``,``) is a
    usage error: it used to mean every method."""
    if text is None:
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise CLIError(f"{option} names no method; leave it out to use every method", EXIT_USAGE)
    return names


def config_options(cls: type, values: list[str] | None, option: str, owner: str) -> dict[str, Any]:
    """``key=value`` options checked against the config dataclass ``cls``: known field names, their
    types, and the values the config itself refuses (``num_epochs=0``), all usage errors (exit 2)
    that name the option."""
    from dataclasses import fields

    checked = check_types(cls, parse_pairs(values, option, {f.name for f in fields(cls)}, owner), option)
    try:
        built = cls(**checked)
        if hasattr(built, "generation_params"):  # a method's decoding limits are checked there
            built.generation_params()
    except ValueError as exc:
        raise CLIError(f"{option}: {exc}", EXIT_USAGE) from None
    return checked


def method_params(method: str, values: list[str] | None) -> dict[str, Any]:
    """``--param`` options checked against the method's config dataclass (names and types)."""
    from lvlm_studio.methods import METHOD_CONFIGS

    return config_options(METHOD_CONFIGS[method], values, "--param", method)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain, left-aligned text table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def eval_metrics(row: dict) -> dict:
    """A round's evaluation metrics (``metrics["eval"]``), {} when it has none."""
    metrics = row.get("metrics") or {}
    ev = metrics.get("eval")
    return ev if isinstance(ev, dict) else {}


def round_summary(row: dict) -> dict:
    """The numbers the rounds table shows, machine-readable."""
    ev = eval_metrics(row)
    metrics = row.get("metrics") or {}
    config = row.get("config") or {}
    return {
        "id": row["id"],
        "parent": row.get("parent_id"),
        "status": row["status"],
        "pid": row.get("pid"),
        "progress": row.get("progress"),
        "chair_s": ev.get("chair_s"),
        "chair_i": ev.get("chair_i"),
        "recall": ev.get("recall"),
        "pope_f1": ev.get("pope_f1"),
        "eval_set": evaluation_label(ev) if ev else None,
        "pairs": metrics.get("n_pairs"),
        "methods": config.get("methods"),
        "base_model": row.get("base_model"),
        "created": row.get("created"),
        "started": row.get("started"),
        "finished": row.get("finished"),
        "seconds": _duration(row.get("started"), row.get("finished")),
        "error": row.get("error"),
    }


def _duration(start: str | None, end: str | None) -> float | None:
    from datetime import datetime

    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end.rstrip("Z")) - datetime.fromisoformat(start.rstrip("Z"))).total_seconds()
    except ValueError:
        return None


def _short_time(stamp: str | None) -> str | None:
    return stamp[:19].replace("T", " ") if stamp else None


def eval_table(ev: dict) -> str:
    """CHAIR, recall and POPE of one evaluation as a two-column table."""
    keys = [("CHAIR_s", "chair_s"), ("CHAIR_i", "chair_i"), ("recall", "recall"),
            ("silent (captions naming no object of a non-empty image)", "silent"),
            ("POPE accuracy", "pope_accuracy"), ("POPE precision", "pope_precision"),
            ("POPE recall", "pope_recall"), ("POPE F1", "pope_f1"), ("POPE yes-ratio", "pope_yes_ratio"),
            ("captions", "n_captions"), ("object mentions", "n_mentions"), ("POPE probes", "pope_n"),
            ("POPE answers saying nothing (read as yes)", "pope_n_empty"), ("items", "n_items")]
    out = table(["metric", "value"], [[name, ev.get(key)] for name, key in keys])
    if note := no_mentions_note(ev):
        out += f"\nnote: {note}"
    return out


def bracket_spans(text: str, spans: list[dict]) -> str:
    """``text`` with each of ``spans`` (start/end character offsets) in [brackets]; a span that
    overlaps an earlier one is left out."""
    out, last = [], 0
    for s in sorted(spans, key=lambda s: s["start"]):
        if s["start"] < last:
            continue
        out += [text[last:s["start"]], "[", text[s["start"]:s["end"]], "]"]
        last = s["end"]
    return "".join(out) + text[last:]


def mark_hallucinations(view: dict | None) -> str:
    """An evaluation answer with its hallucinated objects in [brackets] (from the stored spans)."""
    if view is None:
        return "(no answer stored)"
    text = view.get("answer") or ""
    spans = [s for s in (view.get("spans") or []) if s.get("hallucinated")]
    if spans:
        return bracket_spans(text, spans)
    if view.get("hallucinated"):
        return f"{text}  (hallucinated: {', '.join(map(str, view['hallucinated']))})"
    return text


# ------------------------------------------------------------------------------ demo
demo_app = typer.Typer(help="The embedded ShapesWorld demo: build its models, seed the store.",
                       no_args_is_help=True)


@cli_command
def demo_build_cmd(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the package's world/artifacts).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the world and of training.", min=0, max=MAX_SEED)] = 0,
    vlm_steps: Annotated[int | None, typer.Option(help="SFT steps of the demo VLM (default 4000).")] = None,
    clip_steps: Annotated[int | None, typer.Option(help="Contrastive steps of the demo CLIP (default 600).")] = None,
    train_scenes: Annotated[int | None, typer.Option(help="Training scenes (default 6000; >= 64).")] = None,
    eval_scenes: Annotated[int | None, typer.Option(help="Test scenes for the built-in check (default 500).")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the check after training.")] = False,
    threads: Annotated[int, typer.Option(help="Torch CPU threads.")] = 2,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train the demo VLM (SFT) and CLIP (contrastive) and save them with their recipe."""
    from lvlm_studio.world.build import DEMO_DIR, BuildConfig, build_demo

    cfg = BuildConfig(threads=threads)
    for name, value in (("--vlm-steps", vlm_steps), ("--clip-steps", clip_steps), ("--threads", threads),
                        ("--eval-scenes", eval_scenes)):
        if value is not None and value < 1:
            raise CLIError(f"{name} must be at least 1, not {value}", EXIT_USAGE)
    if train_scenes is not None:
        if train_scenes < cfg.clip_batch:
            raise CLIError(f"--train-scenes must be at least {cfg.clip_batch} (one CLIP batch), not {train_scenes}",
                           EXIT_USAGE)
        cfg.train_scenes = train_scenes
    if eval_scenes is not None:
        cfg.eval_scenes = eval_scenes
    target = Path(out) if out is not None else DEMO_DIR
    recipe = build_demo(target, seed, vlm_steps, clip_steps, progress=not quiet, evaluate=not no_eval, config=cfg)
    result = {
        "ok": True,
        "out": str(target.resolve()),
        "vlm": str((target / "vlm").resolve()),
        "clip": str((target / "clip").resolve()),
        "seed": seed,
        "vlm_steps": recipe["build"]["vlm_steps"],
        "clip_steps": recipe["build"]["clip_steps"],
        "vlm_final_loss": recipe["vlm_final_loss"],
        "clip_final_loss": recipe["clip_final_loss"],
        "timings": recipe["timings"],
        "artifact_bytes": recipe["artifact_bytes"],
        "figures": {k: v for k, v in recipe["figures"].items() if k != "describe_examples"},
    }

    def human() -> str:
        lines = [f"built the demo into {result['out']} in {recipe['timings'].get('total_s')} s "
                 f"(VLM loss {recipe['vlm_final_loss']:.4f}, CLIP loss {recipe['clip_final_loss']:.4f})"]
        desc = result["figures"].get("describe_test")
        if desc:
            lines.append(f"test describe: CHAIR_s {_fmt(desc.get('chair_s'))}, CHAIR_i {_fmt(desc.get('chair_i'))}, "
                         f"recall {_fmt(desc.get('recall'))} on {desc.get('n')} scenes")
        if out is not None:
            lines.append(f"use it with: --model {result['vlm']} --clip {result['clip']}")
        return "\n".join(lines)

    emit(result, as_json, human)


@cli_command
def demo_seed_cmd(
    train: Annotated[int, typer.Option(help="Train-split scenes to add.", min=0, max=MAX_WORLD_SCENES)] = 24,
    test: Annotated[int, typer.Option(help="Test-split scenes to add.", min=0, max=MAX_WORLD_SCENES)] = 24,
    pairs: Annotated[int, typer.Option(help="Train items per method to pair with the demo model (POVID pairs each twice: injected "
                                       "text and a noisy image; CSR adds yes/no pairs; 0: none).", min=0)] = 2,
    seed: Annotated[int, typer.Option(help="World seed.", min=0, max=MAX_SEED)] = 0,
    as_json: JsonOption = False,
) -> None:
    """Put ShapesWorld items (describe + POPE probes) and a few demo pairs into the store: adds the
    missing scenes of --seed up to --train / --test; demo pairs once per data root (an interrupted
    first seeding is completed), none when the store already held pairs."""
    s = studio()
    try:
        with Progress("seeding") as bar:
            report = s.seed_demo(n_train=train, n_test=test, pairs_per_method=pairs, seed=seed, progress=bar,
                                 top_up=True)
        stats = s.stats()
    finally:
        s.store.close()
    result = {"ok": True, **report, "tables": stats["tables"]}
    pairs_text = ", ".join(f"{k} {v}" for k, v in report["pairs"].items()) or "none"
    if report.get("existence_pairs"):
        pairs_text += f" (+ {report['existence_pairs']} CSR yes/no pairs, on the question items CSR adds)"
    emit(result, as_json, f"{report['message']}: {counted(report['items'], 'new scene item')}, new pairs: {pairs_text} "
                          f"(store: {stats['tables'].get('items', 0)} items, {stats['tables'].get('pairs', 0)} pairs)")


# ------------------------------------------------------------------------------ generate
@cli_command
def generate_cmd(
    method: Annotated[str, typer.Option("--method", "-m", help="csr | povid | stic")],
    model: Annotated[str | None, typer.Option(help="demo | local directory | Hub id (default $LVLM_STUDIO_MODEL or demo).")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP for CSR: demo | directory | open_clip ref (default $LVLM_STUDIO_CLIP).")] = None,
    round: Annotated[int | None, typer.Option(help="Generate with this trained round's adapter (0/none: the base model).", min=0, max=MAX_ID)] = None,
    items: Annotated[str | None, typer.Option(help="Item ids, comma-separated (instead of --dataset/--split).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Only items of this dataset (default: all).")] = None,
    split: Annotated[str, typer.Option(help="Only items of this split; 'all' for every split.")] = "train",
    n: Annotated[int | None, typer.Option("--n", help="At most this many new items.", max=MAX_ID)] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.", min=0, max=MAX_SEED)] = 0,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Method option key=value (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Build preference pairs with CSR, POVID or STIC. Resumable: items done are skipped."""
    from lvlm_studio.service import METHODS

    if method not in METHODS:
        raise CLIError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}", EXIT_USAGE)
    item_ids = parse_ints(items, "--items")
    if item_ids is not None and dataset is not None:
        raise CLIError("give either --items or --dataset/--split, not both", EXIT_USAGE)
    if n is not None and n < 1:
        raise CLIError(f"--n must be at least 1, not {n}", EXIT_USAGE)
    params = method_params(method, param)
    # --model is this run's model, passed to the call; as the studio's model it would also become
    # round 0's base model on a fresh root, for good (a typo included).
    s = studio(clip=clip, existing=True)
    try:
        with Progress(f"{method} pairs") as bar:
            report = s.generate(
                method, model=model or s.settings.model, round=round, item_ids=item_ids,
                dataset=None if item_ids is not None else dataset,
                split=None if item_ids is not None or split == "all" else split,
                n=n, params=params, seed=seed, progress=bar,
            )
    finally:
        s.store.close()
    result = {"ok": True, "model": model or s.settings.model, **report}

    def human() -> str:
        if not report["items"]:
            return (f"{method}: nothing to do ({counted(report['skipped'], 'item')} already have {method} pairs "
                    f"for round {report['round']}; 0 new pairs)")
        extra = f" + {counted(report['existence_pairs'], 'yes/no pair')}" if report.get("existence_pairs") else ""
        return (f"{method}: {counted(report['items'], 'item')} -> {counted(report['pairs'], 'new pair')}{extra} "
                f"({counted(report['no_pair'], 'item')} gave no pair); {counted(report['skipped'], 'item')} already "
                f"done, skipped; {report['seconds']} s"
                + (f"\n{report['note']}" if report.get("note") else ""))

    emit(result, as_json, human)


# ------------------------------------------------------------------------------ review
review_app = typer.Typer(help="Review pairs from the terminal, as the Review tab does: next, show, decide, "
                              "undo, progress, agreement.", no_args_is_help=True)

ReviewerOption = Annotated[
    str | None,
    typer.Option("--reviewer", envvar="LVLM_STUDIO_USER", help="Who is reviewing (default $LVLM_STUDIO_USER)."),
]
REVIEW_STATUSES = ("pending", "decided", "all")


def named_reviewer(reviewer: str | None) -> str:
    """The reviewer a command acts as; none named is a usage error that says how to name one."""
    if reviewer is None or not reviewer.strip():
        raise CLIError("name the reviewer: --reviewer NAME, or set LVLM_STUDIO_USER", EXIT_USAGE)
    return reviewer


def candidate_lines(text: str, sentences: list[dict] | None, spans: list[dict] | None) -> list[str]:
    """A candidate as indented lines, one per stored sentence with its calibrated reward, the text
    between sentences on lines of its own, so that every character is shown; injected
    hallucinations in [brackets] (one that crosses sentences is bracketed in each), then listed
    with their category and the words they replaced."""
    from lvlm_studio.methods.sentences import valid_spans

    marks = valid_spans(text, spans)
    segments, pos = [], 0
    for sent in valid_spans(text, sentences):
        if text[pos:sent["start"]].strip():
            segments.append((pos, sent["start"], None))
        segments.append((sent["start"], sent["end"], sent.get("reward")))
        pos = sent["end"]
    if text[pos:].strip() or not segments:
        segments.append((pos, len(text), None))
    lines = []
    for start, end, reward in segments:
        inside = [{"start": max(m["start"], start) - start, "end": min(m["end"], end) - start}
                  for m in marks if m["start"] < end and m["end"] > start]
        shown = bracket_spans(text[start:end], inside).strip()
        finite = isinstance(reward, int | float) and not isinstance(reward, bool) and math.isfinite(reward)
        score = f"{reward:8.3f}  " if finite else ""  # as the Review tab: no colour for a broken reward
        lines.append(f"  {score}{shown}")
    for m in marks:
        lines.append(f"    [{text[m['start']:m['end']]}] injected {m.get('category') or 'hallucination'}"
                     + (f", was {m['original']!r}" if m.get("original") else ""))
    return lines


def pair_text(view: dict) -> str:
    """A pair as the Review tab shows it, in plain text: both candidates sentence by sentence with
    their calibrated rewards, injected hallucinations in [brackets] with their category, the
    automatic (or human) label and margin, this reviewer's decision and the notes."""
    label = view["label"]
    head = [f"pair {view['pair_id']} · {view['method']} · round {view['round']} · margin {_fmt(view['margin'])}"
            f" · label: {label['status']}" + (f" by {label['reviewer']}" if label.get("reviewer") else ""),
            f"image: {view['image_path']}", f"prompt: {view['prompt']}"]
    if view.get("objects"):
        head.append("objects in the image: " + ", ".join(map(str, view["objects"])))
    lines = head
    for name, side in (("A", "chosen"), ("B", "rejected")):
        cand = view[side]
        lines.append(f"{name}, automatic {side} ({cand.get('source') or '-'}, score {_fmt(cand.get('score'))}):")
        lines += candidate_lines(cand["text"], cand.get("sentences"), cand.get("spans"))
    if label["status"] != "auto":
        lines.append(f"effective chosen: {label['chosen_text']}")
        lines.append(f"effective rejected: {label['rejected_text']}")
    if view.get("my_decision"):
        lines.append(f"your decision: {view['my_decision']}")
    for note in view.get("notes") or []:
        lines.append(f"note by {note['reviewer']} ({note['decision']}{', undone' if note['undone'] else ''}): {note['note']}")
    return "\n".join(lines)


@cli_command
def review_next_cmd(
    reviewer: ReviewerOption = None,
    method: Annotated[str | None, typer.Option(help="Only pairs of this method.")] = None,
    round: Annotated[int | None, typer.Option(help="Only pairs built by this round's model.", min=0, max=MAX_ID)] = None,
    status: Annotated[str, typer.Option(help="pending (not yet decided by you), decided, or all.")] = "pending",
    as_json: JsonOption = False,
) -> None:
    """The next pair in your queue: lowest automatic margin first (the least confident label)."""
    if status not in REVIEW_STATUSES:
        raise CLIError(f"--status must be one of {', '.join(REVIEW_STATUSES)}, not {status!r}", EXIT_USAGE)

    def next_pair(s):
        # any round a pair carries, not only the rounds table's (an import keeps its export's rounds)
        view = s.next_pair(named_reviewer(reviewer), method=method, round=round, status=status)
        unmade = view is None and round is not None and not s.store.count_pairs(round=round)
        return view, unmade

    view, unmade = studio_call(next_pair)
    emit({"ok": True, "pair": view}, as_json,
         lambda: pair_text(view) if view is not None
         else f"no pair carries round {round}" if unmade else "no pair left in this queue")


@cli_command
def review_show_cmd(
    pair_id: Annotated[int, typer.Argument(help="The pair's id.", min=1, max=MAX_ID)],
    reviewer: ReviewerOption = None,
    as_json: JsonOption = False,
) -> None:
    """One pair, with your decision on it when --reviewer names you."""
    view = studio_call(lambda s: s.get_pair(pair_id, reviewer))
    emit({"ok": True, "pair": view}, as_json, lambda: pair_text(view))


@cli_command
def review_decide_cmd(
    pair_id: Annotated[int, typer.Argument(help="The pair's id.", min=1, max=MAX_ID)],
    decision: Annotated[str, typer.Argument(help="accept, swap, reject_both or edit.")],
    reviewer: ReviewerOption = None,
    text: Annotated[str | None, typer.Option(help="With edit: the corrected chosen answer.")] = None,
    note: Annotated[str | None, typer.Option(help="Why (shown to other reviewers).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Record a decision on a pair (appended; undo cancels it): the store keeps every decision."""
    from lvlm_studio.service import REVIEW_DECISIONS

    if decision not in REVIEW_DECISIONS:
        raise CLIError(f"decision must be one of {', '.join(REVIEW_DECISIONS)}, not {decision!r}", EXIT_USAGE)
    if text is not None and decision != "edit":
        raise CLIError("--text goes with the edit decision only", EXIT_USAGE)
    if decision == "edit" and not (text or "").strip():  # a missing argument: a usage error, as the README says
        raise CLIError("an edit needs the edited text: --text \"the corrected chosen answer\"", EXIT_USAGE)
    result = studio_call(lambda s: s.decide(pair_id, named_reviewer(reviewer), decision, edited_text=text, note=note))
    emit({"ok": True, **result}, as_json,
         f"pair {result['pair_id']}: {decision} recorded (review {result['review_id']}); "
         f"label now {result['label']['status']}")


@cli_command
def review_undo_cmd(
    reviewer: ReviewerOption = None,
    pair: Annotated[int | None, typer.Option(help="Undo your decision on this pair (default: your latest).", min=1, max=MAX_ID)] = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel your latest live decision (or the one on --pair)."""
    result = studio_call(lambda s: s.undo(named_reviewer(reviewer), pair_id=pair))
    if result is None:
        emit({"ok": True, "undone": None}, as_json, "nothing to undo")
        return
    emit({"ok": True, "undone": result}, as_json,
         f"pair {result['pair_id']}: decision undone; label now {result['label']['status']}")


@cli_command
def review_progress_cmd(
    reviewer: ReviewerOption = None,
    method: Annotated[str | None, typer.Option(help="Only pairs of this method.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Pairs decided out of all pairs, per reviewer (and yours with --reviewer)."""
    result = studio_call(lambda s: s.progress(reviewer, method=method))

    def human() -> str:
        lines = [f"{result['done']} of {counted(result['total'], 'pair')} decided by someone"]
        if "reviewer" in result:
            lines.append(f"you ({result['reviewer']}): {result['reviewer_done']} decided")
        lines += [f"  {name}: {n['done']} decided" for name, n in sorted(result["per_reviewer"].items())]
        return "\n".join(lines)

    emit({"ok": True, **result}, as_json, human)


@cli_command
def review_agreement_cmd(
    buckets: Annotated[int, typer.Option(help="Margin buckets for the override rate.", min=1, max=100)] = 4,
    as_json: JsonOption = False,
) -> None:
    """Agreement between reviewers (Cohen's kappa per pair of reviewers, Fleiss' kappa) and how
    often people overrule the automatic label, by automatic-margin bucket."""
    result = studio_call(lambda s: s.agreement(buckets=buckets))

    def human() -> str:
        lines = [f"reviewers: {', '.join(result['reviewers']) or '-'}; "
                 f"pairs rated by two or more: {result['items_multi_rated']}; Fleiss' kappa {_fmt(result['fleiss_kappa'])}"]
        if result["cohen"]:
            lines.append(table(["reviewer A", "reviewer B", "shared pairs", "Cohen's kappa"],
                               [[c["a"], c["b"], c["n"], c["kappa"]] for c in result["cohen"]]))
        lines.append(f"override rate (swap, reject both, edit): {_fmt(result['override_rate'])} "
                     f"of {counted(result['override_pairs'], 'reviewed pair')}")
        if result["override_by_method"]:
            lines.append(table(["method", "reviewed pairs", "override rate"],
                               [[m, r["n"], r["override_rate"]] for m, r in result["override_by_method"].items()]))
        if result["override_by_margin"]:
            lines.append("by automatic margin (the pairs that have one, such as CSR's)")
            lines.append(table(["automatic margin", "pairs", "override rate"],
                               [[b["bucket"], b["n"], b["override_rate"]] for b in result["override_by_margin"]]))
        return "\n".join(lines)

    emit({"ok": True, **result}, as_json, human)


# ------------------------------------------------------------------------------ training rounds
UserOption = Annotated[
    str | None,
    typer.Option("--user", envvar="LVLM_STUDIO_USER",
                 help="Who is acting (admin-only actions when accounts are configured)."),
]


@cli_command
def train_cmd(
    from_round: Annotated[int | None, typer.Option(help="Parent round (default: the current round).", min=0, max=MAX_ID)] = None,
    methods: Annotated[str | None, typer.Option(help="Only pairs of these methods, e.g. csr,povid.")] = None,
    include_auto: Annotated[bool, typer.Option("--include-auto", help="Also train on pairs nobody reviewed.")] = False,
    config: Annotated[list[str] | None, typer.Option("--config", "-c", help="DPO round option key=value (repeatable), e.g. learning_rate=5e-4.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default $LVLM_STUDIO_MODEL or demo).")] = None,
    user: UserOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the round until it ends and print its metrics.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up following after this many seconds.", min=0)] = None,
    as_json: JsonOption = False,
) -> None:
    """Start a DPO round as a background job (one at a time) and print its id."""
    from lvlm_studio.training import DPORoundConfig

    cfg = config_options(DPORoundConfig, config, "--config", "DPO round")
    names = parse_names(methods, "--methods")
    if names is not None:
        cfg["methods"] = names
    if include_auto:
        cfg["include_auto"] = True
    DPORoundConfig.from_dict(cfg)  # bad values fail here, before a process starts
    s = studio(model=model, existing=True)
    try:
        s.require_admin(user, "starting a training round")  # before anything about pairs is said
        require_round(s.store, from_round)
        # A misspelt method (service.UnknownMethodError) or a round with nothing to train on is refused (JobError) here, before it is created.
        n_material = s.training_material_count(cfg)
        round_id = s.start_round(cfg, user, parent_id=from_round)
        row = s.store.get_round(round_id)
    finally:
        s.store.close()
    if not wait:
        result = {"ok": True, "round": round_id, "parent": row.get("parent_id"), "status": row["status"],
                  "pid": row.get("pid"), "pairs": n_material, "log": row.get("log_path")}
        emit(result, as_json, f"started round {round_id} (parent {row.get('parent_id')}, {counted(n_material, 'pair')}) as a "
                              f"background job, pid {row.get('pid')}; log {row.get('log_path')}\n"
                              f"follow it: lvlm-studio wait {round_id}; stop it: lvlm-studio cancel {round_id}")
        return
    if not as_json:
        typer.echo(f"started round {round_id} (parent {row.get('parent_id')}, {counted(n_material, 'pair')}); following it "
                   f"(Ctrl-C stops following, not the round)")
    report_round(round_id, timeout, as_json)


@cli_command
def wait_cmd(
    round_id: Annotated[int, typer.Argument(metavar="ROUND", help="The round to follow.", min=0, max=MAX_ID)],
    timeout: Annotated[float | None, typer.Option(help="Give up following after this many seconds.", min=0)] = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a round until it ends and print its metrics, as train --wait does (a round started
    earlier, after Ctrl-C or from another shell; one that has ended is reported at once)."""
    from lvlm_studio import jobs

    s = existing_settings()
    try:
        row = jobs.status(s, round_id)
    except jobs.JobError as exc:
        raise CLIError(f"{exc} (see lvlm-studio rounds)") from None
    if not as_json and row["status"] in jobs.ACTIVE:
        typer.echo(f"following round {round_id} ({row['status']}; Ctrl-C stops following, not the round)")
    report_round(round_id, timeout, as_json)


def report_round(round_id: int, timeout: float | None, as_json: bool) -> None:
    """Follow a round (``follow_round``) and print how it ended: its steps, pairs, loss and
    evaluation when done; the reason, with a failing exit code, when not."""
    try:
        row = follow_round(round_id, timeout)
    except StoppedFollowing as exc:  # the round goes on: say which one, in JSON too
        if as_json:
            emit({"ok": False, "round": round_id, "status": exc.row["status"], "error": str(exc)}, True)
        say(f"error: {exc}" if exc.code != 130 else str(exc), err=True)
        raise typer.Exit(exc.code) from None
    summary = round_summary(row)
    ok = row["status"] == "done"
    result = {"ok": ok, "round": round_id, **summary, "metrics": row.get("metrics") or {}}
    if not ok:
        fail(f"round {round_id} {row['status']}: {row.get('error') or 'no reason recorded'}", EXIT_FAILURE, as_json,
             result)

    def human() -> str:
        metrics = row.get("metrics") or {}
        train = metrics.get("train") or {}
        dropped = metrics.get("n_dropped_by_balance")  # why fewer pairs than `train` announced
        if row.get("parent_id") is None and metrics.get("steps") is None:  # round 0: the base model, never trained
            lines = [f"round {round_id} is the base model ({row.get('base_model')}): nothing was trained"]
        else:
            lines = [f"round {round_id} done in {_fmt(summary['seconds'], 1)} s: "
                     f"{counted(metrics.get('steps'), 'step')} on {counted(metrics.get('n_pairs'), 'pair')}"
                     + (f" ({dropped} left out by balance_answers)" if dropped else "")
                     + f", final loss {_fmt(train.get('loss'), 4)}"]
        from lvlm_studio.training import describe_povid_stages

        if stages := describe_povid_stages(metrics.get("povid_stages")):
            lines.append(stages)
        ev = eval_metrics(row)
        if ev:  # its latest evaluation: a later `eval` on another set is what shows
            lines.append(f"evaluated on {evaluation_label(ev)}:")
        lines.append(eval_table(ev) if ev else f"no evaluation: {metrics.get('eval_note', 'no evaluation items')}")
        if ev and metrics.get("eval_note"):
            lines.append(f"note: {metrics['eval_note']}")
        return "\n".join(lines)

    emit(result, as_json, human)


def follow_round(round_id: int, timeout: float | None = None, poll: float = 0.5) -> dict:
    """Poll a round until it ends, drawing its progress; returns the final row."""
    import time

    from tqdm.auto import tqdm

    from lvlm_studio import jobs

    s = settings()
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=100, desc=f"round {round_id}", unit="%", file=sys.stderr, disable=None,
               bar_format="{desc}: {percentage:3.0f}%|{bar}|")
    row: dict = {"status": "unknown"}  # until the first read
    try:
        while True:
            row = jobs.status(s, round_id)
            bar.n = round(100 * float(row.get("progress") or 0.0), 1)
            bar.set_description_str(f"round {round_id} {row['status']}")  # a postfix came out as ", running"
            if row["status"] in jobs.TERMINAL:
                return row
            if deadline is not None and time.monotonic() > deadline:
                raise StoppedFollowing(
                    f"round {round_id} is still {row['status']} after {timeout:g} s; it keeps running in the "
                    f"background (lvlm-studio wait {round_id} / lvlm-studio cancel {round_id})", row)
            time.sleep(poll)
    except KeyboardInterrupt:
        raise StoppedFollowing(f"stopped following; round {round_id} keeps running (lvlm-studio wait {round_id} "
                               f"follows it again, lvlm-studio cancel {round_id} stops it)", row, code=130) from None
    finally:
        bar.close()


class StoppedFollowing(CLIError):
    """``follow_round`` gave up (timeout, Ctrl-C) while the round goes on; ``row`` as last read."""

    def __init__(self, message: str, row: dict, code: int = EXIT_FAILURE):
        super().__init__(message, code)
        self.row = row


@cli_command
def cancel_cmd(
    round_id: Annotated[int, typer.Argument(metavar="ROUND", help="The round to stop.")],
    user: UserOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop before killing it (0: ask and return at once, never kill).", min=0)] = 30.0,
    as_json: JsonOption = False,
) -> None:
    """Cancel a queued or running round (SIGTERM, then SIGKILL after --timeout)."""
    from lvlm_studio.jobs import ACTIVE

    s = studio(existing=True)
    try:
        row = s.get_round(round_id)
        if row is None:
            raise CLIError(f"round {round_id} does not exist (see lvlm-studio rounds)")
        was = row["status"]
        if was in ACTIVE:
            row = s.cancel_round(round_id, user, timeout=timeout)
        else:
            s.require_admin(user, "cancelling a training round")
    finally:
        s.store.close()
    result = {"ok": True, "round": round_id, "was": was, "status": row["status"], "error": row.get("error")}
    if was not in ACTIVE:
        emit(result, as_json, f"round {round_id} is already {was}: nothing to cancel")
    elif row["status"] == "done":  # it finished between the two reads: the cancel came too late
        result.update(ok=False, error=f"round {round_id} finished before the cancel reached it")
        fail(result["error"], EXIT_FAILURE, as_json, result)
    elif row["status"] in ACTIVE:  # the stop signal is sent; the process has not ended yet
        emit(result, as_json, f"round {round_id}: cancel requested, still {row['status']} (see lvlm-studio rounds)")
    else:
        emit(result, as_json, f"round {round_id}: {was} -> {row['status']}")


@cli_command
def rounds_cmd(as_json: JsonOption = False) -> None:
    """Training rounds: lineage, status, progress, evaluation metrics, pairs, times."""
    from lvlm_studio import jobs

    s = existing_settings()
    rows = jobs.refresh(s)  # rounds whose process died are marked failed on the way
    summaries = [round_summary(r) for r in rows]
    if as_json:
        emit({"ok": True, "rounds": [{**sm, "config": r.get("config"), "metrics": r.get("metrics"),
                                      "log": r.get("log_path")} for sm, r in zip(summaries, rows, strict=True)]},
             True)
        return
    if not summaries:
        typer.echo("no rounds yet (lvlm-studio init, then lvlm-studio train)")
        return
    body = [[sm["id"], sm["parent"], sm["status"],
             f"{100 * sm['progress']:.0f}%" if sm["progress"] is not None else None,
             sm["chair_s"], sm["chair_i"], sm["recall"], sm["pope_f1"], sm["eval_set"], sm["pairs"],
             _short_time(sm["created"]), _fmt(sm["seconds"], 0) if sm["seconds"] is not None else None]
            for sm in summaries]
    # The figures are each round's latest evaluation, on the set named ("compare --set" reads two
    # rounds on the same one).
    lines = [table(["id", "parent", "status", "progress", "CHAIR_s", "CHAIR_i", "recall", "POPE F1", "evaluated on",
                    "pairs", "created", "seconds"], body)]
    lines += [f"round {sm['id']}: {sm['error']}" for sm in summaries if sm["status"] == "failed" and sm["error"]]
    say("\n".join(lines))


@cli_command
def compare_cmd(
    a: Annotated[int, typer.Argument(help="Round A (0 = the base model).")],
    b: Annotated[int, typer.Argument(help="Round B.")],
    only_diff: Annotated[bool, typer.Option("--only-diff", help="Only items both rounds answered, differently.")] = False,
    limit: Annotated[int | None, typer.Option(help="Show at most this many items.")] = None,
    evaluation_set: Annotated[str | None, typer.Option("--set", help="The evaluation set to compare on, as lvlm-studio rounds names it (e.g. shapesworld/test, coco/val; a name holding '/', '+' or a quote is quoted, as rounds shows it); default: round B's latest set when A was evaluated on it too, else A's latest when B was, else another set both were evaluated on.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Two rounds' evaluation metrics side by side on one evaluation set, then their answers per
    item (hallucinated objects marked in square brackets)."""
    from lvlm_studio.evaluation import METRIC_LABELS, paired_chair_s_summary, paired_pope_f1_summary

    if limit is not None and limit < 0:
        raise CLIError(f"--limit must be 0 or more, not {limit}", EXIT_USAGE)
    s = studio(existing=True)
    try:
        for rid in (a, b):
            require_round(s.store, rid)
        res = s.compare(a, b, only_diff=only_diff, evaluation_set=evaluation_set)
    finally:
        s.store.close()
    total = len(res["rows"])
    rows = res["rows"][:limit] if limit is not None else res["rows"]
    result = {"ok": True, "a": a, "b": b, "set": res["set"], "sets": res["sets"], "metrics": res["metrics"],
              "common_metrics": res["common_metrics"],
              "paired": res["paired"], "paired_pope": res["paired_pope"], "note": res.get("note"), "items": total,
              "rows": rows}
    if as_json:
        emit(result, True)
        return

    # Figures on two different sets (the note says so) are not a change.
    comparable = res["set"] is not None or not res.get("note")

    def side_by_side(ma: dict, mb: dict) -> str:
        return table(["metric", f"round {a}", f"round {b}", "change"],
                     [[name, ma.get(k), mb.get(k),
                       f"{mb[k] - ma[k]:+.3f}" if comparable and isinstance(ma.get(k), float)
                       and isinstance(mb.get(k), float) else None]
                      for k, name in (*METRIC_LABELS.items(), ("answers", "answers"))])

    lines = [f"on {res['set']}" + (f" (both were also evaluated on: {', '.join(x for x in res['sets'] if x != res['set'])}; "
                                   "--set picks one)" if len(res["sets"]) > 1 else "")] if res["set"] else []
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    lines.append(side_by_side(*res["metrics"]))
    lines += [f"note: round {m['round']}: {m['no_mentions']}" for m in res["metrics"] if m.get("no_mentions")]
    if res["common_metrics"]:
        lines.append(f"these metrics cover different items (the rounds answered different items, or a later, "
                     f"smaller eval replaced one's metrics); on the {res['common_metrics'][0]['answers']} "
                     "items both answered:")
        lines.append(side_by_side(*res["common_metrics"]))
    if res["paired"]:
        lines.append(paired_chair_s_summary(res["paired"], f"round {a}", f"round {b}"))
    if res["paired_pope"]:
        lines.append(paired_pope_f1_summary(res["paired_pope"], f"round {a}", f"round {b}"))
    missing = [rid for rid, answered in zip((a, b), res["answered"], strict=True) if not answered]
    if missing:
        lines.append("no evaluation answers stored for round(s) " + ", ".join(map(str, missing))
                     + ": run lvlm-studio eval --round N (with --dataset D --split S for an imported set)")
    lines.append(f"\n{total} item(s){' both rounds answered, differently' if only_diff else ''}"
                 + (f", showing {len(rows)}" if len(rows) < total else "") + "; [x] = hallucinated object")
    for r in rows:
        lines.append(f"#{r['item_id']} {r.get('prompt') or ''}  (truth: {', '.join(map(str, r.get('objects') or [])) or '-'})")
        lines.append(f"  {a}: {mark_hallucinations(r['a'])}")
        lines.append(f"  {b}: {mark_hallucinations(r['b'])}")
    say("\n".join(lines))


@cli_command
def eval_cmd(
    model: Annotated[str | None, typer.Option(help="Model (default: the round's base model, else $LVLM_STUDIO_MODEL).")] = None,
    dataset: Annotated[str, typer.Option(help="shapesworld (the world's scenes, made as needed) or an imported set with ground-truth objects, e.g. coco.")] = "shapesworld",
    split: Annotated[str, typer.Option(help="Split: the world's test (unbiased) or train; an imported set's own, e.g. val.")] = "test",
    n: Annotated[int | None, typer.Option("--n", help="World scenes (default 500: each a describe item and its POPE probes); of an imported set, its first N images (default: all).", max=MAX_WORLD_SCENES)] = None,
    seed: Annotated[int, typer.Option(help="World seed of the scenes (0: the scenes demo seed adds).", min=0, max=MAX_SEED)] = 0,
    round: Annotated[int, typer.Option(help="Round to evaluate (0 = the base model).", min=0, max=MAX_ID)] = 0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer length limit (greedy decoding); default: the round's own eval_max_new_tokens, else 64.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a round (greedy) on the world's split, or on an imported set with ground-truth
    objects: CHAIR, recall, POPE; stores answers and metrics."""
    from lvlm_studio.service import WORLD_DATASET
    from lvlm_studio.world.scenes import SPLITS

    world = dataset == WORLD_DATASET
    if world and split not in SPLITS:
        raise CLIError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}", EXIT_USAGE)
    for option, value in (("--n", n), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise CLIError(f"{option} must be at least 1, not {value}", EXIT_USAGE)
    s = studio()  # --model is this evaluation's, passed to the call (not round 0's base model)
    try:
        require_round(s.store, round)
        with Progress(f"eval round {round}") as bar:
            res = s.evaluate_on(round, dataset=dataset, split=split, n=n, seed=seed, model=model,
                                max_new_tokens=max_new_tokens, progress=bar)
    finally:
        s.store.close()
    result = {"ok": True, **res}

    def human() -> str:
        where = (f"shapesworld/{split} ({counted(res['metrics']['scenes'], 'scene')}, seed {seed}; "
                 f"{res['added']} items added)" if world
                 else f"{res['metrics'].get('set') or evaluation_set_label([(dataset, split)])} "
                      f"({counted(res['images'], 'image')})")
        note = f"\nnote: {res['metrics']['eval_note']}" if res["metrics"].get("eval_note") else ""
        return (f"round {round} on {res['items']} items of {where}, model {res['metrics'].get('model')}\n"
                + eval_table(res["metrics"]) + note)

    emit(result, as_json, human)


@cli_command
def pope_cmd(
    dataset: Annotated[str, typer.Option(help="Dataset of the evaluation set, e.g. coco.")],
    split: Annotated[str, typer.Option(help="Its split, e.g. val.")],
    strategy: Annotated[str, typer.Option(help="How absent objects are drawn: random, popular or adversarial.")] = "adversarial",
    images: Annotated[int, typer.Option(help="Images to ask about (POPE: 500), drawn with --seed among those with enough objects.")] = 500,
    per_image: Annotated[int, typer.Option(help="Present objects asked per image, and as many absent ones (POPE: 3).")] = 3,
    min_objects: Annotated[int, typer.Option(help="Fewest ground-truth objects an image needs (POPE: 3).")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the image and object draws.", min=0, max=MAX_SEED)] = 0,
    user: UserOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add POPE probes ("Is there a {object} in the image?", yes/no) to an imported set with
    ground-truth objects, so that rounds evaluated on it report POPE beside CHAIR."""
    from lvlm_studio.service import POPE_STRATEGIES

    if strategy not in POPE_STRATEGIES:  # bad option values are usage errors (exit 2), as elsewhere
        raise CLIError(f"unknown POPE strategy {strategy!r}; choose one of {', '.join(POPE_STRATEGIES)}", EXIT_USAGE)
    for option, value in (("--images", images), ("--per-image", per_image), ("--min-objects", min_objects)):
        if value < 1:
            raise CLIError(f"{option} must be at least 1, not {value}", EXIT_USAGE)
    res = studio_call(lambda s: s.add_pope_probes(dataset, split, strategy=strategy, per_image=per_image,
                                                  images=images, seed=seed, min_objects=min_objects, user=user))
    emit({"ok": True, **res}, as_json, lambda: (
        f"{res['probes']} {strategy} POPE probes ({res['yes']} yes) on {counted(res['images'], 'image')} of {dataset}/{split} "
        f"({res['eligible_images']} with {min_objects}+ objects, {res['extractor']} vocabulary); {res['added']} new items"
        + (f"\nnote: {res['note']}" if res["note"] else "")))


# ------------------------------------------------------------------------------ serve
@cli_command
def serve_cmd(
    host: Annotated[str | None, typer.Option(help="Bind address (default $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 on a Space).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default $PORT / $GRADIO_SERVER_PORT, else 7860).", min=1, max=65535)] = None,
    share: Annotated[bool, typer.Option("--share", help="Also open a public gradio.live link.")] = False,
    seed: Annotated[bool, typer.Option("--seed/--no-seed", help="Seed the demo world on a new data root (and complete a seeding that was interrupted).")] = True,
    as_json: JsonOption = False,
) -> None:
    """Launch the Gradio app (as app.py does) and serve until Ctrl-C."""
    from lvlm_studio.ui import launch

    host, port = listen_address(host, port)
    s = studio()
    if seed:
        from lvlm_studio.service import seed_announcement

        if (line := seed_announcement(s.seed_demo())) and not as_json:
            typer.echo(line)
    s.reattach()  # rounds whose process died while nothing was watching are marked failed
    demo, url = launch(s, server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                       quiet=as_json)
    emit({"ok": True, "url": url, "share_url": getattr(demo, "share_url", None), "host": host, "port": port,
          "auth": s.auth_summary()}, as_json, f"LVLM Studio on {url} ({s.auth_summary()}); Ctrl-C stops it")
    sys.stdout.flush()
    try:
        demo.block_thread()
    finally:
        s.store.close()


# ------------------------------------------------------------------------------ registration
def _register() -> None:
    """All commands and sub-apps, in one place. Add new ones here."""
    app.command("init")(init_cmd)
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)
    app.command("stats")(stats_cmd)
    demo_app.command("build")(demo_build_cmd)
    demo_app.command("seed")(demo_seed_cmd)
    app.add_typer(demo_app, name="demo")
    app.command("generate")(generate_cmd)
    app.command("train")(train_cmd)
    app.command("cancel")(cancel_cmd)
    app.command("rounds")(rounds_cmd)
    app.command("wait")(wait_cmd)
    app.command("compare")(compare_cmd)
    app.command("eval")(eval_cmd)
    app.command("pope")(pope_cmd)
    app.command("serve")(serve_cmd)
    for name, command in (("next", review_next_cmd), ("show", review_show_cmd), ("decide", review_decide_cmd),
                          ("undo", review_undo_cmd), ("progress", review_progress_cmd),
                          ("agreement", review_agreement_cmd)):
        review_app.command(name)(command)
    app.add_typer(review_app, name="review")


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``lvlm-studio``) and ``python -m lvlm_studio``."""
    if not sys.stderr.isatty():
        # the libraries' own bars (transformers' "Loading weights", datasets' "Saving the dataset")
        # follow ours: none in a pipe or a log; set before they are imported, which read it once
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = list(argv if argv is not None else sys.argv[1:])
    as_json = "--json" in args
    # The parser's usage errors (an unknown option or command, a value out of range) are printed
    # here, as every other failure is: one 'error:' line (click draws a box for them itself in
    # standalone mode), and with --json the JSON error object on stdout.
    from typer.exceptions import TyperException  # typer >= 0.27.2: its own click's errors derive from it

    try:
        code = app(args=args, prog_name="lvlm-studio", standalone_mode=False)
    except TyperException as exc:  # UsageError, BadParameter, NoSuchOption, ...
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group named alone: its help (rich printed it already)
            if message := exc.format_message():
                typer.echo(message)
            sys.exit(exc.exit_code)
        show_failure(exc.format_message(), as_json=as_json)
        if not as_json and ctx is not None:
            say(f"(see {ctx.command_path} --help)", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        say("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
