"""Captions, POPE-style probes and dataset items of ShapesWorld scenes.

An item record (what the rest of the project imports) is a plain dict::

    {"image": PIL.Image, "prompt": str, "reference": str, "objects": [category, ...],
     "meta": {"scene": {...}, "split": str, "kind": "describe" | "pope" | "count", "target": str,
              "probe": category | None, "label": "yes" | "no" | None, "pope_mode": str | None}}

``reference`` is always the truth about what is drawn; ``meta["target"]`` is what a trainer sees
(in the TRAIN split the noisy caption / noisy probe answer, elsewhere equal to ``reference``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from .render import render
from .scenes import Scene, WorldConfig, WorldObject, cooccurrence_table, popularity, sample_scene
from .vocab import (
    CATEGORIES,
    COUNT_PROMPT,
    COUNT_WORDS,
    DESCRIBE_PROMPT,
    NO,
    POPE_TEMPLATE,
    PRIOR_PARTNERS,
    SENTENCE_TEMPLATE,
    YES,
)

POPE_MODES = ("random", "popular", "adversarial")
KINDS = ("describe", "pope", "count")


def sentence(obj: WorldObject) -> str:
    """"There is a small red circle at the top left." """
    return SENTENCE_TEMPLATE.format(size=obj.size, colour=obj.colour, shape=obj.shape, position=obj.position)


def caption(objects: Iterable[WorldObject]) -> str:
    """One sentence per object, in the given order."""
    return " ".join(sentence(o) for o in objects)


def true_caption(scene: Scene) -> str:
    """The caption of what is drawn (ground truth)."""
    return caption(scene.objects)


def training_caption(scene: Scene) -> str:
    """The (noisy) caption a TRAIN scene ships with: drawn objects, then named-only ones."""
    return caption(scene.caption_objects)


def pope_question(category: str) -> str:
    return POPE_TEMPLATE.format(category=category)


def count_answer(n: int) -> str:
    return f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]} object{'' if n == 1 else 's'}."


def negative_probe(present: set[str], mode: str, rng: random.Random) -> str | None:
    """An absent category to ask about: random, popular (most named in TRAIN) or adversarial
    (the prior partner of a present object, else the absent object co-occurring most with one)."""
    absent = [c for c in CATEGORIES if c not in present]
    if not absent:
        return None
    if mode == "random":
        return rng.choice(absent)
    if mode == "popular":
        return next(c for c in popularity() if c in absent)
    if mode == "adversarial":
        if not present:  # an empty scene (WorldConfig(min_objects=0)): no partner, no co-occurrence
            return next(c for c in popularity() if c in absent)
        partners = [PRIOR_PARTNERS[c] for c in sorted(present) if c in PRIOR_PARTNERS]
        partners = [p for p in partners if p in absent]
        if partners:
            return partners[0]
        table = cooccurrence_table()
        order = popularity()
        return max(absent, key=lambda b: (max(table[a][b] for a in present), -order.index(b)))
    raise ValueError(f"unknown POPE mode {mode!r}; expected one of {POPE_MODES}")


def scene_items(
    scene: Scene,
    kinds: Iterable[str] = ("describe",),
    pope_mode: str = "adversarial",
    pope_per_scene: int = 1,
    image_size: int | None = None,
) -> list[dict]:
    """Items of one scene: a describe item, ``pope_per_scene`` yes + no probes, a count question."""
    kinds = tuple(kinds)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown item kinds {sorted(unknown)}; expected some of {KINDS}")
    image = render(scene, image_size or 64)
    truth = scene.categories
    named = {o.category for o in scene.caption_objects}
    scene_json = scene.to_json()
    base_meta = {"scene": scene_json, "split": scene.split, "scene_index": scene.index}
    items: list[dict] = []

    def add(kind: str, prompt: str, reference: str, target: str, **meta) -> None:
        items.append(
            {
                "image": image,
                "prompt": prompt,
                "reference": reference,
                "objects": list(truth),
                "meta": {**base_meta, "kind": kind, "target": target, "probe": None, "label": None,
                         "pope_mode": None, **meta},
            }
        )

    if "describe" in kinds:
        add("describe", DESCRIBE_PROMPT, true_caption(scene), training_caption(scene))
    if "pope" in kinds:
        rng = random.Random(f"pope/{scene.split}/{scene.seed}/{scene.index}/{pope_mode}")
        positives = rng.sample(truth, min(pope_per_scene, len(truth)))
        present = set(truth)
        negatives: list[str] = []
        for _ in range(pope_per_scene):
            neg = negative_probe(present | set(negatives), pope_mode, rng)
            if neg is not None:
                negatives.append(neg)
        for cat in positives + negatives:
            label = "yes" if cat in present else "no"
            add(
                "pope",
                pope_question(cat),
                YES if label == "yes" else NO,
                YES if cat in named else NO,
                probe=cat,
                label=label,
                pope_mode=pope_mode,
            )
    if "count" in kinds:
        # Counts are of what is visible, also in TRAIN (the alt-text noise is in the caption only).
        add("count", COUNT_PROMPT, count_answer(len(truth)), count_answer(len(truth)))
    return items


def world_items(
    split: str = "test",
    n: int = 100,
    seed: int = 0,
    kinds: Iterable[str] = ("describe",),
    pope_mode: str = "adversarial",
    pope_per_scene: int = 1,
    cfg: WorldConfig | None = None,
    start: int = 0,
) -> list[dict]:
    """Items of scenes ``start .. start+n-1`` of ``split`` (deterministic for a seed).

    ``n`` counts scenes; each gives one item per requested kind (POPE: up to ``pope_per_scene``
    "yes" probes and as many "no" probes).
    """
    cfg = cfg or WorldConfig()
    items: list[dict] = []
    for i in range(start, start + n):
        scene = sample_scene(split, i, seed, cfg)
        items.extend(scene_items(scene, kinds, pope_mode, pope_per_scene, cfg.image_size))
    return items
