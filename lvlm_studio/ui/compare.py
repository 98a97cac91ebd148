"""Compare tab: two rounds' evaluation answers side by side with hallucinated objects marked,
their metrics, and CHAIR_s / CHAIR_i / recall / POPE F1 across all rounds."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lvlm_studio.evaluation import METRIC_LABELS, paired_chair_s_summary
from lvlm_studio.service import Studio
from lvlm_studio.ui.common import parse_round, round_choices, user_errors
from lvlm_studio.ui.highlight import compare_html

# The plot's series say which way is better: hallucination rates down, recall and F1 up.
METRIC_NAMES = {k: f"{label} {'↓' if k.startswith('chair') else '↑'}" for k, label in METRIC_LABELS.items()}
METRIC_COLUMNS = ["round", *METRIC_LABELS.values(), "answers"]


def metrics_plot_frame(studio: Studio) -> pd.DataFrame:
    """Long format for the plot; rounds as labels ("round 2"), so the axis has one tick per round
    (a numeric axis draws 0.05 steps between two rounds); typed columns even when empty (an empty
    object-typed frame makes Gradio keep category axes for the values too)."""
    rows = [{"round": f"round {r['round']}", "metric": METRIC_NAMES[r["metric"]], "value": float(r["value"])}
            for r in studio.round_metrics()]
    return pd.DataFrame(rows, columns=["round", "metric", "value"]).astype({"round": str, "metric": str,
                                                                          "value": float})


def metrics_plot(studio: Studio) -> gr.LinePlot:
    frame = metrics_plot_frame(studio)
    order = sorted(set(frame["round"]), key=lambda label: int(label.split()[-1]))
    return gr.LinePlot(value=frame, sort=order or None)


def metrics_frame(res: dict) -> pd.DataFrame:
    """Each round's metrics as its evaluation stored them, then, when the two rounds answered
    different items, both again on the items both answered (the comparable figures)."""
    rows = [{**m, "round": str(m["round"])} for m in res["metrics"]]
    rows += [{**m, "round": f"{m['round']} (on the {m['answers']} items both answered)"}
             for m in res.get("common_metrics") or []]
    frame = pd.DataFrame(rows, columns=["round", *METRIC_LABELS, "answers"])
    frame.columns = METRIC_COLUMNS
    return frame


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    choices = round_choices(studio)
    with gr.Row():
        a = gr.Dropdown(choices, value="0", label="Round A", allow_custom_value=True, elem_id="compare-a")
        b = gr.Dropdown(choices, value=choices[-1][1] if choices else "0", label="Round B", allow_custom_value=True, elem_id="compare-b")
        only_diff = gr.Checkbox(False, label="only where they differ", elem_id="compare-only-diff", min_width=180)
        go = gr.Button("Compare", variant="primary", elem_id="compare-run")
    metrics = gr.Dataframe(pd.DataFrame(columns=METRIC_COLUMNS), headers=METRIC_COLUMNS, interactive=False,
                           elem_id="compare-metrics")
    paired = gr.Markdown(elem_id="compare-paired")
    plot = gr.LinePlot(metrics_plot_frame(studio), x="round", y="value", color="metric", title="metrics per round",
                       y_title="value", height=260, elem_id="compare-plot")
    table = gr.HTML(elem_id="compare-table")

    @user_errors
    def run(a_v: str, b_v: str, diff: bool) -> tuple:
        if a_v in (None, "") or b_v in (None, ""):
            raise ValueError("pick two rounds")
        res = studio.compare(parse_round(a_v), parse_round(b_v), bool(diff))
        frame = metrics_frame(res)
        empty = ("The two rounds answer every item the same." if diff and all(res["answered"])
                 else "No evaluation answers to compare yet.")
        html = compare_html(res["rows"], f"round {res['a']}", f"round {res['b']}", empty=empty)
        line = paired_chair_s_summary(res["paired"], f"round {res['a']}", f"round {res['b']}")
        return frame, line, html, metrics_plot(studio)

    outputs = [metrics, paired, table, plot]
    go.click(run, [a, b, only_diff], outputs, api_name="compare_view")
    only_diff.change(run, [a, b, only_diff], outputs, api_name=False)

    def refresh() -> tuple:
        # On page load: rounds made since the app started are offered, and B is the newest one.
        ch = round_choices(studio)
        return gr.Dropdown(choices=ch), gr.Dropdown(choices=ch, value=ch[-1][1] if ch else "0"), metrics_plot(studio)

    demo.load(refresh, None, [a, b, plot], api_name=False)
    return {}
