import random

import numpy as np
import pytest
from PIL import Image

from lvlm_studio.methods.stic import (
    GOOD_PROMPT,
    MISLEADING_PROMPTS,
    STICConfig,
    apply_corruption,
    build_description_sft_data,
    build_stic_pairs,
    color_jitter,
    draw_corruption,
    draw_rejection,
    infuse_description,
    low_resolution,
)
from lvlm_studio.models.base import Sequence


class RecordingBackend:
    """Test double: the answer names the prompt kind and the image's size and mean colour."""

    model_id = "rec"

    def __init__(self):
        self.calls = []

    def sample(self, images, prompts, n=1, params=None):
        self.calls.append((list(images), list(prompts), params))
        return [[Sequence(f"{p} | {np.asarray(i).mean():.2f}", [1], [-0.1], "eos")] for i, p in zip(images, prompts, strict=True)]


def test_default_prompts_cover_the_paper():
    assert len(MISLEADING_PROMPTS) == 8 and len(set(MISLEADING_PROMPTS)) == 8
    for word in ("main subjects", "setting", "mood", "colours", "composition", "details", "interpretation"):
        assert word in GOOD_PROMPT
    for word in ("imagined", "hypothetical", "logically", "not in the picture", "outside the frame",
                 "event", "weather", "gadget"):
        assert any(word in p for p in MISLEADING_PROMPTS), word


def test_low_resolution_shorter_side_20_and_back():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    out = low_resolution(img, 20)
    assert out.size == img.size
    # the detail of a 20 x 30 image: far smoother than the noise it came from
    assert np.abs(np.diff(np.asarray(out).astype(float), axis=1)).mean() < 0.5 * np.abs(
        np.diff(np.asarray(img).astype(float), axis=1)).mean()


def test_color_jitter_factors_are_applied():
    img = Image.new("RGB", (8, 8), (100, 50, 20))
    bright = ("brightness",)
    assert np.asarray(color_jitter(img, 1.5, 0.0, bright)).mean(axis=(0, 1)) == pytest.approx([150, 75, 30], abs=1)
    assert np.asarray(color_jitter(img, 0.5, 0.0, bright)).mean(axis=(0, 1)) == pytest.approx([50, 25, 10], abs=1)
    shifted = np.asarray(color_jitter(img, 1.0, 0.3)).mean(axis=(0, 1))
    assert np.argmax(shifted) != 0  # hue moved away from red


def test_corruption_draw_parameters_and_probabilities():
    cfg = STICConfig(require_corruption=False)
    rng = random.Random(0)
    draws = [draw_corruption(rng, cfg) for _ in range(4000)]
    assert np.mean([d["resize"] for d in draws]) == pytest.approx(0.5, abs=0.03)
    assert np.mean([d["jitter"] for d in draws]) == pytest.approx(0.5, abs=0.03)
    jit = [d for d in draws if d["jitter"]]
    b = np.array([d["brightness_factor"] for d in jit])
    h = np.array([d["hue_factor"] for d in jit])
    assert b.min() >= 0.5 and b.max() <= 1.5 and b.mean() == pytest.approx(1.0, abs=0.03)
    assert h.min() >= -0.3 and h.max() <= 0.3 and h.mean() == pytest.approx(0.0, abs=0.02)
    assert all(d["low_res_side"] == 20 for d in draws if d["resize"])
    # by default a branch-(b) image is never left clean
    forced = [draw_corruption(rng, STICConfig()) for _ in range(1000)]
    assert all(d["resize"] or d["jitter"] for d in forced)


def test_branch_choice_is_fifty_fifty_and_seeded():
    cfg = STICConfig()
    rng = random.Random(1)
    draws = [draw_rejection(rng, cfg) for _ in range(4000)]
    assert np.mean([d["branch"] == "misleading" for d in draws]) == pytest.approx(0.5, abs=0.03)
    idx = [d["prompt_index"] for d in draws if d["branch"] == "misleading"]
    assert set(idx) == set(range(8))
    assert all(d["prompt"] == cfg.plain_prompt for d in draws if d["branch"] == "corrupted")
    assert draw_rejection(random.Random(5), cfg) == draw_rejection(random.Random(5), cfg)


