"""ShapesWorld behaviour pinned by a mutation audit of world/scenes.py, world/text.py and
world/build.py: what the existing world tests left open (config knobs, the TRAIN split's
clean counter-examples, JSON round trips, co-occurrence statistics, POPE probe sampling, count
answers, and the demo build's data, encoding, metrics and recipe)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from lvlm_studio.world import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    DEMO_DIR,
    DESCRIBE_PROMPT,
    POPE_MODES,
    PRIOR_PARTNERS,
    SIZES,
    WorldConfig,
    category_mentions,
    conditional_rate,
    cooccurrence_counts,
    cooccurrence_table,
    negative_probe,
    popularity,
    sample_scene,
    sample_scenes,
    scene_items,
    world_items,
)
from lvlm_studio.world.scenes import Scene
from lvlm_studio.world.vocab import template_texts


# ------------------------------------------------------------------------------------------ scenes
def test_object_count_bounds_follow_the_config():
    """min_objects / max_objects bound every scene of both splits: a TRAIN leak scene whose
    partner was dropped is refilled (with neither a trigger nor the dropped partner), and a prior
    scene's trigger + partner never push it past max_objects."""
    for cfg in (WorldConfig(min_objects=3, max_objects=4), WorldConfig(min_objects=3, max_objects=3),
                WorldConfig(min_objects=2, max_objects=2, trigger_leak=1.0)):
        assert {len(s.objects) for s in sample_scenes("test", 200, seed=0, cfg=cfg)} == set(
            range(cfg.min_objects, cfg.max_objects + 1))
        train = sample_scenes("train", 600, seed=0, cfg=cfg)
        assert {len(s.objects) for s in train} == set(range(cfg.min_objects, cfg.max_objects + 1)), cfg
        leaks = [s for s in train if s.prior_trigger is None and set(s.categories) & set(PRIOR_PARTNERS)]
        assert leaks
        for s in leaks:  # still clean counter-examples: a leaked trigger comes without its partner
            for trigger in set(s.categories) & set(PRIOR_PARTNERS):
                assert PRIOR_PARTNERS[trigger] not in s.categories
    small = sample_scenes("train", 300, seed=0, cfg=WorldConfig(max_objects=1, prior_rate=0.0))
    assert {len(s.objects) for s in small} == {1}


@pytest.mark.parametrize("bad, message", [
    (dict(max_objects=1), "no room for a prior scene"),
    (dict(min_objects=0, max_objects=0), "no room for a prior scene"),
    (dict(min_objects=3, max_objects=2), "min_objects <= max_objects"),
    (dict(min_objects=-1), "0 <= min_objects"),
    (dict(max_objects=5), "count answers have words up to 'four'"),
    (dict(prior_rate=1.5), "prior_rate is a share"),
    (dict(partner_undrawn=-0.1), "partner_undrawn is a share"),
    (dict(trigger_leak=2.0), "trigger_leak is a share"),
])
def test_world_config_refuses_what_the_sampler_cannot_honour(bad, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**bad)


def test_partner_adds_sentence_controls_the_busiest_prior_scenes(train_scenes):
    """True: a prior scene may draw 4 objects and still name the undrawn partner (5 caption
    objects); False: the named-only partner takes one of the <= 4 caption slots."""
    assert WorldConfig().partner_adds_sentence
    busiest = [s for s in train_scenes if s.mentioned_only and len(s.objects) == 4]
    assert busiest and all(len(s.caption_objects) == 5 for s in busiest)
    off = sample_scenes("train", 1000, seed=0, cfg=WorldConfig(partner_adds_sentence=False))
    assert any(s.mentioned_only for s in off)
    assert max(len(s.caption_objects) for s in off) == 4
    assert all(len(s.objects) <= 3 for s in off if s.mentioned_only)


def test_prior_scenes_hold_one_trigger_and_leaks_are_clean_counter_examples(train_scenes):
    """A TRAIN prior scene holds its trigger and no other trigger; a trigger that leaks into a
    non-prior TRAIN scene comes without its partner (drawn or named)."""
    leaks = 0
    for s in train_scenes:
        cats = set(s.categories)
        named = {o.category for o in s.caption_objects}
        if s.prior_trigger is not None:
            assert s.prior_trigger in cats
            assert cats & set(PRIOR_PARTNERS) == {s.prior_trigger}
            assert PRIOR_PARTNERS[s.prior_trigger] in named
        else:
            assert not s.mentioned_only
            for trigger in cats & set(PRIOR_PARTNERS):
                assert PRIOR_PARTNERS[trigger] not in named, s.to_json()
                leaks += 1
    assert leaks > 20  # trigger_leak = 0.1: leaks do happen


