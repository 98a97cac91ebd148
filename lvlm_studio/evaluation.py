"""Hallucination metrics: object extraction (ShapesWorld, COCO), CHAIR, object recall, POPE.

Everything here is pure Python over texts and ground-truth object sets (no store, no torch), except
``evaluate_backend``, which only calls ``backend.sample`` of the model protocol (models/base.py).

CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"):
  * CHAIR_i = hallucinated object mentions / all object mentions, pooled over all captions, every
    occurrence counted (as the reference ``chair.py`` counts ``node_words``);
  * CHAIR_s = captions with at least one hallucinated mention / all captions;
  * object recall = ground-truth objects mentioned / ground-truth objects (pooled). CHAIR alone is
    gamed by saying less, so recall is always reported beside it.
  A mention is a hallucination when its canonical object is not in the image's ground truth.
  Negation is not understood ("there is no dog" mentions a dog), exactly as in the reference.

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
  "Is there a {object} in the image?" with ``n`` present objects ("yes") and ``n`` absent ones
  ("no") per image; negatives sampled at random, by popularity (the dataset's most frequent objects
  absent from the image) or adversarially (the objects that co-occur most with the image's objects,
  absent from it). Answers are parsed as the reference does (the first sentence; the words "no" or
  "not" mean no, anything else yes), except that case and punctuation are ignored: POPE's own
  script matches "No" / "no" / "not" after stripping commas only, so it reads "NO", "No!" or
  "Not really" as yes. "yes" is the positive class of precision / recall / F1; with no "yes"
  answer at all precision, recall and F1 are 0.0 (the reference divides by zero).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Mention:
    """One object mention: ``text[start:end]`` names canonical object ``object``."""

    start: int
    end: int
    text: str
    object: str


@runtime_checkable
class ObjectExtractor(Protocol):
    """Finds object mentions in free text and canonicalises ground-truth object lists."""

    name: str

    def mentions(self, text: str) -> list[Mention]:
        """Every mention in order of appearance (repeats included)."""
        ...

    def extract(self, text: str) -> list[str]:
        """Canonical object of every mention, in order (repeats included)."""
        ...

    def ground_truth(self, objects: Iterable[Any]) -> set[str]:
        """Canonical object set of an image's ground truth (strings or dicts)."""
        ...

    @property
    def vocabulary(self) -> list[str]:
        """All canonical objects (POPE draws its negatives from these)."""
        ...


# ----------------------------------------------------------------------------------------------
# Word tokens with offsets, and a small English singulariser
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+")

# Plural -> singular for nouns the suffix rules get wrong; methods.povid reads it backwards.
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "knives": "knife", "pocketknives": "pocketknife",
    "wolves": "wolf", "leaves": "leaf", "shelves": "shelf", "calves": "calf", "halves": "half",
    "loaves": "loaf", "scarves": "scarf", "wives": "wife", "lives": "life", "dice": "die",
    "cacti": "cactus", "fungi": "fungus", "buses": "bus", "gases": "gas", "skis": "ski",
    "radii": "radius", "sheep": "sheep", "fish": "fish", "deer": "deer", "series": "series",
    "species": "species", "bison": "bison", "cattle": "cattle", "glasses": "glass",
    "dresses": "dress", "bosses": "boss", "classes": "class", "crosses": "cross",
}
# Words ending in s that are singular already.
_SINGULAR_S = {
    "bus", "glass", "gas", "grass", "dress", "class", "boss", "cross", "tennis", "this", "is", "was",
    "has", "its", "us", "yes", "his", "as", "plus", "lens", "news", "scissors", "pants", "jeans",
    "shorts", "canvas", "octopus", "cactus", "bonus", "status", "hippopotamus", "walrus", "circus",
    "asparagus", "citrus", "always", "perhaps", "across", "less", "series", "species",
}


def singularize(word: str) -> str:
    """Plural English noun → singular (lower-case in, lower-case out). Covers the plural forms of
    the COCO synonyms and ShapesWorld's shapes; unknown words are returned unchanged."""
    w = word.lower()
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if len(w) <= 3 or w in _SINGULAR_S or w.endswith(("ss", "us", "is")):
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zzes", "sses")):
        return w[:-2]
    if w.endswith("oes") and w[:-2] in {"potato", "tomato", "hero", "volcano", "mango", "echo", "buffalo",
                                        "flamingo"}:
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _joined(text: str, *tokens: tuple[str, int, int]) -> bool:
    """Whether consecutive tokens form one phrase: only spaces, underscores or one hyphen or dash
    between them ("hot-dog", "hot_dog", "red – circle" join; "a baby, dog" and "... baby. Dog" do
    not, as in chair.py's tokens)."""
    return all(re.fullmatch(r"[\s_]+|\s*[-\u2010\u2011\u2013]\s*", text[a[2]:b[1]])
               for a, b in zip(tokens, tokens[1:], strict=False))


