"""Pair-quality benchmark: how often does a method's chosen answer hold fewer hallucinations than
its rejected answer?

On ``--n`` ShapesWorld TEST scenes (default 200; one "Describe the image." item per scene), each
method builds preference pairs with the demo model + demo CLIP. The world's ground truth makes the
check exact: hallucinated = object mentions ("<colour> <shape>", every occurrence) whose object is
not drawn in the scene, by evaluation.py's ShapesWorld extractor. Among the pairs whose two answers
hold a *different* number of hallucinations, ``share`` = the fraction where the chosen one holds
fewer. Goal: share >= 80% for each method. Recall (drawn objects mentioned) is printed beside it,
so that "fewer hallucinations" bought by saying less is visible.

Methods, as run here:
  * csr: ``run_csr`` with ``CSRConfig`` (reference settings unless options say otherwise);
    chosen = best-scored complete answer, rejected = worst.
  * povid: chosen = the scene's ground-truth caption; rejected = (a) that caption with rule-based
    injections (world vocabulary; absent objects ranked by TRAIN-caption co-occurrence, which
    carries PRIOR_PARTNERS), (b) the model's answer on the diffusion-noised image (t=500). Because
    the chosen side is the ground truth (0 hallucinations), every differing POVID pair is won by
    construction: its informative figure is how many pairs differ at all.
  * stic: chosen = the model's description of the clean image; the demo model was trained on
    "Describe the image." only, so the good prompt is that plain prompt. The paper's misleading
    prompts are English the demo's word-level vocabulary cannot even spell (they become <unk>):
    the branch cannot express "imagine extra objects" to this model, so the demo setting
    ("stic") uses the corruption branch only (p_misleading = 0: low resolution / colour jitter,
    plain prompt). "stic_paper_mix" runs the paper's 50/50 mix with the stock misleading prompts
    to show, per branch, what that branch degenerates to here. "stic_app" is what the app's
    service runs on world items: the 50/50 mix with misleading prompts the demo vocabulary can
    spell ("... and the objects next to it", service.WORLD_STIC_PROMPTS).

Prints a table (method, pairs, differing, share, ...) with pair-generation seconds per item, and
as the last line one JSON object.

Usage: python benchmarks/pair_quality.py [--n 200] [--methods csr,povid,stic,stic_paper_mix,stic_app]
       [--reward-mode paper|reference] [--lam 0.9] [--prune-by text|reward]
       [--expansion diverse_beam|sample] [--temperature 0.7] ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    SHARED_CORES_NOTE,
    Timer,
    describe_items,
    emit_json,
    hallucinations,
    load_models,
    recalled,
    scene_key,
    setup_torch,
    table,
)

GOAL_SHARE = 0.8
METHODS = ("csr", "povid", "stic", "stic_paper_mix", "stic_app")
# World answers end at EOS after <= 4 sentences of ~12 tokens; the cap only bounds a runaway answer
# on a corrupted image (the methods' defaults, 256-512 tokens, are sized for real VLMs).
WORLD_MAX_NEW_TOKENS = 96


def summarize(name: str, pairs: list[tuple[str, str, list[str]]], n_items: int, seconds: float,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``pairs``: (chosen text, rejected text, scene objects)."""
    wins = losses = less_complete = 0
    h_c = h_r = rec_c = rec_r = gt = 0
    for chosen, rejected, objects in pairs:
        a, b = hallucinations(chosen, objects), hallucinations(rejected, objects)
        wins += a < b
        losses += a > b
        h_c, h_r = h_c + a, h_r + b
        ra, rb = recalled(chosen, objects), recalled(rejected, objects)
        rec_c, rec_r = rec_c + ra, rec_r + rb
        less_complete += ra < rb
        gt += len(set(objects))
    differing = wins + losses
    n = max(len(pairs), 1)
    return {
        "method": name,
        "items": n_items,
        "pairs": len(pairs),
        "differing": differing,
        "chosen_fewer": wins,
        "chosen_more": losses,
        "share": wins / differing if differing else None,
        "hall_per_chosen": h_c / n,
        "hall_per_rejected": h_r / n,
        "recall_chosen": rec_c / gt if gt else None,
        "recall_rejected": rec_r / gt if gt else None,
        # pairs whose chosen answer names fewer drawn objects than the rejected one: what DPO would
        # learn as "say less" if it dominated
        "chosen_less_complete": less_complete / n if pairs else None,
        "seconds": seconds,
        "seconds_per_item": seconds / max(n_items, 1),
        **(extra or {}),
    }


