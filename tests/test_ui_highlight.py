"""Highlight pieces from stored offsets, reward colouring and HTML escaping (ui/highlight.py)."""

from __future__ import annotations

from lvlm_studio.ui.highlight import (
    HALLUCINATION_COLOR,
    candidate_pieces,
    compare_html,
    mark_objects_html,
    mark_spans_html,
    normalise,
    pair_highlights,
    reward_color,
)

TEXT = "There is a red circle. There is a blue square at the top."


def _sents(rewards):
    first, second = TEXT.index("There is a red"), TEXT.index("There is a blue")
    return [
        {"start": first, "end": second - 1, "text": TEXT[first:second - 1], "reward": rewards[0]},
        {"start": second, "end": len(TEXT), "text": TEXT[second:], "reward": rewards[1]},
    ]


def test_pieces_follow_stored_offsets_and_concatenate_back():
    pieces = candidate_pieces(TEXT, _sents([0.25, -1.5]))
    assert "".join(p for p, _ in pieces) == TEXT
    assert pieces[0] == ("There is a red circle.", "+0.25")
    assert pieces[1] == (" ", None)  # the gap between sentences is unlabelled
    assert pieces[2] == ("There is a blue square at the top.", "-1.50")


def test_hallucination_span_is_cut_out_of_its_sentence_with_its_category():
    start = TEXT.index("blue")
    spans = [{"start": start, "end": start + 4, "category": "attribute", "original": "red", "injected": "blue"}]
    pieces = candidate_pieces(TEXT, _sents([None, None]), spans)
    assert "".join(p for p, _ in pieces) == TEXT
    assert ("blue", "⚠ attribute") in pieces
    # unscored sentences carry no label; only the injected word is marked
    assert [label for _, label in pieces if label] == ["⚠ attribute"]


def test_bad_offsets_are_clipped_not_crashing():
    pieces = candidate_pieces("short", [{"start": -3, "end": 99, "reward": 1.0}, {"start": 4, "end": 2}])
    assert pieces == [("short", "+1.00")]
    assert candidate_pieces("", None) == []


def test_normalise_and_colours():
    assert normalise([1.0, 3.0, None, 2.0]) == [-1.0, 1.0, None, 0.0]
    assert normalise([5.0, 5.0]) == [0.0, 0.0]
    assert reward_color(-1) == "#f87171" and reward_color(1) == "#4ade80" and reward_color(0) == "#e5e7eb"


def test_pair_highlights_share_one_colour_map_normalised_over_both_candidates():
    chosen = {"text": TEXT, "sentences": _sents([10.0, 30.0])}
    rejected = {"text": TEXT, "sentences": _sents([20.0, 30.0]),
                "spans": [{"start": 0, "end": 5, "category": "object"}]}
    hc, hr = pair_highlights(chosen, rejected)
    cmap = hc["color_map"]
    assert cmap == hr["color_map"]
    assert cmap["+10.0"] == reward_color(-1) and cmap["+30.0"] == reward_color(1)
    assert cmap["+20.0"] == reward_color(0)
    assert cmap["⚠ object"] == HALLUCINATION_COLOR
    assert hr["value"][0] == ("There", "⚠ object")


def test_html_helpers_escape_model_text():
    evil = '<img src=x onerror=alert(1)> and a red circle <script>alert(2)</script>'
    out = mark_objects_html(evil, ["red circle"])
    assert "<img" not in out and "<script>" not in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out
    assert '<mark class="hallu">red circle</mark>' in out
    start = evil.index("red circle")
    spans_out = mark_spans_html(evil, [{"start": start, "end": start + 10, "hallucinated": True},
                                       {"start": 0, "end": 4, "hallucinated": False}])
    assert '<mark class="hallu">red circle</mark>' in spans_out and "<img" not in spans_out
    table = compare_html(
        [{"item_id": 3, "prompt": "<b>p</b>", "a": {"answer": evil, "hallucinated": ["red circle"]},
          "b": {"answer": "fine", "hallucinated": []}}],
        "round <0>", "round 1",
    )
    assert "<script>" not in table and "<img" not in table and "<b>p</b>" not in table
    assert "round &lt;0&gt;" in table and "no hallucinated objects" in table
    assert "No evaluation answers" in compare_html([], "a", "b")


