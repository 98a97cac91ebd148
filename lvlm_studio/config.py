"""Settings: where data lives and which models are used.

The data root defaults to ./storage and is overridden by the LVLM_STUDIO_HOME environment
variable (tests always point it at a temporary directory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOME = Path("storage")
# A decompression-bomb guard: 40 megapixels covers any real photo (a 24 MP camera is 6000x4000).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 16_384
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
BACKENDS = ("hf", "vllm")
QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes loading (models.hf.quantization_config)


@dataclass
class Settings:
    home: Path = field(default_factory=lambda: Path(os.environ.get("LVLM_STUDIO_HOME", DEFAULT_HOME)))
    model: str = field(default_factory=lambda: os.environ.get("LVLM_STUDIO_MODEL", "demo"))
    clip: str = field(default_factory=lambda: os.environ.get("LVLM_STUDIO_CLIP", "demo"))
    device: str = field(default_factory=lambda: os.environ.get("LVLM_STUDIO_DEVICE", "auto"))
    # Which library generates for the app, the CLI and the service: "hf" (transformers, default) or
    # "vllm" (CUDA only, an optional extra). Round jobs train and evaluate with transformers.
    backend: str = field(default_factory=lambda: os.environ.get("LVLM_STUDIO_BACKEND", "hf"))
    max_pixels: int = field(
        default_factory=lambda: int(os.environ.get("LVLM_STUDIO_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    )
    max_side: int = DEFAULT_MAX_SIDE
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        self.home = Path(self.home)
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

    def ensure_dirs(self) -> Settings:
        for path in (self.home, self.images_dir, self.adapters_dir, self.runs_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self


def round_dirname(round_id: int) -> str:
    """A round's folder under adapters/, runs/ and merged/: round-N."""
    return f"round-{int(round_id)}"


def resolve_device(device: str = "auto") -> str:
    """'auto' picks cuda when present, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
