"""Data tab: upload images, import a dataset path (and add POPE probes to an imported set), export
pairs (download), statistics with reviewer agreement (Cohen's / Fleiss' κ) and the human override
rate by automatic-margin bucket."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lvlm_studio.service import (
    DEFAULT_PROMPT,
    EXPORT_FORMATS,
    IMPORT_FORMATS,
    METHODS,
    POPE_STRATEGIES,
    Studio,
)
from lvlm_studio.ui.auth import acting_user, request_user
from lvlm_studio.ui.common import (
    bar,
    clear_on_click,
    number_field,
    report_markdown,
    ticked_methods,
    user_errors,
)
from lvlm_studio.ui.highlight import escape_text


def agreement_html(ag: dict) -> str:
    def k(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    lines = [f"<b>Reviewers</b>: {escape_text(', '.join(ag['reviewers']) or 'none yet')}",
             f"<b>Fleiss' κ</b> (pairs rated by ≥ 2): {k(ag['fleiss_kappa'])} over {ag['items_multi_rated']} pairs",
             f"<b>Override rate</b> (swap / reject both / edit): {k(ag['override_rate'])} over "
             f"{ag['override_pairs']} reviewed pairs"
             + "".join(f"; {escape_text(m)} {k(r['override_rate'])} ({r['n']})"
                       for m, r in ag["override_by_method"].items())]
    for rec in ag["cohen"]:
        lines.append(f"<b>Cohen's κ</b> {escape_text(rec['a'])} vs {escape_text(rec['b'])}: {k(rec['kappa'])} "
                     f"({rec['n']} shared pairs)")
    return "<div>" + "<br>".join(lines) + "</div>"


def override_frame(ag: dict) -> pd.DataFrame:
    frame = pd.DataFrame([{"margin bucket": b["bucket"], "override rate": b["override_rate"], "pairs": b["n"]}
                          for b in ag["override_by_margin"]], columns=["margin bucket", "override rate", "pairs"])
    # Typed even when empty (no reviews yet): else Gradio draws a category y axis and keeps it, and a
    # rate of 0 shows as a full-height bar.
    return frame.astype({"margin bucket": str, "override rate": float, "pairs": int})


def method_choices(stats: dict) -> list[str]:
    """The pair methods an export can pick (``stats``: ``Studio.stats()``): the three generators and
    whatever the store holds (an imported file names its own, "imported" when it does not)."""
    present = sorted(stats.get("pairs_by_method") or {})
    return list(dict.fromkeys([*METHODS, *present]))


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Upload images")
            files = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="data-upload")
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt for each image", elem_id="data-prompt")
            up_dataset = gr.Textbox("uploads", label="Dataset name", elem_id="data-up-dataset")
            upload = gr.Button("Add images", elem_id="data-upload-run")
        with gr.Column():
            gr.Markdown("### Import a dataset path (admins)")
            path = gr.Textbox(label="Path on the server (folder, COCO JSON, JSONL, TRL, LLaVA or LLaMA-Factory JSON, HF dataset)",
                              elem_id="data-path")
            kind = gr.Dropdown(list(IMPORT_FORMATS), value="auto",
                               label="Format", elem_id="data-kind")
            imp_dataset = gr.Textbox(label="Dataset name (optional)", elem_id="data-imp-dataset")
            do_import = gr.Button("Import", elem_id="data-import-run")
            with gr.Accordion("POPE probes for an imported set (admins)", open=False):
                gr.Markdown("Yes/no probes (\"Is there a dog in the image?\") from the set's ground-truth objects, "
                            "as POPE builds them, so that rounds evaluated on it report POPE beside CHAIR.")
                with gr.Row():
                    pope_dataset = gr.Textbox("coco", label="Dataset", elem_id="data-pope-dataset")
                    pope_split = gr.Textbox("val", label="Split", elem_id="data-pope-split")
                with gr.Row():
                    pope_strategy = gr.Dropdown(list(POPE_STRATEGIES), value="adversarial", label="Absent objects",
                                                elem_id="data-pope-strategy")
                    pope_images = gr.Number(500, label="Images", precision=0, minimum=1, elem_id="data-pope-images")
                add_probes = gr.Button("Add POPE probes", elem_id="data-pope-run")
        with gr.Column():
            gr.Markdown("### Export pairs")
            fmt = gr.Dropdown(list(EXPORT_FORMATS), value="trl", label="Format", elem_id="data-export-format")
            choices = method_choices(studio.stats())
            ex_methods = gr.CheckboxGroup(choices, value=choices, label="Methods", elem_id="data-export-methods")
            known_methods = gr.State(choices)
            ex_auto = gr.Checkbox(False, label="Include unreviewed pairs (automatic label)")
            export = gr.Button("Export", elem_id="data-export-run")
            download = gr.File(label="Download", elem_id="data-download")
    summary = gr.Markdown(elem_id="data-summary", latex_delimiters=[])  # file names are text, never formulas
    with gr.Accordion("Report (JSON)", open=False):
        result = gr.JSON(label="Result", elem_id="data-result")
    gr.Markdown("### Statistics")
    refresh = gr.Button("Refresh statistics", elem_id="data-stats-refresh")
    with gr.Row(equal_height=False):
        stats = gr.JSON(label="Store", elem_id="data-stats")
        with gr.Column():
            agreement = gr.HTML(elem_id="data-agreement")
            override = gr.BarPlot(x="margin bucket", y="override rate", title="human override rate by automatic margin",
                                  height=260, y_lim=[0, 1], elem_id="data-override-plot", sort=None)

    @user_errors
    def on_upload(paths, prompt_v, dataset_v, request: gr.Request = None,
                  progress=gr.Progress()) -> dict:  # noqa: B008 - Gradio's progress idiom
        acting_user(studio, request, None)  # signed in, unless the studio runs in open mode
        if not paths:
            raise ValueError("choose image files first")
        return studio.upload_images(list(paths), prompt=prompt_v or "Describe the image.",
                                    dataset=dataset_v or "uploads", progress=bar(progress))

    # The bars show on the summary: the report they fill sits in a closed accordion. The summary is
    # written on success only (.success: a failed run leaves it cleared, not showing an old report).
    # Decoding a large image takes hundreds of MB: a few uploads at a time, the rest queue.
    upload.click(on_upload, [files, prompt, up_dataset], [result], api_name="upload_images",
                 show_progress_on=[summary], concurrency_limit=2, concurrency_id="image_intake").success(
        report_markdown, [result], [summary], api_name=False)

    @user_errors
    def on_import(path_v, kind_v, dataset_v, request: gr.Request,
                  progress=gr.Progress()) -> dict:  # noqa: B008 - Gradio's progress idiom
        # Admin only (checked by the service): a reviewer could otherwise pull any readable file on
        # the server into the store and probe which paths exist. Uploads stay open to reviewers.
        if not (path_v or "").strip():
            raise ValueError("type a path first")
        return studio.import_path(path_v.strip(), kind=kind_v, dataset=dataset_v or None,
                                  user=request_user(request), progress=bar(progress))

    imported = do_import.click(on_import, [path, kind, imp_dataset], [result], api_name="import_path",
                               show_progress_on=[summary], concurrency_limit=2,
                               concurrency_id="image_intake").success(
        report_markdown, [result], [summary], api_name=False)

    @user_errors
    def on_pope(dataset_v, split_v, strategy_v, images_v, request: gr.Request = None) -> dict:
        if not (dataset_v or "").strip() or not (split_v or "").strip():
            raise ValueError("name the dataset and split first")
        return studio.add_pope_probes(dataset_v.strip(), split_v.strip(), strategy=strategy_v,
                                      images=number_field(images_v, "images", int), user=request_user(request))

    probed = add_probes.click(on_pope, [pope_dataset, pope_split, pope_strategy, pope_images], [result],
                              api_name="add_pope_probes", show_progress_on=[summary]).success(
        report_markdown, [result], [summary], api_name=False)

    @user_errors
    def on_export(fmt_v, methods_v, auto_v, request: gr.Request = None) -> tuple:
        acting_user(studio, request, None)  # every label and edit goes into the zip: signed-in users only
        if not methods_v:
            raise ValueError("tick at least one method to export")
        rep = studio.export(fmt_v, methods=list(methods_v), include_auto=bool(auto_v), zip_=True)
        # a dict with a "path" key reads as a file reference to gradio_client: name it "folder"
        shown = {("folder" if k == "path" else k): v for k, v in rep.items()}
        return shown, rep["zip"]

    export.click(on_export, [fmt, ex_methods, ex_auto], [result, download], api_name="export").success(
        report_markdown, [result], [summary], api_name=False)

    def on_stats(current: list[str] | None = None, known: list[str] | None = None) -> tuple:
        ag, stats_v = studio.agreement(), studio.stats()
        # Methods that appeared since (an import names its own): offered and ticked; the rest as set.
        now = method_choices(stats_v)
        return (stats_v, agreement_html(ag), override_frame(ag),
                gr.CheckboxGroup(choices=now, value=ticked_methods(now, current, known)), now)

    for button in (upload, do_import, add_probes, export):
        clear_on_click(button, summary)

    stats_outs = [stats, agreement, override, ex_methods, known_methods]
    refresh.click(on_stats, [ex_methods, known_methods], stats_outs, api_name="data_stats")
    imported.then(on_stats, [ex_methods, known_methods], stats_outs, api_name=False)
    probed.then(on_stats, [ex_methods, known_methods], stats_outs, api_name=False)
    demo.load(on_stats, [ex_methods, known_methods], stats_outs, api_name=False)
    return {}