def test_render_jitter_stays_within_the_config(test_scenes):
    """Object jitter is symmetric and bounded by jitter_px / scale_jitter / colour_jitter, both
    sizes occur, and a zero-jitter config draws the plain vocabulary objects."""
    cfg = WorldConfig()
    objects = [o for s in test_scenes for o in s.objects]
    assert {o.size for o in objects} == set(SIZES)
    assert {o.dx for o in objects} == {o.dy for o in objects} == set(range(-cfg.jitter_px, cfg.jitter_px + 1))
    assert all(1 - cfg.scale_jitter <= o.scale <= 1 + cfg.scale_jitter for o in objects)
    assert min(o.scale for o in objects) < 0.97 and max(o.scale for o in objects) > 1.03
    offsets = [v - ref for o in objects for v, ref in zip(o.rgb, COLOURS[o.colour], strict=True)]
    assert min(offsets) == -cfg.colour_jitter and max(offsets) == cfg.colour_jitter
    still = WorldConfig(jitter_px=0, scale_jitter=0.0, colour_jitter=0)
    for s in sample_scenes("test", 30, seed=0, cfg=still):
        for o in s.objects:
            assert (o.dx, o.dy, o.scale, tuple(o.rgb)) == (0, 0, 1.0, COLOURS[o.colour])


def test_large_colour_jitter_is_clamped_to_valid_rgb():
    """However large colour_jitter is, every channel is a valid 0..255 value."""
    cfg = WorldConfig(colour_jitter=80)
    channels = [v for s in sample_scenes("test", 100, seed=0, cfg=cfg) for o in s.objects for v in o.rgb]
    assert min(channels) == 0 and max(channels) == 255
    assert all(isinstance(v, int) for v in channels)


def test_test_split_is_sampled_independently_of_train():
    """Scene i of TEST is not scene i of TRAIN re-labelled: their layouts (cells used) agree
    only by chance."""
    same = 0
    for i in range(200):
        a, b = sample_scene("train", i, seed=0), sample_scene("test", i, seed=0)
        same += sorted(o.position for o in a.objects) == sorted(o.position for o in b.objects)
    assert same < 40


def test_scene_json_roundtrip_is_exact(train_scenes):
    """to_json -> JSON text -> from_json gives back the same scene, named-only partner and
    prior trigger included."""
    noisy = [s for s in train_scenes[:300] if s.mentioned_only]
    assert noisy
    for scene in noisy + train_scenes[:50]:
        again = Scene.from_json(json.loads(json.dumps(scene.to_json())))
        assert again == scene
        assert again.to_json() == scene.to_json()


def test_sample_scenes_start_offsets_the_indices():
    assert [s.index for s in sample_scenes("test", 3, seed=0, start=7)] == [7, 8, 9]
    assert [s.to_json() for s in sample_scenes("test", 3, seed=0, start=7)] == [
        sample_scene("test", i, seed=0).to_json() for i in (7, 8, 9)
    ]


def test_cooccurrence_counts_named_versus_drawn(train_scenes):
    """named=True counts what captions name (the undrawn partner too), named=False what is drawn."""
    scene = next(s for s in train_scenes if s.mentioned_only)
    partner = scene.mentioned_only[0].category
    named_singles, named_pairs = cooccurrence_counts([scene], named=True)
    drawn_singles, drawn_pairs = cooccurrence_counts([scene], named=False)
    assert named_singles[partner] == 1 and drawn_singles[partner] == 0
    assert named_pairs[tuple(sorted((scene.prior_trigger, partner)))] == 1
    assert not any(partner in pair for pair in drawn_pairs)
    assert set(drawn_singles) == set(scene.categories)


def test_cooccurrence_table_is_the_conditional_naming_rate():
    """table[a][b] = P(b named | a named) over the TRAIN captions it was computed from."""
    n, seed = 400, 3
    table = cooccurrence_table(n, seed)
    scenes = sample_scenes("train", n, seed)
    for a, b in [("red circle", "green triangle"), ("green triangle", "red circle"),
                 ("blue square", "yellow circle"), ("yellow circle", "red square")]:
        assert table[a][b] == pytest.approx(conditional_rate(scenes, a, b, named=True))
    assert table["red circle"]["green triangle"] != pytest.approx(table["green triangle"]["red circle"])


