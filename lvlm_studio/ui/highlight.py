"""Rendering model text for the UI: sentence colouring by reward, hallucination marks, escaping.

Everything here is pure Python (no Gradio, no torch) so it is unit-tested directly.

Review candidates are shown with ``gr.HighlightedText`` in *category* mode: every sentence is one
piece whose label is its calibrated reward (``"+0.62"``) and whose colour comes from that reward
normalised to −1…1 over both candidates of the pair (red = worst sentence of the pair, green =
best). Injected hallucinations (POVID) are separate pieces labelled ``"⚠ object"`` etc. in purple.
Why not Gradio's score mode: in Gradio 6.31 it paints negative scores purple and positive ones
red (red reads as "bad" to a reviewer), hides the value, and one component cannot mix scores with
category labels, so the hallucination marks would need a second widget.

Pieces are cut from the *stored offsets* (``sentences[i].start/end``, ``spans[j].start/end``),
never by re-splitting text, so what is coloured is exactly what the method scored. The component
renders tokens as text nodes, so model text needs no escaping there; the HTML helpers below
(``compare_html``, ``escape_text``) escape everything they are given.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from lvlm_studio.methods.sentences import valid_spans

HALLUCINATION_PREFIX = "⚠ "
HALLUCINATION_COLOR = "#c084fc"  # purple: distinct from the red..green reward scale
_RED = (248, 113, 113)
_GREY = (229, 231, 235)
_GREEN = (74, 222, 128)

Piece = tuple[str, "str | None"]


def escape_text(text: Any) -> str:
    """HTML-escape anything (model text, prompts, file names) before it goes into gr.HTML."""
    return html.escape("" if text is None else str(text), quote=True)


def escape_markdown(text: Any) -> str:
    """Text for gr.Markdown, shown as typed: markup characters backslash-escaped (a file named
    ``![x](http://…)`` stays a name, not an image; ``$`` opens no formula; ``:`` and ``.`` make
    no automatic link of ``http://…`` or ``www.…``; ``1.`` starts no list), a list marker too,
    line breaks folded and outer spaces stripped (no heading, list or code block can start inside
    it), then HTML-escaped."""
    text = " ".join(("" if text is None else str(text)).splitlines()).strip()
    text = re.sub(r"([\\`*_{}\[\]()!#|~$:.])", r"\\\1", text)
    text = re.sub(r"^([-+=])", r"\\\1", text)  # ("1." and "1)" are escaped above)
    return html.escape(text, quote=False)


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def normalise(values: Iterable[float | None]) -> list[float | None]:
    """Min-max map to −1…1 (``None`` stays ``None``; all-equal values map to 0)."""
    vals = [_finite(v) for v in values]
    known = [v for v in vals if v is not None]
    if not known:
        return list(vals)
    lo, hi = min(known), max(known)
    if hi - lo < 1e-12:
        return [None if v is None else 0.0 for v in vals]
    return [None if v is None else 2.0 * (v - lo) / (hi - lo) - 1.0 for v in vals]


def reward_color(norm: float) -> str:
    """−1 → red, 0 → grey, +1 → green (hex)."""
    t = max(-1.0, min(1.0, float(norm)))
    a, b = (_GREY, _GREEN) if t >= 0 else (_GREY, _RED)
    w = abs(t)
    rgb = tuple(round(x + (y - x) * w) for x, y in zip(a, b, strict=True))
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def reward_label(reward: float) -> str:
    """A sentence's calibrated reward as its badge: 2 decimals below 10, 1 up to 1000 (CSR's paper
    rewards are CLIP-scale, tens), 3 significant digits beyond; never scientific notation below."""
    size = abs(reward)
    if size >= 1000:
        return f"{reward:+.3g}"
    return f"{reward:+.1f}" if size >= 10 else f"{reward:+.2f}"


def candidate_pieces(
    text: str,
    sentences: Sequence[dict] | None,
    spans: Sequence[dict] | None = None,
    norm: dict[int, float | None] | None = None,
) -> list[Piece]:
    """Cut ``text`` into ``(piece, label)`` from stored offsets.

    A sentence with a reward gets label ``reward_label(reward)``; unscored sentences and the text
    between sentences get ``None``; an injected-hallucination span gets ``"⚠ <category>"`` and
    wins over the sentence it sits in. The pieces concatenate back to ``text`` exactly.
    """
    text = text or ""
    sents = valid_spans(text, sentences)
    marks = valid_spans(text, spans)
    # label per character boundary segment: build cut points from every offset
    cuts = {0, len(text)}
    for rec in sents + marks:
        cuts.update((rec["start"], rec["end"]))
    points = sorted(cuts)
    pieces: list[Piece] = []
    for a, b in zip(points, points[1:], strict=False):
        if b <= a:
            continue
        label: str | None = None
        mark = next((m for m in marks if m["start"] <= a and b <= m["end"]), None)
        if mark is not None:
            label = HALLUCINATION_PREFIX + str(mark.get("category") or "hallucination")
        else:
            sent = next((s for s in sents if s["start"] <= a and b <= s["end"]), None)
            reward = _finite(sent.get("reward")) if sent is not None else None
            if reward is not None:
                label = reward_label(reward)
        if pieces and pieces[-1][1] == label:
            pieces[-1] = (pieces[-1][0] + text[a:b], label)
        else:
            pieces.append((text[a:b], label))
    return pieces


def pair_highlights(chosen: dict, rejected: dict) -> tuple[dict, dict]:
    """HighlightedText values for both candidates of a pair plus one shared colour map.

    Returns ``({"value": pieces, "color_map": cmap}, {...})``. Rewards are normalised over the
    sentences of *both* candidates, so the colours compare across the pair.
    """
    rewards = [
        _finite(s.get("reward"))
        for cand in (chosen, rejected)
        for s in (cand.get("sentences") or [])
    ]
    normed = normalise(rewards)
    cmap: dict[str, str] = {}
    # A label is the formatted raw reward; two sentences with equal labels share a colour.
    for raw, nv in zip(rewards, normed, strict=True):
        if raw is not None and nv is not None:
            cmap[reward_label(raw)] = reward_color(nv)
    out = []
    for cand in (chosen, rejected):
        pieces = candidate_pieces(cand.get("text") or "", cand.get("sentences"), cand.get("spans"))
        for _, label in pieces:
            if label and label.startswith(HALLUCINATION_PREFIX):
                cmap[label] = HALLUCINATION_COLOR
        out.append(pieces)
    return {"value": out[0], "color_map": dict(cmap)}, {"value": out[1], "color_map": dict(cmap)}


# ---- Compare: answers with hallucinated objects marked (HTML, everything escaped) ---------------


def _names(objects: Iterable[Any] | None) -> list[str]:
    names = []
    for obj in objects or []:
        if isinstance(obj, str):
            names.append(obj)
        elif isinstance(obj, dict):
            name = obj.get("text") or obj.get("name") or obj.get("object") or obj.get("mention")
            if name:
                names.append(str(name))
        elif isinstance(obj, list | tuple) and obj:
            names.append(" ".join(str(x) for x in obj))
    return names


def mark_objects_html(answer: str, hallucinated: Iterable[Any] | None) -> str:
    """Escaped ``answer`` with every case-insensitive mention of a hallucinated object wrapped in
    ``<mark class="hallu">``. Matching runs on the raw text; each piece is escaped on output."""
    answer = answer or ""
    names = sorted({n for n in _names(hallucinated) if n.strip()}, key=len, reverse=True)
    if not names:
        return escape_text(answer)
    pattern = re.compile("|".join(r"\b" + re.escape(n) + r"s?\b" for n in names), re.IGNORECASE)
    out, pos = [], 0
    for m in pattern.finditer(answer):
        out.append(escape_text(answer[pos:m.start()]))
        out.append(f'<mark class="hallu">{escape_text(m.group(0))}</mark>')
        pos = m.end()
    out.append(escape_text(answer[pos:]))
    return "".join(out)


def mark_spans_html(answer: str, spans: Sequence[dict]) -> str:
    """Escaped ``answer`` with the stored mention spans whose ``hallucinated`` flag is set marked."""
    answer = answer or ""
    out, pos = [], 0
    for sp in valid_spans(answer, [s for s in spans if s.get("hallucinated")]):
        out.append(escape_text(answer[pos:sp["start"]]))
        out.append(f'<mark class="hallu">{escape_text(answer[sp["start"]:sp["end"]])}</mark>')
        pos = sp["end"]
    out.append(escape_text(answer[pos:]))
    return "".join(out)


def compare_html(rows: Sequence[dict], label_a: str, label_b: str,
                 empty: str = "No evaluation answers to compare yet.") -> str:
    """A side-by-side table: one row per item with both answers and their hallucinated objects.

    ``rows``: ``{item_id, prompt, a: {answer, hallucinated, spans?}|None, b: {...}|None}``; stored
    mention offsets (``spans``) are used when present, else the hallucinated names are searched.
    """
    if not rows:
        return f'<p class="empty">{escape_text(empty)}</p>'
    head = (
        '<table class="compare"><thead><tr><th>item</th>'
        f"<th>{escape_text(label_a)}</th><th>{escape_text(label_b)}</th></tr></thead><tbody>"
    )
    body = []
    for row in rows:
        cells = []
        for side in ("a", "b"):
            rec = row.get(side)
            if not rec:
                cells.append('<td class="missing">—</td>')
                continue
            hallu = _names(rec.get("hallucinated"))
            tag = (
                '<div class="hallu-list">hallucinated: ' + escape_text(", ".join(hallu)) + "</div>"
                if hallu
                else '<div class="clean">no hallucinated objects</div>'
            )
            spans = rec.get("spans")
            body_html = (mark_spans_html(rec.get("answer") or "", spans) if spans is not None
                         else mark_objects_html(rec.get("answer") or "", hallu))
            cells.append(f"<td>{body_html}{tag}</td>")
        prompt = escape_text(row.get("prompt") or "")
        body.append(
            f'<tr><td class="item">#{escape_text(row.get("item_id"))}<div class="prompt">{prompt}</div></td>'
            + "".join(cells)
            + "</tr>"
        )
    return head + "".join(body) + "</tbody></table>"