# ----------------------------------------------------------------------------------------------
# ShapesWorld
# ----------------------------------------------------------------------------------------------
# Fallback vocabulary; the real one is lvlm_studio.world's WORLD_VOCAB when that module is present.
DEFAULT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
DEFAULT_SHAPES = ("circle", "square", "triangle", "star")
DEFAULT_SIZES = ("small", "large", "big", "tiny", "medium")


class ShapesWorldExtractor:
    """Exact-vocabulary extraction for ShapesWorld: a mention is "<colour> <shape>", with an optional
    size word before the colour ("a small red circle") or between colour and shape ("red small
    circle"); shapes singular or plural ("two red circles" is one mention of "red circle"). Every
    occurrence counts. The canonical object is "<colour> <shape>" (size is not part of identity).
    """

    name = "shapesworld"

    def __init__(
        self,
        colours: Sequence[str] = DEFAULT_COLOURS,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        sizes: Sequence[str] = DEFAULT_SIZES,
    ):
        self.colours = tuple(c.lower() for c in colours)
        self.shapes = tuple(s.lower() for s in shapes)
        self.sizes = tuple(s.lower() for s in sizes)
        self._colour_set, self._shape_set, self._size_set = set(self.colours), set(self.shapes), set(self.sizes)

    @classmethod
    def from_world(cls) -> ShapesWorldExtractor:
        """The extractor over lvlm_studio.world's vocabulary (fallback: the default word lists)."""
        try:
            from lvlm_studio import world
        except ImportError:
            return cls()
        vocab = getattr(world, "WORLD_VOCAB", None)
        if isinstance(vocab, dict):
            return cls(
                colours=vocab.get("colours") or vocab.get("colors") or DEFAULT_COLOURS,
                shapes=vocab.get("shapes") or DEFAULT_SHAPES,
                sizes=vocab.get("sizes") or DEFAULT_SIZES,
            )
        colours = getattr(world, "COLOURS", None) or getattr(world, "COLORS", None)
        shapes = getattr(world, "SHAPES", None)
        sizes = getattr(world, "SIZES", None)
        if colours and shapes:
            return cls(colours, shapes, sizes or DEFAULT_SIZES)
        return cls()

    @property
    def vocabulary(self) -> list[str]:
        return [f"{c} {s}" for c in self.colours for s in self.shapes]

    def _shape(self, word: str) -> str | None:
        if word in self._shape_set:
            return word
        single = singularize(word)
        return single if single in self._shape_set else None

    def mentions(self, text: str) -> list[Mention]:
        toks = _tokens(text or "")
        out: list[Mention] = []
        i = 0
        while i < len(toks):
            word, start, _ = toks[i]
            if word in self._colour_set:
                j = i + 1
                if j < len(toks) and toks[j][0] in self._size_set:
                    j += 1
                if j < len(toks) and _joined(text, *toks[i:j + 1]):
                    shape = self._shape(toks[j][0])
                    if shape is not None:
                        end = toks[j][2]
                        out.append(Mention(start, end, text[start:end], f"{word} {shape}"))
                        i = j + 1
                        continue
            i += 1
        return out

    def extract(self, text: str) -> list[str]:
        return [m.object for m in self.mentions(text)]

    def ground_truth(self, objects: Iterable[Any]) -> set[str]:
        """Accepts "red circle", "small red circle", {"colour": .., "shape": ..} (also "color")."""
        out: set[str] = set()
        for obj in objects or ():
            if isinstance(obj, dict):
                colour = obj.get("colour") or obj.get("color")
                shape = obj.get("shape")
                # parsed as the text form is (plural shapes singular, unknown words refused)
                obj = f"{colour} {shape}" if colour and shape else obj.get("name") or obj.get("object") or ""
            found = self.extract(str(obj))
            if not found:
                raise ValueError(f"ground-truth object {obj!r} is not a ShapesWorld '<colour> <shape>' object")
            out.update(found)
        return out


