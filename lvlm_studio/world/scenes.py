"""Seeded ShapesWorld scenes: 1-4 objects on a 3x3 grid, a biased TRAIN split and an unbiased TEST split.

A scene is plain data (JSON-serialisable): the drawn objects with their render jitter, plus the
objects a noisy training caption *names without drawing* (``mentioned_only``). Ground truth is
always the drawn objects.

Why a noisy prior: a prior the model can check by looking does not survive training (docs/EXPERIMENTS.md:
a faint partner was learnt perfectly). Web alt-text names things that are out of frame; here a
TRAIN caption of a scene with a trigger object ("red circle") names its partner ("green
triangle") in most such scenes although the partner is not drawn, so a model that leans on the
prior names an absent object, as real LVLMs do. The TEST split samples objects uniformly.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import combinations

from .vocab import CATEGORIES, COLOURS, COUNT_WORDS, MAX_OBJECTS, POSITIONS, PRIOR_PARTNERS, SHAPES, SIZES

SPLITS = ("train", "test")


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled. Defaults are the shipped demo world (see recipe.json)."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    # Share of TRAIN scenes built around a trigger of PRIOR_PARTNERS (its partner is then named).
    prior_rate: float = 0.4
    # Share of those prior scenes whose caption names the partner although it is NOT drawn.
    # First ShapesWorld experiment (docs/EXPERIMENTS.md): 0.6 gave CHAIR_s 0.177 with every hallucination prior-driven; stronger here.
    partner_undrawn: float = 0.75
    # Share of non-prior TRAIN scenes that may contain a trigger without naming its partner
    # (keeps the prior probabilistic rather than a rule).
    trigger_leak: float = 0.1
    # False: a named-only partner takes one of the scene's n caption slots (captions name <= 4).
    # True: it is an extra sentence after n drawn objects (captions may name 5), so the prior also
    # fires in the busiest scenes (False leaves 4-object test scenes without a learnt prior).
    partner_adds_sentence: bool = True
    # Render jitter (pixels at image_size, relative scale, colour channel units).
    jitter_px: int = 2
    scale_jitter: float = 0.08
    colour_jitter: int = 12

    def __post_init__(self):
        # Refuse bounds the sampler cannot honour rather than silently drawing outside them.
        if not 0 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 0 <= min_objects <= max_objects <= {MAX_OBJECTS} (count answers have words up to "
                f"{COUNT_WORDS[MAX_OBJECTS]!r}); got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name in ("prior_rate", "partner_undrawn", "trigger_leak"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share and must lie in [0, 1]; got {getattr(self, name)}")
        if self.prior_rate > 0 and self.max_objects < 2:
            raise ValueError(
                f"max_objects={self.max_objects} leaves no room for a prior scene (its trigger plus the partner "
                "its caption names): set max_objects >= 2 or prior_rate=0"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WorldObject:
    colour: str
    shape: str
    size: str
    position: str
    dx: int = 0
    dy: int = 0
    scale: float = 1.0
    rgb: tuple[int, int, int] = (0, 0, 0)

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def cell(self) -> tuple[int, int]:
        return POSITIONS[self.position]


@dataclass
class Scene:
    split: str
    seed: int
    index: int
    objects: list[WorldObject]  # drawn, in reading order
    mentioned_only: list[WorldObject] = field(default_factory=list)  # named by the noisy caption
    background: int = 245
    prior_trigger: str | None = None

    @property
    def categories(self) -> list[str]:
        """Ground truth: categories of the drawn objects."""
        return [o.category for o in self.objects]

    @property
    def caption_objects(self) -> list[WorldObject]:
        """Objects the (training) caption names: drawn ones in reading order, then named-only ones."""
        return list(self.objects) + list(self.mentioned_only)

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "seed": self.seed,
            "index": self.index,
            "background": self.background,
            "prior_trigger": self.prior_trigger,
            "objects": [asdict(o) for o in self.objects],
            "mentioned_only": [asdict(o) for o in self.mentioned_only],
        }

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        def obj(d: dict) -> WorldObject:
            return WorldObject(**{**d, "rgb": tuple(d["rgb"])})

        return cls(
            split=data["split"],
            seed=data["seed"],
            index=data["index"],
            objects=[obj(d) for d in data["objects"]],
            mentioned_only=[obj(d) for d in data.get("mentioned_only", [])],
            background=data.get("background", 245),
            prior_trigger=data.get("prior_trigger"),
        )


def _rng(split: str, seed: int, index: int) -> random.Random:
    # String seeds are hashed with sha512 by random.Random: stable across runs and PYTHONHASHSEED.
    return random.Random(f"shapesworld/{split}/{seed}/{index}")


def _make_object(rng: random.Random, category: str, position: str, cfg: WorldConfig) -> WorldObject:
    colour, shape = category.split(" ")
    j = cfg.colour_jitter
    rgb = tuple(max(0, min(255, v + rng.randint(-j, j))) for v in COLOURS[colour])
    return WorldObject(
        colour=colour,
        shape=shape,
        size=rng.choice(list(SIZES)),
        position=position,
        dx=rng.randint(-cfg.jitter_px, cfg.jitter_px),
        dy=rng.randint(-cfg.jitter_px, cfg.jitter_px),
        scale=round(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter), 3),
        rgb=rgb,  # type: ignore[arg-type]
    )


def sample_scene(split: str, index: int, seed: int = 0, cfg: WorldConfig | None = None) -> Scene:
    """Scene ``index`` of ``split`` for ``seed`` (deterministic: same arguments, same scene)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    cfg = cfg or WorldConfig()
    rng = _rng(split, seed, index)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = list(POSITIONS)
    rng.shuffle(cells)
    triggers = list(PRIOR_PARTNERS)
    trigger = None
    undrawn_partner = False
    if split == "train" and rng.random() < cfg.prior_rate:
        trigger = rng.choice(triggers)
        partner = PRIOR_PARTNERS[trigger]
        undrawn_partner = rng.random() < cfg.partner_undrawn
        # Other objects: any category but the pair itself and the other triggers (one prior per scene).
        pool = [c for c in CATEGORIES if c not in (trigger, partner) and c not in triggers]
        extra = 1 if (cfg.partner_adds_sentence and undrawn_partner) else 0
        rest = rng.sample(pool, min(len(pool), max(0, n - 2 + extra)))
        drawn = [trigger] + ([] if undrawn_partner else [partner]) + rest
    else:
        pool = list(CATEGORIES)
        if split == "train" and rng.random() >= cfg.trigger_leak:
            pool = [c for c in pool if c not in triggers]
        drawn = rng.sample(pool, n)
        if split == "train":
            # A trigger that leaks in without its prior comes without its partner, so the leak is a
            # clean counter-example to the prior.
            leaked_partners = {PRIOR_PARTNERS[t] for t in drawn if t in PRIOR_PARTNERS}
            drawn = [c for c in drawn if c not in leaked_partners]
            if len(drawn) < cfg.min_objects:
                # Refill the dropped slots with neutral categories (never a trigger or a dropped
                # partner) so min_objects holds; unreachable at the default min_objects=1, so the
                # shipped world's scenes are unchanged.
                refill = [c for c in pool if c not in drawn and c not in leaked_partners and c not in triggers]
                drawn += rng.sample(refill, cfg.min_objects - len(drawn))
    objects = [_make_object(rng, cat, cells[i], cfg) for i, cat in enumerate(drawn)]
    mentioned = []
    if trigger is not None and undrawn_partner:
        mentioned = [_make_object(rng, PRIOR_PARTNERS[trigger], cells[len(drawn)], cfg)]
    order = list(POSITIONS)
    objects.sort(key=lambda o: order.index(o.position))
    return Scene(
        split=split,
        seed=seed,
        index=index,
        objects=objects,
        mentioned_only=mentioned,
        background=rng.randint(232, 252),
        prior_trigger=trigger,
    )


