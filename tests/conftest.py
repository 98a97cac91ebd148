"""Shared fixtures: a temporary data root, settings, a store, and image/pair factories."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlm_studio.config import Settings
from lvlm_studio.store import Store

REPO_ROOT = Path(__file__).resolve().parent.parent
# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json): an assistant turn ends with a bare
# " ", no EOS; no system branch of its own (a system turn's text is written as is).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.fixture(scope="session", autouse=True)
def _session_environment(tmp_path_factory):
    """For every test: a data root that is never the repo's storage/ (a test that forgets to ask for
    ``home`` writes under a temporary folder), and one torch thread in round subprocesses (they
    share the machine's cores with the test process)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LVLM_STUDIO_HOME", str(tmp_path_factory.mktemp("default-home")))
        m.setenv("LVLM_STUDIO_THREADS", "1")
        yield


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh data root; LVLM_STUDIO_HOME points at it for the test's duration."""
    path = tmp_path / "home"
    monkeypatch.setenv("LVLM_STUDIO_HOME", str(path))
    return path


@pytest.fixture
def settings(home) -> Settings:
    return Settings().ensure_dirs()


@pytest.fixture
def store(settings):
    s = Store(settings.db_path)
    yield s
    s.close()


def noise_image(seed: int = 0, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    """A deterministic random image (distinct seeds → distinct pixels)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def image_bytes(
    seed: int = 0, fmt: str = "JPEG", size: tuple[int, int] = (32, 24), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed, size, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int = 0, fmt: str | None = None, size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    path.write_bytes(image_bytes(seed, fmt, size))
    return path


def write_coco(root: Path, objects: list[list[str]], split: str = "val2017") -> Path:
    """A COCO-style set under ``root`` (annotations/ + images): image i+1 holds ``objects[i]`` as
    instance annotations and one caption."""
    names = sorted({o for objs in objects for o in objs})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    images, captions, instances = [], [], []
    for i, objs in enumerate(objects, start=1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": 32, "height": 24})
        write_image(root / split / f"{i:06d}.jpg", seed=1000 + i)
        captions.append({"id": i, "image_id": i, "caption": f"A picture of a {objs[0] if objs else 'room'}."})
        instances += [{"id": 100 * i + j, "image_id": i, "category_id": names.index(o) + 1}
                      for j, o in enumerate(objs)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "categories": categories, "annotations": instances}))
    return root


def huge_png_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of width×height pixels that compresses to ~100 KB: a
    decompression bomb (decoding it would allocate width·height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture
def make_items(store, settings):
    """Factory: ``make_items(n, seed0=0, dataset="default")`` → item ids, each on its own stored
    image (real files under the data root)."""
    from lvlm_studio.media import ingest_image

    def make(
        n: int, seed0: int = 0, dataset: str = "default", prompt: str = "Describe the image."
    ) -> list[int]:
        ids = []
        for k in range(n):
            rec = ingest_image(settings, image_bytes(seed0 + k, "PNG"), name=f"img{seed0 + k}.png")
            store.add_image(rec.id, rec.path, rec.width, rec.height, "test", objects=["circle"])
            ids.append(store.add_item(rec.id, prompt, reference=f"reference {seed0 + k}", dataset=dataset))
        return ids

    return make


@pytest.fixture
def make_pairs(store, make_items):
    """Factory: ``make_pairs(margins, method="csr", round=0)`` → pair ids, one new item per
    margin; the chosen text is "There is a red circle {k}.", the rejected "There is a blue star {k}."."""

    counter = {"next": 0}  # successive calls use new images, hence new items

    def make(margins, method: str = "csr", round: int = 0) -> list[int]:
        pair_ids = []
        seed0 = counter["next"]
        counter["next"] += len(margins)
        items = make_items(len(margins), seed0=1000 + seed0)
        for k, (item_id, margin) in enumerate(zip(items, margins, strict=True), start=seed0):
            chosen, rejected = f"There is a red circle {k}.", f"There is a blue star {k}."
            store.write_generation(
                item_id,
                [
                    {"text": chosen, "source": "csr", "model": "m", "round": round},
                    {"text": rejected, "source": "csr", "model": "m", "round": round},
                ],
                [{"chosen": 0, "rejected": 1, "method": method, "margin": margin, "round": round}],
            )
            pair_ids.append(store.find_pair(item_id, chosen, rejected, method))
        return pair_ids

    return make


@pytest.fixture(scope="session")
def train_scenes():
    """3000 ShapesWorld TRAIN scenes (seed 0), shared by the world tests."""
    from lvlm_studio.world import sample_scenes
    return sample_scenes("train", 3000, seed=0)


@pytest.fixture(scope="session")
def test_scenes():
    """3000 unbiased TEST scenes (seed 0)."""
    from lvlm_studio.world import sample_scenes
    return sample_scenes("test", 3000, seed=0)
