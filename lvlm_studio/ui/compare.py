"""Compare tab: two rounds' evaluation answers side by side with hallucinated objects marked,
their metrics, and CHAIR_s / CHAIR_i / recall / POPE F1 across all rounds."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lvlm_studio.evaluation import paired_chair_s_summary
from lvlm_studio.service import Studio
from lvlm_studio.ui.common import parse_round, round_choices, user_errors
from lvlm_studio.ui.highlight import compare_html


def metrics_plot_frame(studio: Studio) -> pd.DataFrame:
    return pd.DataFrame(studio.round_metrics(), columns=["round", "metric", "value"])


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    choices = round_choices(studio)
    with gr.Row():
        a = gr.Dropdown(choices, value="0", label="Round A", allow_custom_value=True, elem_id="compare-a")
        b = gr.Dropdown(choices, value=choices[-1][1] if choices else "0", label="Round B", allow_custom_value=True, elem_id="compare-b")
        only_diff = gr.Checkbox(False, label="only where they differ", elem_id="compare-only-diff")
        go = gr.Button("Compare", variant="primary", elem_id="compare-run")
    metrics = gr.Dataframe(interactive=False, elem_id="compare-metrics")
    paired = gr.Markdown(elem_id="compare-paired")
    plot = gr.LinePlot(metrics_plot_frame(studio), x="round", y="value", color="metric", title="metrics per round",
                       height=260, elem_id="compare-plot")
    table = gr.HTML(elem_id="compare-table")

    @user_errors
    def run(a_v: str, b_v: str, diff: bool) -> tuple:
        if a_v in (None, "") or b_v in (None, ""):
            raise ValueError("pick two rounds")
        res = studio.compare(parse_round(a_v), parse_round(b_v), bool(diff))
        frame = pd.DataFrame(res["metrics"], columns=["round", "chair_s", "chair_i", "recall", "pope_f1", "answers"])
        empty = ("The two rounds answer every item the same." if diff and all(res["answered"])
                 else "No evaluation answers to compare yet.")
        html = compare_html(res["rows"], f"round {res['a']}", f"round {res['b']}", empty=empty)
        line = paired_chair_s_summary(res["paired"], f"round {res['a']}", f"round {res['b']}")
        return frame, line, html, metrics_plot_frame(studio)

    outputs = [metrics, paired, table, plot]
    go.click(run, [a, b, only_diff], outputs, api_name="compare_view")
    only_diff.change(run, [a, b, only_diff], outputs, api_name=False)

    def refresh() -> tuple:
        ch = round_choices(studio)
        return gr.Dropdown(choices=ch), gr.Dropdown(choices=ch), metrics_plot_frame(studio)

    demo.load(refresh, None, [a, b, plot], api_name=False)
    return {}
