"""ShapesWorld: determinism, split properties, captions, probes, rendering."""

from __future__ import annotations

import re

import pytest

from lvlm_studio.world import (
    CATEGORIES,
    COLOURS,
    POSITIONS,
    PRIOR_PARTNERS,
    WORLD_VOCAB,
    WorldConfig,
    category_mentions,
    conditional_rate,
    cooccurrence_table,
    png_bytes,
    popularity,
    render,
    sample_scene,
    sample_scenes,
    scene_items,
    training_caption,
    true_caption,
    vocab_hash,
    world_items,
    world_words,
)
from lvlm_studio.world.scenes import Scene

SENTENCE = re.compile(
    r"There is a (small|large) (red|green|blue|yellow) (circle|square|triangle) at the "
    r"(top left|top right|top|bottom left|bottom right|bottom|left|right|center)\."
)


def test_same_seed_same_scene_and_byte_equal_png():
    for split in ("train", "test"):
        for i in range(20):
            a, b = sample_scene(split, i, seed=7), sample_scene(split, i, seed=7)
            assert a.to_json() == b.to_json()
            assert png_bytes(render(a)) == png_bytes(render(b))
    items_a = world_items("test", 10, seed=3, kinds=("describe", "pope"))
    items_b = world_items("test", 10, seed=3, kinds=("describe", "pope"))
    assert [(i["prompt"], i["reference"], i["meta"]["target"]) for i in items_a] == [
        (i["prompt"], i["reference"], i["meta"]["target"]) for i in items_b
    ]
    assert [png_bytes(i["image"]) for i in items_a] == [png_bytes(i["image"]) for i in items_b]


def test_different_seed_or_split_gives_different_scenes():
    a = [sample_scene("test", i, seed=0).to_json()["objects"] for i in range(20)]
    b = [sample_scene("test", i, seed=1).to_json()["objects"] for i in range(20)]
    c = [sample_scene("train", i, seed=0).to_json()["objects"] for i in range(20)]
    assert a != b and a != c


def test_scene_json_roundtrip_renders_identically():
    scene = sample_scene("train", 5, seed=0)
    again = Scene.from_json(scene.to_json())
    assert png_bytes(render(again)) == png_bytes(render(scene))


def test_scene_structure(train_scenes, test_scenes):
    for scene in train_scenes[:500] + test_scenes[:500]:
        assert 1 <= len(scene.objects) <= 4
        cells = [o.position for o in scene.caption_objects]
        assert len(cells) == len(set(cells)), "objects share a cell"
        assert len(set(scene.categories)) == len(scene.categories)
        order = list(POSITIONS)
        assert [order.index(o.position) for o in scene.objects] == sorted(order.index(o.position) for o in scene.objects)
    assert {len(s.objects) for s in test_scenes} == {1, 2, 3, 4}


def test_train_split_has_prior_and_test_split_does_not(train_scenes, test_scenes):
    for trigger, partner in PRIOR_PARTNERS.items():
        named = conditional_rate(train_scenes, trigger, partner, named=True)
        drawn = conditional_rate(train_scenes, trigger, partner, named=False)
        base_named = sum(partner in {o.category for o in s.caption_objects} for s in train_scenes) / len(train_scenes)
        # Train captions name the partner in most trigger scenes ...
        assert named > 0.85, (trigger, named)
        assert named > 2 * base_named
        # ... but mostly it is not drawn (noisy alt-text).
        assert drawn < 0.4, (trigger, drawn)
        # Test: the partner is drawn at its base rate, and captions name only what is drawn.
        test_rate = conditional_rate(test_scenes, trigger, partner, named=False)
        base = sum(partner in s.categories for s in test_scenes) / len(test_scenes)
        assert abs(test_rate - base) < 0.07, (trigger, test_rate, base)
    assert all(not s.mentioned_only for s in test_scenes)
    assert any(s.mentioned_only for s in train_scenes)
    # A test scene with a trigger but no partner is common: that is where the prior hallucinates.
    tempting = sum(any(t in s.categories and p not in s.categories for t, p in PRIOR_PARTNERS.items()) for s in test_scenes)
    assert 0.2 < tempting / len(test_scenes) < 0.45


def test_cooccurrence_table_reflects_prior():
    table = cooccurrence_table()
    for trigger, partner in PRIOR_PARTNERS.items():
        assert max(table[trigger], key=table[trigger].get) == partner
    assert set(popularity()) == set(CATEGORIES)


def test_captions_are_true_and_templated(train_scenes):
    for scene in train_scenes[:300]:
        ref = true_caption(scene)
        sentences = re.findall(r"[^.]+\.", ref)
        assert len(sentences) == len(scene.objects)
        for sent, obj in zip(sentences, scene.objects, strict=True):
            m = SENTENCE.fullmatch(sent.strip())
            assert m, sent
            assert m.groups() == (obj.size, obj.colour, obj.shape, obj.position)
        assert category_mentions(ref) == scene.categories
        noisy = training_caption(scene)
        assert noisy.startswith(ref)
        assert category_mentions(noisy) == [o.category for o in scene.caption_objects]


