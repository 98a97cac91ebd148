"""Compare tab: two rounds' evaluation answers side by side with hallucinated objects marked,
their metrics, and CHAIR_s / CHAIR_i / recall / POPE F1 across all rounds. A round (the base model
on a fresh start) can be evaluated here too, as ``lvlm-studio eval`` does."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from lvlm_studio.config import MAX_WORLD_SCENES, counted
from lvlm_studio.evaluation import (
    METRIC_LABELS,
    evaluation_set_label,
    no_mentions_note,
    paired_chair_s_summary,
    paired_pope_f1_summary,
)
from lvlm_studio.service import Studio
from lvlm_studio.ui.auth import acting_user
from lvlm_studio.ui.common import (
    MODEL_JOBS,
    bar,
    number_field,
    parse_round,
    round_choices,
    rounded,
    user_errors,
)
from lvlm_studio.ui.highlight import compare_html, escape_markdown

# The plot's series say which way is better: hallucination rates down, recall and F1 up.
METRIC_NAMES = {k: f"{label} {'↓' if k.startswith('chair') else '↑'}" for k, label in METRIC_LABELS.items()}
METRIC_COLUMNS = ["round", *METRIC_LABELS.values(), "answers"]
# The evaluation the CLI's ``eval`` runs by default: 500 unbiased test scenes. The cap keeps one
# click on a shared app (a Space) from rendering and answering an unbounded number of scenes.
EVAL_SCENES = 500
EVAL_SCENES_MAX = 5000
WORLD_SET = "shapesworld/test"  # Studio.evaluation_sets' first label: the world's test scenes
SHARED_SET = "latest both share"  # the comparison's default set (Studio.compare's evaluation_set=None)
NO_ANSWERS = ("No evaluation answers to compare yet: evaluate a round below (a training round also "
              "evaluates itself and its parent).")


def metrics_plot_frame(studio: Studio, evaluation_set: str | None = None) -> pd.DataFrame:
    """Long format for the plot, the rounds evaluated on one set (``Studio.round_metrics``); rounds
    as labels ("round 2"), so the axis has one tick per round (a numeric axis draws 0.05 steps
    between two rounds); typed columns even when empty (an empty object-typed frame makes Gradio
    keep category axes for the values too)."""
    rows = [{"round": f"round {r['round']}", "metric": METRIC_NAMES[r["metric"]], "value": float(r["value"])}
            for r in studio.round_metrics(evaluation_set)]
    return pd.DataFrame(rows, columns=["round", "metric", "value"]).astype({"round": str, "metric": str,
                                                                          "value": float})


def metrics_plot(studio: Studio, evaluation_set: str | None = None) -> tuple[gr.LinePlot, str, gr.Dropdown]:
    """The per-round plot on one evaluation set (the one picked, while some round has it; else the
    set most rounds were evaluated on), the note under it, and the set box's update. Gradio draws
    lines only, so a single evaluated round is invisible in the plot and its figures go in the note."""
    sets = studio.evaluated_sets()
    chosen = evaluation_set if evaluation_set in sets else next(iter(sets), None)
    frame = metrics_plot_frame(studio, chosen)
    order = sorted(set(frame["round"]), key=lambda label: int(label.split()[-1]))
    note = metrics_plot_note(frame)
    if len(sets) > 1:  # say which set the lines are on, and that others exist
        note = f"On {escape_markdown(chosen)} (rounds evaluated on another set only are not drawn). {note}".strip()
    return (gr.LinePlot(value=frame, sort=order or None), note,
            gr.Dropdown(choices=sets, value=chosen, visible=len(sets) > 1))


def metrics_plot_note(frame: pd.DataFrame) -> str:
    rounds = set(frame["round"])
    if not rounds:
        return "No round evaluated yet."
    if len(rounds) > 1:
        return ""
    figures = ", ".join(f"{row.metric} {row.value:.3f}" for row in frame.itertuples())
    return f"Only {rounds.pop()} is evaluated so far ({figures}); a line needs a second round."


def metrics_frame(res: dict) -> pd.DataFrame:
    """Each round's metrics as its evaluation stored them, then, when those cover different items
    (the rounds answered different items, or a later, smaller evaluation replaced one's metrics),
    both again on the items both answered (the comparable figures)."""
    rows = [{**m, "round": str(m["round"])} for m in res["metrics"]]
    rows += [{**m, "round": f"{m['round']} (on the {m['answers']} items both answered)"}
             for m in res.get("common_metrics") or []]
    frame = pd.DataFrame(rows, columns=["round", *METRIC_LABELS, "answers"])
    for key in METRIC_LABELS:  # 4 decimals to read by; a missing figure stays an empty cell
        frame[key] = [rounded(v) for v in frame[key]]
    frame.columns = METRIC_COLUMNS
    return frame


def build(studio: Studio, demo: gr.Blocks) -> dict[str, Any]:
    choices = round_choices(studio)
    with gr.Row():
        a = gr.Dropdown(choices, value="0", label="Round A", allow_custom_value=True, elem_id="compare-a")
        b = gr.Dropdown(choices, value=newest(round_choices(studio, done_only=True)), label="Round B",
                        allow_custom_value=True, elem_id="compare-b")
        only_diff = gr.Checkbox(False, label="only where they differ", elem_id="compare-only-diff", min_width=180)
        # Both rounds are read on one evaluation set: by default the latest one they share.
        cmp_set = gr.Dropdown([SHARED_SET, *studio.shared_sets(0, int(b.value))], value=SHARED_SET,
                              label="evaluation set", allow_custom_value=True, elem_id="compare-set")
        go = gr.Button("Compare", variant="primary", elem_id="compare-run")
    metrics = gr.Dataframe(pd.DataFrame(columns=METRIC_COLUMNS), headers=METRIC_COLUMNS, interactive=False,
                           elem_id="compare-metrics")
    paired = gr.Markdown(elem_id="compare-paired")
    first_plot, first_note, first_sets = metrics_plot(studio)
    # Custom values allowed: a set evaluated since the page loaded is drawn (metrics_plot checks it).
    plot_set = gr.Dropdown(first_sets.choices, value=first_sets.value, label="plot: metrics on",
                           visible=len(first_sets.choices) > 1, allow_custom_value=True, elem_id="compare-plot-set")
    plot = gr.LinePlot(first_plot.value, x="round", y="value", color="metric", title="metrics per round",
                       y_title="value", height=260, sort=first_plot.sort, elem_id="compare-plot")
    # Not the plot's caption: Gradio clips a caption under a plot of fixed height.
    plot_note = gr.Markdown(first_note, elem_id="compare-plot-note")
    table = gr.HTML(elem_id="compare-table")

    @user_errors
    def run(a_v: str, b_v: str, diff: bool, set_v: str = SHARED_SET, plot_v: str | None = None) -> tuple:
        if a_v in (None, "") or b_v in (None, ""):
            raise ValueError("pick two rounds")
        res = studio.compare(parse_round(a_v), parse_round(b_v), bool(diff),
                             evaluation_set=None if str(set_v or "").strip() == SHARED_SET else set_v)
        frame = metrics_frame(res)
        empty = ("The two rounds answer every item both answered the same." if diff and all(res["answered"])
                 else NO_ANSWERS)
        html = compare_html(res["rows"], f"round {res['a']}", f"round {res['b']}", empty=empty)
        line = paired_chair_s_summary(res["paired"], f"round {res['a']}", f"round {res['b']}")
        if res["paired_pope"]:
            line += "\n\n" + paired_pope_f1_summary(res["paired_pope"], f"round {res['a']}", f"round {res['b']}")
        for m in res["metrics"]:
            if m.get("no_mentions"):
                line += f"\n\n**Note:** round {m['round']}: {escape_markdown(m['no_mentions'])}"
        if res.get("note"):
            line = f"**Note:** {escape_markdown(res['note'])}\n\n{line}"
        if res.get("set"):
            line = f"On {escape_markdown(res['set'])}.\n\n{line}"
        sets = gr.Dropdown(choices=[SHARED_SET, *res["sets"]])  # what this pair can be read on
        return frame, line, html, *metrics_plot(studio, plot_v), sets

    with gr.Accordion("Evaluate a round", open=not studio.round_metrics(), elem_id="compare-eval-box"):
        gr.Markdown("Greedy answers on the world's unbiased test scenes (a description and its POPE "
                    "probes per scene), or on an imported set with ground-truth objects (its captions and "
                    "POPE probes, the first N images), scored against the objects; the answers and metrics "
                    "are stored for the round, replacing its earlier answers on the same items.")
        with gr.Row():
            eval_round = gr.Dropdown(round_choices(studio, done_only=True), value="0", label="Round",
                                     allow_custom_value=True, elem_id="compare-eval-round")
            # No minimum/maximum here: Gradio's own refusal does not name the field; evaluation_scenes does.
            eval_n = gr.Number(EVAL_SCENES, label=f"test scenes, or images of a set (1 to {EVAL_SCENES_MAX})",
                               precision=0, elem_id="compare-eval-n")
            # Custom values allowed, as the round lists: a set imported since the app started is
            # offered per page (on_show) and checked by the handler, not against the start-up list.
            eval_set = gr.Dropdown(list(studio.evaluation_sets()), value=WORLD_SET, label="evaluation set",
                                   allow_custom_value=True, elem_id="compare-eval-set")
            eval_go = gr.Button("Evaluate", elem_id="compare-eval-run")
        eval_summary = gr.Markdown(elem_id="compare-eval-summary", min_height=48)  # room for the bar

    outputs = [metrics, paired, table, plot, plot_note, plot_set, cmp_set]
    inputs = [a, b, only_diff, cmp_set, plot_set]
    go.click(run, inputs, outputs, api_name="compare_view")
    only_diff.change(run, inputs, outputs, api_name=False)
    cmp_set.input(run, inputs, outputs, api_name=False)

    def pair_sets(a_v: str, b_v: str, set_v: str | None) -> gr.Dropdown:
        """The set box offers the sets the two rounds picked share (the default when the one picked
        is not among them); a round typed wrong leaves the box as it is (Compare says why)."""
        try:
            ra, rb = parse_round(a_v), parse_round(b_v)
        except ValueError:
            return gr.skip()
        if ra is None or rb is None:
            return gr.skip()
        shared = studio.shared_sets(ra, rb)
        return gr.Dropdown(choices=[SHARED_SET, *shared], value=set_v if set_v in shared else SHARED_SET)

    for box in (a, b):
        box.change(pair_sets, [a, b, cmp_set], [cmp_set], api_name=False, show_progress="hidden")
    plot_set.input(lambda v: metrics_plot(studio, v), [plot_set], [plot, plot_note, plot_set], api_name=False)

    @user_errors
    def evaluate(round_v: str, n_v: Any, set_v: str = WORLD_SET, plot_v: str | None = None, a_v: str = "0",
                 progress=gr.Progress(),  # noqa: B008 - Gradio's idiom
                 request: gr.Request = None) -> tuple:
        acting_user(studio, request, None)  # signed in, unless the studio runs in open mode
        round_id = parse_round(round_v)
        if round_id is None:
            raise ValueError("pick a round to evaluate")
        n = evaluation_scenes(n_v)
        sets, label = studio.evaluation_sets(), set_v or WORLD_SET
        if label not in sets:
            raise ValueError(f"unknown evaluation set {str(set_v)[:60]!r}; the store has {', '.join(sets)}")
        dataset, split = sets[label]
        progress(0, desc="loading the model")
        res = studio.evaluate_on(round_id, dataset=dataset, split=split, n=n, progress=bar(progress))
        ch = round_choices(studio)
        # The plot turns to the set just evaluated, which the comparison then reads too.
        done = res["metrics"].get("set") or plot_v
        # The comparison that follows reads A against this round: the set box offers what they share
        # (set here, before that comparison reads it, rather than by B's change event).
        return (evaluation_summary(res), *metrics_plot(studio, done), gr.Dropdown(choices=ch),
                gr.Dropdown(choices=ch, value=str(round_id)), pair_sets(a_v, str(round_id), None))

    # The bar shows under the button's summary only; once stored, the comparison is drawn again.
    eval_go.click(evaluate, [eval_round, eval_n, eval_set, plot_set, a], [eval_summary, plot, plot_note, plot_set, a, b,
                                                                          cmp_set],
                  api_name="evaluate_round", concurrency_limit=1, concurrency_id=MODEL_JOBS,
                  show_progress_on=[eval_summary]).success(run, inputs, outputs, api_name=False)

    def compare_rounds(pick_newest: bool = False) -> tuple:
        # The rounds made since are offered; coming back to the tab leaves A and B as picked, a page
        # load sets B to the newest finished round (a failed, cancelled or running round has no
        # answers to compare). The rounds are read once (a read checks active rounds' processes).
        rounds = studio.rounds()
        ch, done = round_choices(studio, rounds=rounds), round_choices(studio, done_only=True, rounds=rounds)
        b_update = gr.Dropdown(choices=ch, value=newest(done)) if pick_newest else gr.Dropdown(choices=ch)
        return (gr.Dropdown(choices=ch), b_update, *metrics_plot(studio), gr.Dropdown(choices=done),
                gr.Dropdown(choices=list(studio.evaluation_sets())))  # a set imported since is offered

    def refresh() -> tuple:
        return compare_rounds(pick_newest=True)

    shown = [a, b, plot, plot_note, plot_set, eval_round, eval_set]
    # The set box follows A and B: after a load or a return to the tab too, where A and B may not
    # change (no change event fires).
    follow = (pair_sets, [a, b, cmp_set], [cmp_set])
    demo.load(refresh, None, shown, api_name=False).then(*follow, api_name=False, show_progress="hidden")
    return {"on_show": (compare_rounds, shown, follow)}


def newest(choices: list[tuple[str, str]]) -> str:
    """The last round of a choice list (the newest), or the base round when there is none."""
    return choices[-1][1] if choices else "0"


def evaluation_scenes(value: Any) -> int:
    """The "test scenes, or images of a set" field as a count: a whole number from 1 to ``EVAL_SCENES_MAX``."""
    n = number_field(value, "test scenes or images", int)
    if not 1 <= n <= EVAL_SCENES_MAX:
        raise ValueError(f"test scenes or images: between 1 and {EVAL_SCENES_MAX} (the CLI's eval takes up to "
                         f"{MAX_WORLD_SCENES})")
    return n


def evaluation_summary(res: dict) -> str:
    """One line per evaluation: what was answered and its CHAIR / recall / POPE figures."""
    ev = res["metrics"]
    figures = ", ".join(f"{label} **{value:.3f}**" for key, label in METRIC_LABELS.items()
                        if (value := _figure(ev, key)) is not None)
    where = (f"{ev.get('scenes', '?')} test scenes, {res['added']} items added" if "added" in res else
             f"{escape_markdown(ev.get('set') or evaluation_set_label([(ev.get('dataset'), ev.get('split'))]))}, "
             f"{counted(res.get('images'), 'image')}")
    notes = [n for n in (ev.get("eval_note"), no_mentions_note(ev)) if n]
    note = f" ({escape_markdown('; '.join(notes))})" if notes else ""
    return (f"Round {res['round']} on {res['items']} items ({where}), model {escape_markdown(ev.get('model'))}: "
            f"{figures or 'no figures'}{note}")


def _figure(ev: dict, key: str) -> float | None:
    value = ev.get(key)
    return float(value) if isinstance(value, int | float) else None
