"""POVID: Preference Optimization with AI-generated dispreferred responses (Zhou et al. 2024,
arXiv 2402.11411).

Per item (an image, a prompt and its ground-truth answer):
  * chosen = the ground-truth answer;
  * rejected (text) = that answer with plausible hallucinations injected. The paper prompts GPT-4V;
    offline we offer a rule-based ``HallucinationInjector`` driven by a vocabulary and object
    co-occurrence statistics (absent co-occurring objects, wrong colour/size, wrong count, wrong
    relation/position; on reasoning answers a wrong step or a wrong final answer), and a
    ``PromptedInjector`` that asks a local model through the backend protocol and recovers the
    injected spans with a word diff. Spans are kept for the UI;
  * rejected (image) = the model's own answer on the image distorted by diffusion forward noise
    (t = 500 of the sigmoid schedule: about 0.863·x0 + 0.505·ε).
"""

from __future__ import annotations

import difflib
import math
import random
import re
from collections.abc import Iterable
from collections.abc import Sequence as SeqType
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from lvlm_studio.evaluation import COCO_CATEGORIES, COCO_SYNONYMS, IRREGULAR_PLURALS
from lvlm_studio.methods.sentences import sentence_records
from lvlm_studio.models.base import GenerationParams, VLMBackend, check_temperature

CATEGORIES = ("object", "attribute", "count", "relation", "reasoning")
# "reasoning" (POVID's wrong steps and wrong final answers) applies to answers that reason: a step
# is a clause after one of these cues, the final answer a leading yes/no or the last sentence's number.
REASONING_CUES = ("because", "since", "so", "therefore", "thus", "hence", "which means", "this means",
                  "as a result", "suggests", "indicates")
# A final answer: a leading yes/no that is the answer ("Yes, ...", "No." - not "No one ...").
_LEADING_ANSWER = re.compile(r"\s*(yes|no)\b(?=\s*(?:[,.!;:]|$))", re.IGNORECASE)
# A step is made wrong by flipping its first verb of being or modal (either way); do/have are left
# out, since as main verbs ("does the dishes") they cannot simply take a "not".
NEGATIONS = {"is": "is not", "are": "are not", "was": "was not", "were": "were not", "can": "cannot",
             "will": "will not", "could": "could not", "would": "would not", "should": "should not"}

# The 80 COCO categories and CHAIR's synonyms for them: the default object vocabulary (POVID's
# data is COCO / LLaVA-Instruct), so "a man on a motorbike" has a person and a motorcycle to swap.
COCO_OBJECTS = list(COCO_CATEGORIES)
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple", "gray"]
SIZES = ["small", "large", "big", "tiny", "huge", "tall", "short"]
COUNTS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
RELATIONS = [
    "to the left of", "to the right of", "on the left", "on the right", "in front of", "behind",
    "above", "below", "on top of", "under", "next to", "at the top", "at the bottom",
]
OPPOSITES = {
    "left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below",
    "below": "above", "in front of": "behind", "behind": "in front of", "on top of": "under",
    "under": "on top of", "small": "large", "large": "small", "big": "small", "tiny": "huge",
    "huge": "tiny", "tall": "short", "short": "tall",
}
# Singular -> plural: evaluation's table read backwards (one table for the injector and CHAIR's
# matching), plus COCO names that are plural already.
_IRREGULAR_PLURALS = {singular: plural for plural, singular in IRREGULAR_PLURALS.items()} | {
    "skis": "skis", "scissors": "scissors"}
# Names that are plural without a singular beside them in the synonym table.
_PLURAL_ONLY = {"cattle", "people", "police"}
# Words after which "orange" is still the fruit ("an orange on the table", "an orange and a pear");
# before any other word it is read as the colour ("an orange umbrella") and not edited as an object.
_FUNCTION_WORDS = {"and", "or", "but", "on", "in", "at", "of", "with", "to", "from", "near", "by", "under",
                   "next", "beside", "behind", "is", "are", "was", "were", "that", "which", "for", "as"}


def plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        p = _IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