def run_csr_pairs(backend, scorer, world: list[dict], args) -> tuple[list[dict], dict[str, Any]]:
    from lvlm_studio.methods.csr import CSRConfig, run_csr

    cfg = CSRConfig(**csr_overrides(args))
    items = [(it["image"], it["prompt"], scene_key(it)) for it in world]
    with Timer() as t:
        results = run_csr(backend, scorer, items, cfg)
    pairs = []
    for it, r in zip(world, results, strict=True):
        if r.has_pair:
            pairs.append((r.candidates[r.chosen].text, r.candidates[r.rejected].text, it["objects"]))
    margins = [r.margin for r in results if r.has_pair]
    extra = {"config": cfg.as_dict(), "candidates_per_item": sum(len(r.candidates) for r in results) / len(world),
             "mean_margin": sum(margins) / len(margins) if margins else None}
    return [summarize("csr", pairs, len(world), t.seconds, extra)], {"results": results}


def world_vocabulary(train_scenes: int = 2000, seed: int = 0):
    """POVID's injection vocabulary for ShapesWorld: the world's categories, colours, sizes and
    positions, with object co-occurrence counted over what TRAIN captions name (so the prior
    partners of PRIOR_PARTNERS rank first as injected objects)."""
    from lvlm_studio.methods.povid import Vocabulary
    from lvlm_studio.world import COLOURS, COUNT_WORDS, POSITIONS, SIZES, sample_scenes

    named = [[o.category for o in s.caption_objects] for s in sample_scenes("train", train_scenes, seed)]
    return Vocabulary.from_object_sets(
        named,
        colours=list(COLOURS),
        sizes=list(SIZES),
        counts=[w for w in COUNT_WORDS if w not in ("zero", "one")],
        relations=list(POSITIONS),
    )


def run_povid_pairs(backend, world: list[dict], args) -> tuple[list[dict], dict[str, Any]]:
    from lvlm_studio.methods.povid import POVIDConfig, POVIDItem, build_povid_pairs

    cfg = POVIDConfig(max_new_tokens=args.gen_max_new_tokens, seed=args.seed, noise_answer=args.povid_noise_answer)
    items = [POVIDItem(it["image"], it["prompt"], it["reference"], scene_key(it), list(it["objects"]))
             for it in world]
    vocab = world_vocabulary()
    with Timer() as t:
        results = build_povid_pairs(backend, items, cfg, vocabulary=vocab)
    inject, noise = [], []
    for it, r in zip(world, results, strict=True):
        if r.rejected_text is not None:
            inject.append((r.chosen.text, r.rejected_text.text, it["objects"]))
        if r.rejected_image is not None and r.rejected_image.text != r.chosen.text:
            noise.append((r.chosen.text, r.rejected_image.text, it["objects"]))
    rows = [
        summarize("povid", inject + noise, len(world), t.seconds),
        summarize("povid_inject", inject, len(world), t.seconds),
        summarize("povid_noise", noise, len(world), t.seconds),
    ]
    return rows, {"results": results}


def run_stic_pairs(backend, world: list[dict], args, name: str) -> tuple[list[dict], dict[str, Any]]:
    from lvlm_studio.methods.stic import STICConfig, build_stic_pairs
    from lvlm_studio.service import WORLD_STIC_PROMPTS
    from lvlm_studio.world import DESCRIBE_PROMPT

    paper_mix = name != "stic"
    prompts = {"good_prompt": DESCRIBE_PROMPT, "plain_prompt": DESCRIBE_PROMPT}
    if name == "stic_app":  # what Studio.generate("stic") runs on world items: world-word misleading prompts
        prompts = dict(WORLD_STIC_PROMPTS)
    cfg = STICConfig(
        **prompts,
        pair_prompt=DESCRIBE_PROMPT,
        p_misleading=0.5 if paper_mix else 0.0,
        max_new_tokens=args.gen_max_new_tokens,
        seed=args.seed,
    )
    items = [(it["image"], scene_key(it)) for it in world]
    with Timer() as t:
        results = build_stic_pairs(backend, items, cfg)
    by_branch: dict[str, list] = {"misleading": [], "corrupted": []}
    unpaired = 0
    for it, r in zip(world, results, strict=True):
        if r.has_pair:
            by_branch[r.draw["branch"]].append((r.chosen.text, r.rejected.text, it["objects"]))
        else:
            unpaired += 1  # identical answers (or an empty one): no preference to learn
    rows = [summarize(name, by_branch["misleading"] + by_branch["corrupted"], len(world), t.seconds,
                      {"unpaired_identical_or_empty": unpaired})]
    if paper_mix:
        rows += [summarize(f"{name}:{b}", p, len(world), t.seconds) for b, p in by_branch.items()]
    return rows, {"results": results}


