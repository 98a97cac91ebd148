"""Train tab: reviewed pairs per method, one click starts a DPO round (a subprocess, jobs.py),
live status and curves polled from the store (so they survive a browser refresh or app restart)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lvlm_studio.evaluation import METRIC_LABELS, evaluation_label
from lvlm_studio.service import Studio
from lvlm_studio.training import DPORoundConfig, describe_povid_stages
from lvlm_studio.ui.auth import request_user
from lvlm_studio.ui.common import (
    number_field,
    parse_round,
    round_choices,
    rounded,
    ticked_methods,
    user_errors,
)
from lvlm_studio.ui.highlight import escape_text

POLL_SECONDS = 2.0
# Curve keys per plot, as TRL's DPOTrainer logs them (plus "eval_loss" when present). Not
# "train_loss": the run's mean, logged once at the end, a point a line plot shows only in its legend.
LOSS_KEYS = ("loss", "eval_loss")
MARGIN_KEYS = ("rewards/margins", "rewards/chosen", "rewards/rejected")
ACC_KEYS = ("rewards/accuracies",)
# Legend names short enough not to be cut off beside a 240-px plot.
SERIES_NAMES = {"rewards/margins": "margin", "rewards/chosen": "chosen", "rewards/rejected": "rejected",
                "rewards/accuracies": "accuracy", "eval_loss": "eval loss"}


def counts_frame(studio: Studio) -> pd.DataFrame:
    counts = studio.reviewed_counts()
    return pd.DataFrame(
        [{"method": m.upper(), "pairs": c["pairs"], "reviewed": c["reviewed"], "usable for DPO": c["usable"]}
         for m, c in counts.items()]
    )


def rounds_frame(studio: Studio, rounds: list[dict] | None = None) -> pd.DataFrame:
    rows = []
    for r in studio.rounds() if rounds is None else rounds:
        cfg = r.get("config") or {}
        metrics = (r.get("metrics") or {}).get("eval") or {}
        rows.append({
            "round": r["id"], "parent": r.get("parent_id"), "status": r["status"],
            "methods": ",".join(cfg.get("methods") or []) if isinstance(cfg.get("methods"), list) else "",
            "progress": percent(r.get("progress")), "CHAIR_s": rounded(metrics.get("chair_s")),
            "recall": rounded(metrics.get("recall")),
            # Rounds may be evaluated on different numbers of items (eval_limit, a later Compare
            # evaluation): the count says how far two figures can be compared.
            "captions": metrics.get("n_captions"),
            "evaluated on": evaluation_label(metrics) if metrics else None,  # the latest evaluation's set
            "created": r.get("created"),
            "reason": (r.get("error") or "")[:200] or None,  # why a round failed or was cancelled
        })
    return pd.DataFrame(rows, columns=["round", "parent", "status", "methods", "progress", "CHAIR_s", "recall",
                                       "captions", "evaluated on", "created", "reason"])


def percent(fraction: Any) -> str | None:
    """A progress fraction as the rounds table shows it: 0.33 -> '33%'."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        return None
    return f"{100 * float(fraction):.0f}%"