def test_review_info_says_when_an_automatic_label_trains_without_the_sft_term():
    from lvlm_studio.ui.review import _info_html

    view = {"pair_id": 7, "method": "csr", "round": 2, "margin": 1.5, "prompt": "Describe <b>it</b>.",
            "label": {"status": "auto"}, "meta": {"sft": False, "chosen_min_reward": 29.04}}
    html = _info_html(view)
    assert "no SFT term" in html and "29" in html
    assert "<b>it</b>" not in html and "&lt;b&gt;it&lt;/b&gt;" in html  # the prompt is escaped
    reviewed = {**view, "label": {"status": "accept", "reviewer": "ann"}}
    assert "no SFT term" not in _info_html(reviewed)  # a person's label trains with the term
    assert "no SFT term" not in _info_html({**view, "meta": {"sft": True}})


def test_review_info_renders_malformed_meta_as_text():
    """Pair meta can come from an import written by anyone: a list where a kind belongs or a word
    where a reward belongs is shown as text, never an error that would block the review queue."""
    from lvlm_studio.ui.review import _info_html

    view = {"pair_id": 1, "method": "imported", "round": 0, "margin": 0.1, "prompt": "p",
            "label": {"status": "auto"}, "meta": {"kind": ["<b>text</b>"], "sft": False, "chosen_min_reward": "low"}}
    html = _info_html(view)
    assert "rejected side: [&#x27;&lt;b&gt;text&lt;/b&gt;&#x27;]" in html or "&lt;b&gt;text&lt;/b&gt;" in html
    assert "<b>text</b>" not in html
    assert "no SFT term" in html and "reward —" in html
    assert "pair #1" in _info_html({**view, "meta": "not a dict"})


def test_plot_frames_are_typed_even_when_empty():
    """Gradio picks category axes for an object-typed frame and keeps them when data arrives: the
    Train curves then drew no lines and the override plot drew a rate of 0 as a full bar."""
    import pandas as pd

    from lvlm_studio.ui.data import override_frame
    from lvlm_studio.ui.train import curve_frames

    for frame in (*curve_frames([]), *curve_frames([{"step": 1, "loss": 0.69, "rewards/margins": 0.0}])):
        assert pd.api.types.is_integer_dtype(frame["step"]) and pd.api.types.is_float_dtype(frame["value"])
    curve = [{"step": 1, "loss": 0.69, "rewards/margins": 0.1, "rewards/chosen": 0.2, "rewards/rejected": 0.1},
             {"step": 2, "loss": 0.5, "rewards/margins": 0.3, "rewards/chosen": 0.4, "rewards/rejected": 0.1},
             {"step": 2, "train_loss": 0.6}]  # TRL's closing mean: one point, no line
    loss, margins, _ = curve_frames(curve)
    assert loss["value"].tolist() == [0.69, 0.5] and set(loss["series"]) == {"loss"}
    assert sorted(set(margins["series"])) == ["chosen", "margin", "rejected"]  # legend names that fit
    empty = override_frame({"override_by_margin": []})
    assert pd.api.types.is_float_dtype(empty["override rate"]) and pd.api.types.is_integer_dtype(empty["pairs"])


def test_answer_panels_say_what_each_answer_trains_as():
    from lvlm_studio.ui.review import panel_labels

    assert panel_labels(None) == ("Chosen (automatic label)", "Rejected (automatic label)")
    chosen, rejected = panel_labels({"status": "swap", "reviewer": "<b>ann</b>"})
    assert "trains as REJECTED" in chosen and "trains as CHOSEN" in rejected
    assert "not trained" in panel_labels({"status": "reject_both", "reviewer": "bob"})[0]
    assert "accepted by bob" in panel_labels({"status": "accept", "reviewer": "bob"})[1]


def test_review_info_shows_the_prompt_a_pair_trains_with():
    from lvlm_studio.ui.review import _info_html

    view = {"pair_id": 2, "method": "stic", "round": 0, "margin": None, "prompt": "Describe the image.",
            "label": {"status": "auto"}, "meta": {"pair_prompt": "Step by step: <the subjects>."}}
    html = _info_html(view)
    assert "Answers written for (and trained with)" in html and "Step by step: &lt;the subjects&gt;." in html
    same = {**view, "meta": {"pair_prompt": "Describe the image."}}
    assert "trained with" not in _info_html(same)