def test_popularity_ranks_categories_by_train_mentions():
    singles, _ = cooccurrence_counts(sample_scenes("train", 300, seed=2), named=True)
    ranked = popularity(300, 2)
    assert sorted(ranked) == sorted(CATEGORIES)
    assert [singles[c] for c in ranked] == sorted((singles[c] for c in ranked), reverse=True)


def test_conditional_rate_without_the_given_category_is_zero(test_scenes):
    scenes = [s for s in test_scenes if "red circle" not in s.categories][:50]
    assert conditional_rate(scenes, "red circle", "green triangle", named=False) == 0.0
    assert conditional_rate([], "red circle", "green triangle") == 0.0


# -------------------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def demo_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO_DIR / "vlm" / "tokenizer.json"))


def test_every_world_text_is_templated_and_in_the_demo_vocabulary(demo_tokenizer):
    """Captions are template sentences joined by single spaces, count answers are the world's own
    count sentences, and every prompt / reference / target encodes without <unk> in the shipped
    VLM's word-level vocabulary."""
    templates = set(template_texts())
    items = world_items("train", 60, seed=0, kinds=("describe", "pope", "count"))
    items += world_items("test", 30, seed=0, kinds=("describe", "pope", "count"))
    unk = demo_tokenizer.token_to_id("<unk>")
    for it in items:
        for text in (it["prompt"], it["reference"], it["meta"]["target"]):
            assert all(s + "." in templates for s in text.split(". ")[:-1]) and text.split(". ")[-1] in templates, text
            assert unk not in demo_tokenizer.encode(text, add_special_tokens=False).ids, text


def test_count_answers_count_the_drawn_objects():
    """The count answer names len(objects) in words, grammatically, also in TRAIN scenes whose
    noisy caption names one more object than is drawn."""
    items = world_items("train", 200, seed=0, kinds=("count",))
    assert {len(it["objects"]) for it in items} == {1, 2, 3, 4}
    noisy = 0
    for it in items:
        n = len(it["objects"])
        want = "There is one object." if n == 1 else f"There are {COUNT_WORDS[n]} objects."
        assert it["reference"] == it["meta"]["target"] == want
        noisy += bool(it["meta"]["scene"]["mentioned_only"])
    assert noisy
    # An empty scene (min_objects=0) is counted too: the vocabulary has "zero".
    empty = world_items("test", 2, seed=0, kinds=("count",), cfg=WorldConfig(min_objects=0, max_objects=0, prior_rate=0.0))
    assert [it["reference"] for it in empty] == ["There are zero objects."] * 2


def test_pope_yes_probes_are_sampled_among_the_drawn_objects():
    """The "yes" probe of a scene is a random drawn object, not always the first in reading order."""
    first = total = 0
    for it in world_items("test", 300, seed=0, kinds=("pope",), pope_mode="random"):
        objs = it["meta"]["scene"]["objects"]
        if it["meta"]["label"] == "yes" and len(objs) == 2:
            total += 1
            first += it["meta"]["probe"] == f"{objs[0]['colour']} {objs[0]['shape']}"
    assert total > 30 and 0.25 < first / total < 0.75


def test_random_negatives_cover_the_absent_categories():
    negatives = Counter(
        it["meta"]["probe"]
        for it in world_items("test", 200, seed=0, kinds=("pope",), pope_mode="random")
        if it["meta"]["label"] == "no"
    )
    assert set(negatives) == set(CATEGORIES)
    assert max(negatives.values()) < 0.25 * sum(negatives.values())


def test_popular_negative_is_the_most_named_absent_category():
    singles, _ = cooccurrence_counts(sample_scenes("train", 2000, seed=0), named=True)
    for it in world_items("test", 60, seed=0, kinds=("pope",), pope_mode="popular"):
        if it["meta"]["label"] == "no":
            absent = [c for c in CATEGORIES if c not in it["objects"]]
            assert singles[it["meta"]["probe"]] == max(singles[c] for c in absent)


