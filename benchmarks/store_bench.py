"""Store benchmark: review-queue reads and decision writes at scale.

Builds a store with ``--pairs`` pairs (default 100k) and ``--reviews`` reviews (default 200k)
by bulk insert, then measures, over ``--calls`` calls each (default 300):
  * next-pair latency (``Store.next_pair``: the queue query + the full pair with item, image and
    both candidates), for reviewers in different situations:
      - "front":  has decided the first N pairs of the queue in queue order (how people work:
                  the hardest case for a "skip what I decided" query),
      - "random": has decided N pairs spread at random,
      - "new":    has decided nothing,
  * decision-write latency (``Store.add_review``: one BEGIN IMMEDIATE transaction; WAL with
    synchronous=NORMAL, so a commit is not fsync'd: it survives a crash of the process, and reaches
    the disk at the next checkpoint), interleaved with the reads as a reviewer works through the queue,
  * other reads: progress, stats, review_counts (cold and cached), the agreement statistics,
    training_pairs.
Prints p50 / p95 / max in ms. Goals: next-pair p95 ≤ 20 ms, decision write p95 ≤ 10 ms.

Usage: python benchmarks/store_bench.py [--pairs 100000] [--reviews 200000] [--calls 300]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm_studio.store import Store  # noqa: E402

PAIRS_PER_ITEM = 2


def build(store: Store, n_pairs: int, seed: int) -> list[int]:
    """Items with 4 candidates and 2 pairs each; margins random, 5% NULL. Returns pair ids."""
    rng = random.Random(seed)
    n_items = (n_pairs + PAIRS_PER_ITEM - 1) // PAIRS_PER_ITEM
    methods = ("csr", "povid", "stic")
    with store.transaction():
        for k in range(n_items):
            image_id = f"{k:064x}"
            store.add_image(image_id, f"images/{image_id[:2]}/{image_id}.png", 64, 64, "bench")
            item = store.add_item(image_id, "Describe the image.", dataset="bench")
            candidates = [
                {
                    "text": f"Sentence {k}.{j} about a red circle at the top left.",
                    "source": "csr",
                    "sentences": [
                        {"start": 0, "end": 40, "text_logprob": -1.2, "clip_score": 23.0, "reward": 0.5}
                    ],
                }
                for j in range(4)
            ]
            pairs = []
            for j in range(PAIRS_PER_ITEM):
                if k * PAIRS_PER_ITEM + j >= n_pairs:
                    break
                margin = None if rng.random() < 0.05 else rng.uniform(0, 5)
                pairs.append(
                    {"chosen": 2 * j, "rejected": 2 * j + 1, "method": methods[(k + j) % 3], "margin": margin}
                )
            store.write_generation(item, candidates, pairs)
    return store.pair_ids()


def add_bulk_reviews(store: Store, n_reviews: int, order: list[int], seed: int) -> dict[str, int]:
    """Half the reviews by reviewers who worked the queue from the front, half at random."""
    rng = random.Random(seed)
    decisions = ("accept", "accept", "accept", "swap", "reject_both")
    rows = []
    plan: dict[str, int] = {}
    front, rand = n_reviews // 2, n_reviews - n_reviews // 2
    per = min(len(order), max(1, front // 2))
    for name in ("front-a", "front-b"):
        plan[name] = per
        rows += [{"pair_id": pid, "reviewer": name, "decision": rng.choice(decisions)} for pid in order[:per]]
    k = min(len(order), max(1, rand // 2))
    for name in ("random-a", "random-b"):
        plan[name] = k
        rows += [
            {"pair_id": pid, "reviewer": name, "decision": rng.choice(decisions)}
            for pid in rng.sample(order, k)
        ]
    rows = rows[:n_reviews]
    for i in range(0, len(rows), 50_000):
        store.add_reviews(rows[i : i + 50_000])
    return plan


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"name": name, "n": len(ms), "p50": statistics.median(ms), "p95": pct(ms, 0.95), "max": max(ms)}


def work_the_queue(
    store: Store, reviewer: str, calls: int, method: str | None = None
) -> tuple[list[float], list[float]]:
    """A reviewer's session: next pair, decide, next pair, ..."""
    reads, writes = [], []
    for k in range(calls):
        t0 = time.perf_counter()
        pair = store.next_pair(reviewer, method=method)
        t1 = time.perf_counter()
        reads.append(t1 - t0)
        if pair is None:
            break
        t2 = time.perf_counter()
        store.add_review(pair["id"], reviewer, "swap" if k % 5 == 0 else "accept")
        writes.append(time.perf_counter() - t2)
    return reads, writes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--reviews", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", type=Path, default=None, help="database path (default: a temporary one)")
    args = parser.parse_args(argv)

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="store-bench-")
        args.db = Path(tmp.name) / "studio.db"
    store = Store(args.db)

    t0 = time.perf_counter()
    build(store, args.pairs, args.seed)
    t_pairs = time.perf_counter() - t0
    order = store.pair_ids(queue_order=True)
    t0 = time.perf_counter()
    plan = add_bulk_reviews(store, args.reviews, order, args.seed)
    t_reviews = time.perf_counter() - t0
    store.analyze()
    stats = store.stats()["tables"]
    size_mb = sum(p.stat().st_size for p in args.db.parent.glob(args.db.name + "*")) / 1e6
    print(
        f"built {stats['pairs']} pairs ({stats['candidates']} candidates, {stats['items']} items) in {t_pairs:.1f} s; "
        f"{stats['reviews']} reviews in {t_reviews:.1f} s; database {size_mb:.0f} MB"
    )
    print("reviewers before the run: " + ", ".join(f"{k} decided {v}" for k, v in plan.items()))

    results = []
    all_reads, all_writes = [], []
    for reviewer, method in (
        ("front-a", None),
        ("random-a", None),
        ("new-reviewer", None),
        ("front-b", "csr"),
    ):
        reads, writes = work_the_queue(store, reviewer, args.calls, method)
        label = reviewer + (f" method={method}" if method else "")
        results.append(summary(f"next_pair [{label}]", reads))
        all_reads += reads
        all_writes += writes
    # While a generation job adds pairs: one new pair (random margin) before every call.
    rng = random.Random(args.seed + 1)
    reads, writes = [], []
    for k in range(args.calls):
        image_id = f"{10**9 + k:064x}"
        store.add_image(image_id, f"images/{image_id[:2]}/{image_id}.png", 64, 64, "bench")
        item = store.add_item(image_id, "Describe the image.", dataset="bench")
        store.write_generation(
            item,
            [{"text": "a", "source": "csr"}, {"text": "b", "source": "csr"}],
            [{"chosen": 0, "rejected": 1, "method": "csr", "margin": rng.uniform(0, 5)}],
        )
        t0 = time.perf_counter()
        pair = store.next_pair("front-a")
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.add_review(pair["id"], "front-a", "accept")
        writes.append(time.perf_counter() - t0)
    results.append(summary("next_pair [front-a, a pair added before each]", reads))
    all_reads += reads
    all_writes += writes
    results.append(summary("next_pair [all]", all_reads))
    results.append(summary("add_review (decision write)", all_writes))

    # What the Data tab (agreement) and the Train tab's 2 s poll (review_counts) read.
    studio = None
    if args.db.name == "studio.db":
        from lvlm_studio.config import Settings
        from lvlm_studio.service import Studio

        studio = Studio(Settings(home=args.db.parent), users={}, admins=())
    store.add_review(order[0], "front-a", "accept")  # a new review: review_counts' cache is stale
    for name, fn, n in (
        ("progress(reviewer) [other]", lambda: store.progress(reviewer="front-a"), 20),
        ("stats() [other]", store.stats, 5),
        ("review_counts() after a new review [other]", store.review_counts, 1),
        ("review_counts() unchanged store [other]", store.review_counts, 20),
        *((("Studio.agreement() [other]", studio.agreement, 3),) if studio is not None else ()),
        ("training_pairs(include_auto) [other]", lambda: store.training_pairs(include_auto=True), 2),
    ):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        results.insert(len(results), summary(name, times))

    print(f"{'measurement':48s} {'n':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for r in results:
        print(f"{r['name']:48s} {r['n']:5d} {r['p50']:8.2f} {r['p95']:8.2f} {r['max']:8.2f}")
    by_name = {r["name"]: r for r in results}
    read_p95 = by_name["next_pair [all]"]["p95"]
    write_p95 = by_name["add_review (decision write)"]["p95"]
    ok = read_p95 <= 20 and write_p95 <= 10
    print(
        f"goal next_pair p95 <= 20 ms: {read_p95:.2f} ms; decision write p95 <= 10 ms: {write_p95:.2f} ms -> "
        f"{'OK' if ok else 'MISSED'}"
    )
    store.close()
    if studio is not None:
        studio.store.close()
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
