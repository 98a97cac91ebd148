"""Review tab: the image beside both candidates, sentence rewards and hallucination marks,
accept / swap / reject both / edit / skip / undo with keyboard shortcuts (see ``SHORTCUTS``)."""

from __future__ import annotations

import hashlib
from typing import Any

import gradio as gr

from lvlm_studio.service import METHODS, Studio
from lvlm_studio.ui.auth import acting_user
from lvlm_studio.ui.common import parse_round, round_choices, user_errors
from lvlm_studio.ui.highlight import (
    HALLUCINATION_COLOR,
    escape_text,
    pair_highlights,
    reward_color,
    reward_label,
)

# key -> (button elem_id, label). The page script (ui/app.py) clicks the button of a key.
SHORTCUTS = {
    "a": ("review-accept", "Accept"),
    "s": ("review-swap", "Swap"),
    "r": ("review-reject", "Reject both"),
    "e": ("review-edit", "Edit"),
    "k": ("review-skip", "Skip"),
    "u": ("review-undo", "Undo"),
}


_KINDS = {
    "text": "hallucinations injected into the reference answer (POVID)",
    "image": "the model's answer on a diffusion-noised image (POVID)",
    "misleading": "answer to a misleading prompt (STIC)",
    "corrupted": "answer on a corrupted image (STIC)",
}


def _info_html(view: dict | None, empty_reason: str = "") -> str:
    if view is None:
        return f'<div class="review-info empty">{escape_text(empty_reason or "No pair to review.")}</div>'
    margin = view["margin"]
    label = view["label"]
    status = label["status"]
    status_text = "automatic (not reviewed)" if status == "auto" else f"{status} by {label.get('reviewer')}"
    mine = view.get("my_decision")
    parts = [
        f'<div class="review-prompt"><span class="k">Prompt</span> {escape_text(view["prompt"])}</div>',
        '<div class="review-meta">'
        f'<span class="chip">pair #{escape_text(view["pair_id"])}</span>'
        f'<span class="chip">{escape_text(view["method"].upper())}</span>'
        f'<span class="chip">round {escape_text(view["round"])}</span>'
        f'<span class="chip">margin {"—" if margin is None else f"{margin:.3g}"}</span>'
        f'<span class="chip">label: {escape_text(status_text)}</span>'
        + (f'<span class="chip mine">your decision: {escape_text(mine)}</span>' if mine else "")
        + "</div>",
    ]
    meta_prompt = (view.get("meta") or {}).get("pair_prompt") if isinstance(view.get("meta"), dict) else None
    if isinstance(meta_prompt, str) and meta_prompt.strip() and meta_prompt != view["prompt"]:
        parts.append('<div class="review-prompt"><span class="k">Answers written for (and trained with)</span> '
                     f'{escape_text(meta_prompt)}</div>')
    if status == "edit" and label.get("chosen_text"):  # what training will use as the chosen side
        parts.append('<div class="review-edited"><span class="k">Edited chosen answer (trains as chosen)</span> '
                     f'{escape_text(label["chosen_text"])}</div>')
    if view.get("notes"):
        parts.append('<div class="review-notes"><span class="k">Notes</span><ul>' + "".join(
            f"<li>{escape_text(n['reviewer'])} ({escape_text(n['decision'])}{', undone' if n.get('undone') else ''}): "
            f"{escape_text(n['note'])}</li>"
            for n in view["notes"]) + "</ul></div>")
    meta = view.get("meta") if isinstance(view.get("meta"), dict) else {}
    if meta.get("sft") is False and status == "auto":
        low = meta.get("chosen_min_reward")
        low_text = reward_label(low) if isinstance(low, int | float) and not isinstance(low, bool) else "—"
        parts.append(
            '<div class="review-kind">training: DPO only, no SFT term: a sentence of the chosen answer has '
            f'reward {low_text}, below the bar for imitating it; a reviewed '
            "label (accept, swap, edit) trains with the term</div>"
        )
    kind = meta.get("kind")
    if kind:  # meta may come from an import: render whatever it holds as text, never fail on it
        text = _KINDS.get(kind, kind) if isinstance(kind, str) else str(kind)
        parts.append(f'<div class="review-kind">rejected side: {escape_text(text)}</div>')
    return '<div class="review-info">' + "".join(parts) + "</div>"