@dataclass
class Vocabulary:
    """What the rule-based injector may say. ``cooccurrence[a][b]`` = how many images hold both."""

    objects: list[str] = field(default_factory=lambda: list(COCO_OBJECTS))
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    counts: list[str] = field(default_factory=lambda: list(COUNTS))
    relations: list[str] = field(default_factory=lambda: list(RELATIONS))
    opposites: dict[str, str] = field(default_factory=lambda: dict(OPPOSITES))
    cooccurrence: dict[str, dict[str, int]] = field(default_factory=dict)
    # Other names an answer may use for an object (object -> names): a mention of any of them is
    # that object, for the injector to replace. Default: CHAIR's COCO synonym table.
    synonyms: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in COCO_SYNONYMS.items()})

    @classmethod
    def from_object_sets(cls, object_sets: Iterable[Iterable[str]], **kwargs: Any) -> Vocabulary:
        """A vocabulary whose objects and co-occurrence come from a COCO-like annotated set."""
        sets = [set(s) for s in object_sets]
        cooc = cooccurrence_from_objects(sets)
        objects = kwargs.pop("objects", None)
        if objects is None:
            objects = sorted(set().union(*sets)) if sets else []
        return cls(objects=objects, cooccurrence=cooc, **kwargs)


def cooccurrence_from_objects(object_sets: Iterable[Iterable[str]]) -> dict[str, dict[str, int]]:
    """Symmetric pair counts: for every image, every unordered pair of distinct objects counts once."""
    counts: dict[str, dict[str, int]] = {}
    for objs in object_sets:
        uniq = sorted(set(objs))
        for a in uniq:
            row = counts.setdefault(a, {})
            for b in uniq:
                if a != b:
                    row[b] = row.get(b, 0) + 1
    return counts


@dataclass
class Injection:
    original: str
    text: str
    spans: list[dict[str, Any]]  # [{start, end, category, original, injected}] into ``text``


@dataclass
class _Edit:
    start: int
    end: int
    replacement: str
    category: str


def _match_case(template: str, word: str) -> str:
    return word[:1].upper() + word[1:] if template[:1].isupper() else word


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _phrase_regex(phrases: Iterable[str]) -> re.Pattern[str] | None:
    alts = sorted({p for p in phrases if p}, key=len, reverse=True)
    if not alts:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in alts) + r")\b", re.IGNORECASE)


