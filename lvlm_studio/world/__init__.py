"""ShapesWorld: a small synthetic world whose ground truth is known, with a language prior.

See ``vocab`` (words, categories, PRIOR_PARTNERS), ``scenes`` (seeded sampler, splits,
co-occurrence), ``render``, ``text`` (captions, probes, ``world_items``) and ``build`` (the demo
VLM + CLIP). Importing this package does not import torch.
"""

from pathlib import Path

from .render import png_bytes, render
from .scenes import (
    Scene,
    WorldConfig,
    WorldObject,
    conditional_rate,
    cooccurrence_counts,
    cooccurrence_table,
    popularity,
    sample_scene,
    sample_scenes,
)
from .text import (
    POPE_MODES,
    caption,
    negative_probe,
    pope_question,
    scene_items,
    sentence,
    training_caption,
    true_caption,
    world_items,
)
from .vocab import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    DESCRIBE_PROMPT,
    POPE_TEMPLATE,
    POSITIONS,
    PRIOR_PARTNERS,
    SHAPES,
    SIZES,
    WORLD_VOCAB,
    category_mentions,
    vocab_hash,
    world_words,
)

# Where the shipped demo build lives (vlm/, clip/, recipe.json).
DEMO_DIR = Path(__file__).parent / "artifacts"

__all__ = [
    "CATEGORIES", "COLOURS", "COUNT_WORDS", "DEMO_DIR", "DESCRIBE_PROMPT", "POPE_MODES", "POPE_TEMPLATE",
    "POSITIONS", "PRIOR_PARTNERS", "SHAPES", "SIZES", "WORLD_VOCAB", "Scene", "WorldConfig",
    "WorldObject", "caption", "category_mentions", "conditional_rate", "cooccurrence_counts",
    "cooccurrence_table", "negative_probe", "png_bytes", "popularity", "pope_question", "render",
    "sample_scene", "sample_scenes", "scene_items", "sentence", "training_caption", "true_caption",
    "vocab_hash", "world_items", "world_words",
]
