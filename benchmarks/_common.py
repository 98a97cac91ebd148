"""Shared helpers of the benchmark scripts: thread setup, model loading, world items, the exact
hallucination count of the ShapesWorld ground truth, tables and the final JSON line.

Every benchmark prints a small human table and, as its last stdout line, one JSON object
(``{"benchmark": ..., ...}``) so that a caller can ``tail -n 1`` it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARED_CORES_NOTE = (
    "note: timings on a shared CPU; other processes may be using the same cores, so absolute "
    "figures are noisy (ratios measured back to back are steadier)"
)


def setup_torch(threads: int) -> dict[str, Any]:
    """Pin torch's intra-op threads (the machine's cores are shared) and return a host record."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return {
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def load_models(model_ref: str = "demo", clip_ref: str | None = "demo", device: str = "cpu"):
    """(backend, scorer) through the project's one factory. ``model_ref``/``clip_ref``: "demo"
    (the ShapesWorld artifacts) or a local directory. ``clip_ref`` None gives no scorer."""
    from lvlm_studio.models.registry import load_backend, load_clip

    backend = load_backend(model_ref, device=device, dtype="float32")
    scorer = load_clip(clip_ref, device=device) if clip_ref else None
    return backend, scorer


def describe_items(n: int, split: str = "test", seed: int = 0, start: int = 0) -> list[dict]:
    """``n`` ShapesWorld "Describe the image." items (one per scene) with their ground truth."""
    from lvlm_studio.world import world_items

    return world_items(split, n, seed=seed, kinds=("describe",), start=start)


def scene_key(item: dict) -> str:
    """A stable image key for a world item (split/seed/index), for the CLIP embedding cache."""
    scene = item["meta"]["scene"]
    return f"shapesworld/{scene['split']}/{scene['seed']}/{scene['index']}"


_EXTRACTOR = None


def world_extractor():
    global _EXTRACTOR
    if _EXTRACTOR is None:
        from lvlm_studio.evaluation import ShapesWorldExtractor

        _EXTRACTOR = ShapesWorldExtractor.from_world()
    return _EXTRACTOR


def hallucinations(text: str, objects: Iterable[Any]) -> int:
    """Hallucinated object mentions of ``text`` (every occurrence; CHAIR_i's numerator): mentioned
    "<colour> <shape>" objects that are not among the scene's drawn ``objects``."""
    from lvlm_studio.evaluation import score_caption

    return len(score_caption(text, objects, world_extractor()).hallucinated)


def recalled(text: str, objects: Iterable[Any]) -> int:
    """Ground-truth objects the text mentions at least once (to show CHAIR is not won by silence)."""
    from lvlm_studio.evaluation import score_caption

    return len(score_caption(text, objects, world_extractor()).recalled)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(h) for h in headers]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit_json(record: dict[str, Any]) -> None:
    """The machine-readable last line."""
    print(json.dumps(record, sort_keys=True, default=str), flush=True)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