# ----------------------------------------------------------------------------------------------
# COCO (CHAIR's synonym table and rules)
# ----------------------------------------------------------------------------------------------
# The 80 MSCOCO categories, first entry = category, then its synonyms: CHAIR's synonyms.txt
# (Rohrbach et al. 2018, github.com/LisaAnne/Hallucination, data/synonyms.txt), written from the
# reference. Entries are lower-cased here ("iPhone" in the reference could never match its
# lower-cased captions); duplicates of the reference are harmless and dropped.
COCO_SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bikes, bicycles, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter, motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter, meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, grizzly
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knives
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake, cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iphone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book, novel, minibook, paperback, hardcover
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer, hair dryer, blow dryer, blowdryer, blow drier, blowdrier, hairdrier
toothbrush
"""


def _parse_synonyms(txt: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in txt.strip().splitlines():
        names = [n.strip().lower() for n in line.split(",") if n.strip()]
        table[names[0]] = list(dict.fromkeys(names))
    return table


COCO_SYNONYMS: dict[str, list[str]] = _parse_synonyms(COCO_SYNONYMS_TXT)
COCO_CATEGORIES: list[str] = list(COCO_SYNONYMS)
assert len(COCO_CATEGORIES) == 80, len(COCO_CATEGORIES)

# chair.py: common two-word names that must be read as one word (those that are no COCO object,
# "home plate", "train track", are merged too so that "train track" does not count as a train).
COCO_DOUBLE_WORDS = [
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
]
# chair.py: "baby bird" / "adult bird" is the bird, not a person; "passenger jet" is the jet.
_ANIMAL_WORDS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub"]
_VEHICLE_WORDS = ["jet", "train"]


def _coco_double_word_map() -> dict[str, str]:
    mapping = {w: w for w in COCO_DOUBLE_WORDS}
    for animal in _ANIMAL_WORDS:
        mapping[f"baby {animal}"] = animal
        mapping[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        mapping[f"passenger {vehicle}"] = vehicle
    mapping["bow tie"] = "tie"
    mapping["toilet seat"] = "toilet"
    # Two-word synonyms of the table that chair.py's list misses ("hair dryer", "blow dryer", ...).
    for synonyms in COCO_SYNONYMS.values():
        for s in synonyms:
            if s.count(" ") == 1:
                mapping.setdefault(s, s)
    return mapping


class CocoExtractor:
    """CHAIR's COCO procedure: lower-case, tokenise, singularise, merge two-word names (incl. the
    special rules above), keep words in the 80 categories' synonym lists, map each to its category.
    Three-word names ("stove top oven") are matched too. "seat" is dropped from a caption that also
    mentions a toilet, as chair.py does."""

    name = "coco"

    def __init__(self, synonyms: dict[str, list[str]] | None = None):
        self.synonyms = synonyms or COCO_SYNONYMS
        self.inverse: dict[str, str] = {}
        for category, names in self.synonyms.items():
            for n in names:
                self.inverse.setdefault(n, category)
        self.double = _coco_double_word_map()
        self.triple = {n for n in self.inverse if n.count(" ") == 2}
        # Words never singularised: single-word synonyms and parts of multi-word names (tennis, bus, ...).
        self._keep = {w for n in [*self.inverse, *self.double] for w in n.split()}

    @property
    def vocabulary(self) -> list[str]:
        return list(self.synonyms)

    def _singular(self, word: str) -> str:
        """The singular of a plural, preferring a form the vocabulary knows: the rules cannot tell
        "taxis" (taxi) from "axis", "collies" (collie) from "lilies", so the known word decides
        (policemen, grandchildren, minibuses, corgis, tvs, ...)."""
        guesses = [word[:-3] + "man" if word.endswith("men") else None,
                   word[:-3] if word.endswith("children") else None,
                   word[:-1] if word.endswith("s") else None,
                   word[:-2] if word.endswith(("ses", "xes", "zes", "ches", "shes")) else None]
        known = next((g for g in guesses if g and g in self._keep), None)
        return known or singularize(word)

    def _norm(self, word: str) -> str:
        return word if word in self._keep else self._singular(word)

    def mentions(self, text: str) -> list[Mention]:
        toks = [(self._norm(w), s, e) for w, s, e in _tokens(text or "")]
        merged: list[tuple[str, int, int]] = []
        i = 0
        while i < len(toks):
            three = " ".join(t[0] for t in toks[i : i + 3])
            two = " ".join(t[0] for t in toks[i : i + 2])
            if i + 1 < len(toks) and two not in self.double:
                # A kept plural ("bikes" is a bicycle synonym) may still end a two-word name
                # ("motor bikes" is a motorcycle).
                alt = f"{toks[i][0]} {self._singular(toks[i + 1][0])}"
                two = alt if alt in self.double else two
            if i + 2 < len(toks) and three in self.triple and _joined(text, *toks[i:i + 3]):
                merged.append((three, toks[i][1], toks[i + 2][2]))
                i += 3
            elif i + 1 < len(toks) and two in self.double and _joined(text, *toks[i:i + 2]):
                merged.append((self.double[two], toks[i][1], toks[i + 1][2]))
                i += 2
            else:
                merged.append(toks[i])
                i += 1
        words = [m[0] for m in merged]
        if "toilet" in words and "seat" in words:
            merged = [m for m in merged if m[0] != "seat"]
        return [Mention(s, e, text[s:e], self.inverse[w]) for w, s, e in merged if w in self.inverse]

    def extract(self, text: str) -> list[str]:
        return [m.object for m in self.mentions(text)]

    def ground_truth(self, objects: Iterable[Any]) -> set[str]:
        """Category names (or synonyms, or dicts with "name"/"category") → categories. Unknown
        names raise: a silent drop would turn real objects into hallucinations."""
        out: set[str] = set()
        for obj in objects or ():
            name = (obj.get("name") or obj.get("category")) if isinstance(obj, dict) else obj
            name = str(name).lower().strip()
            if name in self.synonyms:
                out.add(name)
                continue
            found = self.extract(name)
            if not found:
                raise ValueError(f"ground-truth object {name!r} is not a COCO category or synonym")
            out.update(found)
        return out

    def image_ground_truth(self, instance_categories: Iterable[str], captions: Iterable[str] = ()) -> set[str]:
        """CHAIR's ground truth of an image: its instance categories ∪ categories its human
        captions name."""
        gt = self.ground_truth(instance_categories)
        for caption in captions:
            gt.update(self.extract(caption))
        return gt


def get_extractor(name: str) -> ObjectExtractor:
    if name in ("shapesworld", "world", "shapes"):
        return ShapesWorldExtractor.from_world()
    if name == "coco":
        return CocoExtractor()
    raise ValueError(f"unknown object extractor {name!r} (choose 'shapesworld' or 'coco')")


# ----------------------------------------------------------------------------------------------
# CHAIR and recall
# ----------------------------------------------------------------------------------------------
@dataclass
class CaptionScore:
    objects: list[str]  # canonical object per mention (repeats kept)
    hallucinated: list[str]  # the mentions (repeats kept) whose object is not in the ground truth
    gt: set[str]
    recalled: set[str]  # ground-truth objects mentioned at least once


def score_caption(text: str, gt_objects: Iterable[Any], extractor: ObjectExtractor,
                  captions: Iterable[str] = ()) -> CaptionScore:
    """One caption against an image's ground truth: its annotated objects, plus the objects its
    human ``captions`` name where the extractor defines that union (COCO: CHAIR's ground truth is
    the instance categories ∪ the categories the reference captions mention)."""
    captions = [c for c in captions or () if isinstance(c, str)]
    union = getattr(extractor, "image_ground_truth", None)
    gt = union(gt_objects, captions) if captions and union is not None else extractor.ground_truth(gt_objects)
    objects = extractor.extract(text)
    return CaptionScore(
        objects=objects,
        hallucinated=[o for o in objects if o not in gt],
        gt=gt,
        recalled={o for o in objects if o in gt},
    )


def chair(scores: Sequence[CaptionScore]) -> dict[str, float | int]:
    """CHAIR_i, CHAIR_s and object recall, pooled over ``scores``. Empty inputs give 0.0, not NaN,
    with the counts beside them so a reader can tell "no mentions" from "no hallucinations"."""
    n_mentions = sum(len(s.objects) for s in scores)
    n_hall = sum(len(s.hallucinated) for s in scores)
    n_gt = sum(len(s.gt) for s in scores)
    n_recalled = sum(len(s.recalled) for s in scores)
    n_bad = sum(1 for s in scores if s.hallucinated)
    # Captions that name no object at all though their image has some: CHAIR counts them as clean,
    # so a model that learns to stop early (or to answer nothing) shows up here first.
    n_silent = sum(1 for s in scores if s.gt and not s.objects)
    return {
        "chair_i": n_hall / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad / len(scores) if scores else 0.0,
        "recall": n_recalled / n_gt if n_gt else 0.0,
        "silent": n_silent / len(scores) if scores else 0.0,
        "n_silent": n_silent,
        "n_captions": len(scores),
        "n_mentions": n_mentions,
        "n_hallucinated": n_hall,
        "n_gt_objects": n_gt,
    }


# Item kinds whose answers are captions CHAIR scores (None = an item without a kind).
CAPTION_KINDS = (None, "describe", "caption")
# The headline metrics of a round, as tables and plots name them.
METRIC_LABELS = {"chair_s": "CHAIR_s", "chair_i": "CHAIR_i", "recall": "recall", "pope_f1": "POPE F1"}


def paired_chair_s(hallucinated_a: Sequence[bool], hallucinated_b: Sequence[bool]) -> dict[str, Any]:
    """CHAIR_s of two models on the same captions, compared caption by caption: how many only A
    hallucinates in, only B, both, and McNemar's exact two-sided p-value (a binomial test on the
    captions where they disagree). At a few percent CHAIR_s on a few hundred captions, a change of a
    few captions is noise; this says which changes are not."""
    if len(hallucinated_a) != len(hallucinated_b):
        raise ValueError(f"{len(hallucinated_a)} captions for A but {len(hallucinated_b)} for B")
    pairs = list(zip(map(bool, hallucinated_a), map(bool, hallucinated_b), strict=True))
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    both = sum(1 for x, y in pairs if x and y)
    n = len(pairs)
    discordant = only_a + only_b
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2**discordant
    return {
        "n": n,
        "chair_s_a": (only_a + both) / n if n else None,
        "chair_s_b": (only_b + both) / n if n else None,
        "only_a": only_a,
        "only_b": only_b,
        "both": both,
        "p_value": min(1.0, 2 * tail),
    }


def paired_chair_s_summary(paired: dict[str, Any] | None, label_a: str, label_b: str, alpha: float = 0.05) -> str:
    """One line for people: the paired CHAIR_s change and whether it is beyond noise at ``alpha``."""
    if not paired or not paired["n"]:
        return "no captions answered by both: nothing to compare pair by pair"
    verdict = ("a real change" if paired["p_value"] < alpha else "within noise") + f" at p < {alpha:g}"
    return (f"CHAIR_s on the same {paired['n']} captions: {paired['chair_s_a']:.3f} ({label_a}) -> "
            f"{paired['chair_s_b']:.3f} ({label_b}); only {label_a} hallucinates in {paired['only_a']}, "
            f"only {label_b} in {paired['only_b']}, both in {paired['both']}; McNemar exact "
            f"p = {paired['p_value']:.3g}: {verdict}")


def chair_from_texts(
    texts: Sequence[str], gts: Sequence[Iterable[Any]], extractor: ObjectExtractor
) -> dict[str, float | int]:
    if len(texts) != len(gts):
        raise ValueError(f"{len(texts)} captions but {len(gts)} ground-truth sets")
    return chair([score_caption(t, g, extractor) for t, g in zip(texts, gts, strict=True)])


# ----------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------
POPE_TEMPLATE = "Is there a {object} in the image?"
POPE_STRATEGIES = ("random", "popular", "adversarial")


def cooccurrence(gt_sets: Iterable[Iterable[str]]) -> dict[str, Counter]:
    """object → Counter of objects that appear in the same image."""
    co: dict[str, Counter] = {}
    for objs in gt_sets:
        objs = set(objs)
        for a in objs:
            co.setdefault(a, Counter()).update(b for b in objs if b != a)
    return co


def build_pope_questions(
    images: dict[Any, Iterable[str]],
    vocabulary: Sequence[str],
    strategy: str = "random",
    n: int = 3,
    seed: int = 0,
    template: str = POPE_TEMPLATE,
    statistics: dict[Any, Iterable[str]] | None = None,
) -> list[dict]:
    """POPE probes: per image ``n`` present objects ("yes") and as many absent ones ("no").

    ``images``: image id → canonical ground-truth objects. Popularity and co-occurrence are counted
    over ``statistics`` (default: ``images`` itself), as POPE counts them over its image pool.
    Images with fewer than ``n`` objects give all they have, and as many absent ones: POPE's probes
    are half yes, half no (POPE itself keeps images with ≥ 3 objects and asks 3 + 3).
    Returns dicts: image_id, question, label ("yes"/"no"), object, strategy.
    """
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose one of {POPE_STRATEGIES}")
    rng = random.Random(seed)
    stats = {k: set(v) for k, v in (statistics or images).items()}
    frequency = Counter(o for objs in stats.values() for o in objs)
    co = cooccurrence(stats.values())
    vocab_order = {o: i for i, o in enumerate(vocabulary)}  # deterministic tie-break
    out: list[dict] = []
    for image_id, objs in images.items():
        present = sorted(set(objs), key=lambda o: vocab_order.get(o, len(vocab_order)))
        absent = [o for o in vocabulary if o not in set(present)]
        positives = rng.sample(present, min(n, len(present)))
        k = len(positives)  # as many "no" as "yes"
        if strategy == "random":
            negatives = rng.sample(absent, min(k, len(absent)))
        elif strategy == "popular":
            negatives = sorted(absent, key=lambda o: (-frequency[o], vocab_order.get(o, 0)))[:k]
        else:  # adversarial, as POPE's reference: each positive brings its own top co-occurring absent object
            negatives = []
            for p in positives:
                partners = co.get(p, Counter())
                ranked = sorted(absent, key=lambda o: (-partners[o], -frequency[o], vocab_order.get(o, 0)))
                pick = next((o for o in ranked if o not in negatives), None)
                if pick is not None:
                    negatives.append(pick)
            score = Counter()  # fewer partners than positives: top up by co-occurrence with all that is present
            for p in present:
                score.update(co.get(p, Counter()))
            rest = sorted((o for o in absent if o not in negatives), key=lambda o: (-score[o], -frequency[o],
                                                                                     vocab_order.get(o, 0)))
            negatives += rest[: max(0, k - len(negatives))]
        for label, chosen in (("yes", positives), ("no", negatives)):
            for obj in chosen:
                out.append(
                    {
                        "image_id": image_id,
                        "question": template.format(object=obj),
                        "label": label,
                        "object": obj,
                        "strategy": strategy,
                    }
                )
    return out


_NEGATIONS = frozenset({"no", "not", "none", "nope", "cannot"})


def parse_yes_no(answer: str) -> str:
    """POPE's parser: keep the first sentence; "no" or "not" as a word, in any case and with any
    punctuation around it, means "no", else "yes" (POPE's script: exact "No"/"no"/"not"). Beyond
    the script, a contraction ("isn't", "don't") and "none", "nope", "cannot" say no too: the
    script read "There isn't a dog." as yes."""
    return "no" if _first_sentence_words(answer) & _NEGATIONS else "yes"


def pope_says_nothing(answer: str) -> bool:
    """Does the part of ``answer`` that POPE's parser reads (its first sentence) hold no word: "",
    ".", "..."? ``parse_yes_no`` reads such an answer as yes, as POPE's script does."""
    return not _first_sentence_words(answer)


def _first_sentence_words(answer: str) -> set[str]:
    first = (answer or "").strip().split(".")[0].lower()
    first = re.sub(r"n[’']t\b", " not", first)
    return set(re.findall(r"[a-z]+", first))


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 ("yes" positive) and yes-ratio of parsed answers
    (``parse_yes_no``'s "yes" / "no"; anything else is refused, not dropped from the counts)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    _only_yes_no(predictions, "prediction")
    _only_yes_no(labels, "label")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    total = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / total if total else 0.0,
        "n": total,
    }


def _only_yes_no(values: Sequence[Any], what: str) -> None:
    """POPE counts only parsed answers: a missing or raw one would fall out of TP/FP/TN/FN while
    staying in the total, and move recall, F1 and the yes-ratio without a word."""
    for value in values:
        if value not in ("yes", "no"):
            raise ValueError(f"a POPE {what} must be 'yes' or 'no' (parse_yes_no's output), got {value!r}")


def paired_pope_f1(predictions_a: Sequence[str], predictions_b: Sequence[str], labels: Sequence[str],
                   resamples: int = 10_000, seed: int = 0, groups: Sequence[Any] | None = None) -> dict[str, Any]:
    """POPE F1 of two models on the same probes, and a paired bootstrap p-value for their difference:
    the probes are resampled with replacement ``resamples`` times, both models' F1 recomputed on each
    resample, and p is the share of resamples whose difference lies at least as far from the observed
    one as the observed one lies from 0 (two-sided, the null centred on the observed difference), plus
    one in numerator and denominator. F1 is not a mean over probes, so McNemar does not apply; the
    bootstrap keeps each probe's pair of answers together.

    ``groups``: the unit resampled, one key per probe (the image it asks about): POPE asks a yes and
    a no probe of each image, which share its picture and are not independent, so an image's probes
    are drawn together (a cluster bootstrap). None: each probe on its own."""
    import numpy as np

    if not len(predictions_a) == len(predictions_b) == len(labels):
        raise ValueError(f"{len(predictions_a)} and {len(predictions_b)} predictions for {len(labels)} labels")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} probes")
    n = len(labels)
    f1_a = pope_metrics(list(predictions_a), list(labels))["f1"]
    f1_b = pope_metrics(list(predictions_b), list(labels))["f1"]
    if n == 0:
        return {"n": 0, "units": 0, "f1_a": None, "f1_b": None, "p_value": 1.0, "resamples": 0}
    truth = np.array([t == "yes" for t in labels])
    index: dict[Any, int] = {}
    unit = np.arange(n) if groups is None else np.array([index.setdefault(g, len(index)) for g in groups])
    k = int(unit.max()) + 1

    def per_unit(predictions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        said = np.array([p == "yes" for p in predictions])
        tp = np.bincount(unit, weights=said & truth, minlength=k)
        wrong = np.bincount(unit, weights=said != truth, minlength=k)  # false positives + false negatives
        return tp, wrong

    (tp_a, wrong_a), (tp_b, wrong_b) = per_unit(predictions_a), per_unit(predictions_b)
    rng = np.random.default_rng(seed)

    def f1(tp: np.ndarray, wrong: np.ndarray, picks: np.ndarray) -> np.ndarray:
        t, w = tp[picks].sum(1), wrong[picks].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(t > 0, 2 * t / (2 * t + w), 0.0)  # F1 = 2TP / (2TP + FP + FN)

    observed = f1_b - f1_a
    if k < 2:  # one image: every resample is the sample itself, and any difference would look certain
        return {"n": n, "units": k, "f1_a": f1_a, "f1_b": f1_b, "p_value": 1.0, "resamples": 0}
    far = 0
    for start in range(0, resamples, 1000):  # in chunks: 1000 x k indices at a time
        picks = rng.integers(0, k, size=(min(1000, resamples - start), k))
        diffs = f1(tp_b, wrong_b, picks) - f1(tp_a, wrong_a, picks)
        far += int((np.abs(diffs - observed) >= abs(observed) - 1e-12).sum())
    return {"n": n, "units": k, "f1_a": f1_a, "f1_b": f1_b, "p_value": (far + 1) / (resamples + 1),
            "resamples": resamples}


def paired_pope_f1_summary(paired: dict[str, Any] | None, label_a: str, label_b: str, alpha: float = 0.05) -> str:
    """One line for people: the paired POPE F1 change and whether it is beyond noise at ``alpha``."""
    if not paired or not paired["n"]:
        return "no POPE probes answered by both: nothing to compare probe by probe"
    verdict = ("a real change" if paired["p_value"] < alpha else "within noise") + f" at p < {alpha:g}"
    units = paired.get("units", paired["n"])
    if units < 2:
        return (f"POPE F1 on the same {paired['n']} probes: {paired['f1_a']:.3f} ({label_a}) -> {paired['f1_b']:.3f} "
                f"({label_b}); too few images ({units}) to test the change")
    over = f" over {units} images" if units != paired["n"] else ""
    return (f"POPE F1 on the same {paired['n']} probes: {paired['f1_a']:.3f} ({label_a}) -> {paired['f1_b']:.3f} "
            f"({label_b}); paired bootstrap{over} p = {paired['p_value']:.3g} ({paired['resamples']} resamples): "
            f"{verdict}")


# ----------------------------------------------------------------------------------------------
# Evaluation sets: which (dataset, split) an evaluation answered, so a round's figures on one set
# are never read beside another round's figures on another
# ----------------------------------------------------------------------------------------------
UNRECORDED_SET = "set not recorded"


def no_mentions_note(ev: dict) -> str | None:
    """Why CHAIR 0 is no clean result when no caption named an object the extractor knows (CHAIR
    counts a caption that names nothing as clean: 0.000 would read as a perfect round); else None."""
    if ev.get("n_captions") and not ev.get("n_mentions"):
        return ("no caption names an object the extractor knows, so CHAIR_s and CHAIR_i are 0 by default, not a "
                "clean result (is the model answering in another vocabulary?)")
    return None


def evaluation_set_of(items: Iterable[dict]) -> list[list[str]]:
    """The sorted (dataset, split) pairs the items come from ([] when they do not say)."""
    pairs = {(it["dataset"], it["split"]) for it in items
             if isinstance(it.get("dataset"), str) and isinstance(it.get("split"), str)}
    return [list(p) for p in sorted(pairs)]


def _label_part(name: str) -> str:
    """A dataset or split name as a label shows it: quoted (JSON) when it holds a character the
    label uses ("/", "+", a quote) or space at an end (a Hub name "lmms-lab/POPE"), so two sets
    never share a label."""
    plain = not any(c in name for c in '/+"') and name == name.strip() and name != ""
    return name if plain else json.dumps(name, ensure_ascii=False)


def evaluation_set_label(pairs: Iterable[Sequence[str]]) -> str:
    """"shapesworld/test"; "coco/val + shapesworld/test" for an evaluation over both;
    '"lmms-lab/POPE"/test' for a dataset whose name holds a slash."""
    return " + ".join(f"{_label_part(d)}/{_label_part(s)}" for d, s in pairs) or UNRECORDED_SET


def evaluation_pairs(ev: dict) -> list[tuple[str, str]]:
    """The (dataset, split) pairs one stored evaluation answered: its own record (``eval_set``),
    else (evaluations stored before sets were recorded) the dataset and split the CLI's eval kept
    beside the metrics; [] when it says neither."""
    pairs = ev.get("eval_set")
    if isinstance(pairs, list) and pairs and all(isinstance(p, list | tuple) and len(p) == 2
                                                 and all(isinstance(x, str) for x in p) for p in pairs):
        return [(d, s) for d, s in pairs]
    if isinstance(ev.get("dataset"), str) and isinstance(ev.get("split"), str):
        return [(ev["dataset"], ev["split"])]
    return []


def evaluation_label(ev: dict) -> str:
    """The set one stored evaluation answered, labelled from its pairs as labels are made now (else
    the label it carries, else ``UNRECORDED_SET``)."""
    if pairs := evaluation_pairs(ev):
        return evaluation_set_label(pairs)
    return ev["set"] if isinstance(ev.get("set"), str) else UNRECORDED_SET


def round_evaluations(metrics: dict | None) -> dict[str, dict]:
    """A round's stored evaluations by set label, the latest last (``with_evaluation`` keeps them)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    evals = metrics.get("evals")
    if isinstance(evals, dict) and evals:  # keyed as labels are made now (a later one on a set wins)
        return {evaluation_label(v): v for v in evals.values() if isinstance(v, dict)}
    latest = metrics.get("eval")
    return {evaluation_label(latest): latest} if isinstance(latest, dict) else {}


def with_evaluation(metrics: dict | None, ev: dict) -> dict:
    """A round's metrics with ``ev`` as its latest evaluation (``"eval"``, what the rounds tables
    show) and as the one on its set (``"evals"``, what a plot or comparison on one set reads): an
    evaluation on another set no longer replaces the figures on the first."""
    metrics = dict(metrics) if isinstance(metrics, dict) else {}
    evals = round_evaluations(metrics)
    label = evaluation_label(ev)
    evals.pop(label, None)  # re-inserted last: the dict's order is the order of evaluation
    return {**metrics, "eval": ev, "evals": {**evals, label: ev}}


# ----------------------------------------------------------------------------------------------
# Running a backend over an evaluation set
# ----------------------------------------------------------------------------------------------
class EvaluationCancelled(RuntimeError):
    """``should_stop`` returned True between batches."""


def pope_label(item: dict) -> str | None:
    """The yes/no label of a POPE-style probe item, or None for a caption item. A probe says so in
    ``meta`` (kind "pope"/"probe"/"existence") with its label in meta["label"/"answer"] or the
    item's reference; or carries a top-level "label"."""
    if item.get("label") in ("yes", "no"):
        return item["label"]
    meta = item.get("meta") or {}
    if meta.get("kind") in ("pope", "probe", "existence"):
        for value in (meta.get("label"), meta.get("answer"), item.get("reference")):
            # "Yes." counts: the world's probes and CSR's yes/no answers end with a period.
            label = value.strip().lower().rstrip(".!") if isinstance(value, str) else None
            if label in ("yes", "no"):
                return label
    return None


