"""The Gradio app: a header (auth mode), five tabs, and JSON API endpoints for scripts and tests.

``build_app(studio)`` returns the ``gr.Blocks``; Gradio 6 takes css / head / theme in ``launch()``,
so ``launch_kwargs(studio)`` returns them (plus ``auth``), and ``launch(studio, **kw)`` does both.
Every handler is reachable by ``api_name``; the JSON endpoints (``gr.api``) are:
``/next_pair``, ``/get_pair``, ``/decide``, ``/undo``, ``/progress``, ``/generate``, ``/start_round``,
``/cancel_round``, ``/rounds``, ``/round_status``, ``/compare``, ``/agreement``, ``/stats``.
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from lvlm_studio.service import Studio
from lvlm_studio.ui import compare as compare_tab
from lvlm_studio.ui import data as data_tab
from lvlm_studio.ui import generate as generate_tab
from lvlm_studio.ui import review as review_tab
from lvlm_studio.ui import train as train_tab
from lvlm_studio.ui.auth import acting_user, claimed_user, header_text, launch_auth, on_space
from lvlm_studio.ui.common import MODEL_JOBS, user_errors
from lvlm_studio.ui.highlight import escape_text

CSS = """
.gradio-container { max-width: 1400px !important; }
#studio-header { display:flex; align-items:baseline; gap:14px; flex-wrap:wrap; padding:4px 2px 0; }
#studio-header h1 { font-size: 1.5rem; margin: 0; }
#studio-header .tagline { color: var(--body-text-color-subdued); }
#studio-header .auth { margin-left:auto; font-size:.85rem; padding:2px 10px; border-radius:999px;
  background: var(--background-fill-secondary); border:1px solid var(--border-color-primary); }