def test_reports_read_as_a_few_escaped_lines():
    from lvlm_studio.ui.common import report_markdown

    gen = report_markdown({"method": "csr", "round": 0, "items": 6, "skipped": 0, "pairs": 5, "no_pair": 1,
                           "seconds": 1.2, "note": "1 item(s) gave no pair (<why>)"})
    assert "**CSR** from round 0: **5 pairs** from 6 items" in gen and "&lt;why&gt;" in gen
    imp = report_markdown({"source": "x", "format": "jsonl", "imported": 2, "pairs": 1, "skipped": 12,
                           "ignored": 0, "status": "partial", "errors": [f"line {k}: <bad>" for k in range(12)]})
    assert "Import **partial**" in imp and imp.count("\n- ") == 11 and "and 2 more" in imp
    assert "&lt;bad&gt;" in imp and "<bad>" not in imp
    assert "Exported **3 pairs** (2 images)" in report_markdown({"format": "trl", "folder": "/x", "pairs": 3, "images": 2})
    assert "Exported **1 pair** (1 image)" in report_markdown({"format": "trl", "folder": "/x", "pairs": 1, "images": 1})
    one = report_markdown({"method": "stic", "round": 0, "items": 1, "skipped": 0, "pairs": 1, "no_pair": 0, "seconds": 1})
    assert "**1 pair** from 1 item in" in one
    assert "**1 image added**, 1 refused" in report_markdown({"items": [4], "rejected": [{"file": "a", "reason": "b"}]})
    assert report_markdown(None) == ""


def test_number_fields_name_themselves_in_every_refusal():
    """A number field's refusal names the field: empty, text, a fraction for a count, and the
    infinities a JSON client can send (int(inf) raised an unnamed OverflowError)."""
    import pytest

    from lvlm_studio.ui.common import number_field
    from lvlm_studio.ui.compare import evaluation_scenes

    assert number_field("2e-4", "learning rate") == 2e-4 and number_field(3.0, "epochs", int) == 3
    for value, cast, match in ((None, float, "enter a number"), ("abc", float, "enter a number"),
                               (2.5, int, "enter a whole number, not 2.5"), (float("inf"), int, "enter a finite number"),
                               (float("-inf"), float, "enter a finite number"),
                               (float("nan"), int, "enter a finite number")):
        with pytest.raises(ValueError, match=f"^field: {match}"):
            number_field(value, "field", cast)
    assert evaluation_scenes(500.0) == 500
    with pytest.raises(ValueError, match="test scenes or images: between 1 and 5000"):
        evaluation_scenes(5001)


def test_report_values_render_as_text_in_markdown():
    """File names and errors are Markdown-escaped too: a file named like a Markdown image (or a
    line starting like a list or heading) used to render as one in the Data tab's summary.
    Rendered with CommonMark (markdown-it); what only Gradio's renderer adds (automatic links of
    http:// and www., $$ formulas) is checked on the escaped text: those characters are escaped."""
    from markdown_it import MarkdownIt

    from lvlm_studio.ui.common import report_markdown

    name = "![x](http://evil.example/p.png)"
    errors = [f"{name}: not an image", "1. # big", "- [a](b)\n# head", "     spaced.png: no", "$$x^2$$.png: no",
              "www.evil.example_1.5.png: no", "C:\\dir\\f_1.png: no"]
    md = report_markdown({"imported": 0, "status": "failed", "format": "folder", "pairs": 0, "skipped": 3,
                          "ignored": 0, "errors": errors})
    rendered = MarkdownIt().render(md)
    for tag in ("<img", "<a ", "<h1", "<ol", "<pre", "<code", "<em"):
        assert tag not in rendered, tag
    for shown in (f"{name}: not an image", "1. # big", "- [a](b) # head", "spaced.png: no", "$$x^2$$.png: no",
                  "www.evil.example_1.5.png: no", "C:\\dir\\f_1.png: no"):
        assert f"<li>{shown}</li>" in rendered, shown
    assert "http://" not in md and "www." not in md and "$$" not in md  # no autolink or formula can start
    up = MarkdownIt().render(report_markdown({"items": [], "rejected": [{"file": f"{name}<b>", "reason": "_x_"}]}))
    assert "<img" not in up and "<em>" not in up and "<b>" not in up and "&lt;b&gt;: _x_" in up


def test_the_evaluation_summary_shows_a_model_id_as_typed():
    """The Compare tab's summary is Markdown: a model id (a local path an admin typed) is shown as
    typed, neither formatted nor turned into a link or HTML."""
    from lvlm_studio.ui.compare import evaluation_summary

    line = evaluation_summary({"metrics": {"model": "org/*bold*[x](javascript:alert(1))<b>", "chair_s": 0.25},
                               "round": 0, "items": 3, "added": 0})
    assert r"model org/\*bold\*\[x\]\(javascript\:alert\(1\)\)&lt;b&gt;: CHAIR_s **0.250**" in line
