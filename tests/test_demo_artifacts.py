"""The shipped ShapesWorld demo models: they load offline, fit the budget, match their recipe,
behave as recorded, and the build is deterministic for its seed."""

from __future__ import annotations

import json

import pytest

from lvlm_studio.world import (
    DEMO_DIR,
    PRIOR_PARTNERS,
    WorldConfig,
    vocab_hash,
    world_items,
    world_words,
)
from lvlm_studio.world.build import (
    BuildConfig,
    build_demo,
    clip_sanity,
    demo_clip_cfg,
    describe_metrics,
    generate_answers,
    load_clip,
)

MAX_BYTES = 15 * 1024 * 1024


@pytest.fixture(scope="module")
def recipe():
    path = DEMO_DIR / "recipe.json"
    assert path.is_file(), f"missing {path}: run python -m lvlm_studio.world.build"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def vlm():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(DEMO_DIR / "vlm")
    processor = AutoProcessor.from_pretrained(DEMO_DIR / "vlm")
    model.eval()
    return model, processor


def test_artifacts_fit_the_budget():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"demo artifacts are {total / 2**20:.1f} MiB"


def test_vlm_matches_recipe(vlm, recipe):
    model, processor = vlm
    spec = recipe["vlm_spec"]
    cfg = model.config
    assert cfg.vision_config.hidden_size == spec["vision_width"]
    assert cfg.vision_config.num_hidden_layers == spec["vision_layers"]
    assert cfg.vision_config.patch_size == spec["patch_size"]
    assert cfg.vision_config.image_size == spec["image_size"]
    assert cfg.text_config.hidden_size == spec["text_width"]
    assert cfg.text_config.num_hidden_layers == spec["text_layers"]
    assert sum(p.numel() for p in model.parameters()) == recipe["vlm_parameters"]
    assert recipe["seed"] == recipe["build"]["seed"] == spec["seed"]
    # The shipped model was trained on today's world (a changed sampler needs a rebuild).
    assert recipe["world"] == WorldConfig().to_dict()
    assert recipe["prior_partners"] == PRIOR_PARTNERS
    # The tokenizer holds the world's vocabulary the recipe hashed, and that is today's vocabulary.
    assert recipe["vocab_hash"] == vocab_hash(world_words())
    vocab = processor.tokenizer.get_vocab()
    assert len(processor.tokenizer) == recipe["vocab_size"]
    for word in world_words():
        assert (f"▁{word}" if word[0].isalnum() else word) in vocab, word


def test_recorded_figures_are_the_shipped_models_and_meet_the_target(vlm, recipe):
    """The recipe's describe figures are measured again on the shipped weights (the build's 500
    test scenes, greedy), so the README's base-model row cannot drift from what ships."""
    model, processor = vlm
    fig = recipe["figures"]["describe_test"]
    items = world_items("test", fig["n"], seed=recipe["seed"], kinds=("describe",))
    answers = generate_answers(model, processor, [it["image"] for it in items])
    assert all(answer.startswith("There is a") for answer in answers)
    assert answers[:8] == [ex["answer"] for ex in recipe["figures"]["describe_examples"]]
    live = describe_metrics(answers, [it["objects"] for it in items])
    for key in ("chair_s", "chair_i", "recall"):
        assert live[key] == pytest.approx(fig[key], abs=0.01), key
    assert live["n"] == fig["n"] >= 500
    assert live["recall"] >= 0.70
    assert 0.15 <= live["chair_s"] <= 0.60  # a base model that hallucinates, for the rounds to cut
    assert live["top_hallucination"] == fig["top_hallucination"] in set(PRIOR_PARTNERS.values())


def test_recorded_clip_figures_are_the_shipped_clip(recipe):
    """The recipe's CLIP sanity figures, measured again on the shipped (fp16) CLIP."""
    model, preprocess, tokenizer = load_clip(DEMO_DIR / "clip")
    clip = recipe["figures"]["clip_sanity"]
    live = clip_sanity(model, tokenizer, preprocess, BuildConfig(seed=recipe["seed"]), n=clip["n"])
    for key in ("auc_drawn_vs_absent_partner", "paired_win_rate_drawn_over_partner"):
        assert live[key] == pytest.approx(clip[key], abs=0.005), key
    for key in ("mean_cos100_drawn_trigger", "mean_cos100_absent_partner"):
        assert live[key] == pytest.approx(clip[key], abs=0.1), key
    assert live["mean_cos100_drawn_trigger"] > live["mean_cos100_absent_partner"]
    assert live["auc_drawn_vs_absent_partner"] > 0.75


def test_clip_loads_from_local_dir_and_matches_recipe(recipe):
    import torch
    import torch.nn.functional as F

    model, preprocess, tokenizer = load_clip(DEMO_DIR / "clip")
    config = json.loads((DEMO_DIR / "clip" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == recipe["clip_cfg"] == demo_clip_cfg()
    assert sum(p.numel() for p in model.parameters()) == recipe["clip_parameters"]
    tokens = tokenizer(["There is a small red circle at the top left."])
    assert tokens.shape == (1, config["model_cfg"]["text_cfg"]["context_length"])
    # Drawn objects' sentences score higher than an absent prior partner's on test images.
    items = world_items("test", 80, seed=recipe["seed"], kinds=("describe",), start=60_000)
    wins = n = 0
    with torch.no_grad():
        for it in items:
            present = set(it["objects"])
            triggers = [t for t in PRIOR_PARTNERS if t in present and PRIOR_PARTNERS[t] not in present]
            if not triggers:
                continue
            scene = it["meta"]["scene"]
            obj = next(o for o in scene["objects"] if o["colour"] + " " + o["shape"] == triggers[0])
            partner = PRIOR_PARTNERS[triggers[0]]
            texts = [f"There is a {obj['size']} {obj['colour']} {obj['shape']} at the {obj['position']}.",
                     f"There is a {obj['size']} {partner} at the {obj['position']}."]
            img = F.normalize(model.encode_image(preprocess(it["image"])[None]), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
            scores = (img @ txt.T)[0]
            wins += bool(scores[0] > scores[1])
            n += 1
    assert n >= 10 and wins / n >= 0.8


def test_short_rebuild_is_deterministic(tmp_path, recipe):
    from safetensors.torch import load_file

    def build(out):
        cfg = BuildConfig(train_scenes=64, vlm_batch=8, clip_batch=16)
        build_demo(out, seed=recipe["seed"], vlm_steps=3, clip_steps=3, progress=False, evaluate=False, config=cfg)
        return load_file(str(out / "vlm" / "model.safetensors")), load_file(str(out / "clip" / "open_clip_model.safetensors"))

    (vlm_a, clip_a), (vlm_b, clip_b) = build(tmp_path / "a"), build(tmp_path / "b")
    for a, b in ((vlm_a, vlm_b), (clip_a, clip_b)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), key
    rec = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert rec["seed"] == recipe["seed"] and rec["vocab_hash"] == recipe["vocab_hash"]
    assert rec["vlm_spec"] == recipe["vlm_spec"] and rec["clip_cfg"] == recipe["clip_cfg"]
    # The three VLM steps ran and logged a finite loss (the curve is averaged over what ran).
    assert rec["vlm_loss_curve"] and rec["vlm_loss_curve"][-1][0] == 3 and 0 < rec["vlm_final_loss"] < float("inf")