class HallucinationInjector:
    """Rule-based hallucination injection over a ``Vocabulary``; seeded and reproducible.

    Categories: "object" (replace a mentioned object by an absent object that co-occurs with the
    mentioned ones, or add a sentence naming one), "attribute" (swap a colour or size, or insert
    a wrong colour before an object), "count" (change a number word), "relation" (swap a
    relation/position phrase for its opposite). Each span's offsets point at the injected words in
    the returned text.
    """

    def __init__(self, vocabulary: Vocabulary | None = None, n_injections: int = 2,
                 categories: SeqType[str] = CATEGORIES, cooccur_top_k: int = 5):
        self.vocab = vocabulary or Vocabulary()
        self.n_injections = n_injections
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown injection categories {sorted(unknown)}; choose from {CATEGORIES}")
        self.categories = tuple(categories)
        self.cooccur_top_k = cooccur_top_k
        # surface form -> (object, is plural): the objects' own names first, so a synonym shared
        # with another object's name never takes that name over.
        forms: dict[str, tuple[str, bool]] = {}
        for obj in self.vocab.objects:
            forms.setdefault(obj.lower(), (obj, False))
            forms.setdefault(plural(obj).lower(), (obj, True))
        for obj in self.vocab.objects:
            names = {n.lower() for n in self.vocab.synonyms.get(obj, ())} - {obj.lower()}
            for name in sorted(names):
                # the table lists some plurals ("bikes") beside their singular
                forms.setdefault(name, (obj, name in _PLURAL_ONLY or any(plural(other) == name for other in names)))
                forms.setdefault(plural(name), (obj, True))
        self._object_forms = forms
        self._object_re = _phrase_regex(forms)
        self._colour_re = _phrase_regex(self.vocab.colours)
        self._colour_words = {c.lower() for c in self.vocab.colours}
        self._size_re = _phrase_regex(self.vocab.sizes)
        numbers = list(self.vocab.counts) + [str(i) for i in range(2, 11)]
        self._count_re = _phrase_regex(numbers)
        self._relation_re = _phrase_regex(self.vocab.relations)
        self._cue_re = _phrase_regex(REASONING_CUES)
        # Contractions with either apostrophe; the longer forms win over "can" at the same place.
        contracted = {"can't": "can", "won't": "will", "can not": "can",
                      **{f"{pos}n't": pos for pos in ("is", "are", "was", "were", "could", "would", "should")}}
        flips = {**NEGATIONS, **{neg: pos for pos, neg in NEGATIONS.items()}, **contracted,
                 **{k.replace("'", "’"): v for k, v in contracted.items()}}
        self._flips = flips
        self._flip_re = _phrase_regex(flips)

    def mentioned_objects(self, text: str) -> list[tuple[int, int, str, bool]]:
        """(start, end, canonical object, is_plural) for each object mention."""
        if not self._object_re:
            return []
        out = []
        for m in self._object_re.finditer(text):
            form = m.group(0).lower()
            after = re.match(r"\s+([A-Za-z]+)", text[m.end():])
            if form in self._colour_words and after and after.group(1).lower() not in _FUNCTION_WORDS:
                continue  # "an orange umbrella": the colour, not the fruit
            canon, is_plural = self._object_forms[form]
            out.append((m.start(), m.end(), canon, is_plural))
        return out

    def absent_candidates(self, mentioned: set[str], present: set[str]) -> list[str]:
        """Absent objects ranked by co-occurrence with the mentioned ones (most frequent first)."""
        excluded = {o.lower() for o in mentioned | present}
        scores: dict[str, int] = {}
        for m in mentioned:
            for other, c in self.vocab.cooccurrence.get(m, {}).items():
                if other.lower() not in excluded:
                    scores[other] = scores.get(other, 0) + c
        return sorted(scores, key=lambda o: (-scores[o], o))

    def _pick_absent(self, rng: random.Random, mentioned: set[str], present: set[str], used: set[str]) -> str | None:
        ranked = [o for o in self.absent_candidates(mentioned, present) if o not in used][: self.cooccur_top_k]
        if ranked:
            weights = [self._cooc_weight(o, mentioned) for o in ranked]
            return rng.choices(ranked, weights=weights, k=1)[0]
        excluded = {o.lower() for o in mentioned | present | used}
        pool = [o for o in self.vocab.objects if o.lower() not in excluded]
        return rng.choice(pool) if pool else None

    def _cooc_weight(self, obj: str, mentioned: set[str]) -> float:
        return float(sum(self.vocab.cooccurrence.get(m, {}).get(obj, 0) for m in mentioned)) or 1.0

    def _edits(self, text: str, category: str, rng: random.Random, present: set[str], used: set[str]) -> list[_Edit]:
        mentions = self.mentioned_objects(text)
        mentioned = {m[2] for m in mentions}
        edits: list[_Edit] = []
        if category == "object":
            for start, end, _canon, is_plural in mentions:
                new = self._pick_absent(rng, mentioned, present, used)
                if new:
                    word = plural(new) if is_plural else new
                    edits.append(self._with_article(text, start, end, _match_case(text[start:end], word), "object"))
            if mentions or self.vocab.objects:
                new = self._pick_absent(rng, mentioned, present, used)
                if new:
                    anchor = f" next to the {self._anchor_name(text, mentions[0])}" if mentions else ""
                    sentence = f"There is also {_article(new)} {new}{anchor}."
                    pos = len(text.rstrip())
                    # a new sentence: the answer's last one closed first if it was left open
                    sep = "" if pos == 0 else " " if text.rstrip()[-1] in ".!?" else ". "
                    edits.append(_Edit(pos, pos, sep + sentence, "object"))
        elif category == "attribute":
            for regex, pool in ((self._colour_re, self.vocab.colours), (self._size_re, self.vocab.sizes)):
                if not regex:
                    continue
                for m in regex.finditer(text):
                    word = m.group(0).lower()
                    options = [self.vocab.opposites[word]] if word in self.vocab.opposites else [
                        w for w in pool if w.lower() != word]
                    if options:
                        new = _match_case(m.group(0), rng.choice(options))
                        edits.append(self._with_article(text, m.start(), m.end(), new, "attribute"))
            if not edits and self.vocab.colours:
                for start, end, _canon, _pl in mentions:
                    colour = rng.choice(self.vocab.colours)
                    edits.append(self._with_article(text, start, end, f"{colour} {text[start:end]}", "attribute"))
        elif category == "count" and self._count_re:
            for m in self._count_re.finditer(text):
                if re.search(r"\d[.,:]$", text[:m.start()]) or re.match(r"[.,:]\d", text[m.end():]):
                    continue  # a digit of 3.5, 1,200 or 10:45 is no count
                word = m.group(0).lower()
                options = [w for w in self.vocab.counts if w.lower() != word]
                if word.isdigit():
                    options = [str(i) for i in range(2, 11) if str(i) != word]
                if options:
                    edits.append(_Edit(m.start(), m.end(), _match_case(m.group(0), rng.choice(options)), "count"))
        elif category == "relation" and self._relation_re:
            for m in self._relation_re.finditer(text):
                phrase = m.group(0).lower()
                new = self._opposite_phrase(phrase)
                if new is None:
                    others = [r for r in self.vocab.relations if r.lower() != phrase]
                    new = rng.choice(others) if others else None
                if new:
                    edits.append(_Edit(m.start(), m.end(), _match_case(m.group(0), new), "relation"))
        elif category == "reasoning":
            edits.extend(self._reasoning_edits(text, rng))
        return edits

    def reasons(self, text: str) -> bool:
        """Whether ``text`` is a reasoning answer: a leading yes/no, or a reasoning cue."""
        return bool(_LEADING_ANSWER.match(text) or (self._cue_re and self._cue_re.search(text)))

    def _reasoning_edits(self, text: str, rng: random.Random) -> list[_Edit]:
        """A wrong final answer (a leading yes/no flipped, or the last sentence's number changed) and
        wrong steps (in each sentence with a reasoning cue, the first is/are/can/will/... after the
        cue negated, or a negated one made positive)."""
        edits = []
        lead = _LEADING_ANSWER.match(text)
        if lead:
            new = "no" if lead.group(1).lower() == "yes" else "yes"
            edits.append(_Edit(lead.start(1), lead.end(1), _match_case(lead.group(1), new), "reasoning"))
        # Sentences end at . ! ? but not at a decimal point ("1.5 m").
        sentences = list(re.finditer(r"(?:[^.!?]|[.!?](?=\d))+[.!?]*", text))
        number_changed_in = None
        if sentences:
            last = sentences[-1]
            # A number with separators (1,200, 10:45, 2.5) is one token and left alone.
            numbers = list(re.finditer(r"(?<![\d.,:])\d+(?:[.,:]\d+)*(?![\d.,:]\d)", last.group(0)))
            if numbers and numbers[-1].group(0).isdigit():
                m, value = numbers[-1], int(numbers[-1].group(0))
                wrong = [v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0]
                start = last.start() + m.start()
                edits.append(_Edit(start, start + len(m.group(0)), str(rng.choice(wrong)), "reasoning"))
                number_changed_in = last
        if self._cue_re and self._flip_re:
            for sentence in sentences:
                if sentence is number_changed_in:
                    # negating the clause whose number changed makes it true again: "so the answer
                    # is 4" -> "so the answer is not 3"
                    continue
                cue = self._cue_re.search(sentence.group(0))
                flip = cue and self._flip_re.search(sentence.group(0), cue.end())
                if flip:
                    word = flip.group(0)
                    start = sentence.start() + flip.start()
                    edits.append(_Edit(start, start + len(word), _match_case(word, self._flips[word.lower()]),
                                       "reasoning"))
        return edits

    @staticmethod
    def _anchor_name(text: str, mention: tuple[int, int, str, bool]) -> str:
        """The object's name, or the answer's own word when it used a synonym ("the man", not
        "the person")."""
        start, end, canon, _ = mention
        said = text[start:end].lower()
        return canon if said in (canon.lower(), plural(canon).lower()) else said

    def _opposite_phrase(self, phrase: str) -> str | None:
        if phrase in self.vocab.opposites:
            return self.vocab.opposites[phrase]
        words = phrase.split()
        swapped = [self.vocab.opposites.get(w, w) for w in words]
        return " ".join(swapped) if swapped != words else None

    @staticmethod
    def _with_article(text: str, start: int, end: int, replacement: str, category: str) -> _Edit:
        """Include a preceding "a"/"an" in the edit so the article agrees with the new word."""
        m = re.search(r"\b(a|an|A|An)\s+$", text[:start])
        if m and m.group(1).lower() != _article(replacement):
            art = _article(replacement)
            return _Edit(m.start(), end, _match_case(m.group(1), art) + " " + replacement, category)
        return _Edit(start, end, replacement, category)

    def inject(self, text: str, present_objects: Iterable[str] | None = None, seed: int | None = 0,
               n: int | None = None) -> Injection:
        """Inject up to ``n`` (default ``n_injections``) hallucinations into ``text``.

        ``present_objects`` (ground truth, when known) are never used as hallucinated objects.
        """
        rng = random.Random(seed)
        present = set(present_objects or ())
        want = self.n_injections if n is None else n
        chosen: list[_Edit] = []
        used: set[str] = set()
        # Only a reasoning answer offers the reasoning category (and others draw as without it).
        categories = [c for c in self.categories if c != "reasoning" or self.reasons(text)]
        rng.shuffle(categories)
        attempts = 0
        while len(chosen) < want and categories and attempts < 4 * max(want, 1) + 8:
            attempts += 1
            category = categories[(attempts - 1) % len(categories)]
            options = [e for e in self._edits(text, category, rng, present, used)
                       if not any(_overlaps(e, c) for c in chosen)]
            if not options:
                categories.remove(category)
                continue
            edit = rng.choice(options)
            chosen.append(edit)
            if edit.category == "object":
                used.update(o for o in self.vocab.objects if o in edit.replacement)
        return apply_edits(text, chosen)


