"""ClipScorer over a tiny random open_clip CLIP saved in open_clip's local-dir layout."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from PIL import Image

from lvlm_studio.models import clip as clip_mod
from lvlm_studio.models.base import ModelLoadError
from lvlm_studio.models.clip import ClipScorer

torch.set_num_threads(1)
CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


def save_tiny_clip(path):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**CFG)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), path / "open_clip_model.safetensors")
    cfg = {"model_cfg": CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture()
def scorer(clip_dir):
    return ClipScorer.from_ref(str(clip_dir), device="cpu")


def img(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((30, 40, 3)) * 255).astype("uint8"))


def test_score_is_100_cos(scorer):
    texts = ["a red circle", "a blue square at the top left", "two green stars"]
    got = scorer.score(img(0), texts)
    with torch.no_grad():
        ie = scorer.model.encode_image(scorer.preprocess(img(0)).unsqueeze(0))
        te = scorer.model.encode_text(open_clip.tokenize(texts, context_length=16))
    want = (100 * torch.nn.functional.cosine_similarity(te, ie)).tolist()
    assert got == pytest.approx(want, abs=1e-3)
    assert len(set(round(g, 4) for g in got)) == 3
    assert scorer.score(img(0), []) == []


def test_local_dir_prefix_and_batching(clip_dir, scorer):
    other = ClipScorer.from_ref(f"local-dir:{clip_dir}", device="cpu")
    texts = [f"there is a small {c} circle" for c in ["red", "green", "blue", "yellow", "purple"]]
    other.batch_size = 2
    assert other.score(img(1), texts) == pytest.approx(scorer.score(img(1), texts), abs=1e-4)


def test_image_embedding_cache(scorer):
    scorer.cache_size = 2
    scorer.score(img(0), ["a"], image_key="k0")
    scorer.score(img(0), ["b"], image_key="k0")
    assert scorer.image_encodes == 1
    scorer.score(img(0), ["a"])
    scorer.score(img(0), ["a"])
    assert scorer.image_encodes == 3  # no key, no cache
    scorer.score(img(1), ["a"], image_key="k1")
    scorer.score(img(2), ["a"], image_key="k2")  # evicts k0 (least recently used)
    assert list(scorer._image_cache) == ["k1", "k2"]
    scorer.score(img(0), ["a"], image_key="k0")
    assert scorer.image_encodes == 6
    # a cached embedding gives exactly the uncached score
    assert scorer.score(img(1), ["a red circle"], image_key="k1") == pytest.approx(scorer.score(img(1), ["a red circle"]))


def test_overlong_text_is_truncated(scorer):
    long = "there is a small red circle at the top left " * 30
    assert scorer.context_length == 16
    tokens = scorer.tokenizer([long])
    assert tokens.shape == (1, 16) and int(tokens[0, -1]) == scorer.tokenizer.eot_token_id
    (s,) = scorer.score(img(0), [long])
    assert np.isfinite(s)
    # truncation keeps the start: same as the text cut to its first 14 BPE tokens + end token
    assert s == pytest.approx(scorer.score(img(0), ["there is a small red circle at the top left there is a small red"])[0], abs=1e-3)


def test_refs_and_errors(clip_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_mod, "DEMO_CLIP_DIR", tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="lvlm-studio demo build"):
        ClipScorer.from_ref("demo")
    monkeypatch.setattr(clip_mod, "DEMO_CLIP_DIR", clip_dir)
    assert ClipScorer.from_ref("demo", device="cpu").score(img(0), ["a"])
    with pytest.raises(ModelLoadError, match="Unknown CLIP reference"):
        ClipScorer.from_ref("no-such-clip-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        ClipScorer.from_ref(str(tmp_path / "empty"))
    assert clip_mod._resolve_ref("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert clip_mod._resolve_ref("hf-hub:org/name") == ("hf-hub:org/name", None)


# ---- pinned by a mutation audit of models/clip.py -------------------------------------------------
def test_image_cache_evicts_the_least_recently_used(scorer):
    """A cache hit refreshes the key; unkeyed images are never cached."""
    scorer.cache_size = 2
    scorer.score(img(0), ["a"], image_key="k0")
    scorer.score(img(1), ["a"], image_key="k1")
    scorer.score(img(0), ["a"], image_key="k0")  # k0 is now the most recent
    scorer.score(img(2), ["a"], image_key="k2")  # evicts k1, not k0
    assert list(scorer._image_cache) == ["k0", "k2"]
    assert scorer.image_encodes == 3
    scorer.score(img(3), ["a"])
    assert list(scorer._image_cache) == ["k0", "k2"]


def test_scores_are_deterministic_even_for_a_model_handed_over_in_train_mode():
    """The scorer puts its model in eval mode: with patch dropout (active only in training) the
    same image and text always score the same."""
    torch.manual_seed(0)
    cfg = {**CFG, "vision_cfg": {**CFG["vision_cfg"], "patch_dropout": 0.5}}
    model = open_clip.model.CLIP(**cfg).train()
    preprocess = open_clip.image_transform(32, is_train=False, mean=[0.5] * 3, std=[0.5] * 3)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    scorer = ClipScorer(model, preprocess, tokenizer, "tiny-dropout")
    scores = [scorer.score(img(0), ["a red circle", "a blue square"]) for _ in range(4)]
    assert all(s == scores[0] for s in scores)
    assert not scorer.model.training


def test_embed_texts_unit_rows_and_empty(scorer):
    scorer.batch_size = 2
    emb = scorer.embed_texts(["a", "b c", "d", "e f g", "h"])
    assert emb.shape[0] == 5
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert scorer.embed_texts([]).numel() == 0


def test_from_ref_defaults_to_an_available_device_and_keeps_the_ref_as_id(clip_dir):
    scorer = ClipScorer.from_ref(str(clip_dir))  # device "auto"
    assert scorer.model_id == str(clip_dir)
    assert str(scorer.device) in ("cpu", "cuda", "cuda:0", "mps")
    assert len(scorer.score(img(0), ["a red circle"])) == 1
    prefixed = ClipScorer.from_ref(f"local-dir:{clip_dir}", device="cpu")
    assert prefixed.model_id == f"local-dir:{clip_dir}"


def test_an_unloadable_directory_is_a_model_load_error(tmp_path):
    """open_clip's own failures (here: corrupt weights) surface as ModelLoadError naming the ref."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG}))
    (bad / "open_clip_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="Could not load the CLIP model") as err:
        ClipScorer.from_ref(str(bad), device="cpu")
    assert str(bad) in str(err.value)
    # a directory without open_clip_config.json is refused before open_clip sees it
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a directory but not an open_clip model"):
        ClipScorer.from_ref(str(tmp_path / "weights_only"), device="cpu")


def test_a_directory_with_a_config_but_no_weights_is_refused(tmp_path, monkeypatch):
    """open_clip would build a randomly initialised model from the config alone (it only logs
    "initialized randomly"), making CSR's image reward noise: every way of naming such a
    directory is refused with ModelLoadError instead."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG}))
    for ref in (str(config_only), f"local-dir:{config_only}"):
        with pytest.raises(ModelLoadError, match="no weights"):
            ClipScorer.from_ref(ref, device="cpu")
    monkeypatch.setattr(clip_mod, "DEMO_CLIP_DIR", config_only)
    with pytest.raises(ModelLoadError, match="no weights"):
        ClipScorer.from_ref("demo", device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        ClipScorer.from_ref(f"local-dir:{tmp_path / 'missing'}", device="cpu")
    # any checkpoint name open_clip's directory loader accepts is enough
    weights = safetensors.torch.load_file(save_tiny_clip(tmp_path / "full") / "open_clip_model.safetensors")
    safetensors.torch.save_file(weights, config_only / "model.safetensors")
    assert ClipScorer.from_ref(f"local-dir:{config_only}", device="cpu").score(img(0), ["a"])


def test_a_half_precision_model_scores_like_the_fp32_one(clip_dir, scorer):
    """Pixels are cast to the model's dtype: a bf16 CLIP used to fail on fp32 pixel input."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}", device="cpu")
    half = ClipScorer(model.to(torch.bfloat16), preprocess, scorer.tokenizer, "tiny-bf16")
    texts = ["a red circle", "a blue square"]
    assert half.score(img(0), texts) == pytest.approx(scorer.score(img(0), texts), abs=0.5)


def test_bare_model_names_resolve_to_their_first_pretrained_tag():
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert len(tags) > 1
    assert clip_mod._resolve_ref("ViT-B-32") == ("ViT-B-32", tags[0])
    untagged = next(m for m in open_clip.list_models() if not open_clip.list_pretrained_tags_by_model(m))
    with pytest.raises(ModelLoadError, match="has no pretrained weights"):
        clip_mod._resolve_ref(untagged)


def test_one_line_error_summary():
    assert clip_mod._one_line(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert clip_mod._one_line(RuntimeError("")) == "RuntimeError: "
    assert len(clip_mod._one_line(OSError("x" * 1000))) == 400