def panel_labels(label: dict | None) -> tuple[str, str]:
    """Titles of the two answer panels: they always show the automatic chosen / rejected, so after
    a decision the titles say what each answer now trains as."""
    status = (label or {}).get("status", "auto")
    who = (label or {}).get("reviewer") or "a reviewer"
    if status == "swap":
        return (f"Automatic chosen: swapped by {who}, trains as REJECTED",
                f"Automatic rejected: swapped by {who}, trains as CHOSEN")
    if status == "reject_both":
        return (f"Automatic chosen: {who} rejected both, not trained", f"Automatic rejected: {who} rejected both, not trained")
    if status == "edit":
        return (f"Automatic chosen: replaced by {who}'s edit (see above)", "Rejected")
    if status == "accept":
        return f"Chosen (label accepted by {who})", f"Rejected (label accepted by {who})"
    return "Chosen (automatic label)", "Rejected (automatic label)"


def _progress_html(p: dict, reviewer: str) -> str:
    total, done = p.get("total", 0), p.get("done", 0)
    mine = p.get("per_reviewer", {}).get(reviewer, {}).get("done", 0)
    pct = 0 if not total else round(100 * done / total)
    others = ", ".join(f"{escape_text(k)}: {v['done']}" for k, v in sorted(p.get("per_reviewer", {}).items()))
    return (
        f'<div class="review-progress"><div class="bar"><div style="width:{pct}%"></div></div>'
        f"<span>{done} / {total} pairs reviewed ({pct}%) · you: {mine}"
        + (f" · per reviewer: {others}" if others else "")
        + "</span></div>"
    )


def legend_html() -> str:
    swatches = "".join(
        f'<span class="sw" style="background:{reward_color(v)}"></span>' for v in (-1, -0.5, 0, 0.5, 1)
    )
    keys = " ".join(f'<kbd>{k}</kbd> {escape_text(lbl)}' for k, (_, lbl) in SHORTCUTS.items())
    return (
        '<div class="review-legend">'
        f"<span>badge: the sentence's calibrated reward; colour: low {swatches} high within this pair</span>"
        f'<span><span class="sw" style="background:{HALLUCINATION_COLOR}"></span> ⚠ injected hallucination</span>'
        f'<span class="keys">Keys: {keys}</span></div>'
    )


def restore_reviewer(saved: str | None, shown: str | None) -> str:
    """The Reviewer box on page load: the name this browser typed last, else what the box holds."""
    return (saved or "").strip() or shown or "guest"


