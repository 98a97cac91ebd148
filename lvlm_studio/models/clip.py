"""open_clip scorer: image–sentence relevance as 100 × cosine similarity (CSR's image reward).

CSR's reference code re-encodes the image for every sentence; here an image is embedded once per
``image_key`` (the image's sha256, as the store keys images) and kept in a small LRU cache, and
sentences are embedded in batches. Texts longer than the model's context (77 tokens for OpenAI CLIP)
are truncated by open_clip's tokenizer (the last kept position becomes the end token) instead of
crashing, as the CSR paper's scorer requires.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from ..config import resolve_device
from .base import ModelLoadError

DEMO_CLIP_DIR = Path(__file__).resolve().parent.parent / "world" / "artifacts" / "clip"


class ClipScorer:
    def __init__(self, model, preprocess, tokenizer, model_id: str, device: str = "cpu",
                 cache_size: int = 512, batch_size: int = 64):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_encodes = 0  # how many times an image went through the vision tower
        self._dtype = next(self.model.parameters()).dtype

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @classmethod
    def from_ref(cls, ref: str, device: str = "auto") -> ClipScorer:
        """``ref``: "demo" (the ShapesWorld CLIP), "Name:pretrained_tag" (e.g.
        "ViT-B-32:laion2b_s34b_b79k"), a bare open_clip model name (its first pretrained tag), a
        local directory in open_clip's layout (open_clip_config.json + open_clip_model.safetensors),
        "local-dir:PATH" or "hf-hub:org/name"."""
        import open_clip

        device = resolve_device(device)
        name, pretrained = _resolve_ref(ref)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip raises RuntimeError/FileNotFoundError/ValueError/HTTP errors
            raise ModelLoadError(
                f"Could not load the CLIP model {ref!r} (open_clip name {name!r}, pretrained {pretrained!r}): "
                f"{_one_line(exc)}. Without internet only local directories and already-downloaded "
                "weights load; use 'demo' or a local open_clip directory."
            ) from exc
        return cls(model, preprocess, tokenizer, str(ref), device)

    @torch.no_grad()
    def embed_image(self, image: Image.Image, image_key: str | None = None) -> torch.Tensor:
        """Unit-norm image embedding (1-D), cached under ``image_key`` when given."""
        if image_key is not None and image_key in self._image_cache:
            self._image_cache.move_to_end(image_key)
            return self._image_cache[image_key]
        # cast to the model's dtype: a half-precision CLIP (precision='bf16'/'fp16') rejects fp32 pixels
        pixels = self.preprocess(image.convert("RGB")).unsqueeze(0).to(self.device, dtype=self._dtype)
        emb = self.model.encode_image(pixels).float()[0]
        self.image_encodes += 1
        emb = emb / emb.norm().clamp(min=1e-12)
        if image_key is not None:
            self._image_cache[image_key] = emb
            while len(self._image_cache) > self.cache_size:
                self._image_cache.popitem(last=False)
        return emb

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (len(texts), D), in batches of ``batch_size``."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            emb = self.model.encode_text(tokens).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        return torch.cat(out) if out else torch.empty(0)

    def score(self, image: Image.Image, texts: list[str], image_key: str | None = None) -> list[float]:
        """100 · cos(image, text) for each text (not clipped at 0: the caller decides)."""
        if not texts:
            return []
        img = self.embed_image(image, image_key)
        return (100.0 * self.embed_texts(texts) @ img).tolist()


def _resolve_ref(ref: str) -> tuple[str, str | None]:
    """(open_clip model name with schema, pretrained tag or None)."""
    import open_clip

    if ref == "demo":
        if not (DEMO_CLIP_DIR / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"The demo CLIP is not built yet (no {DEMO_CLIP_DIR / 'open_clip_config.json'}). "
                "Build it with: lvlm-studio demo build"
            )
        return _local_dir_ref(DEMO_CLIP_DIR, ref), None
    if ref.startswith("hf-hub:"):
        return ref, None
    if ref.startswith("local-dir:"):
        return _local_dir_ref(Path(ref.removeprefix("local-dir:")), ref), None
    if Path(ref).is_dir():
        return _local_dir_ref(Path(ref), ref), None
    name, _, tag = ref.partition(":")
    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"Unknown CLIP reference {ref!r}: not 'demo', not a local directory, not 'hf-hub:…' and not an "
            f"open_clip model name (e.g. 'ViT-B-32:laion2b_s34b_b79k'; see open_clip.list_pretrained())."
        )
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise ModelLoadError(f"open_clip model {name!r} has no pretrained weights; give 'NAME:TAG'.")
        tag = tags[0]
    return name, tag


def _local_dir_ref(path: Path, ref: str) -> str:
    """``local-dir:`` reference for an open_clip directory that has both config and weights.

    open_clip builds a randomly initialised model (and only logs it) when the directory has a
    config but no checkpoint: CSR's image reward would then be noise, so refuse up front.
    """
    if not path.is_dir():
        raise ModelLoadError(f"CLIP directory {ref!r} does not exist.")
    if not (path / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"{ref!r} is a directory but not an open_clip model: it has no open_clip_config.json "
            "(expected open_clip's local-dir layout: open_clip_config.json + open_clip_model.safetensors)."
        )
    if not any(f.is_file() for pattern in _CLIP_WEIGHT_PATTERNS for f in path.glob(pattern)):
        raise ModelLoadError(
            f"{ref!r} has open_clip_config.json but no weights (no *.safetensors, *.bin or *.pth): "
            "open_clip would silently build a randomly initialised model."
        )
    return f"local-dir:{path.resolve()}"


# The files open_clip's local-dir loader looks for (open_clip.factory._find_checkpoint_in_dir).
_CLIP_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]