def _overlaps(a: _Edit, b: _Edit) -> bool:
    if a.start == a.end or b.start == b.end:
        return a.start == b.start or (b.start < a.start < b.end) or (a.start < b.start < a.end)
    return a.start < b.end and b.start < a.end


def apply_edits(text: str, edits: list[_Edit]) -> Injection:
    """Apply non-overlapping edits; spans point at each replacement in the new text (a leading
    separator space of an insertion is not part of its span)."""
    out: list[str] = []
    spans: list[dict[str, Any]] = []
    cursor = 0
    length = 0
    for e in sorted(edits, key=lambda e: (e.start, e.end)):
        out.append(text[cursor:e.start])
        length += e.start - cursor
        lead = len(e.replacement) - len(e.replacement.lstrip(" ")) if e.start == e.end else 0
        spans.append({
            "start": length + lead,
            "end": length + len(e.replacement),
            "category": e.category,
            "original": text[e.start:e.end],
            "injected": e.replacement[lead:],
        })
        out.append(e.replacement)
        length += len(e.replacement)
        cursor = e.end
    out.append(text[cursor:])
    return Injection(text, "".join(out), spans)


# ---- the prompted injector -----------------------------------------------------------------------

DEFAULT_INJECT_PROMPT = (
    "Rewrite the following description of the image so that it contains a few plausible but wrong "
    "details: add objects that often appear in such scenes but are not in the image, change some "
    "colours, sizes or counts, and change some positions or relations. Keep everything else the "
    "same and answer with the rewritten description only.\n\nDescription: {answer}"
)