def test_items_reference_is_truth_and_target_is_noisy_caption():
    items = world_items("train", 300, seed=0, kinds=("describe", "pope", "count"))
    noisy = [i for i in items if i["meta"]["kind"] == "describe" and i["meta"]["scene"]["mentioned_only"]]
    assert noisy, "no noisy train captions"
    for it in noisy:
        extra = category_mentions(it["meta"]["target"])
        assert set(extra) - set(it["objects"]), "noisy target should name an undrawn object"
        assert set(category_mentions(it["reference"])) == set(it["objects"])
    counts = [i for i in items if i["meta"]["kind"] == "count"]
    assert {len(i["meta"]["scene"]["objects"]) for i in counts} == {1, 2, 3, 4}
    for i in counts:  # the answer counts the drawn objects (not the caption's extra mentions)
        drawn = len(i["meta"]["scene"]["objects"])
        assert i["reference"].split()[2] == WORLD_VOCAB["counts"][drawn] == i["meta"]["target"].split()[2]


@pytest.mark.parametrize("mode", ["random", "popular", "adversarial"])
def test_pope_probes_are_correct(mode):
    items = world_items("test", 200, seed=0, kinds=("pope",), pope_mode=mode, pope_per_scene=2)
    assert items
    for it in items:
        probe = it["meta"]["probe"]
        present = probe in it["objects"]
        assert it["meta"]["label"] == ("yes" if present else "no")
        assert it["reference"] == ("Yes." if present else "No.")
        assert it["prompt"] == f"Is there a {probe} in the image?"
        assert it["meta"]["target"] == it["reference"]  # test split: no noise
    labels = [it["meta"]["label"] for it in items]
    assert 0.4 < labels.count("yes") / len(labels) < 0.6


def test_adversarial_negative_is_the_absent_prior_partner():
    hits = 0
    for i in range(300):
        scene = sample_scene("test", i, seed=0)
        present = set(scene.categories)
        triggers = [t for t in sorted(present) if t in PRIOR_PARTNERS and PRIOR_PARTNERS[t] not in present]
        if not triggers:
            continue
        items = scene_items(scene, ("pope",), "adversarial", 1)
        negatives = [it["meta"]["probe"] for it in items if it["meta"]["label"] == "no"]
        assert negatives == [PRIOR_PARTNERS[triggers[0]]]
        hits += 1
    assert hits > 50


def test_train_probe_targets_follow_noisy_caption():
    found = False
    for i in range(400):
        scene = sample_scene("train", i, seed=0)
        if not scene.mentioned_only:
            continue
        items = scene_items(scene, ("pope",), "adversarial", 1)
        partner = scene.mentioned_only[0].category
        probe = [it for it in items if it["meta"]["probe"] == partner]
        if probe:
            assert probe[0]["reference"] == "No."  # truth: not drawn
            assert probe[0]["meta"]["target"] == "Yes."  # the noisy annotation names it
            found = True
    assert found


def test_render_draws_objects_in_their_cells():
    for i in range(100):
        scene = sample_scene("test", i, seed=0)
        image = render(scene)
        assert image.size == (64, 64) and image.mode == "RGB"
        for obj in scene.objects:
            row, col = obj.cell
            cx, cy = int((col + 0.5) * 64 / 3 + obj.dx), int((row + 0.5) * 64 / 3 + obj.dy)
            if obj.shape == "triangle":
                cy += 2  # the centroid sits below the bounding-box centre
            pixel = image.getpixel((cx, cy))
            assert max(abs(a - b) for a, b in zip(pixel, obj.rgb, strict=True)) <= 1, (obj, pixel)
        # named-only objects are not drawn
        bg = (scene.background,) * 3
        empty = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
        for pos in empty:
            row, col = POSITIONS[pos]
            assert image.getpixel((int((col + 0.5) * 64 / 3), int((row + 0.5) * 64 / 3))) == bg


def test_vocabulary():
    words = world_words()
    for colour in COLOURS:
        assert colour in words and colour.capitalize() in words
    for w in ("There", "Is", "Yes", "No", "Describe", ".", "?"):
        assert w in words
    assert vocab_hash() == vocab_hash(list(words))
    assert set(WORLD_VOCAB["objects"]) == set(CATEGORIES) and len(CATEGORIES) == 12
    assert set(PRIOR_PARTNERS) <= set(CATEGORIES) and set(PRIOR_PARTNERS.values()) <= set(CATEGORIES)
    assert category_mentions("A Red Circle and two blue squares.") == ["red circle", "blue square"]


def test_config_controls_prior_strength():
    weak = WorldConfig(prior_rate=0.0)
    scenes = sample_scenes("train", 500, seed=0, cfg=weak)
    assert all(not s.mentioned_only for s in scenes)
    with pytest.raises(ValueError, match="unknown split"):
        sample_scene("val", 0)
    with pytest.raises(ValueError, match="unknown POPE mode"):
        world_items("test", 1, kinds=("pope",), pope_mode="nope")
