"""Sentence segmentation with offsets, and the CSR reference's sentence cleaning filter.

``segment_sentences`` returns spans whose offsets index the original string
(``text[span.start:span.end] == span.text``), so the UI can highlight from stored offsets.
It survives the usual traps of model answers: abbreviations ("Mr.", "Dr.", "e.g.", "i.e.",
"etc.", "U.S."), decimals ("3.5"), ellipses ("..."), numbered-list markers ("1. The dog") and
text that ends without a terminator (a sentence cut at end-of-sequence or by a length cap).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple


class Span(NamedTuple):
    start: int
    end: int
    text: str


# Lower-cased, without their final period. Titles and Latin abbreviations never end a sentence;
# ``_MAY_END`` ones do when the next word is capitalised ("... and so on, etc. The dog ...").
_NEVER_END = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "e.g", "i.e", "cf",
    "approx", "vol", "p", "pp", "ca", "u.s", "u.k", "u.n", "a.m", "p.m",
    "dept", "est", "gen", "gov", "lt", "col", "capt", "sgt", "rev", "hon", "inc", "ltd", "co",
    "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}
_MAY_END = {"etc", "u.s", "u.k", "a.m", "p.m", "inc", "ltd", "co", "corp"}
# Abbreviations only before a number ("No. 5", "Fig. 3"); else the word itself ends a sentence, as
# "No." does in an answer ("No. There is no cat.", "The answer is no. There is a cat.").
_BEFORE_NUMBER = {"no", "nos", "fig", "figs"}
# After a _MAY_END abbreviation a capitalised word still may be a name ("the U.S. Army"), so only
# these common sentence openers end the sentence ("... in the U.S. It is ...").
_OPENERS = {
    "the", "a", "an", "it", "its", "he", "she", "they", "we", "i", "you", "this", "that", "these",
    "those", "there", "here", "his", "her", "their", "our", "my", "in", "on", "at", "as", "but",
    "and", "so", "if", "when", "while", "after", "before", "then", "however", "also", "some",
    "many", "most", "all", "one", "two", "each", "every", "no", "not", "what", "why", "how",
}

_TERMINATOR = re.compile(r"[.!?]+[\"')\]]*")
_WORD_BEFORE = re.compile(r"([A-Za-z](?:[A-Za-z.]*[A-Za-z])?|\d+)$")


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Does the terminator text[start:end] end a sentence?"""
    if end < len(text) and not text[end].isspace():
        return False  # "3.5", "e.g.x", "www.site.com": no whitespace after the dot
    rest = text[end:].lstrip()
    if not rest:
        return True
    next_char = rest[0]
    term = text[start:end].rstrip("\"')]")
    if term.startswith("..") and len(term) >= 2 and set(term) == {"."}:
        # An ellipsis ends a sentence only when a capitalised word follows.
        return next_char.isupper() or not next_char.isalpha()
    if term != ".":
        return True  # "!", "?", "?!"
    match = _WORD_BEFORE.search(text[:start])
    if not match:
        return True
    if _never_ends(text, start):
        return False
    word = match.group(1)
    low = word.lower()
    if low in _MAY_END:
        next_word = re.match(r"[A-Za-z']+", rest)
        return next_char.isupper() and bool(next_word) and next_word.group(0).lower() in _OPENERS
    if low in _BEFORE_NUMBER:
        return not next_char.isdigit()
    if "." in word and len(word) <= 6:
        return next_char.isupper()  # "a.k.a. the", other dotted abbreviations
    return True


def _never_ends(text: str, start: int) -> bool:
    """Whatever follows, the period at ``text[start]`` ends no sentence: it closes a numbered-list
    marker at the start of a line ("1. The dog"), a title or Latin abbreviation ("Mr.", "e.g.") or
    an initial ("J. Smith"). False also when no word precedes it."""
    match = _WORD_BEFORE.search(text[:start])
    if not match:
        return False
    word = match.group(1)
    low = word.lower()
    line_start = text.rfind("\n", 0, match.start()) + 1
    if word.isdigit() and not text[line_start:match.start()].strip():
        return True
    if low in _MAY_END or low in _BEFORE_NUMBER:
        return False  # these depend on the next word
    return low in _NEVER_END or (len(word) == 1 and word.isupper())