def test_adversarial_fallback_is_the_most_co_occurring_absent_category():
    """Without an absent prior partner, the adversarial negative is the absent category named most
    often with a present one in TRAIN captions; ties go to the more popular category."""
    import random
    from itertools import combinations

    table, order = cooccurrence_table(), popularity()

    def expected(present):
        if any(PRIOR_PARTNERS[c] not in present for c in present & set(PRIOR_PARTNERS)):
            return None  # the partner shortcut applies, not the fallback
        absent = [c for c in CATEGORIES if c not in present]
        strength = {b: max(table[a][b] for a in present) for b in absent}
        tied = [b for b in absent if strength[b] == max(strength.values())]
        return min(tied, key=order.index), len(tied) > 1

    checked = 0
    for i in range(400):
        objects = set(sample_scene("test", i, seed=0).categories)
        negatives: list[str] = []
        for _ in range(3):  # later probes see earlier negatives as present
            present = objects | set(negatives)
            negatives.append(negative_probe(present, "adversarial", random.Random(0)))
            want = expected(present)
            if want is not None:
                assert negatives[-1] == want[0], present
                checked += 1
    assert checked > 200
    # Ties in co-occurrence need >= 5 present categories (a 4-object scene plus an earlier probe).
    tied_sets = [set(c) for c in combinations(CATEGORIES, 5) if (expected(set(c)) or (None, False))[1]]
    assert tied_sets
    for present in tied_sets:
        assert negative_probe(present, "adversarial", random.Random(0)) == expected(present)[0]
    # An empty scene (WorldConfig(min_objects=0) allows one) has no partner and no co-occurrence:
    # its adversarial probe is the most popular object, not a crash.
    assert negative_probe(set(), "adversarial", random.Random(0)) == negative_probe(set(), "popular", random.Random(0))


class _IterOrder(set):
    """A set that iterates in a chosen order (as another PYTHONHASHSEED might)."""

    def __init__(self, items, reverse: bool):
        super().__init__(items)
        self._order = sorted(items, reverse=reverse)

    def __iter__(self):
        return iter(self._order)


def test_adversarial_negative_does_not_depend_on_set_order():
    """With both triggers present and both partners absent, which partner is asked about must not
    depend on the set's iteration order (string hashing varies between processes)."""
    import random

    triggers = set(PRIOR_PARTNERS)
    others = [c for c in CATEGORIES if c not in triggers and c not in PRIOR_PARTNERS.values()]
    for extra in [[], *([c] for c in others), others[:2]]:
        present = triggers | set(extra)
        picks = {negative_probe(_IterOrder(present, reverse), "adversarial", random.Random(0)) for reverse in (False, True)}
        assert len(picks) == 1 and picks <= set(PRIOR_PARTNERS.values()), (present, picks)


def test_pope_probes_are_distinct_and_exhaust_the_absent_categories():
    """Many probes per scene: each "no" probe is a different absent category, and asking for more
    than there are stops at every absent category (no crash, no None)."""
    for mode in POPE_MODES:
        for i in range(5):
            scene = sample_scene("test", i, seed=0)
            items = scene_items(scene, ("pope",), mode, pope_per_scene=3)
            probes = [it["meta"]["probe"] for it in items]
            assert len(probes) == len(set(probes))
            many = scene_items(scene, ("pope",), mode, pope_per_scene=12)
            no = [it["meta"]["probe"] for it in many if it["meta"]["label"] == "no"]
            assert sorted(no) == sorted(c for c in CATEGORIES if c not in scene.categories)
            yes = [it["meta"]["probe"] for it in many if it["meta"]["label"] == "yes"]
            assert sorted(yes) == sorted(scene.categories)


def test_item_kinds_are_validated():
    scene = sample_scene("test", 0, seed=0)
    with pytest.raises(ValueError, match="unknown item kinds"):
        scene_items(scene, ("describe", "caption"))


def test_items_honour_image_size_start_and_config():
    items = world_items("train", 2, seed=0, kinds=("describe",), cfg=WorldConfig(image_size=32, prior_rate=0.0),
                        start=40)
    assert [it["image"].size for it in items] == [(32, 32)] * 2
    assert [it["meta"]["scene_index"] for it in items] == [40, 41]
    assert [it["meta"]["scene"] for it in items] == [
        sample_scene("train", i, seed=0, cfg=WorldConfig(prior_rate=0.0)).to_json() for i in (40, 41)
    ]
    assert scene_items(sample_scene("test", 3, seed=0), image_size=48)[0]["image"].size == (48, 48)