def sample_scenes(split: str, n: int, seed: int = 0, cfg: WorldConfig | None = None, start: int = 0) -> list[Scene]:
    return [sample_scene(split, i, seed, cfg) for i in range(start, start + n)]


def cooccurrence_counts(scenes: list[Scene], named: bool = True) -> tuple[Counter, Counter]:
    """(single counts, unordered pair counts) of categories per scene.

    ``named=True`` counts what captions name (the annotation a trainer sees), else what is drawn.
    """
    singles: Counter = Counter()
    pairs: Counter = Counter()
    for scene in scenes:
        cats = sorted({o.category for o in (scene.caption_objects if named else scene.objects)})
        singles.update(cats)
        pairs.update(combinations(cats, 2))
    return singles, pairs


def conditional_rate(scenes: list[Scene], given: str, target: str, named: bool = True) -> float:
    """P(target in scene | given in scene), by caption mentions (``named``) or drawn objects."""
    with_given = [s for s in scenes if given in {o.category for o in (s.caption_objects if named else s.objects)}]
    if not with_given:
        return 0.0
    hits = sum(target in {o.category for o in (s.caption_objects if named else s.objects)} for s in with_given)
    return hits / len(with_given)


@lru_cache(maxsize=4)
def cooccurrence_table(n: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """P(b named | a named) over TRAIN captions, for every pair of categories (POPE adversarial)."""
    scenes = sample_scenes("train", n, seed)
    singles, pairs = cooccurrence_counts(scenes, named=True)
    table: dict[str, dict[str, float]] = {a: {} for a in CATEGORIES}
    for a in CATEGORIES:
        for b in CATEGORIES:
            if a == b:
                continue
            joint = pairs[tuple(sorted((a, b)))]
            table[a][b] = joint / singles[a] if singles[a] else 0.0
    return table


@lru_cache(maxsize=4)
def popularity(n: int = 2000, seed: int = 0) -> tuple[str, ...]:
    """Categories by how often TRAIN captions name them, most frequent first (POPE popular)."""
    singles, _ = cooccurrence_counts(sample_scenes("train", n, seed), named=True)
    return tuple(sorted(CATEGORIES, key=lambda c: (-singles[c], c)))


__all__ = [
    "SPLITS",
    "WorldConfig",
    "WorldObject",
    "Scene",
    "sample_scene",
    "sample_scenes",
    "cooccurrence_counts",
    "conditional_rate",
    "cooccurrence_table",
    "popularity",
    "COLOURS",
    "SHAPES",
]