def _load_image(item: dict):
    image = item.get("image")
    if image is not None:
        return image
    from lvlm_studio.media import load_image  # as training reads it: transparency over white

    return load_image(item["image_path"])


def evaluate_backend(
    backend: Any,
    eval_items: Sequence[dict],
    extractor: ObjectExtractor,
    params: Any = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    describe_prompt: str | None = None,
) -> tuple[dict, list[dict]]:
    """Answer every item with ``backend.sample(..., n=1)`` and score it.

    ``describe_prompt``: STIC's "describe then respond". Before each question item (not a caption
    item) the model describes the image with this prompt, and is then asked the question with its
    description prepended in STIC's stage-2 format; the description is kept in the row's meta.

    ``eval_items``: dicts with ``item_id``, ``prompt``, ``image`` (PIL) or ``image_path``, and
    ``objects`` (ground truth) for caption items; POPE probes are recognised by ``pope_label``;
    items whose meta kind is neither describe/caption nor a probe (e.g. "count") are answered and
    stored but not scored.
    Returns (metrics, rows): metrics has CHAIR_i / CHAIR_s / recall over caption items and
    ``pope_*`` over probes; rows (for ``Store.add_eval_outputs``) are item_id, answer, objects,
    hallucinated, meta. ``progress(done, total)`` after each batch; ``should_stop()`` is checked
    before each batch and raises ``EvaluationCancelled``.
    """
    import time

    t0 = time.perf_counter()
    total = len(eval_items)
    rows: list[dict] = []
    scores: list[CaptionScore] = []
    preds: list[str] = []
    labels: list[str] = []
    n_empty_pope = 0
    n_words = 0
    for start in range(0, total, max(1, batch_size)):
        if should_stop is not None and should_stop():
            raise EvaluationCancelled(f"evaluation stopped after {start} of {total} items")
        batch = eval_items[start : start + batch_size]
        images = [_load_image(it) for it in batch]
        prompts = [it["prompt"] for it in batch]
        descriptions: dict[int, str] = {}
        if describe_prompt:
            from lvlm_studio.methods.stic import infuse_description

            asks = [i for i, it in enumerate(batch) if (it.get("meta") or {}).get("kind") not in CAPTION_KINDS
                    or pope_label(it) is not None]
            if asks:
                described = backend.sample([images[i] for i in asks], [describe_prompt] * len(asks), n=1,
                                           params=params)
                for i, seqs in zip(asks, described, strict=True):
                    descriptions[i] = seqs[0].text.strip()
                    prompts[i] = infuse_description(descriptions[i], prompts[i])
        outs = backend.sample(images, prompts, n=1, params=params)
        for index, (item, seqs) in enumerate(zip(batch, outs, strict=True)):
            answer = seqs[0].text.strip()
            label = pope_label(item)
            if label is not None:
                pred = parse_yes_no(answer)
                n_empty_pope += pope_says_nothing(answer)
                preds.append(pred)
                labels.append(label)
                meta = {"kind": "pope", "label": label, "prediction": pred, "correct": pred == label}
                if index in descriptions:
                    meta["description"] = descriptions[index]
                rows.append({"item_id": item["item_id"], "answer": answer, "objects": None, "hallucinated": None,
                             "meta": meta})
                continue
            kind = (item.get("meta") or {}).get("kind")
            if kind not in CAPTION_KINDS:
                # Not an object-listing answer (e.g. a count question): stored, not scored.
                rows.append({"item_id": item["item_id"], "answer": answer, "objects": None,
                             "hallucinated": None, "meta": {"kind": kind}})
                continue
            s = score_caption(answer, item.get("objects") or [], extractor,
                              captions=(item.get("meta") or {}).get("captions") or ())
            scores.append(s)
            n_words += len(answer.split())
            rows.append(
                {
                    "item_id": item["item_id"],
                    "answer": answer,
                    "objects": s.objects,
                    "hallucinated": s.hallucinated,
                    "meta": {
                        "kind": "caption",
                        "gt": sorted(s.gt),
                        "recalled": sorted(s.recalled),
                        "spans": [
                            {"start": m.start, "end": m.end, "object": m.object, "hallucinated": m.object not in s.gt}
                            for m in extractor.mentions(answer)
                        ],
                    },
                }
            )
        if progress is not None:
            progress(min(start + len(batch), total), total)
    metrics: dict[str, Any] = {"extractor": extractor.name, "n_items": total}
    if sets := evaluation_set_of(eval_items):
        metrics["eval_set"], metrics["set"] = sets, evaluation_set_label(sets)
    if scores:
        metrics.update(chair(scores))
        metrics["mean_words"] = n_words / len(scores)
    if labels:
        metrics.update({f"pope_{k}": v for k, v in pope_metrics(preds, labels).items()})
        # POPE's parser reads an answer with no word ("", ".") as "yes" (the reference does): a model
        # that learned to answer nothing would look like one that says yes; this count shows it.
        metrics["pope_n_empty"] = n_empty_pope
    metrics["seconds"] = time.perf_counter() - t0
    return metrics, rows
