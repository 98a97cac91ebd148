"""Generate tab: run CSR / POVID / STIC on a set of items; new pairs appear in Review."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from lvlm_studio.service import METHODS, Studio
from lvlm_studio.ui.auth import acting_user
from lvlm_studio.ui.common import (
    MODEL_JOBS,
    bar,
    clear_on_click,
    parse_round,
    report_markdown,
    round_choices,
    user_errors,
)

DEFAULT_PARAMS = {
    "csr": {},  # CSRConfig's defaults; fewer candidates leave most world items without a pair
    "povid": {"make_image_rejected": True},
    "stic": {},
}


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    gr.Markdown("Pairs are written item by item with their provenance (method, model, round, parameters, "
                "seed). Items that already have pairs for the method and round are skipped, so a stopped "
                "run resumes where it left off.")
    with gr.Row():
        method = gr.Dropdown([(m.upper(), m) for m in METHODS], value="povid", label="Method", elem_id="gen-method")
        model = gr.Textbox(studio.settings.model, label="Model (demo, a path or a Hub id)", elem_id="gen-model")
        round_ = gr.Dropdown(round_choices(studio, done_only=True), value="0", label="Round (adapter)",
                             allow_custom_value=True, elem_id="gen-round")
    with gr.Row():
        dataset = gr.Textbox("shapesworld", label="Dataset", elem_id="gen-dataset")
        split = gr.Dropdown(["train", "test", "all"], value="train", label="Split", elem_id="gen-split")
        n = gr.Number(4, label="Items (max)", precision=0, elem_id="gen-n")
        seed = gr.Number(0, label="Seed", precision=0, elem_id="gen-seed")
    params = gr.Code(json.dumps(DEFAULT_PARAMS["povid"], indent=1), language="json",
                     label="Method parameters (JSON, fields of the method's config)", elem_id="gen-params")
    run = gr.Button("Generate pairs", variant="primary", elem_id="gen-run")
    summary = gr.Markdown(elem_id="gen-summary", min_height=48, latex_delimiters=[])  # room for the progress bar
    with gr.Accordion("Report (JSON)", open=False):
        result = gr.JSON(label="Result", elem_id="gen-result")

    method.change(lambda m: json.dumps(DEFAULT_PARAMS.get(m, {}), indent=1), [method], [params], api_name=False)

    @user_errors
    def on_run(method_v, model_v, round_v, dataset_v, split_v, n_v, seed_v, params_v,
               progress=gr.Progress(), request: gr.Request = None) -> dict:  # noqa: B008 - Gradio's progress idiom
        studio.require_model_choice(model_v, acting_user(studio, request, None))  # signed in; another model: admin
        try:
            p = json.loads(params_v or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"parameters are not valid JSON: {exc}") from exc
        if not isinstance(p, dict):
            raise ValueError("parameters must be a JSON object")
        progress(0, desc="loading the model")
        return studio.generate(method_v, model=model_v or studio.settings.model, round=parse_round(round_v),
                               dataset=dataset_v or None, split=None if split_v == "all" else split_v,
                               n=None if n_v in (None, "") else int(n_v), params=p, seed=int(seed_v or 0), progress=bar(progress))

    # The bar shows on the summary: the JSON it fills sits in a closed accordion, where the bar was
    # hidden too.
    clear_on_click(run, summary)
    run.click(on_run, [method, model, round_, dataset, split, n, seed, params], [result], api_name="generate_run",
              concurrency_limit=1, concurrency_id=MODEL_JOBS, show_progress_on=[summary]
              ).success(report_markdown, [result], [summary], api_name=False)

    def generate_rounds() -> gr.Dropdown:  # a round that finished since is offered to generate with
        return gr.Dropdown(choices=round_choices(studio, done_only=True))

    demo.load(generate_rounds, None, [round_], api_name=False)
    return {"on_show": (generate_rounds, [round_])}
