"""Settings: where data lives and which models are used.

The data root defaults to ./storage and is overridden by the LVLM_STUDIO_HOME environment
variable (tests always point it at a temporary directory).
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HOME = Path("storage")
# A decompression-bomb guard: 40 megapixels covers any real photo (a 24 MP camera is 6000x4000).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 16_384
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
BACKENDS = ("hf", "vllm")
# Seeds reach torch's Generator.manual_seed (at most 64 bits) after item ids and draw offsets are
# added to them (2**70 failed there with "Overflow when unpacking long long"); 32 bits leaves every
# such sum in range. The CLI's --seed options and the service check it.
MAX_SEED = 2**32 - 1
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER: pair, item and round ids
# World scenes one call renders into the store (per split): the README's evaluations use 500 and
# docs/EXPERIMENTS.md 2000; 100 million (a typo) used to build a list of every index first and
# grow by about 250 MB/s with no output.
MAX_WORLD_SCENES = 20_000
QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes loading (models.hf.quantization_config)


def _env_count(name: str, default: int) -> int:
    """A positive whole number from the environment variable ``name``, or a message naming it."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)  # int() allows surrounding spaces and 40_000_000
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive whole number (e.g. {default}), not {raw!r}")
    return value


def model_image_pixels() -> int | None:
    """``LVLM_STUDIO_MODEL_IMAGE_PIXELS``: at most this many pixels of an image reach a
    dynamic-resolution model (Qwen2-VL / Qwen2.5-VL: one token per 28×28 pixels, so 1,003,520 is
    about 1280 tokens). Unset: the model processor's own limit (Qwen2.5-VL's Hub configuration
    allows 12.8 MP, about 16k tokens per image). Fixed-resolution models ignore it."""
    if not os.environ.get("LVLM_STUDIO_MODEL_IMAGE_PIXELS", "").strip():
        return None
    return _env_count("LVLM_STUDIO_MODEL_IMAGE_PIXELS", 1_003_520)


def listen_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """Where the app listens: the given host and port, else ``GRADIO_SERVER_NAME`` (127.0.0.1;
    0.0.0.0 on a Space, where ``SPACE_ID`` is set) and ``PORT`` (a Space's or a PaaS's), then
    ``GRADIO_SERVER_PORT``, then 7860."""
    if not host:
        host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    source = "the port"
    if port is None:
        source = "PORT" if (os.environ.get("PORT") or "").strip() else "GRADIO_SERVER_PORT"
        port = _env_count(source, 7860)
    if not 0 < port < 65536:
        raise ValueError(f"{source} must be in 1..65535, not {port}")
    return host, port