def test_build_stic_pairs_records_and_applies_the_draws():
    backend = RecordingBackend()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(12)]
    cfg = STICConfig(batch_size=5, plain_prompt="Describe the image.")
    res = build_stic_pairs(backend, [(im, f"k{i}") for i, im in enumerate(imgs)], cfg)
    assert len(res) == 12 and [r.image_key for r in res] == [f"k{i}" for i in range(12)]
    assert len(backend.calls) == 6  # 3 chunks x (good, bad)
    branches = {r.draw["branch"] for r in res}
    assert branches == {"misleading", "corrupted"}
    for r, im in zip(res, imgs, strict=True):
        assert r.prompt == GOOD_PROMPT and r.chosen.source == "stic_good" and r.rejected.source == "stic_bad"
        assert r.chosen.params["prompt"] == GOOD_PROMPT and r.rejected.params["branch"] == r.draw["branch"]
        assert r.chosen.text.endswith(f"{np.asarray(im).mean():.2f}")
        if r.draw["branch"] == "corrupted":
            assert r.rejected_image is not None and r.rejected_image.size == im.size
            assert np.array_equal(np.asarray(r.rejected_image), np.asarray(apply_corruption(im, r.draw["corruption"])))
            assert not np.array_equal(np.asarray(r.rejected_image), np.asarray(im))
            assert r.rejected.text.startswith("Describe the image. |")
        else:
            assert r.rejected_image is None and r.rejected.params["prompt"] in MISLEADING_PROMPTS
        assert r.has_pair
    again = build_stic_pairs(RecordingBackend(), [(im, f"k{i}") for i, im in enumerate(imgs)], cfg)
    assert [r.draw for r in again] == [r.draw for r in res]
    # An item's own seed decides its draw, whatever its place in the call (the service gives each
    # stored item one: counted from 0 in each chunk, every chunk drew the same few draws).
    own = build_stic_pairs(RecordingBackend(), [(im, f"k{i}", 7000 + i) for i, im in enumerate(imgs)], cfg)
    assert [r.draw for r in own] == [draw_rejection(random.Random(7000 + i), cfg) for i in range(12)]
    assert [r.chosen.seed for r in own] == list(range(7000, 7012))
    moved = build_stic_pairs(RecordingBackend(), [(imgs[11], "k11", 7011)], cfg)
    assert moved[0].draw == own[11].draw


def test_prompts_are_overridable_for_a_demo_model():
    cfg = STICConfig(good_prompt="Describe the image.", plain_prompt="Describe the image.",
                     misleading_prompts=["Describe the image and its other objects."], p_misleading=1.0)
    backend = RecordingBackend()
    [r] = build_stic_pairs(backend, [Image.new("RGB", (8, 8))], cfg)
    assert backend.calls[0][1] == ["Describe the image."]
    assert backend.calls[1][1] == ["Describe the image and its other objects."]
    with pytest.raises(ValueError):
        STICConfig(misleading_prompts=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        STICConfig(max_new_tokens=0)  # refused when the config is made, not after the first item


def test_stage2_description_infused_rows():
    assert infuse_description(" A red car. ", "What colour is the car?") == (
        "Image description:\nA red car.\n\nWhat colour is the car?")
    backend = RecordingBackend()
    rows = build_description_sft_data(backend, [(Image.new("RGB", (4, 4)), "Q1?", "A1", "k")],
                                      STICConfig(description_prompt="Describe the image."))
    assert rows[0]["prompt"] == f"Image description:\n{rows[0]['description']}\n\nQ1?"
    assert rows[0]["answer"] == "A1" and rows[0]["image_key"] == "k"
    assert backend.calls[0][1] == ["Describe the image."]


# Tests from a mutation audit: each fails on a mutant the suite above let through.
def test_low_resolution_sets_the_shorter_side():  # S03
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))  # 90 x 60
    expected = img.resize((30, 20), Image.Resampling.BILINEAR).resize((90, 60), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(low_resolution(img, 20)), np.asarray(expected))


def test_jitter_order_is_random():  # S06
    rng = random.Random(0)
    draws = [draw_corruption(rng, STICConfig(require_corruption=False)) for _ in range(200)]
    assert {tuple(d["jitter_order"]) for d in draws if d["jitter"]} == {("brightness", "hue"), ("hue", "brightness")}


def test_stic_draws_do_not_depend_on_the_batch_size():  # S10
    imgs = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(6)]
    a = build_stic_pairs(RecordingBackend(), imgs, STICConfig(batch_size=6))
    b = build_stic_pairs(RecordingBackend(), imgs, STICConfig(batch_size=1))
    assert [r.draw for r in a] == [r.draw for r in b]
    assert [r.chosen.seed for r in b] == list(range(6))
    assert len({str(r.draw) for r in b}) > 1


def test_identical_answers_are_no_stic_pair():  # S14
    class Same:
        model_id = "same"

        def sample(self, images, prompts, n=1, params=None):
            return [[Sequence("A red circle.", [1], [-0.1], "eos")] for _ in prompts]

    [r] = build_stic_pairs(Same(), [Image.new("RGB", (8, 8))])
    assert r.chosen is not None and r.rejected is not None and not r.has_pair


def test_stage2_describes_with_the_good_prompt_by_default():  # S19
    backend = RecordingBackend()
    [row] = build_description_sft_data(backend, [(Image.new("RGB", (4, 4)), "Q?", "A")])
    assert backend.calls[0][1] == [GOOD_PROMPT] and row["params"]["description_prompt"] == GOOD_PROMPT


def test_stage2_leaves_out_an_image_described_with_nothing():
    """An empty description gave a row whose prompt infused nothing ("Image description:\n\n\nQ?")."""
    class Blank:
        model_id = "blank"

        def sample(self, images, prompts, n=1, params=None):
            return [[Sequence("" if im.size == (4, 4) else "A red circle.", [1], [-0.1], "eos")] for im in images]

    rows = build_description_sft_data(Blank(), [(Image.new("RGB", (4, 4)), "Q1?", "A1", "a"),
                                                (Image.new("RGB", (8, 8)), "Q2?", "A2", "b")])
    assert [r["image_key"] for r in rows] == ["b"] and "A red circle." in rows[0]["prompt"]