# ------------------------------------------------------------------------------------ demo build
def test_vlm_training_data_is_the_noisy_train_split_with_every_pope_mode():
    """The demo VLM learns the TRAIN split's noisy captions (the prior) and POPE probes of all three
    modes (random / popular / adversarial in turn), each kind in its own list."""
    from lvlm_studio.world.build import BuildConfig, _train_data
    from lvlm_studio.world.text import training_caption

    cfg = BuildConfig(train_scenes=60)
    scenes, describe, pope = _train_data(cfg, progress=False)
    assert [s.index for s in scenes] == list(range(60)) and all(s.split == "train" for s in scenes)
    assert [(i, p) for i, p, _ in describe] == [(i, DESCRIBE_PROMPT) for i in range(60)]
    assert [t for _, _, t in describe] == [training_caption(s) for s in scenes]
    assert any(set(category_mentions(t)) - set(scenes[i].categories) for i, _, t in describe)
    assert all(p.startswith("Is there a ") and t in ("Yes.", "No.") for _, p, t in pope)
    only_mode = Counter()
    for scene in scenes:
        mine = [(p, t) for i, p, t in pope if i == scene.index]
        fits = [m for m in POPE_MODES
                if mine == [(it["prompt"], it["meta"]["target"]) for it in scene_items(scene, ("pope",), m)]]
        assert fits, scene.index
        if len(fits) == 1:
            only_mode[fits[0]] += 1
    assert set(only_mode) == set(POPE_MODES)


@pytest.fixture(scope="module")
def demo_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(DEMO_DIR / "vlm")


def test_encode_masks_exactly_the_expanded_prompt(demo_processor):
    """Labels are -100 over the prompt (image token expanded as the processor expands it) and equal
    the ids over the answer and its end token; a chat whose prompt is not a prefix is refused."""
    from lvlm_studio.world import render
    from lvlm_studio.world.build import _chat_full, _encode, chat_prompt

    tok = demo_processor.tokenizer
    image_token = tok.convert_tokens_to_ids("<image>")
    answer = "There is a small red circle at the top."
    prompt = chat_prompt(demo_processor, DESCRIBE_PROMPT)
    ids, labels = _encode(tok, prompt, _chat_full(demo_processor, DESCRIBE_PROMPT, answer), image_token, 64)
    expanded = demo_processor(text=prompt, images=render(sample_scene("test", 0)), return_tensors="pt")
    prefix = expanded["input_ids"][0].tolist()
    assert ids[: len(prefix)] == prefix and ids.count(image_token) == 64
    assert labels[: len(prefix)] == [-100] * len(prefix)
    assert labels[len(prefix):] == ids[len(prefix):]
    assert tok.decode(labels[len(prefix):]) == answer + tok.eos_token
    with pytest.raises(RuntimeError, match="not a prefix"):
        _encode(tok, chat_prompt(demo_processor, "How many objects are in the image?"),
                _chat_full(demo_processor, DESCRIBE_PROMPT, answer), image_token, 64)


def test_generate_answers_is_greedy():
    """Evaluation answers are greedy: a random (near-uniform) model answers the same whatever the
    torch seed, so the recorded figures do not depend on sampling luck."""
    import torch

    from lvlm_studio.models.tiny import TinyLlavaSpec, build_llava
    from lvlm_studio.world import render, world_words
    from lvlm_studio.world.build import generate_answers

    model, processor = build_llava(world_words(), TinyLlavaSpec())
    model.eval()
    images = [render(sample_scene("test", i, seed=0)) for i in range(3)]
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(generate_answers(model, processor, images, batch=2, max_new_tokens=6))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_describe_metrics_count_chair_recall_and_prior_driven_hallucinations():
    from lvlm_studio.world.build import describe_metrics

    cases = [
        (["red circle"], "There is a small red circle at the top. There is a small green triangle at the left."),
        (["red circle", "blue circle"], "There is a large red circle at the top."),
        (["blue square"], "There is a small blue square at the top. There is a large yellow circle at the center. "
                          "There is a small red square at the left."),
        (["blue circle"], "There is a small green triangle at the top."),  # a partner, but its trigger is absent
        (["red circle", "yellow square"], "There is a red circle. There is a green triangle. There is a green triangle."),
        (["green square"], "There is a small green square at the top."),
    ]
    m = describe_metrics([a for _, a in cases], [t for t, _ in cases])
    assert m["n"] == 6
    assert m["chair_s"] == pytest.approx(4 / 6)  # answers with a hallucination
    assert m["chair_i"] == pytest.approx(6 / 11)  # hallucinated mentions / mentions
    assert m["recall"] == pytest.approx(5 / 8)  # drawn objects named / drawn objects
    assert m["hallucinated_objects"] == {"green triangle": 3, "yellow circle": 1, "red square": 1}
    assert m["top_hallucination"] == "green triangle" and m["top_is_prior_partner"] is True
    assert m["prior_driven_share"] == pytest.approx(3 / 5)  # partner hallucinated next to its trigger
    clean = describe_metrics(["There is a small red circle at the top."], [["red circle"]])
    assert clean["chair_s"] == clean["chair_i"] == 0 and clean["top_hallucination"] is None
    assert clean["top_is_prior_partner"] is None
    # The recipe's CHAIR reads answers as the evaluation does: a size between colour and shape, a hyphen.
    odd = ["There is a red large circle at the top.", "There is a red-circle at the top."]
    m = describe_metrics(odd, [["blue square"], ["blue square"]])
    assert m["chair_s"] == 1.0 and m["hallucinated_objects"] == {"red circle": 2}