def curve_frames(curve: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    def long(keys: tuple[str, ...]) -> pd.DataFrame:
        rows = [{"step": int(rec["step"]), "series": SERIES_NAMES.get(k, k), "value": float(rec[k])}
                for rec in curve for k in keys if isinstance(rec.get(k), int | float)]
        # Typed even when empty: an empty object-typed frame makes Gradio draw category axes, and
        # it keeps them when the real curve arrives (a stack of value labels, no lines).
        return pd.DataFrame(rows, columns=["step", "series", "value"]).astype({"step": int, "series": str,
                                                                              "value": float})

    return long(LOSS_KEYS), long(MARGIN_KEYS), long(ACC_KEYS)


# The parent a round starts from by default: the current round (the newest that finished and was
# evaluated), as CSR's iterations do; the base model or any finished round can be picked instead.
CURRENT = "current"


def parent_choices(studio: Studio, rounds: list[dict] | None = None) -> list[tuple[str, str]]:
    return [("the current round", CURRENT), *round_choices(studio, done_only=True, rounds=rounds)]


def status_html(rnd: dict | None, curve: list[dict] | None = None) -> str:
    if rnd is None:
        return '<div class="round-status">No round selected.</div>'
    parts = [f"<b>Round {escape_text(rnd['id'])}</b> · status <b>{escape_text(rnd['status'])}</b>"]
    if (shown := percent(rnd.get("progress"))) is not None:
        parts.append(f"progress {shown}")
    for key in ("started", "finished"):
        if rnd.get(key):
            parts.append(f"{key} {escape_text(rnd[key])}")
    html = '<div class="round-status">' + " · ".join(parts)
    if rnd.get("error"):
        html += f'<div class="err">{escape_text(rnd["error"])}</div>'
    if stages := describe_povid_stages((rnd.get("metrics") or {}).get("povid_stages")):
        html += f"<div>{escape_text(stages)}</div>"
    ev = (rnd.get("metrics") or {}).get("eval")
    if ev:
        shown = {label: ev[k] for k, label in METRIC_LABELS.items() if isinstance(ev.get(k), int | float)}
        on = (f" (on {ev['n_captions']} captions of {evaluation_label(ev)})" if isinstance(ev.get("n_captions"), int)
              else f" (on {evaluation_label(ev)})")
        # the set's label holds dataset names from imports: escaped like every stored text
        html += "<div>" + " · ".join(f"{escape_text(k)} {v:.3f}" for k, v in shown.items()) + escape_text(on) + "</div>"
    steps = sorted({rec["step"] for rec in curve or [] if isinstance(rec.get("loss"), int | float)})
    if len(steps) == 1:  # Gradio's LinePlot draws lines only: one point shows nothing
        loss = next(rec["loss"] for rec in curve if isinstance(rec.get("loss"), int | float))
        html += (f"<div>One logged training step (loss {float(loss):.4f}): the curves need a second "
                 "step to draw a line.</div>")
    return html + "</div>"


def methods_update(studio: Studio, current: list[str] | None, known: list[str] | None) -> tuple:
    """The timer's update of the methods box: only when the store's methods changed (an import
    named a new one: offered and ticked); otherwise no update, so a poll never undoes a box the
    user just clicked. Returns (the box's update, the methods now known)."""
    now = studio.method_names()
    if now == list(known or []):
        return gr.skip(), gr.skip()
    return gr.CheckboxGroup(choices=now, value=ticked_methods(now, current, known)), now


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    gr.Markdown("Reviewed pairs per method. A round trains a LoRA adapter with DPO on the human-labelled "
                "pairs (swap / edit applied, reject-both left out), then evaluates it on the test split.")
    counts = gr.Dataframe(counts_frame(studio), interactive=False, elem_id="train-counts")
    with gr.Row():
        # The generators and whatever else the store holds (an import names its own method), all
        # ticked: the same pairs as the CLI's `train` without --methods.
        method_names = studio.method_names()
        methods = gr.CheckboxGroup(method_names, value=method_names, label="Methods", elem_id="train-methods")
        known_methods = gr.State(method_names)
        parent = gr.Dropdown(parent_choices(studio), value=CURRENT, label="Start from round",
                             allow_custom_value=True, elem_id="train-parent")
        include_auto = gr.Checkbox(False, label="Also use unreviewed pairs (automatic label)",
                                   elem_id="train-include-auto", min_width=200)
    with gr.Accordion("Training parameters", open=False):
        with gr.Row():
            d = DPORoundConfig()  # the measured defaults (README), not a second set
            lr = gr.Number(d.learning_rate, label="learning rate", elem_id="train-lr")
            epochs = gr.Number(d.num_epochs, label="epochs", elem_id="train-epochs")
            beta = gr.Number(d.beta, label="DPO β", elem_id="train-beta")
            lora_r = gr.Number(d.lora_r, label="LoRA r", precision=0, elem_id="train-lora-r")
            lora_alpha = gr.Number(d.lora_alpha, label="LoRA α", precision=0, info="the update is scaled by α / r",
                                   elem_id="train-lora-alpha")
            sft_weight = gr.Number(d.sft_weight, label="SFT weight", info="0 = pure DPO; 1 = STIC-style DPO + SFT",
                                   elem_id="train-sft")
        with gr.Row():  # a second row: ten fields in one squeezed the checkbox to a word per line
            eval_n = gr.Number(d.eval_limit, label="test items to evaluate", precision=0, elem_id="train-eval-n",
                               info="captions and POPE probes together (Compare's Evaluate counts scenes: "
                                    "a caption + its probes each)")
            povid_two_term = gr.Checkbox(d.povid_two_term, label="POVID two-term loss",
                                         info="text-hallucinated and noisy-image pairs weigh half each",
                                         elem_id="train-povid-two-term", min_width=220)
            povid_stage1 = gr.Number(d.povid_stage1_epochs, label="POVID stage-1 epochs",
                                     info="0 = one stage; the paper: 3 on text-hallucinated pairs, merged, then "
                                          "'epochs' (1) on every pair with the two-term loss",
                                     elem_id="train-povid-stage1")
            objective = gr.Dropdown([("DPO on the reviewed pairs", "dpo"),
                                     ("STIC stage 2: description-infused SFT", "stic_infusion")],
                                    value=d.objective, label="Round objective",
                                    info="stage 2 fine-tunes on items with a reference answer; it is evaluated "
                                         "describing first", elem_id="train-objective")
    with gr.Row():
        start = gr.Button("Start training round", variant="primary", elem_id="train-start")
        latest = [value for _, value in round_choices(studio) if value != "0"]
        # The newest round, not Gradio's default first choice (round 0, which has no curve).
        selected = gr.Dropdown(round_choices(studio), value=latest[-1] if latest else None, label="Round",
                               allow_custom_value=True, elem_id="train-round")
        cancel = gr.Button("Cancel round", variant="stop", elem_id="train-cancel")
    status = gr.HTML(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", height=240, elem_id="plot-loss")
        margin_plot = gr.LinePlot(x="step", y="value", color="series", title="reward margins", height=240,
                                  elem_id="plot-margins")
        acc_plot = gr.LinePlot(x="step", y="value", color="series", title="reward accuracy", height=240,
                               elem_id="plot-accuracy")
    rounds_table = gr.Dataframe(rounds_frame(studio), interactive=False, elem_id="train-rounds")
    timer = gr.Timer(POLL_SECONDS)

    def refresh(round_value: str | None, set_round: bool = True) -> tuple:
        # The timer calls this every few seconds with whatever the Round box holds (it accepts typed
        # values): an unknown round is said in the status, never raised, or it would repeat forever.
        rounds = studio.rounds()
        trained = [r for r in rounds if r["id"] > 0]
        try:
            rid = parse_round(round_value)
        except ValueError:
            rid = -1
        if rid is None:
            rid = trained[-1]["id"] if trained else None
        # Every poll reads the rounds once: each read checks the active rounds' processes under the
        # store's write lock, and every open tab polls every few seconds while a round trains.
        rnd = next((r for r in rounds if r["id"] == rid), None) if rid is not None and rid >= 0 else None
        curve = studio.round_curve(rid) if rnd is not None else []
        status = status_html(rnd, curve) if rnd is not None or rid is None else (
            f'<div class="round-status">No round {escape_text(round_value)}: pick one from the list.</div>')
        loss, margins, acc = curve_frames(curve)
        choices = round_choices(studio, rounds=rounds)
        pick = gr.Dropdown(choices=choices, value=str(rid) if rnd is not None else round_value) if set_round else (
            gr.Dropdown(choices=choices))
        return (counts_frame(studio), rounds_frame(studio, rounds), status, loss, margins, acc, pick,
                gr.Dropdown(choices=parent_choices(studio, rounds)))

    def poll_rounds(round_value: str | None) -> tuple:
        # The timer writes the Round box only while it is empty (a round started elsewhere fills it,
        # so Cancel has a round): a tick sent before the user picked a round (or before Start showed
        # the new one) can answer after it, and would put the old round back.
        return refresh(round_value, set_round=not round_value)

    outs = [counts, rounds_table, status, loss_plot, margin_plot, acc_plot, selected, parent]

    @user_errors
    def on_start(methods_v, parent_v, include_v, lr_v, epochs_v, beta_v, r_v, sft_v, eval_v, two_term_v,
                 objective_v="dpo", stage1_v=0, alpha_v=None, request: gr.Request = None) -> tuple:
        if not methods_v and objective_v == "dpo":
            raise ValueError("pick at least one method")
        lora_r = number_field(r_v, "LoRA r", int)
        parent_id = None if parent_v in (None, "", CURRENT) else parse_round(parent_v)  # None: the current round
        config = {"methods": list(methods_v) if methods_v else None, "parent_id": parent_id,
                  "include_auto": bool(include_v),
                  "learning_rate": number_field(lr_v, "learning rate"), "num_epochs": number_field(epochs_v, "epochs"),
                  "beta": number_field(beta_v, "DPO β"), "lora_r": lora_r,
                  "sft_weight": number_field(sft_v, "SFT weight"), "eval_limit": number_field(eval_v, "test items", int),
                  "povid_two_term": bool(two_term_v), "objective": objective_v or "dpo",
                  "povid_stage1_epochs": number_field(stage1_v or 0, "POVID stage-1 epochs")}
        if alpha_v is not None:  # left out (an older API client), DPORoundConfig's default, as in the CLI
            config["lora_alpha"] = number_field(alpha_v, "LoRA α", int)
        rid = studio.start_round(config, request_user(request))
        return refresh(str(rid))

    start.click(on_start, [methods, parent, include_auto, lr, epochs, beta, lora_r, sft_weight, eval_n, povid_two_term,
                           objective, povid_stage1, lora_alpha],
                outs,
                api_name="train_start")

    @user_errors
    def on_cancel(round_v: str | None, request: gr.Request) -> tuple:
        rid = parse_round(round_v)
        if rid is None:
            raise ValueError("pick a round to cancel")
        row = studio.get_round(rid)
        if row is None:
            raise LookupError(f"round {rid} does not exist")
        if row["status"] not in ("queued", "running"):  # say so instead of a click that does nothing
            raise ValueError(f"round {rid} is {row['status']}, not queued or running: nothing to cancel")
        row = studio.cancel_round(rid, request_user(request))
        gr.Info(f"Round {rid}: {(row or {}).get('status', 'cancel requested')}.")
        return refresh(round_v)

    def update_methods(current: list[str] | None, known: list[str] | None) -> tuple:
        return methods_update(studio, current, known)

    def objective_learning_rate(objective_v: str | None) -> float:
        # Picking STIC's stage 2 shows its own default lr (the paper's 2e-5), DPO's shows DPO's.
        return DPORoundConfig(objective=objective_v or "dpo").learning_rate

    objective.input(objective_learning_rate, [objective], [lr], api_name="train_objective_lr")
    cancel.click(on_cancel, [selected], outs, api_name="train_cancel")
    selected.input(refresh, [selected], outs, api_name="train_refresh")
    timer.tick(poll_rounds, [selected], outs, api_name=False, show_progress="hidden")
    timer.tick(update_methods, [methods, known_methods], [methods, known_methods], api_name=False,
               show_progress="hidden")
    def refresh_newest() -> tuple:
        # A page (re)load shows the newest round, not the Round box's value when the app was built
        # (Gradio keeps that as the box's value for every later page load).
        return refresh(None)

    demo.load(refresh_newest, None, outs, api_name=False)
    return {}