#review-image img { image-rendering: pixelated; object-fit: contain; }
.review-info { font-size: .92rem; line-height: 1.5; }
.review-info .k { font-weight: 600; margin-right: 6px; }
.review-prompt { margin: 4px 0 8px; }
.review-edited { margin: 6px 0; padding: 4px 8px; border-left: 3px solid #6366f1; }
.review-meta { display:flex; flex-wrap:wrap; gap:6px; }
.chip { display:inline-block; padding:1px 9px; border-radius:999px; font-size:.8rem;
  background: var(--background-fill-secondary); border:1px solid var(--border-color-primary); }
.chip.mine { border-color: #16a34a; }
.review-kind { margin-top:6px; font-size:.82rem; color: var(--body-text-color-subdued); }
.review-progress { display:flex; flex-wrap:wrap; align-items:center; gap:4px 12px; font-size:.88rem; }
.review-progress .bar { flex: 0 1 220px; min-width: 80px; height: 8px; border-radius: 4px; background: var(--background-fill-secondary);
  overflow:hidden; border:1px solid var(--border-color-primary); }
.review-progress .bar > div { height:100%; background:#22c55e; }
.review-legend { display:flex; flex-wrap:wrap; gap:16px; font-size:.8rem; color: var(--body-text-color-subdued); }
.review-legend .sw { display:inline-block; width:14px; height:12px; border-radius:3px; vertical-align:middle;
  margin: 0 1px; }
kbd { font-family: ui-monospace, monospace; font-size:.78rem; padding:0 5px; border-radius:4px;
  border:1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
#review-actions button { font-weight: 600; }
#review-chosen, #review-rejected { font-size: 1.02rem; }
/* HighlightedText lays tokens out as flex items, which breaks a long unlabelled piece onto its own
   line and splits words; candidates read as running text instead. */
#review-chosen .textfield, #review-rejected .textfield { display: block !important; line-height: 2.0;
  word-break: normal !important; overflow-wrap: anywhere; }
#review-chosen .token-container, #review-rejected .token-container,
#review-chosen .token, #review-rejected .token, #review-chosen .text, #review-rejected .text {
  display: inline !important; word-break: normal !important; white-space: normal; }
/* Only the candidate's own text keeps its spaces; pre-wrap on the token wrappers also showed the
   whitespace of Gradio's markup as ~40 px gaps between sentences. */
#review-chosen .text, #review-rejected .text { white-space: pre-wrap; }
#review-chosen .token.highlighted, #review-rejected .token.highlighted { padding: 3px 4px; border-radius: 5px; }
#review-chosen .label, #review-rejected .label { display: inline-block; margin-left: 5px; font-size: .68rem;
  padding: 0 5px; border-radius: 4px; vertical-align: middle; line-height: 1.4; color: #1f2937 !important; }
.msg { color: #15803d; font-size: .88rem; }
table.compare { width:100%; border-collapse: collapse; font-size:.9rem; }
table.compare th, table.compare td { border: none; border-bottom:1px solid var(--border-color-primary);
  padding:6px 8px; vertical-align: top; text-align:left; }
table.compare td.item { white-space: nowrap; color: var(--body-text-color-subdued); }
table.compare .prompt { font-size:.78rem; white-space: normal; max-width: 180px; }
mark.hallu { background:#c084fc; color:#1f1f1f; border-radius:3px; padding:0 2px; }
.hallu-list { margin-top:4px; font-size:.78rem; color:#7e22ce; }
.clean { margin-top:4px; font-size:.78rem; color:#15803d; }
.round-status { font-size:.92rem; }
.round-status .err { color:#b91c1c; white-space: pre-wrap; }
"""


def shortcut_script() -> str:
    """Keyboard shortcuts for the Review tab: a key clicks its button (by elem_id) unless the user
    is typing in a field, a modifier is held, or the Review tab is hidden. A focused radio button or
    checkbox (a filter just clicked) takes no letters, so it does not block them."""
    mapping = json.dumps({k: elem for k, (elem, _) in review_tab.SHORTCUTS.items()})
    return (
        "<script>\n(() => {\n"
        f"  const keys = {mapping};\n"
        "  document.addEventListener('keydown', (ev) => {\n"
        "    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;\n"
        "    const t = ev.target;\n"
        "    const tag = (t && t.tagName ? t.tagName : '').toLowerCase();\n"
        "    const choice = tag === 'input' && ['radio', 'checkbox'].includes((t.type || '').toLowerCase());\n"
        "    if ((tag === 'input' && !choice) || tag === 'textarea' || tag === 'select' || (t && t.isContentEditable)) return;\n"
        "    const id = keys[(ev.key || '').toLowerCase()];\n"
        "    if (!id) return;\n"
        "    let el = document.getElementById(id);\n"
        "    if (el && el.tagName.toLowerCase() !== 'button') el = el.querySelector('button') || el;\n"
        "    if (!el || el.offsetParent === null || el.disabled) return;\n"
        "    ev.preventDefault();\n"
        "    el.click();\n"
        "  });\n"
        "})();\n</script>"
    )


def _header_html(studio: Studio, request: Any = None) -> str:
    return (
        '<div id="studio-header"><h1>LVLM Studio</h1>'
        '<span class="tagline">preference pairs against hallucination: CSR · POVID · STIC → review → DPO</span>'
        f'<span class="auth" id="auth-mode">{escape_text(header_text(studio, request))}</span></div>'
    )


def build_app(studio: Studio | None = None) -> gr.Blocks:
    studio = studio or Studio()
    with gr.Blocks(title="LVLM Studio", analytics_enabled=False) as demo:
        header = gr.HTML(_header_html(studio), elem_id="header")
        if on_space():
            gr.LoginButton()
        with gr.Tabs(elem_id="tabs"):
            for title, module in (("Review", review_tab), ("Generate", generate_tab), ("Train", train_tab),
                                  ("Compare", compare_tab), ("Data", data_tab)):
                with gr.Tab(title, id=title.lower(), elem_id=f"tab-{title.lower()}") as tab:
                    built = module.build(studio, demo)
                if "on_show" in built:
                    # Rounds and methods made since the page loaded (a round that finished in the
                    # Train tab, an import's new method) are offered when the tab is opened again.
                    fn, outputs, *follow = built["on_show"]
                    shown = tab.select(fn, None, outputs, api_name=False, show_progress="hidden")
                    for then_fn, then_in, then_out in follow:  # a step that reads what the first set
                        shown = shown.then(then_fn, then_in, then_out, api_name=False, show_progress="hidden")

        def on_header(request: gr.Request) -> str:
            return _header_html(studio, request)

        demo.load(on_header, None, [header], api_name=False)
        _json_api(studio)
    demo.studio = studio  # type: ignore[attr-defined]
    return demo


def _json_api(studio: Studio) -> None:
    """Typed JSON endpoints (no UI): what scripts and tests drive. Identity: with accounts on, the
    signed-in user (the ``reviewer``/``user`` argument is ignored); in open mode, the argument."""

    @user_errors
    def next_pair(reviewer: str, method: str = "", round: str = "", status: str = "pending",
                  request: gr.Request = None) -> dict | None:
        who = acting_user(studio, request, reviewer)
        return studio.next_pair(who, method=method or None, round=round if str(round).strip() else None,
                                status=status or "pending")

    @user_errors
    def get_pair(pair_id: int, reviewer: str = "", request: gr.Request = None) -> dict:
        return studio.get_pair(pair_id, acting_user(studio, request, reviewer) or None)

    @user_errors
    def decide(pair_id: int, reviewer: str, decision: str, edited_text: str = "", note: str = "",
               request: gr.Request = None) -> dict:
        who = acting_user(studio, request, reviewer)
        return studio.decide(pair_id, who, decision, edited_text=edited_text or None, note=note or None)

    @user_errors
    def undo(reviewer: str, request: gr.Request = None) -> dict | None:
        return studio.undo(acting_user(studio, request, reviewer))

    @user_errors
    def progress(reviewer: str = "", request: gr.Request = None) -> dict:
        return studio.progress(acting_user(studio, request, reviewer) or None)

    @user_errors
    def generate(method: str, model: str = "demo", round: int = 0, item_ids: list[int] | None = None,
                 dataset: str = "", split: str = "", n: int = 0, params: dict | None = None,
                 seed: int = 0, request: gr.Request = None) -> dict:
        studio.require_model_choice(model, acting_user(studio, request, None))
        return studio.generate(method, model=model or studio.settings.model, round=round or None,
                               item_ids=item_ids, dataset=dataset or None, split=split or None,
                               n=n or None, params=params or None, seed=seed)

    @user_errors
    def start_round(config: dict, user: str = "", request: gr.Request = None) -> int:
        return studio.start_round(config, claimed_user(studio, request, user))

    @user_errors
    def cancel_round(round_id: int, user: str = "", request: gr.Request = None) -> dict | None:
        return studio.cancel_round(round_id, claimed_user(studio, request, user))  # the service checks the id

    def rounds() -> list[dict]:
        return studio.rounds()

    @user_errors
    def round_status(round_id: int) -> dict:
        row = studio.get_round(round_id)
        if row is None:  # as /cancel_round and /compare say, rather than a null round
            raise LookupError(f"round {round_id} does not exist")
        return {"round": row, "curve": studio.round_curve(row["id"])}

    @user_errors
    def compare(a: int, b: int, only_diff: bool = False, evaluation_set: str | None = None) -> dict:
        return studio.compare(a, b, bool(only_diff), evaluation_set=evaluation_set)

    def agreement() -> dict:
        return studio.agreement()

    def stats() -> dict:
        return studio.stats()

    for fn in (next_pair, get_pair, decide, undo, progress, start_round, cancel_round, rounds, round_status,
               compare, agreement, stats):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    gr.api(generate, api_name="generate", concurrency_limit=1, concurrency_id=MODEL_JOBS)


def launch_kwargs(studio: Studio) -> dict[str, Any]:
    """What Gradio 6 wants in ``launch()``: css, head (the shortcut script), theme, auth."""
    exports, images = studio.settings.home / "exports", studio.settings.images_dir
    for folder in (exports, images):
        folder.mkdir(parents=True, exist_ok=True)
    # Gradio serves files from the working and temp directories and these only: the stored images
    # (the Review and Compare tabs show them) and the export zips, wherever the data root is.
    kwargs: dict[str, Any] = {"css": CSS, "head": shortcut_script(), "theme": gr.themes.Soft(),
                              "allowed_paths": [str(exports), str(images)],
                              # Gradio writes an upload to disk before any handler runs: refuse one
                              # over the image limit there, not after it filled the disk.
                              "max_file_size": studio.settings.max_file_bytes}
    auth = launch_auth(studio)
    if auth is not None:
        kwargs["auth"] = auth
        kwargs["auth_message"] = "LVLM Studio: sign in with the account your admin gave you."
    return kwargs


def launch(studio: Studio | None = None, **kwargs: Any) -> tuple[gr.Blocks, str]:
    """Build and launch; returns (demo, local url). ``kwargs`` go to ``demo.launch``."""
    studio = studio or Studio()
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=None)
    _, url, _ = demo.launch(**{**launch_kwargs(studio), **kwargs})
    return demo, url