def test_pope_metrics_parse_answers_and_score_them(monkeypatch):
    """The build's POPE check reads answers as the evaluation does (``parse_yes_no``: "no" or "not"
    in the first sentence, in any case, not only an answer starting with it); precision / recall /
    F1 / yes ratio follow from the probes' labels."""
    from lvlm_studio.world import build, png_bytes, text

    seen: dict = {}
    real_world_items = text.world_items

    def recording_world_items(*args, **kwargs):
        items = real_world_items(*args, **kwargs)
        seen.update({(it["prompt"], png_bytes(it["image"])): it["meta"]["label"] for it in items})
        return items

    monkeypatch.setattr(text, "world_items", recording_world_items)
    cfg = build.BuildConfig()

    def answer_with(rule):
        def fake(model, processor, images, prompt, **kwargs):
            return [rule(seen[(prompt, png_bytes(im))]) for im in images]
        return fake

    monkeypatch.setattr(build, "generate_answers", answer_with(lambda label: "It is there."))
    always = build.pope_metrics(None, None, cfg, "adversarial", 8)
    share_yes = sum(label == "yes" for label in seen.values()) / len(seen)
    assert always["n"] == len(seen) and 0 < share_yes < 1
    assert always["yes_ratio"] == 1 and always["recall"] == 1
    assert always["precision"] == pytest.approx(share_yes) == always["accuracy"]
    assert always["f1"] == pytest.approx(2 * share_yes / (share_yes + 1))
    monkeypatch.setattr(build, "generate_answers", answer_with(lambda label: "Yes." if label == "yes" else "no, none"))
    perfect = build.pope_metrics(None, None, cfg, "adversarial", 8)
    assert perfect["accuracy"] == perfect["precision"] == perfect["recall"] == 1
    assert perfect["f1"] == pytest.approx(1) and perfect["yes_ratio"] == pytest.approx(share_yes)
    monkeypatch.setattr(build, "generate_answers",
                        answer_with(lambda label: "Yes." if label == "yes" else "There is no such shape."))
    assert build.pope_metrics(None, None, cfg, "adversarial", 8)["accuracy"] == 1


@pytest.fixture(scope="module")
def shipped_clip():
    from lvlm_studio.world.build import load_clip

    return load_clip(DEMO_DIR / "clip")


def test_clip_sanity_scores_drawn_triggers_against_absent_partners(shipped_clip, monkeypatch):
    """clip_sanity uses TEST scenes with a trigger drawn and its partner absent, and the shipped
    CLIP prefers the drawn trigger's sentence there."""
    import importlib

    from lvlm_studio.world.build import BuildConfig, clip_sanity

    render_mod = importlib.import_module("lvlm_studio.world.render")  # the package re-exports the function

    rendered = []
    real_render = render_mod.render

    def recording_render(scene, *args, **kwargs):
        rendered.append(scene)
        return real_render(scene, *args, **kwargs)

    monkeypatch.setattr(render_mod, "render", recording_render)
    model, preprocess, tokenizer = shipped_clip
    batches = []

    def recording_tokenizer(texts):
        batches.append(list(texts))
        return tokenizer(texts)

    fig = clip_sanity(model, recording_tokenizer, preprocess, BuildConfig(), n=60)
    assert fig["n"] == len(rendered) == 60
    drawn_texts, partner_texts = batches[0], batches[1]  # one chunk: drawn, partner, random absent
    assert len(drawn_texts) == len(partner_texts) == 60
    both_triggers = 0
    for scene, drawn, partner in zip(rendered, drawn_texts, partner_texts, strict=True):
        present = set(scene.categories)
        assert scene.split == "test"
        # the drawn sentence is a drawn trigger, and the partner sentence names that trigger's absent partner
        (trigger,) = [t for t in PRIOR_PARTNERS if f" {t} " in drawn]
        assert trigger in present and PRIOR_PARTNERS[trigger] not in present
        assert f" {PRIOR_PARTNERS[trigger]} " in partner
        both_triggers += set(PRIOR_PARTNERS) <= present
    assert both_triggers  # the case where the first trigger in reading order is the wrong one occurs
    assert fig["mean_cos100_drawn_trigger"] > fig["mean_cos100_absent_partner"] + 10
    assert fig["auc_drawn_vs_absent_partner"] > 0.8 and fig["paired_win_rate_drawn_over_partner"] > 0.8


