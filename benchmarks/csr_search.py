"""CSR search benchmark: the reference code's execution model vs the project's engine.

Runs the CSR sentence-level search with the reference settings (diverse group beam search with
5 groups and diversity penalty 3.0, at most 70 new tokens per sentence, pruning to the top 1 and
bottom 2 by cumulative text score) on ``--n`` ShapesWorld test prompts, two ways:

  * reference (``run_csr_reference``): items one at a time, every expansion re-encodes the image and
    re-prefills the whole chat prompt + partial answer text (decode -> re-tokenise), batch 1, and
    CLIP re-encodes the image for every sentence;
  * engine (``run_csr``): image + prompt encoded once per item (prefix KV cache), all live nodes of
    a depth continued in one batched call, CLIP image embeddings cached per image.

Checks that both produce the same candidates, sentences and scores (within ``--atol``), then prints
a table (seconds, tokens/s, backend calls, CLIP image encodes) and the speed ratio (goal >= 5x on
this CPU), and as the last line one JSON object.

Usage: python benchmarks/csr_search.py [--n 20] [--model demo] [--clip demo] [--threads 2]
Exit status 1 when the two paths disagree.
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
    load_models,
    scene_key,
    setup_torch,
    table,
)

GOAL_RATIO = 5.0


class CountingBackend:
    """Transparent wrapper that counts the tokens the backend generates (every expansion)."""

    def __init__(self, inner: Any, from_text: bool = True):
        self.inner = inner
        self.model_id = inner.model_id
        self.tokens = 0
        self.calls = 0
        # Only offer what the inner backend offers: run_csr_reference checks with hasattr.
        if from_text and hasattr(inner, "sample_from_text"):
            self.sample_from_text = self._sample_from_text
        if hasattr(inner, "extend_many"):
            self.extend_many = self._extend_many

    def __getattr__(self, name: str) -> Any:
        if name in ("sample_from_text", "extend_many"):  # only when set in __init__
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _count(self, rows) -> None:
        self.calls += 1
        self.tokens += sum(len(s.token_ids) for row in rows for s in row)

    def extend(self, prefix, partials, n=1, params=None):
        out = self.inner.extend(prefix, partials, n, params)
        self._count(out)
        return out

    def _extend_many(self, prefixes, partials, n=1, params=None):
        out = self.inner.extend_many(prefixes, partials, n, params)
        for per_item in out:
            self._count(per_item)
        return out

    def _sample_from_text(self, image, prompt, partial_text, n=1, params=None):
        out = self.inner.sample_from_text(image, prompt, partial_text, n, params)
        self._count([out])
        return out


def compare(engine: list, reference: list, atol: float, clip_atol: float) -> dict[str, Any]:
    """Same candidates (texts, in order), same sentences, log-probs / CLIP scores / answer scores
    within tolerance, same chosen and rejected. Returns mismatches and the largest differences."""
    mismatches: list[dict[str, Any]] = []
    worst = {"text_logprob": 0.0, "clip_score": 0.0, "score": 0.0}
    for i, (f, r) in enumerate(zip(engine, reference, strict=True)):
        ft, rt = [c.text for c in f.candidates], [c.text for c in r.candidates]
        if ft != rt:
            first = next((k for k, (a, b) in enumerate(zip(ft, rt, strict=False)) if a != b), min(len(ft), len(rt)))
            mismatches.append({"item": i, "what": "candidates", "engine": ft[first: first + 1],
                               "reference": rt[first: first + 1], "n_engine": len(ft), "n_reference": len(rt)})
            continue
        for a, b in zip(f.candidates, r.candidates, strict=True):
            if [s["text"] for s in a.sentences] != [s["text"] for s in b.sentences]:
                mismatches.append({"item": i, "what": "sentences", "text": a.text})
                continue
            for x, y in zip(a.sentences, b.sentences, strict=True):
                worst["text_logprob"] = max(worst["text_logprob"], abs(x["text_logprob"] - y["text_logprob"]))
                worst["clip_score"] = max(worst["clip_score"], abs(x["clip_score"] - y["clip_score"]))
            worst["score"] = max(worst["score"], abs(a.score - b.score))
        if (f.chosen, f.rejected) != (r.chosen, r.rejected):
            mismatches.append({"item": i, "what": "pair", "engine": [f.chosen, f.rejected],
                               "reference": [r.chosen, r.rejected]})
    if worst["text_logprob"] > atol:
        mismatches.append({"what": "text_logprob", "max_abs_diff": worst["text_logprob"], "atol": atol})
    if worst["clip_score"] > clip_atol:
        mismatches.append({"what": "clip_score", "max_abs_diff": worst["clip_score"], "atol": clip_atol})
    if worst["score"] > clip_atol:  # an answer score mixes CLIP-scale rewards
        mismatches.append({"what": "score", "max_abs_diff": worst["score"], "atol": clip_atol})
    return {"match": not mismatches, "mismatches": mismatches[:10], "n_mismatches": len(mismatches),
            "max_abs_diff": worst}


def _run(fn, backend, scorer, items, cfg, from_text: bool = True) -> tuple[list, dict[str, Any]]:
    counting = CountingBackend(backend, from_text)
    encodes0 = getattr(scorer, "image_encodes", None)
    with Timer() as t:
        results = fn(counting, scorer, items, cfg)
    encodes = None if encodes0 is None else scorer.image_encodes - encodes0
    stats = {
        "seconds": t.seconds,
        "seconds_per_item": t.seconds / max(len(items), 1),
        "tokens": counting.tokens,
        "tokens_per_s": counting.tokens / t.seconds if t.seconds > 0 else 0.0,
        "backend_calls": counting.calls,
        "clip_calls": sum(r.stats.get("clip_calls", 0) for r in results),
        "clip_image_encodes": encodes,
        "candidates": sum(len(r.candidates) for r in results),
        "pairs": sum(r.has_pair for r in results),
    }
    return results, stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="world TEST prompts (one per scene)")
    p.add_argument("--start", type=int, default=0, help="first scene index")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--model", default="demo", help="'demo' or a saved transformers model directory")
    p.add_argument("--clip", default="demo", help="'demo' or an open_clip local directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=70, help="per sentence (reference: 70)")
    p.add_argument("--max-sentences", type=int, default=None, help="depth cap (default: CSRConfig's)")
    p.add_argument("--item-batch", type=int, default=None, help="items the engine searches together")
    p.add_argument("--atol", type=float, default=1e-3, help="tolerance on mean token log-probs")
    p.add_argument("--clip-atol", type=float, default=1e-2, help="tolerance on 100*cos and answer scores")
    p.add_argument("--reference-expansion", choices=("text", "tokens"), default="text",
                   help="text: the backend's sample_from_text (chat text + partial answer text, one "
                        "prefill); tokens: a fresh open_prefix (image re-encoded) + extend of the "
                        "re-tokenised partial text (two forward calls, same recomputation)")
    p.add_argument("--no-warmup", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    host = setup_torch(args.threads)
    from lvlm_studio.methods.csr import CSRConfig, run_csr, run_csr_reference

    backend, scorer = load_models(args.model, args.clip)
    overrides: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.max_sentences is not None:
        overrides["max_sentences"] = args.max_sentences
    if args.item_batch is not None:
        overrides["item_batch"] = args.item_batch
    cfg = CSRConfig(**overrides)  # everything else: the reference settings (CSRConfig defaults)
    world = describe_items(args.n + 1, "test", args.seed, args.start)
    items = [(it["image"], it["prompt"], scene_key(it)) for it in world[: args.n]]
    if not args.no_warmup:  # first-call costs (allocator, kernels) on a scene outside the measured set
        warm = [(world[-1]["image"], world[-1]["prompt"], scene_key(world[-1]))]
        run_csr(backend, scorer, warm, cfg)
        run_csr_reference(CountingBackend(backend, args.reference_expansion == "text"), scorer, warm, cfg)

    from_text = args.reference_expansion == "text"
    ref_results, ref = _run(run_csr_reference, backend, scorer, items, cfg, from_text)
    eng_results, eng = _run(run_csr, backend, scorer, items, cfg)
    check = compare(eng_results, ref_results, args.atol, args.clip_atol)
    ratio = ref["seconds"] / eng["seconds"] if eng["seconds"] > 0 else float("inf")

    cols = ["path", "seconds", "s/item", "tokens", "tokens/s", "backend calls", "clip calls", "clip img enc"]
    rows = [[name, s["seconds"], s["seconds_per_item"], s["tokens"], s["tokens_per_s"], s["backend_calls"],
             s["clip_calls"], "n/a" if s["clip_image_encodes"] is None else s["clip_image_encodes"]]
            for name, s in (("reference", ref), ("engine", eng))]
    print(f"CSR search on {args.n} ShapesWorld test prompts, model={args.model} clip={args.clip}")
    print(f"settings: diverse beam {cfg.num_candidates} groups, penalty {cfg.diversity_penalty}, "
          f"max {cfg.max_new_tokens} tokens/sentence, keep top {cfg.keep_top} + bottom {cfg.keep_bottom} "
          f"by {cfg.prune_by}, max {cfg.max_sentences} sentences, reward {cfg.reward_mode}; "
          f"reference expansion from {args.reference_expansion}; engine batches items: "
          f"{hasattr(backend, 'extend_many')} (item_batch {cfg.item_batch})")
    print(f"torch threads: {host['threads']} (cpu_count {host['cpu_count']}); {SHARED_CORES_NOTE}")
    print(table(cols, rows))
    verdict = "meets" if ratio >= GOAL_RATIO else "BELOW"
    print(f"speed ratio reference/engine: {ratio:.2f}x ({verdict} the {GOAL_RATIO:.0f}x goal)")
    print(f"same sentences and scores: {'yes' if check['match'] else 'NO'} "
          f"(max |diff| text log-prob {check['max_abs_diff']['text_logprob']:.2e}, "
          f"CLIP {check['max_abs_diff']['clip_score']:.2e}, score {check['max_abs_diff']['score']:.2e})")
    if not check["match"]:
        for m in check["mismatches"]:
            print(f"  mismatch: {m}")
    record = {
        "benchmark": "csr_search",
        "n": args.n,
        "model": args.model,
        "clip": args.clip,
        "config": cfg.as_dict(),
        "reference_expansion": args.reference_expansion,
        "engine_extend_many": hasattr(backend, "extend_many"),
        "host": host,
        "reference": ref,
        "engine": eng,
        "speed_ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "meets_goal": ratio >= GOAL_RATIO,
        **{k: check[k] for k in ("match", "n_mismatches", "max_abs_diff", "mismatches")},
    }
    emit_json(record)
    return record


if __name__ == "__main__":
    sys.exit(0 if main()["match"] else 1)