def debug_enabled() -> bool:
    """``LVLM_STUDIO_DEBUG`` set to anything but empty, 0, false or no: show tracebacks."""
    return os.environ.get("LVLM_STUDIO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _env(name: str, default: str) -> str:
    """A setting from the environment; set but empty (``LVLM_STUDIO_HOME=``) is the default, not ""
    (an empty home was the working directory: the store landed wherever the command ran)."""
    return os.environ.get(name, "").strip() or default


@dataclass
class Settings:
    home: Path = field(default_factory=lambda: Path(_env("LVLM_STUDIO_HOME", str(DEFAULT_HOME))))
    model: str = field(default_factory=lambda: _env("LVLM_STUDIO_MODEL", "demo"))
    clip: str = field(default_factory=lambda: _env("LVLM_STUDIO_CLIP", "demo"))
    device: str = field(default_factory=lambda: _env("LVLM_STUDIO_DEVICE", "auto"))
    # Which library generates for the app, the CLI and the service: "hf" (transformers, default) or
    # "vllm" (CUDA only, an optional extra). Round jobs train and evaluate with transformers.
    backend: str = field(default_factory=lambda: _env("LVLM_STUDIO_BACKEND", "hf"))
    max_pixels: int = field(default_factory=lambda: _env_count("LVLM_STUDIO_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    max_side: int = DEFAULT_MAX_SIDE
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        # Absolute, so the paths the store keeps (adapters, logs) stay valid from any working
        # directory (the round job, the app and the CLI may start in different ones).
        self.home = Path(os.path.abspath(Path(self.home).expanduser()))
        if self.backend not in BACKENDS:
            raise ValueError(f"LVLM_STUDIO_BACKEND must be one of {', '.join(BACKENDS)}, not {self.backend!r}")

    @property
    def db_path(self) -> Path:
        return self.home / "studio.db"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def check_home(self) -> Settings:
        """Refuse a data root that is a file (a folder that does not exist yet is fine)."""
        if self.home.exists() and not self.home.is_dir():
            raise ValueError(f"the data root {self.home} is a file, not a folder (LVLM_STUDIO_HOME)")
        return self

    def ensure_dirs(self) -> Settings:
        self.check_home()
        for path in (self.home, self.images_dir, self.adapters_dir, self.runs_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self


@contextlib.contextmanager
def data_root_lock(settings: Settings, name: str) -> collections.abc.Iterator[None]:
    """An exclusive lock on the file ``name`` in the data root, across processes (fcntl; the OS
    releases it when a process dies): two starts cannot both pass a check-then-create."""
    import fcntl

    settings.ensure_dirs()
    with open(settings.home / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def process_gone(pid: int) -> bool:
    """Has process ``pid`` exited (no such process)? Another user's process is not gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process; a number no pid can be
        return False
    return False


def remove_dead_scratch(folder: Path, prefix: str) -> None:
    """Remove the scratch folders ``<prefix><pid>[-...]`` in ``folder`` whose writing process is gone
    (killed mid-save: a merged model can be GBs); this process's own and live writers' stay."""
    import glob
    import shutil

    with contextlib.suppress(OSError):
        for entry in Path(folder).glob(f"{glob.escape(prefix)}*"):
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and process_gone(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def counted(n: Any, noun: str) -> str:
    """'1 item', '3 items' (a count that is not a number is shown as it is): the CLI's, the app's
    and the round log's wording."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def round_dirname(round_id: int) -> str:
    """A round's folder under adapters/, runs/ and merged/: round-N."""
    return f"round-{int(round_id)}"


def resolve_device(device: str = "auto") -> str:
    """'auto' picks cuda when present, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- options checked against config dataclasses (CLI key=value, app JSON) -----------------------
def matches_type(value: Any, hint: Any) -> bool:
    """Does a JSON-decoded ``value`` fit the type ``hint`` (lenient where the hint is exotic)?"""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and (len(args) != 1 or all(matches_type(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def check_option_types(cls: type, values: dict[str, Any], option: str) -> dict[str, Any]:
    """Check options (JSON-decoded values) against a config dataclass's field types: a string where
    a number belongs must fail here with its name, not minutes later in a background job or as a
    comparison error deep in a method. Lists become tuples where the field is a tuple. The CLI's
    ``key=value`` options and the app's JSON parameters both go through it."""
    import math
    import typing

    if not isinstance(values, dict):
        raise ValueError(f"{option}s must be a JSON object of name: value, not {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        hint = hints.get(key, Any)
        if isinstance(value, float) and not math.isfinite(value):  # JSON's 1e999 decodes to inf
            raise ValueError(f"{option} {key}={value}: expected a finite number")
        if not matches_type(value, hint):
            if typing.get_origin(hint) is typing.Literal:
                shown = "one of " + ", ".join(json.dumps(a) for a in typing.get_args(hint))
            else:
                shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise ValueError(f"{option} {key}={json.dumps(value, default=str)}: expected {shown}")
        if isinstance(value, list) and (typing.get_origin(hint) is tuple or any(
                typing.get_origin(a) is tuple for a in typing.get_args(hint))):
            out[key] = tuple(value)
    return out