def greedy_baseline(backend, world: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """The model's own greedy answer on each scene: context for the chosen/rejected figures."""
    from lvlm_studio.models.base import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with Timer() as t:
        outs = backend.sample([it["image"] for it in world], [it["prompt"] for it in world], 1, params)
    texts = [o[0].text for o in outs]
    hall = [hallucinations(x, it["objects"]) for x, it in zip(texts, world, strict=True)]
    gt = sum(len(set(it["objects"])) for it in world)
    return {
        "answers": len(texts),
        "hall_per_answer": sum(hall) / max(len(texts), 1),
        "answers_with_hallucination": sum(h > 0 for h in hall) / max(len(texts), 1),
        "recall": sum(recalled(x, it["objects"]) for x, it in zip(texts, world, strict=True)) / gt if gt else None,
        "seconds_per_item": t.seconds / max(len(world), 1),
    }


def csr_overrides(args) -> dict[str, Any]:
    keys = ("reward_mode", "lam", "clip_alpha", "prune_by", "expansion", "temperature", "num_candidates",
            "diversity_penalty", "answer_score", "keep_top", "keep_bottom", "max_sentences", "max_new_tokens")
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    out["seed"] = args.seed
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lvlm_studio.methods.csr import ANSWER_SCORES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="world TEST scenes (one describe item each)")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="world seed and method seeds")
    p.add_argument("--methods", default="csr,povid,stic,stic_paper_mix,stic_app",
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--model", default="demo")
    p.add_argument("--clip", default="demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true", help="skip the model's greedy-answer context line")
    p.add_argument("--gen-max-new-tokens", type=int, default=WORLD_MAX_NEW_TOKENS,
                   help="answer cap of POVID's noisy-image and STIC's generations")
    p.add_argument("--povid-noise-answer", choices=("generate", "teacher_forced_argmax"), default="generate",
                   help="POVID's noisy-image rejected side: the generated answer or the teacher-forced argmax")
    g = p.add_argument_group("CSR options (default: CSRConfig's)")
    g.add_argument("--reward-mode", choices=("paper", "reference"))
    g.add_argument("--lam", type=float)
    g.add_argument("--clip-alpha", type=float)
    g.add_argument("--prune-by", choices=("text", "reward"))
    g.add_argument("--expansion", choices=("diverse_beam", "sample"))
    g.add_argument("--temperature", type=float)
    g.add_argument("--num-candidates", type=int)
    g.add_argument("--diversity-penalty", type=float)
    g.add_argument("--answer-score", choices=ANSWER_SCORES)
    g.add_argument("--keep-top", type=int)
    g.add_argument("--keep-bottom", type=int)
    g.add_argument("--max-sentences", type=int)
    g.add_argument("--max-new-tokens", type=int)
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.method_list) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    host = setup_torch(args.threads)
    backend, scorer = load_models(args.model, args.clip if "csr" in args.method_list else None)
    world = describe_items(args.n, "test", args.seed, args.start)
    baseline = None if args.no_baseline else greedy_baseline(backend, world, args.gen_max_new_tokens)
    rows: list[dict[str, Any]] = []
    for method in args.method_list:
        if method == "csr":
            rows += run_csr_pairs(backend, scorer, world, args)[0]
        elif method == "povid":
            rows += run_povid_pairs(backend, world, args)[0]
        else:
            rows += run_stic_pairs(backend, world, args, method)[0]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    print(f"Pair quality on {args.n} ShapesWorld TEST scenes, model={args.model} clip={args.clip}")
    print(f"torch threads: {host['threads']}; {SHARED_CORES_NOTE}")
    cols = ["method", "pairs", "differing", "chosen fewer", "share", "hall/chosen", "hall/rejected",
            "recall ch", "recall rej", "ch less complete", "s/item"]
    print(table(cols, [[r["method"], r["pairs"], r["differing"], r["chosen_fewer"], pct(r["share"]),
                        r["hall_per_chosen"], r["hall_per_rejected"], pct(r["recall_chosen"]),
                        pct(r["recall_rejected"]), pct(r["chosen_less_complete"]), r["seconds_per_item"]]
                       for r in rows]))
    print("share = pairs whose chosen answer holds fewer hallucinated objects than the rejected one, "
          f"among pairs where the counts differ (goal >= {100 * GOAL_SHARE:.0f}%). "
          "recall: drawn objects named / drawn objects; 'ch less complete': pairs whose chosen answer names "
          "fewer drawn objects than the rejected one. s/item: pair-generation seconds per item (POVID rows "
          "share one run).")
    if baseline:
        print(f"context: the model's own greedy answer holds {baseline['hall_per_answer']:.3f} hallucinated "
              f"objects per answer ({pct(baseline['answers_with_hallucination'])} of answers have one), "
              f"recall {pct(baseline['recall'])}")
    if "povid" in args.method_list:
        print("povid: chosen = ground-truth caption (0 hallucinations), so its share is 100% by construction; "
              "'differing' says how often the rejected answer really holds a hallucinated object.")
    main_rows = {r["method"]: r for r in rows if r["method"] in ("csr", "povid", "stic", "stic_app")}
    record = {
        "benchmark": "pair_quality",
        "n": args.n,
        "model": args.model,
        "clip": args.clip,
        "host": host,
        "goal_share": GOAL_SHARE,
        "rows": rows,
        "greedy_baseline": baseline,
        "meets_goal": {m: (r["share"] is not None and r["share"] >= GOAL_SHARE) for m, r in main_rows.items()},
    }
    emit_json(record)
    return record


if __name__ == "__main__":
    main()
