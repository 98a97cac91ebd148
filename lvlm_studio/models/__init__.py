"""Model layer: the backend protocol, the transformers / vLLM backends, the CLIP scorer, the factory.

Only the protocol is imported eagerly; backends (torch, transformers, open_clip) load on first use,
so modules that need just the types (methods, store) stay light.
"""

from __future__ import annotations

from typing import Any

from .base import (
    GenerationParams,
    GenerationRecord,
    MissingDependencyError,
    ModelLoadError,
    Prefix,
    Sequence,
    VLMBackend,
)

_LAZY = {
    "HFBackend": ".hf",
    "VLLMBackend": ".vllm_backend",
    "ClipScorer": ".clip",
    "load_backend": ".registry",
    "load_clip": ".registry",
    "clear_cache": ".registry",
}

__all__ = [
    "GenerationParams",
    "GenerationRecord",
    "MissingDependencyError",
    "ModelLoadError",
    "Prefix",
    "Sequence",
    "VLMBackend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
