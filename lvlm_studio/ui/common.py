"""Small helpers shared by the tabs: error mapping, choices, tables."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr

from lvlm_studio.service import Studio

# The project's own error classes a user's input can raise (by name: importing them all here would
# load torch-side modules at UI import time). Subclasses count (RoundBusyError is a JobError).
_USER_ERROR_NAMES = frozenset({
    "StoreError", "NotFoundError", "ImageRejected", "DataImportError", "DataExportError", "UnsafePathError",
    "ModelLoadError", "MissingDependencyError", "JobError",
})


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
            raise gr.Error(f"Not allowed: {exc}") from exc
        except (ValueError, LookupError, TypeError) as exc:
            raise gr.Error(str(exc)) from exc
        except Exception as exc:  # store, job and model errors: say what failed
            if any(cls.__name__ in _USER_ERROR_NAMES for cls in type(exc).__mro__):
                raise gr.Error(str(exc)) from exc
            raise

    return wrapper


def round_choices(studio: Studio, with_all: bool = False, done_only: bool = False) -> list[tuple[str, str]]:
    out = [("all rounds", "all")] if with_all else []
    for r in studio.rounds():
        if done_only and r["status"] != "done":
            continue
        name = "round 0 (base model)" if r["id"] == 0 else f"round {r['id']} ({r['status']})"
        out.append((name, str(r["id"])))
    return out


def parse_round(value: Any) -> int | None:
    if value in (None, "", "all"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):  # the dropdowns accept typed values
        raise ValueError(f"no round {str(value)[:40]!r}: pick a round from the list (a round number)") from None