def period_may_end_sentence(text: str) -> bool:
    """May the last period of ``text`` end a sentence, whatever is written next? False for the
    cases ``segment_sentences`` never cuts at ("1." opening a line, "e.g.", "Mr.", "J."); True
    otherwise ("There is a." included), and when ``text`` holds no period. Generation uses it to
    stop a sentence only where one can end (``GenerationParams.stop_rule = "sentence"``, through
    ``models.base.find_stop``): what comes next is not written yet, so a period that the next word
    would decide ("etc.", "No. 5") stops; the next character ("3.5", "e.g.") is waited for there."""
    i = text.rfind(".")
    if i < 0:
        return True
    j = i
    while j > 0 and text[j - 1] == ".":
        j -= 1
    if j < i:
        return True  # an ellipsis
    return not _never_ends(text, i)


def segment_sentences(text: str) -> list[Span]:
    """Split ``text`` into sentence spans (stripped of surrounding whitespace).

    A line break also ends a sentence (lists, paragraphs). Empty input gives ``[]``.
    """
    spans: list[Span] = []
    cut_points: list[int] = []
    for match in _TERMINATOR.finditer(text):
        if _is_boundary(text, match.start(), match.end()):
            cut_points.append(match.end())
    for match in re.finditer(r"\n", text):
        cut_points.append(match.start())
    cut_points = sorted(set(cut_points))
    begin = 0
    for cut in [*cut_points, len(text)]:
        _append(spans, text, begin, cut)
        begin = cut
    return spans


def _append(spans: list[Span], text: str, begin: int, end: int) -> None:
    chunk = text[begin:end]
    stripped = chunk.strip()
    if not stripped:
        return
    start = begin + (len(chunk) - len(chunk.lstrip()))
    spans.append(Span(start, start + len(stripped), stripped))


def sentence_records(text: str) -> list[dict]:
    """Per-sentence records for a text that was not scored (reference answers, STIC, POVID):
    ``{start, end, text}`` plus the score fields set to ``None``."""
    return [
        {"start": s.start, "end": s.end, "text": s.text, "text_logprob": None, "clip_score": None, "reward": None}
        for s in segment_sentences(text)
    ]


def valid_spans(text: str, records: Sequence[dict] | None) -> list[dict]:
    """Valid, sorted, non-overlapping spans with integer offsets inside ``text``: stored sentence or
    hallucination records made safe to cut ``text`` with (the Review tab and the CLI show them)."""
    out: list[dict] = []
    for rec in records or []:
        try:
            start, end = int(rec["start"]), int(rec["end"])
        except (KeyError, TypeError, ValueError):
            continue
        start, end = max(0, start), min(len(text), end)
        if end <= start:
            continue
        out.append({**rec, "start": start, "end": end})
    out.sort(key=lambda r: (r["start"], r["end"]))
    kept: list[dict] = []
    for rec in out:
        if kept and rec["start"] < kept[-1]["end"]:
            continue  # overlapping span: keep the first, the stored data should not do this
        kept.append(rec)
    return kept


# ---- the CSR cleaning filter -------------------------------------------------------------------
# Reference (CSR inference_csr/utils.py clean_tree + score.py): a candidate sentence is dropped when
# it is shorter than 4 characters, repeats one word >= 6 times in a row (or one character >= 11
# times), has > 5 line breaks, or contains foreign-script junk (Korean, Japanese kana, Cyrillic,
# emoji, repeated &nbsp;). We add CJK ideographs, which the reference's list misses although
# they are the same kind of junk for an English model.
_FOREIGN = re.compile(
    "[\u3130-\u318f\uac00-\ud7af"  # Hangul
    "\u3040-\u309f\u30a0-\u30ff"  # Japanese kana
    "\u0400-\u04ff"  # Cyrillic
    "\u4e00-\u9fff"  # CJK ideographs
    "\U0001f300-\U0001f5ff\U0001f600-\U0001f64f\U0001f680-\U0001f6ff\U0001f700-\U0001f77f]"  # emoji
    "|(?:&nbsp;){2,}"
)
_REPEATED_CHAR = re.compile(r"(\S)(?:\s*\1){10,}")


def clean_reason(
    sentence: str, min_chars: int = 4, max_repeated_words: int = 6, max_newlines: int = 5
) -> str | None:
    """Why the sentence fails the cleaning filter, or ``None`` when it is clean."""
    text = sentence.strip()
    if len(text) < min_chars:
        return "too_short"
    if _FOREIGN.search(text):
        return "foreign_script"
    repeated_word = re.compile(r"\b(\w+)\b(?:\s+\1\b){" + str(max_repeated_words - 1) + ",}", re.IGNORECASE)
    if repeated_word.search(text) or _REPEATED_CHAR.search(text):
        return "repetition"
    if text.count("\n") > max_newlines:
        return "too_many_newlines"
    return None


def is_clean_sentence(sentence: str, min_chars: int = 4, max_repeated_words: int = 6) -> bool:
    return clean_reason(sentence, min_chars=min_chars, max_repeated_words=max_repeated_words) is None