def method_filter_choices(studio: Studio) -> list[tuple[str, str]]:
    """The Method filter: the three methods and every method the store's pairs carry (an import
    names its own, e.g. "imported"), so any pair can be reached without skipping through the rest."""
    return [("all methods", "all"), *[(m.upper() if m in METHODS else m, m) for m in studio.method_names()]]


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    pair_state = gr.State(None)  # current pair id
    seen_state = gr.State([])  # skipped / decided this session (kept out of the queue)
    edit_pair = gr.State(None)  # the pair whose text the edit box was opened with

    with gr.Row(elem_id="review-filters"):
        method = gr.Dropdown(method_filter_choices(studio), value="all", label="Method", elem_id="review-method",
                             scale=1)
        round_ = gr.Dropdown(round_choices(studio, with_all=True), value="all", label="Round", allow_custom_value=True,
                             elem_id="review-round", scale=1)
        status = gr.Radio(["pending", "decided", "all"], value="pending", label="Queue",
                          elem_id="review-status", scale=1, min_width=330)
        name = gr.Textbox(value="guest" if studio.open_mode else "", label="Reviewer",
                          visible=studio.open_mode, elem_id="reviewer-name", scale=1, max_lines=1)
    progress = gr.HTML(elem_id="review-progress")
    with gr.Row(equal_height=False, elem_id="review-main"):
        with gr.Column(scale=2, min_width=280):
            image = gr.Image(type="filepath", interactive=False, label="Image", height=340,
                             buttons=["fullscreen", "download"], elem_id="review-image")
            info = gr.HTML(elem_id="review-info")
        with gr.Column(scale=3, min_width=360):
            chosen = gr.HighlightedText(label="Chosen (automatic label)", elem_id="review-chosen",
                                        show_legend=False, show_inline_category=True, interactive=False)
            rejected = gr.HighlightedText(label="Rejected (automatic label)", elem_id="review-rejected",
                                          show_legend=False, show_inline_category=True, interactive=False)
            gr.HTML(legend_html(), elem_id="review-legend")
    with gr.Row(elem_id="review-actions"):
        buttons = {}
        for key, (elem_id, label) in SHORTCUTS.items():
            variant = "primary" if key == "a" else ("stop" if key == "r" else "secondary")
            buttons[key] = gr.Button(f"{label}  [{key}]", variant=variant, elem_id=elem_id, min_width=90)
    with gr.Row():
        edit_text = gr.Textbox(label="Edited chosen answer", lines=3, visible=False, elem_id="review-edit-text",
                               scale=4)
        save_edit = gr.Button("Save edit", visible=False, elem_id="review-save-edit", variant="primary", scale=1)
    note = gr.Textbox(label="Note (optional, saved with your next decision)", max_lines=2, elem_id="review-note")
    message = gr.HTML(elem_id="review-message")

    outputs = [pair_state, seen_state, image, info, chosen, rejected, progress, edit_text, save_edit, note, message,
               edit_pair]

    def render(view: dict | None, seen: list, reviewer: str, msg: str = "", empty: str = "") -> tuple:
        prog = _progress_html(studio.progress(reviewer), reviewer)
        hidden = gr.Textbox(value="", visible=False)
        if view is None:
            title_c, title_r = panel_labels(None)
            return (None, seen, None, _info_html(None, empty), gr.HighlightedText(value=None, label=title_c),
                    gr.HighlightedText(value=None, label=title_r), prog, hidden, gr.Button(visible=False), "", msg,
                    None)
        hc, hr = pair_highlights(view["chosen"], view["rejected"])
        title_c, title_r = panel_labels(view.get("label"))
        return (view["pair_id"], seen, view["image_path"], _info_html(view),
                gr.HighlightedText(value=hc["value"], color_map=hc["color_map"], label=title_c),
                gr.HighlightedText(value=hr["value"], color_map=hr["color_map"], label=title_r),
                prog, hidden, gr.Button(visible=False), "", msg, None)

    def load_next(reviewer: str, method_v: str, round_v: str, status_v: str, seen: list, msg: str = "") -> tuple:
        m = None if method_v in (None, "", "all") else method_v
        view = studio.next_pair(reviewer, method=m, round=parse_round(round_v), status=status_v, exclude=seen)
        empty = ("Nothing left in this queue. Generate pairs in the Generate tab, or switch the filters."
                 if not seen else "Queue done (skipped pairs come back when you reload or change filters).")
        return render(view, seen, reviewer, msg, empty)

    @user_errors
    def on_load(typed: str, method_v: str, round_v: str, status_v: str, request: gr.Request) -> tuple:
        reviewer = acting_user(studio, request, typed) or "guest"
        return load_next(reviewer, method_v, round_v, status_v, [])

    def make_action(decision: str):
        @user_errors
        def act(pair_id, seen, typed, method_v, round_v, status_v, edit_v, note_v, request: gr.Request,
                edit_for=None):
            reviewer = acting_user(studio, request, typed)
            seen = list(seen or [])
            msg = ""
            parse_round(round_v)  # a bad filter is refused before a decision is stored, not after
            if decision == "edit" and None not in (edit_for, pair_id) and int(edit_for) != int(pair_id):
                # The edit box was filled for a pair an earlier action already moved past (e then a
                # fast a): saving it would put that pair's text on the one shown now.
                raise ValueError(f"the edit box holds pair #{int(edit_for)}'s text, but pair #{int(pair_id)} "
                                 "is shown now: press Edit again")
            if decision == "undo":
                res = studio.undo(reviewer)
                if res is None:
                    return load_next(reviewer, method_v, round_v, status_v, seen,
                                     '<span class="msg">Nothing to undo.</span>')
                view = studio.get_pair(res["pair_id"], reviewer)
                seen = [p for p in seen if p != res["pair_id"]]
                return render(view, seen, reviewer, f'<span class="msg">Undid your decision on pair '
                              f'#{res["pair_id"]}.</span>')
            if pair_id is None:
                return load_next(reviewer, method_v, round_v, status_v, seen)
            if decision == "skip":
                seen.append(int(pair_id))
                msg = f"Skipped pair #{int(pair_id)}."
            else:
                studio.decide(int(pair_id), reviewer, decision, edited_text=edit_v if decision == "edit" else None,
                              note=note_v or None)
                seen.append(int(pair_id))
                msg = f"{decision.replace('_', ' ')} saved for pair #{int(pair_id)}."
            return load_next(reviewer, method_v, round_v, status_v, seen,
                             f'<span class="msg">{escape_text(msg)}</span>')

        return act

    inputs = [pair_state, seen_state, name, method, round_, status, edit_text, note, edit_pair]
    # show_progress="hidden" keeps the panel on screen when an action is refused (an empty edit, a
    # pair another reviewer just changed): Gradio replaces every output of a failed event with an
    # "Error" badge unless its progress display is hidden. The actions are instant: no spinner is lost.
    for key, decision in (("a", "accept"), ("s", "swap"), ("r", "reject_both"), ("k", "skip"), ("u", "undo")):
        buttons[key].click(make_action(decision), inputs, outputs, api_name=f"review_{decision}",
                           concurrency_limit=None, show_progress="hidden")

    def open_edit(pair_id):
        if pair_id is None:
            return gr.Textbox(visible=False), gr.Button(visible=False), None
        view = studio.get_pair(int(pair_id))
        label = view["label"]  # re-editing starts from the saved edit, not from the automatic text
        text = label["chosen_text"] if label["status"] == "edit" and label.get("chosen_text") else view["chosen"]["text"]
        return gr.Textbox(value=text, visible=True), gr.Button(visible=True), int(pair_id)

    focus_js = ("() => { setTimeout(() => { const t = document.querySelector('#review-edit-text textarea');"
                " if (t) t.focus(); }, 100); }")
    buttons["e"].click(open_edit, [pair_state], [edit_text, save_edit, edit_pair], api_name="review_open_edit").then(
        None, None, None, js=focus_js)
    save_edit.click(make_action("edit"), inputs, outputs, api_name="review_edit", concurrency_limit=None,
                    show_progress="hidden")

    for comp in (method, round_, status):
        comp.change(on_load, [name, method, round_, status], outputs, api_name=False)
    name.submit(on_load, [name, method, round_, status], outputs, api_name=False)
    if studio.open_mode:
        # The typed name survives a reload (the browser's localStorage): a reviewer who reloaded used
        # to go on as "guest" without noticing. With accounts the signed-in name counts instead.
        saved_name = gr.BrowserState("", storage_key="lvlm-studio-reviewer",
                                     secret=hashlib.sha256(str(studio.settings.home).encode()).hexdigest())
        name.change(lambda typed: (typed or "").strip(), [name], [saved_name], api_name=False, queue=False,
                    show_progress="hidden")
        demo.load(restore_reviewer, [saved_name, name], [name], api_name=False, queue=False).then(
            on_load, [name, method, round_, status], outputs, api_name="review_load")
    else:
        demo.load(on_load, [name, method, round_, status], outputs, api_name="review_load")

    def refresh_filters():
        return gr.Dropdown(choices=round_choices(studio, with_all=True)), gr.Dropdown(choices=method_filter_choices(studio))

    demo.load(refresh_filters, None, [round_, method], api_name=False)
    return {"name": name, "round": round_, "on_show": (refresh_filters, [round_, method])}