def test_saved_clip_is_fp16_and_reloads_with_its_training_preprocess(shipped_clip, tmp_path):
    import torch
    from safetensors.torch import load_file

    from lvlm_studio.world import render
    from lvlm_studio.world.build import load_clip, save_clip

    model, preprocess, _ = shipped_clip
    save_clip(model, tmp_path / "clip")
    state = load_file(str(tmp_path / "clip" / "open_clip_model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.float16}
    again, again_preprocess, _ = load_clip(tmp_path / "clip")
    image = render(sample_scene("test", 0, seed=0))
    # trained with mean = std = 0.5: a 64 px scene maps to 2 * pixel - 1
    want = torch.tensor(list(image.getdata()), dtype=torch.float32).T.reshape(3, 64, 64) / 255 * 2 - 1
    assert again_preprocess(image) == pytest.approx(want, abs=1e-5)
    assert torch.equal(again_preprocess(image), preprocess(image))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_build_demo_honours_its_arguments(tmp_path):
    """A tiny build records the seed and step counts it was given, writes the recipe it returns,
    and its training moved the VLM away from its initialisation."""
    import torch
    from safetensors.torch import load_file

    from lvlm_studio.models.tiny import build_llava
    from lvlm_studio.world import world_words
    from lvlm_studio.world.build import BuildConfig, build_demo, demo_vlm_spec

    out = tmp_path / "demo"
    cfg = BuildConfig(train_scenes=64, vlm_batch=4, clip_batch=2, threads=1)
    torch.set_num_threads(2)
    recipe = build_demo(out, seed=1, vlm_steps=2, clip_steps=50, progress=False, evaluate=False, config=cfg)
    assert torch.get_num_threads() == 1  # the build pins its thread count (determinism)
    assert recipe["seed"] == recipe["build"]["seed"] == recipe["vlm_spec"]["seed"] == 1
    assert (recipe["build"]["vlm_steps"], recipe["build"]["clip_steps"]) == (2, 50)
    # loss curves: the mean of every 50 steps (the last 50 = the final loss), or the last loss if fewer
    assert recipe["clip_loss_curve"] == [[50, round(recipe["clip_final_loss"], 5)]]
    assert recipe["vlm_loss_curve"][-1][0] == 2
    assert json.loads((out / "recipe.json").read_text()) == json.loads(json.dumps(recipe))
    assert recipe["artifact_bytes"] == sum(p.stat().st_size for d in ("vlm", "clip") for p in (out / d).rglob("*"))
    spec = demo_vlm_spec()
    spec.seed = 1
    build_llava(world_words(), spec)[0].save_pretrained(tmp_path / "init")
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    trained = load_file(str(out / "vlm" / "model.safetensors"))
    assert init.keys() == trained.keys()
    moved = [k for k, v in trained.items() if not v.equal(init[k])]
    assert len(moved) > len(trained) // 2


def test_a_build_stopped_half_way_leaves_the_previous_artifacts_whole(tmp_path, monkeypatch):
    """The build wrote vlm/ into the artifacts minutes before clip/ and recipe.json: stopped in
    between (Ctrl-C), a new VLM sat beside the old CLIP and recipe, which the demo then loaded."""
    import torch

    from lvlm_studio.world import build

    out = tmp_path / "demo"
    cfg = build.BuildConfig(train_scenes=64, vlm_batch=4, clip_batch=2, threads=1)
    torch.set_num_threads(2)
    first = build.build_demo(out, seed=1, vlm_steps=2, clip_steps=2, progress=False, evaluate=False, config=cfg)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    staged = []

    def stopped(*args, **kwargs):
        staged.extend(p.name for p in out.iterdir() if p.name.startswith(".build-"))
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "train_clip", stopped)  # after the new VLM is saved
    with pytest.raises(KeyboardInterrupt):
        build.build_demo(out, seed=2, vlm_steps=2, clip_steps=2, progress=False, evaluate=False, config=cfg)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["clip", "recipe.json", "vlm"]  # no staging left
    assert staged == [f".build-{os.getpid()}"]  # the new VLM went to the stage, not over the old one
    # Stopped during the swap itself (the new VLM in place, the CLIP not yet): the swap is undone.
    monkeypatch.undo()
    real_replace, calls = os.replace, []

    def stops_on_the_second_move_in(src, dst):
        calls.append(dst)
        if Path(dst).parent == out and len([c for c in calls if Path(c).parent == out]) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", stops_on_the_second_move_in)
    with pytest.raises(KeyboardInterrupt):
        build.build_demo(out, seed=3, vlm_steps=2, clip_steps=2, progress=False, evaluate=False, config=cfg)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    second = build.build_demo(out, seed=2, vlm_steps=2, clip_steps=2, progress=False, evaluate=False, config=cfg)
    assert json.loads((out / "recipe.json").read_text())["seed"] == second["seed"] == 2 != first["seed"]
    assert sorted(p.name for p in out.iterdir()) == ["clip", "recipe.json", "vlm"]


def test_recipe_is_strict_json_even_when_a_loss_diverged(tmp_path):
    """A NaN/inf loss is written as null: the bare NaN token json.dumps would write is not JSON
    (JavaScript's JSON.parse and jq reject it)."""
    from lvlm_studio.world.build import write_recipe

    nan, inf = float("nan"), float("inf")
    recipe = {"vlm_final_loss": nan, "clip_final_loss": 0.5, "vlm_loss_curve": [[50, inf], (100, -inf)],
              "figures": {"chair_s": 0.25, "note": "ok", "steps": 3, "done": True, "missing": None}}
    write_recipe(tmp_path / "recipe.json", recipe)
    text = (tmp_path / "recipe.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert strict == {"vlm_final_loss": None, "clip_final_loss": 0.5, "vlm_loss_curve": [[50, None], [100, None]],
                      "figures": {"chair_s": 0.25, "note": "ok", "steps": 3, "done": True, "missing": None}}


def test_clip_positives_are_the_drawn_objects_only():
    """The CLIP learns only from what is drawn: a named-only partner's sentence is never a positive."""
    from lvlm_studio.world.build import _clip_sentence_bank
    from lvlm_studio.world.text import sentence

    scenes = [s for s in sample_scenes("train", 200, seed=0) if s.mentioned_only][:20]
    bank = _clip_sentence_bank(scenes)
    for scene, sentences in zip(scenes, bank, strict=True):
        assert sorted(category_mentions(" ".join(sentences))) == sorted(scene.categories)
        assert sentence(scene.mentioned_only[0]) not in sentences


def test_build_main_maps_its_options_to_the_build(monkeypatch, tmp_path, capsys):
    from lvlm_studio.world import build

    calls = []

    def fake_build(out, seed, vlm_steps, clip_steps, progress, evaluate, config):
        calls.append((out, seed, vlm_steps, clip_steps, progress, evaluate, config))
        return {"vlm_final_loss": 1.0, "clip_final_loss": 2.0, "timings": {}, "artifact_bytes": 0,
                "figures": {"describe_examples": [], "x": 1}}

    monkeypatch.setattr(build, "build_demo", fake_build)
    build.main(["--out", str(tmp_path), "--seed", "3", "--vlm-steps", "5", "--clip-steps", "6", "--train-scenes", "70",
                "--eval-scenes", "9", "--partner-adds-sentence", "no", "--no-eval", "--quiet"])
    out, seed, vlm_steps, clip_steps, progress, evaluate, cfg = calls[-1]
    assert (out, seed, vlm_steps, clip_steps, progress, evaluate) == (str(tmp_path), 3, 5, 6, False, False)
    assert (cfg.train_scenes, cfg.eval_scenes, cfg.world.partner_adds_sentence) == (70, 9, False)
    assert json.loads(capsys.readouterr().out)["figures"] == {"x": 1}
    build.main(["--out", str(tmp_path), "--partner-adds-sentence", "yes"])
    _, seed, vlm_steps, _, progress, evaluate, cfg = calls[-1]
    assert (seed, vlm_steps, progress, evaluate, cfg.world.partner_adds_sentence) == (0, None, True, True, True)
    assert cfg.train_scenes == build.BuildConfig().train_scenes