def diff_spans(original: str, rewritten: str) -> list[dict[str, Any]]:
    """Word diff (difflib): a span for every inserted or replaced run of words in ``rewritten``."""
    def words(s: str) -> list[tuple[int, int, str]]:
        return [(m.start(), m.end(), re.sub(r"[^\w]", "", m.group(0).lower())) for m in re.finditer(r"\S+", s)]

    a, b = words(original), words(rewritten)
    matcher = difflib.SequenceMatcher(None, [w[2] for w in a], [w[2] for w in b], autojunk=False)
    spans = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "insert") and j2 > j1:
            start, end = b[j1][0], b[j2 - 1][1]
            orig = original[a[i1][0]: a[i2 - 1][1]] if i2 > i1 else ""
            spans.append({"start": start, "end": end, "category": "prompted", "original": orig,
                          "injected": rewritten[start:end]})
    return spans


class PromptedInjector:
    """Asks a local model (through the backend protocol) to rewrite an answer with hallucinations;
    the spans come from a word diff against the original. With a ``vocabulary`` each span is
    labelled with the category whose words it contains (else "prompted")."""

    def __init__(self, backend: VLMBackend, prompt_template: str = DEFAULT_INJECT_PROMPT,
                 params: GenerationParams | None = None, vocabulary: Vocabulary | None = None):
        if "{answer}" not in prompt_template:
            raise ValueError("prompt_template must contain '{answer}'")
        self.backend = backend
        self.template = prompt_template
        self.params = params or GenerationParams(max_new_tokens=256, temperature=0.0)
        self.vocab = vocabulary

    def inject_many(self, images: list[Image.Image], answers: list[str]) -> list[Injection]:
        prompts = [self.template.format(answer=a) for a in answers]
        outs = self.backend.sample(images, prompts, n=1, params=self.params)
        results = []
        for answer, seqs in zip(answers, outs, strict=True):
            new = seqs[0].text.strip() if seqs else ""
            spans = diff_spans(answer, new)
            if not spans:
                # The same words (a dropped period, other capitals or spacing): nothing hallucinated,
                # so no rejected side rather than a near-copy of the chosen answer.
                new = answer
            for s in spans:
                s["category"] = self._category(s["injected"])
            results.append(Injection(answer, new, spans))
        return results

    def inject(self, image: Image.Image, answer: str) -> Injection:
        return self.inject_many([image], [answer])[0]

    def _category(self, words: str) -> str:
        if not self.vocab:
            return "prompted"
        low = words.lower()
        checks = (("object", self.vocab.objects + [plural(o) for o in self.vocab.objects]),
                  ("count", self.vocab.counts), ("attribute", self.vocab.colours + self.vocab.sizes),
                  ("relation", self.vocab.relations))
        for name, pool in checks:
            if any(re.search(rf"\b{re.escape(w.lower())}\b", low) for w in pool):
                return name
        return "prompted"


