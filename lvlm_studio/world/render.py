"""Render a ShapesWorld scene to a small RGB image (deterministic: the scene holds all jitter)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from .scenes import Scene, WorldObject
from .vocab import SIZES

REFERENCE_SIZE = 64  # SIZES are diameters at this resolution


def _draw(draw: ImageDraw.ImageDraw, obj: WorldObject, image_size: int) -> None:
    cell = image_size / 3
    row, col = obj.cell
    f = image_size / REFERENCE_SIZE
    cx = (col + 0.5) * cell + obj.dx * f
    cy = (row + 0.5) * cell + obj.dy * f
    r = SIZES[obj.size] * obj.scale * f / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = tuple(obj.rgb)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        # A square of the same area feel as the circle reads as "bigger"; shrink slightly.
        s = r * 0.88
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # pragma: no cover - vocabulary guards this
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, image_size: int = REFERENCE_SIZE) -> Image.Image:
    """The scene's drawn objects on a plain background (``mentioned_only`` objects are NOT drawn)."""
    bg = scene.background
    image = Image.new("RGB", (image_size, image_size), (bg, bg, bg))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, image_size)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding without metadata (byte-equal for equal pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
