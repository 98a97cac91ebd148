"""ShapesWorld vocabulary: colours, shapes, sizes, positions, the co-occurrence prior, templates.

Everything another module needs to read world text (object extraction for CHAIR/POPE, POVID's
hallucination injection, the demo tokenizer) is importable from here without torch.
An object *category* (what CHAIR counts) is "<colour> <shape>", e.g. "red circle".
"""

from __future__ import annotations

import hashlib
import json
import re

# 4 colours x 3 shapes = 12 categories, as in the first ShapesWorld experiment (docs/EXPERIMENTS.md): small enough that a
# 1 M-parameter model learns to see them on 2 CPU cores, large enough for a real prior.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 195, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Size word -> object diameter in pixels at the 64 px reference resolution.
SIZES: dict[str, int] = {"small": 14, "large": 19}
# A 3x3 grid; the phrase is what follows "at the" in a caption. (row, col), row 0 = top.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4

CATEGORIES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# The language prior of the TRAIN split (trigger -> partner): training captions of scenes with the
# trigger name the partner, mostly although it is not drawn (noisy alt-text). Two disjoint pairs
# whose four objects use every colour and shape, so no colour or shape alone predicts the prior.
PRIOR_PARTNERS: dict[str, str] = {
    "red circle": "green triangle",
    "blue square": "yellow circle",
}

DESCRIBE_PROMPT = "Describe the image."
POPE_TEMPLATE = "Is there a {category} in the image?"
COUNT_PROMPT = "How many objects are in the image?"
SENTENCE_TEMPLATE = "There is a {size} {colour} {shape} at the {position}."
YES, NO = "Yes.", "No."

WORLD_VOCAB: dict[str, tuple[str, ...]] = {
    "objects": CATEGORIES,
    "colours": tuple(COLOURS),
    "shapes": SHAPES,
    "sizes": tuple(SIZES),
    "positions": tuple(POSITIONS),
    "counts": COUNT_WORDS,
}

# "red circle", "red circles" -> category; longest alternatives first.
_CATEGORY_RE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE
)


def category_mentions(text: str) -> list[str]:
    """Every "<colour> <shape>" in ``text``, in order (a reference extractor for world text).

    evaluation.py owns the project's extraction (the demo build measures its model with it too);
    this is the world's own minimal version, which the world's tests read their captions with.
    """
    return [f"{c.lower()} {s.lower()}" for c, s in _CATEGORY_RE.findall(text)]


def template_texts() -> list[str]:
    """Every sentence the world can produce (used to build the word vocabulary)."""
    texts = [DESCRIBE_PROMPT, COUNT_PROMPT, YES, NO]
    for cat in CATEGORIES:
        texts.append(POPE_TEMPLATE.format(category=cat))
    for size in SIZES:
        for colour in COLOURS:
            for shape in SHAPES:
                for pos in POSITIONS:
                    texts.append(SENTENCE_TEMPLATE.format(size=size, colour=colour, shape=shape, position=pos))
    for n, word in enumerate(COUNT_WORDS):
        texts.append(f"There {'is' if n == 1 else 'are'} {word} object{'' if n == 1 else 's'}.")
    return texts


def world_words() -> list[str]:
    """Sorted word list of the world, each word also capitalised (sentence starts, user prompts)."""
    words: set[str] = set()
    for text in template_texts():
        words.update(re.findall(r"\w+|[^\w\s]", text))
    words |= {w.capitalize() for w in words if w.isalpha()} | {w.lower() for w in words if w.isalpha()}
    return sorted(words)


def vocab_hash(words: list[str] | None = None) -> str:
    """sha256 (first 16 hex) of the word list: the demo recipe records it, tests compare it."""
    words = world_words() if words is None else words
    return hashlib.sha256(json.dumps(words).encode()).hexdigest()[:16]