# ---- image distortion ---------------------------------------------------------------------------


def diffusion_coefficients(t: int = 500, num_steps: int = 1000, beta_start: float = 1e-5,
                           beta_end: float = 5e-3) -> tuple[float, float]:
    """(√ᾱ_t, √(1−ᾱ_t)) of POVID's schedule: β = sigmoid(linspace(−6, 6, 1000))·(5e-3 − 1e-5) + 1e-5,
    ᾱ = cumprod(1 − β), indexed at ``t`` as the reference does (``alphas_bar_sqrt[t]``)."""
    if not 0 <= t < num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps}), got {t}")
    x = np.linspace(-6.0, 6.0, num_steps)
    betas = 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    alpha_bar = np.cumprod(1.0 - betas)
    return float(math.sqrt(alpha_bar[t])), float(math.sqrt(1.0 - alpha_bar[t]))


def add_diffusion_noise(image: Image.Image, t: int = 500, seed: int | None = 0, **schedule: Any) -> Image.Image:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε on x0 in [0, 1], clamped to [0, 1] before it becomes an image
    again (the reference wraps around mod 256, a bug that turns bright pixels dark)."""
    a, b = diffusion_coefficients(t, **schedule)
    x0 = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    eps = np.random.default_rng(seed).standard_normal(x0.shape)
    xt = np.clip(a * x0 + b * eps, 0.0, 1.0)
    return Image.fromarray(np.round(xt * 255.0).astype(np.uint8), "RGB")


# ---- pairs --------------------------------------------------------------------------------------


@dataclass
class POVIDConfig:
    """POVID settings: the noise schedule, the two-term loss and the categories follow the paper /
    reference (arXiv 2402.11411, YiyangZhou/POVID); where a field says "project choice", neither
    gives a value."""

    injector: Literal["rules", "prompted"] = "rules"
    # Project choices: the paper has GPT-4V rewrite the answer with hallucinations and fixes no
    # count; two injected spans per answer, absent objects drawn from the 5 that co-occur most
    # with the present ones (the paper asks for "co-occurring" objects).
    n_injections: int = 2
    categories: tuple[str, ...] = CATEGORIES
    cooccur_top_k: int = 5
    noise_step: int = 500  # reference noise_step (√ᾱ ≈ 0.863, √(1−ᾱ) ≈ 0.505)
    num_noise_steps: int = 1000
    beta_start: float = 1e-5
    beta_end: float = 5e-3
    # "generate" (default): the model's full answer on the noisy image: simple and inspectable.
    # "teacher_forced_argmax": the reference trainer's variant: the chosen answer is teacher-forced
    # under the noisy image and, at each position, the model's most likely token is taken; the
    # decoded tokens are the rejected text (same length as the chosen answer, diverging wherever
    # the noise changes the model's belief). Needs a backend with ``argmax_tokens`` (HFBackend).
    # The reference takes that argmax inside its trainer, from the policy being trained, at every
    # step; here it is taken once, when the pair is generated, from the generating model, and
    # stored as an ordinary rejected answer (reviewable, exportable).
    noise_answer: Literal["generate", "teacher_forced_argmax"] = "generate"
    # Project choices, not the paper's: answer length and greedy decoding. With temperature > 0 a
    # batch samples under one seed, so a sampled answer depends on the batch it fell in; each
    # item's injections and noise are its own whatever the batch.
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    make_text_rejected: bool = True
    make_image_rejected: bool = True

    def __post_init__(self) -> None:
        # Checked here, before any model loads (these used to fail mid-run, after the model loaded).
        self.categories = tuple(self.categories)
        unknown = set(self.categories) - set(CATEGORIES)
        if not self.categories or unknown:
            raise ValueError(f"categories must be some of {CATEGORIES}, not {self.categories}")
        if self.n_injections < 1 or self.cooccur_top_k < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("n_injections, cooccur_top_k, batch_size and max_new_tokens must be >= 1")
        if not 0 <= self.noise_step < self.num_noise_steps:
            raise ValueError(f"noise_step must be in [0, num_noise_steps={self.num_noise_steps}), not {self.noise_step}")
        if not 0 <= self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 <= beta_start <= beta_end < 1, not {self.beta_start}, {self.beta_end}")
        check_temperature(self.temperature)
        if not (self.make_text_rejected or self.make_image_rejected):
            raise ValueError("make_text_rejected and make_image_rejected are both off: no rejected side to build")

    def generation_params(self, seed: int | None = None) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)

    def noise_schedule(self) -> dict[str, Any]:
        return {"num_steps": self.num_noise_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}


def noisy_rejected(backend: VLMBackend, image: Image.Image, prompt: str, params: GenerationParams | None = None,
                   config: POVIDConfig | None = None, seed: int | None = None) -> tuple[str, Image.Image]:
    """The model's answer on the diffusion-noised image (POVID's image-side rejected answer)."""
    cfg = config or POVIDConfig()
    if cfg.noise_answer != "generate":
        raise ValueError("noisy_rejected generates an answer; teacher_forced_argmax needs the chosen answer: "
                         "use build_povid_pairs")
    noisy = add_diffusion_noise(image, cfg.noise_step, cfg.seed if seed is None else seed, **cfg.noise_schedule())
    seqs = backend.sample([noisy], [prompt], n=1, params=params or cfg.generation_params(seed))
    return seqs[0][0].text.strip(), noisy


def teacher_forced_rejected(backend: Any, noisy: list[Image.Image], prompts: list[str],
                            chosen: list[str]) -> list[str]:
    """POVID reference variant: per position of each teacher-forced chosen answer, the model's
    argmax token under the noisy image, decoded."""
    if not hasattr(backend, "argmax_tokens"):
        raise ValueError(f"noise_answer='teacher_forced_argmax' needs a backend with argmax_tokens "
                         f"(the HF backend); {type(backend).__name__} has none")
    # the texts, not ids: the backend tokenises each answer as the model writes it after its prompt
    return [backend.decode(t).strip() for t in backend.argmax_tokens(noisy, prompts, list(chosen))]


@dataclass
class POVIDItem:
    image: Image.Image
    prompt: str
    reference: str
    image_key: str | None = None
    objects: list[str] | None = None  # ground-truth objects, when known
    # The item's own seed for its injection and its noise: the service gives one per stored item,
    # so an item draws the same in whatever run and chunk it falls (None: the config's seed plus
    # the item's position in this call).
    seed: int | None = None


@dataclass
class POVIDCandidate:
    text: str
    source: str  # "reference", "povid_inject", "povid_noise"
    sentences: list[dict[str, Any]]
    spans: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int | None


@dataclass
class POVIDResult:
    prompt: str
    image_key: str | None
    chosen: POVIDCandidate
    rejected_text: POVIDCandidate | None
    rejected_image: POVIDCandidate | None
    noisy_image: Image.Image | None = field(default=None, repr=False)


def _as_item(item: Any) -> POVIDItem:
    if isinstance(item, POVIDItem):
        return item
    if isinstance(item, dict):
        return POVIDItem(**item)
    return POVIDItem(*item)


def build_povid_pairs(backend: VLMBackend | None, items: SeqType[Any], config: POVIDConfig | None = None,
                      injector: HallucinationInjector | PromptedInjector | None = None,
                      vocabulary: Vocabulary | None = None) -> list[POVIDResult]:
    """For each item (``POVIDItem`` or ``(image, prompt, reference[, image_key[, objects]])``):
    chosen = the reference answer, rejected_text = the injected answer, rejected_image = the model's
    answer on the noisy image. Provenance (method, parameters, seed) rides on every candidate.
    ``backend`` may be None when only the rule-based text side is wanted."""
    cfg = config or POVIDConfig()
    its = [_as_item(i) for i in items]
    model_id = getattr(backend, "model_id", None)
    if injector is None and cfg.make_text_rejected:
        if cfg.injector == "prompted":
            if backend is None:
                raise ValueError("the prompted injector needs a backend")
            injector = PromptedInjector(backend, vocabulary=vocabulary)
        else:
            injector = HallucinationInjector(vocabulary, cfg.n_injections, cfg.categories, cfg.cooccur_top_k)
    if cfg.make_image_rejected and backend is None:
        raise ValueError("the noisy-image rejected answer needs a backend (or make_image_rejected=False)")

    text_side: list[POVIDCandidate | None] = [None] * len(its)
    if cfg.make_text_rejected:
        if isinstance(injector, PromptedInjector):
            injections = []
            for lo in range(0, len(its), cfg.batch_size):
                chunk = its[lo: lo + cfg.batch_size]
                injections += injector.inject_many([i.image for i in chunk], [i.reference for i in chunk])
            params = {"method": "povid", "injector": "prompted", "model": model_id, "template": injector.template,
                      "generation": injector.params.as_dict()}
            seeds: list[int | None] = [injector.params.seed] * len(its)
        else:
            seeds = [i.seed if i.seed is not None else cfg.seed + k for k, i in enumerate(its)]
            injections = [injector.inject(i.reference, i.objects, seed=s) for i, s in zip(its, seeds, strict=True)]
            params = {"method": "povid", "injector": "rules", "n_injections": injector.n_injections,
                      "categories": list(injector.categories), "cooccur_top_k": injector.cooccur_top_k}
        for k, inj in enumerate(injections):
            if inj.text.strip() and inj.text.strip() != inj.original.strip():
                text_side[k] = POVIDCandidate(inj.text, "povid_inject", sentence_records(inj.text), inj.spans,
                                              dict(params), seeds[k])

    image_side: list[POVIDCandidate | None] = [None] * len(its)
    noisy_images: list[Image.Image | None] = [None] * len(its)
    if cfg.make_image_rejected:
        for lo in range(0, len(its), cfg.batch_size):
            chunk = its[lo: lo + cfg.batch_size]
            seeds_n = [i.seed if i.seed is not None else cfg.seed + lo + j for j, i in enumerate(chunk)]
            noisy = [add_diffusion_noise(i.image, cfg.noise_step, s, **cfg.noise_schedule())
                     for i, s in zip(chunk, seeds_n, strict=True)]
            gen = cfg.generation_params(cfg.seed + lo)
            if cfg.noise_answer == "teacher_forced_argmax":
                texts = teacher_forced_rejected(backend, noisy, [i.prompt for i in chunk], [i.reference for i in chunk])
            else:
                outs = backend.sample(noisy, [i.prompt for i in chunk], n=1, params=gen)
                texts = [seqs[0].text.strip() if seqs else "" for seqs in outs]
            a, b = diffusion_coefficients(cfg.noise_step, **cfg.noise_schedule())
            for j, text in enumerate(texts):
                noisy_images[lo + j] = noisy[j]
                if not text or text == chunk[j].reference.strip():  # no preference to learn
                    continue
                params = {"method": "povid", "variant": "noisy_image", "model": model_id,
                          "noise_step": cfg.noise_step, "sqrt_alpha_bar": a, "sqrt_one_minus_alpha_bar": b,
                          **cfg.noise_schedule(), "noise_answer": cfg.noise_answer, "noise_seed": seeds_n[j],
                          "generation": gen.as_dict()}
                image_side[lo + j] = POVIDCandidate(text, "povid_noise", sentence_records(text), [], params, seeds_n[j])

    results = []
    for k, item in enumerate(its):
        chosen = POVIDCandidate(item.reference, "reference", sentence_records(item.reference), [],
                                {"method": "povid", "variant": "reference"}, None)
        results.append(POVIDResult(item.prompt, item.image_key, chosen, text_side[k], image_side[k], noisy_images[k]))
    return results
