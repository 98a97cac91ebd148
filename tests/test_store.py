"""Store: schema, idempotent inserts, transactions, review derivation, queue order, rounds."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from lvlm_studio.store import NotFoundError, Store, StoreError, live_decisions

MIGRATIONS = ["m001_initial_schema", "m002_studio_meta", "m003_round_cancel_requested", "m004_evaluation_sets"]


# ------------------------------------------------------------------------- schema and pragmas
def test_pragmas_and_migrations(store, settings):
    db = store.db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert store.applied_migrations() == MIGRATIONS
    tables = set(db.table_names())
    assert {
        "images",
        "items",
        "candidates",
        "pairs",
        "reviews",
        "rounds",
        "round_logs",
        "eval_outputs",
    } <= tables
    # Reopening applies nothing twice and keeps data.
    store.add_image("a" * 64, settings.images_dir / "x.png", 2, 2, "t")
    again = Store(settings.db_path)
    assert again.applied_migrations() == MIGRATIONS
    assert again.get_image("a" * 64)["width"] == 2
    again.close()


def test_connection_per_thread(store, make_items):
    import threading

    [item] = make_items(1)
    seen = []

    def work():
        seen.append((id(store.db), store.get_item(item)["id"]))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen[0][1] == item and seen[0][0] != id(store.db)


def test_connections_of_ended_threads_are_closed(store, make_items):
    """A pool that retires idle threads (Gradio's handlers run on anyio's) must not leave each one's
    connection open: 50 short-lived threads leave one connection per live thread, not 50."""
    import sqlite3
    import threading

    [item] = make_items(1)
    used = []

    def work():
        used.append(store.db)
        assert store.get_item(item)["id"] == item

    for _ in range(50):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert len(store._connections) <= 2  # this thread's and the last worker's
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        used[0].execute("SELECT 1")
    assert store.get_item(item)["id"] == item  # this thread's own is untouched


# ------------------------------------------------------------------------- images and items
def test_add_image_idempotent_relative_path_and_objects(store, settings):
    path = settings.images_dir / "ab" / "abc.png"
    assert store.add_image("abc", path, 10, 20, "upload") == "abc"
    assert store.add_image("abc", path, 10, 20, "upload", objects=["dog", "cat"]) == "abc"
    row = store.get_image("abc")
    assert row["path"] == str(path.resolve()) and row["objects"] == ["dog", "cat"]
    # Stored relative to the data root so the root can be moved.
    assert store.db.execute("SELECT path FROM images").fetchone()[0] == "images/ab/abc.png"
    assert store.stats()["tables"]["images"] == 1
    with pytest.raises(StoreError):
        store.add_image("", path, 1, 1, "x")


def test_add_item_idempotent_and_listing(store, settings):
    store.add_image("img1", settings.images_dir / "1.png", 4, 4, "t", ["cat"])
    a = store.add_item("img1", "Describe.", dataset="d1", split="train")
    assert store.add_item("img1", "Describe.", reference="later ref", dataset="d1") == a
    assert store.get_item(a)["reference"] == "later ref"  # a reference fills an item that had none
    assert store.add_item("img1", "Describe.", reference="other", dataset="d1") == a
    assert store.get_item(a)["reference"] == "later ref"  # ... but never overwrites one
    b = store.add_item("img1", "Describe.", dataset="d2", split="test")
    c = store.add_item("img1", "Count.", dataset="d1", meta={"k": 1})
    assert len({a, b, c}) == 3
    item = store.get_item(c)
    assert item["image_path"].endswith("1.png") and item["objects"] == ["cat"] and item["meta"] == {"k": 1}
    assert [i["id"] for i in store.list_items(dataset="d1")] == [a, c]
    assert [i["id"] for i in store.list_items(split="test")] == [b]
    assert [i["id"] for i in store.list_items(limit=1, offset=1)] == [b]
    assert store.count_items(dataset="d1") == 2
    with pytest.raises(NotFoundError):
        store.add_item("nope", "Describe.")
    with pytest.raises(StoreError):
        store.add_item("img1", "   ")


# ------------------------------------------------------------------------- candidates and pairs
def test_pair_validation(store, make_items):
    i1, i2 = make_items(2)
    c1 = store.add_candidate(
        i1, "a", "model", sentences=[{"start": 0, "end": 1, "text": "a"}], params={"t": 1}
    )
    c2 = store.add_candidate(i1, "b", "model")
    c3 = store.add_candidate(i2, "c", "model")
    assert store.get_candidate(c1)["sentences"][0]["text"] == "a"
    with pytest.raises(StoreError, match="belongs to item"):
        store.add_pair(i1, c1, c3, "csr")
    with pytest.raises(StoreError, match="different"):
        store.add_pair(i1, c1, c1, "csr")
    with pytest.raises(NotFoundError):
        store.add_pair(i1, c1, 9999, "csr")
    pid = store.add_pair(i1, c1, c2, "csr", margin=0.3, round=2, meta={"x": 1})
    pair = store.get_pair(pid)
    assert pair["chosen"]["text"] == "a" and pair["rejected"]["text"] == "b"
    assert pair["meta"] == {"x": 1} and pair["round"] == 2 and pair["label"]["status"] == "auto"
    assert store.items_with_pairs("csr", 2) == {i1}
    assert store.items_with_pairs("csr", 0) == set()


def test_write_generation_is_one_transaction(store, make_items):
    [item] = make_items(1)
    cands = [
        {"text": f"t{k}", "source": "csr", "score": k, "spans": [{"start": 0, "end": 1}]} for k in range(3)
    ]
    ids = store.write_generation(
        item, cands, [{"chosen": 0, "rejected": 2, "method": "csr", "margin": 1.5, "meta": {"a": 1}}]
    )
    assert len(ids) == 3 and store.count_pairs() == 1
    assert store.get_candidate(ids[1])["spans"] == [{"start": 0, "end": 1}]
    before = store.stats()["tables"]
    with pytest.raises(StoreError):  # an index out of range: nothing of this call may land
        store.write_generation(item, cands, [{"chosen": 0, "rejected": 7, "method": "csr"}])
    with pytest.raises(StoreError):  # a candidate without text fails after others were inserted
        store.write_generation(item, [{"text": "ok", "source": "s"}, {"source": "s"}], [])
    assert store.stats()["tables"] == before


def test_write_generation_only_if_unpaired_writes_an_items_pairs_once(store, make_items):
    [item] = make_items(1)
    cands = [{"text": "a", "source": "povid"}, {"text": "b", "source": "povid"}]
    pair = {"chosen": 0, "rejected": 1, "method": "povid", "round": 0}
    assert store.write_generation(item, cands, [pair], only_if_unpaired=True) is not None
    before = store.stats()["tables"]
    assert store.write_generation(item, cands, [pair], only_if_unpaired=True) is None
    assert store.write_generation(item, cands, [{**pair, "round": None}], only_if_unpaired=True) is None  # round 0
    assert store.stats()["tables"] == before  # not even the candidates
    assert store.write_generation(item, cands, [{**pair, "method": "csr"}], only_if_unpaired=True) is not None
    assert store.write_generation(item, cands, [{**pair, "round": 2}], only_if_unpaired=True) is not None
    assert store.write_generation(item, cands, [pair]) is not None  # without the flag: written (imports, tests)
    assert store.count_pairs("povid", round=0) == 2 and store.count_pairs() == 4


# ------------------------------------------------------------------------- reviews
def test_review_validation_and_append_only(store, make_pairs):
    [pid] = make_pairs([0.1])
    with pytest.raises(StoreError, match="unknown decision"):
        store.add_review(pid, "ann", "maybe")
    with pytest.raises(StoreError, match="edited text"):
        store.add_review(pid, "ann", "edit", edited_text="  ")
    with pytest.raises(StoreError, match="nothing|no decision"):
        store.add_review(pid, "ann", "undo")
    with pytest.raises(StoreError, match="reviewer"):
        store.add_review(pid, " ", "accept")
    with pytest.raises(NotFoundError):
        store.add_review(12345, "ann", "accept")
    rid = store.add_review(pid, "ann", "accept", marked_spans=[{"start": 0, "end": 5}], note="fine")
    assert store.pair_reviews(pid)[0]["marked_spans"] == [{"start": 0, "end": 5}]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE reviews SET decision = 'swap' WHERE id = ?", (rid,))
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM reviews WHERE id = ?", (rid,))


def test_effective_label_derivation(store, make_pairs):
    [pid] = make_pairs([0.1])
    chosen, rejected = "There is a red circle 0.", "There is a blue star 0."
    label = store.effective_label(pid)
    assert (label["status"], label["chosen_text"], label["reviewer"]) == ("auto", chosen, None)

    store.add_review(pid, "ann", "accept")
    assert store.effective_label(pid)["status"] == "accept"
    store.add_review(pid, "bob", "swap")  # the latest live decision of any reviewer wins
    label = store.effective_label(pid)
    assert (label["status"], label["chosen_text"], label["rejected_text"], label["reviewer"]) == (
        "swap",
        rejected,
        chosen,
        "bob",
    )
    assert label["chosen_id"] == store.get_pair(pid)["rejected_id"] and label["decided_at"]
    store.add_review(pid, "ann", "edit", edited_text="There is a red circle.")
    label = store.effective_label(pid)
    assert (label["status"], label["chosen_text"], label["rejected_text"], label["chosen_id"]) == (
        "edit",
        "There is a red circle.",
        rejected,
        None,
    )
    store.add_review(pid, "ann", "undo")  # cancels ann's edit → bob's swap is the latest live
    assert store.effective_label(pid)["status"] == "swap"
    store.add_review(pid, "bob", "undo")  # cancels bob's swap → ann's accept
    assert store.effective_label(pid)["status"] == "accept"
    assert store.decisions_matrix() == {pid: {"ann": "accept"}}
    store.add_review(pid, "ann", "undo")
    assert store.effective_label(pid)["status"] == "auto"
    assert store.decisions_matrix() == {}
    store.add_review(pid, "ann", "reject_both")
    assert store.effective_label(pid)["status"] == "reject_both"
    with pytest.raises(NotFoundError):
        store.effective_label(999)


def _reference_label(reviews):
    """Derivation straight from the definition, over all reviews of one pair."""
    live = {}
    by_reviewer = {}
    for r in reviews:
        by_reviewer.setdefault(r["reviewer"], []).append(r)
    for reviewer, rows in by_reviewer.items():
        stack = live_decisions(rows)
        if stack:
            live[reviewer] = stack[-1]
    if not live:
        return "auto", {}
    latest = max(live.values(), key=lambda r: r["id"])
    return latest["decision"], {k: v["decision"] for k, v in live.items()}


def test_effective_label_matches_definition_on_random_histories(store, make_pairs):
    rng = random.Random(7)
    pids = make_pairs([0.0] * 6) + make_pairs([0.0] * 3, method="povid")
    for _ in range(300):
        pid, reviewer = rng.choice(pids), rng.choice(["a", "b", "c"])
        decision = rng.choice(["accept", "swap", "reject_both", "edit", "undo", "undo"])
        if decision == "undo" and store.reviewer_decision(pid, reviewer) is None:
            continue
        store.add_review(pid, reviewer, decision, edited_text="edited" if decision == "edit" else None)
    matrix = store.decisions_matrix()
    for pid in pids:
        expected_status, expected_live = _reference_label(store.pair_reviews(pid))
        assert store.effective_label(pid)["status"] == expected_status
        assert matrix.get(pid, {}) == expected_live
    # The Train tab's grouped counts agree with the labels derived pair by pair.
    expected_counts: dict[str, dict[str, int]] = {}
    for row in store.labelled_pairs():
        rec = expected_counts.setdefault(row["method"], {"pairs": 0, "reviewed": 0, "usable": 0})
        status = row["label"]["status"]
        rec["pairs"] += 1
        rec["reviewed"] += status != "auto"
        rec["usable"] += status not in ("auto", "reject_both")
    assert store.review_counts() == expected_counts
    assert {m: c["reviewed"] for m, c in expected_counts.items()} != {"csr": 0, "povid": 0}
    # The cached review_state is exactly what a rebuild from the append-only log gives.
    before = sorted(store.db.execute("SELECT * FROM review_state").fetchall())
    store.rebuild_review_state()
    assert sorted(store.db.execute("SELECT * FROM review_state").fetchall()) == before


def test_bulk_reviews_match_single_reviews(store, make_pairs):
    pids = make_pairs([0.1, 0.2])
    n = store.add_reviews(
        [
            {"pair_id": pids[0], "reviewer": "a", "decision": "accept"},
            {"pair_id": pids[0], "reviewer": "a", "decision": "swap"},
            {"pair_id": pids[0], "reviewer": "a", "decision": "undo"},
            {"pair_id": pids[1], "reviewer": "b", "decision": "edit", "edited_text": "x"},
        ]
    )
    assert n == 4
    assert store.effective_label(pids[0])["status"] == "accept"
    assert store.effective_label(pids[1])["chosen_text"] == "x"
    with pytest.raises(StoreError):
        store.add_reviews([{"pair_id": pids[0], "reviewer": "a", "decision": "bogus"}])


# ------------------------------------------------------------------------- review queue
def test_next_pair_order_filters_and_undo(store, make_pairs):
    p_mid, p_null, p_low, p_high = make_pairs([0.5, None, -1.0, 2.0], method="csr")
    [p_povid] = make_pairs([-5.0], method="povid", round=1)

    order = []
    exclude: list[int] = []
    while (pair := store.next_pair("ann", method="csr", exclude=exclude)) is not None:
        order.append(pair["id"])
        exclude.append(pair["id"])
    assert order == [p_low, p_mid, p_high, p_null]  # lowest margin first, NULL last

    assert store.next_pair("ann")["id"] == p_povid  # no method filter: the lowest overall
    assert store.next_pair("ann", round=1)["id"] == p_povid
    assert store.next_pair("ann", method="povid", round=0) is None

    store.add_review(p_povid, "ann", "accept")
    store.add_review(p_low, "ann", "swap")
    assert store.next_pair("ann")["id"] == p_mid
    assert store.next_pair("bob")["id"] == p_povid  # other reviewers are unaffected
    assert store.next_pair("ann", status="decided")["id"] == p_povid
    assert store.next_pair("ann", status="all")["id"] == p_povid
    store.add_review(p_low, "ann", "undo")  # undone → pending again
    assert store.next_pair("ann")["id"] == p_low
    pair = store.next_pair("ann")
    assert pair["chosen"]["text"].startswith("There is a red circle") and pair["image_path"]
    with pytest.raises(StoreError):
        store.next_pair("ann", status="weird")


def test_queue_query_uses_index(store, make_pairs):
    make_pairs([0.1, 0.2])
    key = "coalesce(p.margin, 9e999)"
    for method in (None, "csr"):
        for start in ("", f"AND {key} >= 0.1 AND ({key} > 0.1 OR p.id >= 1) "):
            plan = " ".join(
                str(r)
                for r in store.db.execute(
                    "EXPLAIN QUERY PLAN SELECT p.id FROM pairs p WHERE "
                    + ("p.method = 'csr' AND " if method else "")
                    + "NOT EXISTS (SELECT 1 FROM review_state s WHERE s.pair_id = p.id AND s.reviewer = 'a') "
                    + start
                    + f"ORDER BY {key}, p.id LIMIT 1"
                )
            )
            assert "TEMP B-TREE" not in plan, plan  # ordered by an index, no sort of all pairs
            assert "queue" in plan, plan
            if start:
                assert ">?" in plan.replace(" ", ""), plan  # the cursor is an index range


def test_queue_cursor_sees_new_pairs_undos_and_other_processes(store, make_pairs, settings):
    pids = make_pairs([1.0, 2.0, 3.0, 4.0])
    for pid in pids[:3]:
        store.add_review(pid, "ann", "accept")
    assert store.next_pair_id("ann") == pids[3]  # cursor now at pids[3]
    [early] = make_pairs([0.5])  # a new pair before the cursor
    assert store.next_pair_id("ann") == early
    store.add_review(early, "ann", "accept")
    assert store.next_pair_id("ann") == pids[3]
    store.add_review(pids[1], "ann", "undo")  # undo before the cursor: pending again
    assert store.next_pair_id("ann") == pids[1]
    store.add_review(pids[1], "ann", "swap")
    other = Store(settings.db_path)  # another writer (process) adds and undoes
    assert other.next_pair_id("ann") == pids[3]
    other.add_review(pids[0], "ann", "undo")
    assert store.next_pair_id("ann") == pids[0]
    assert store.next_pair_id("ann", exclude=[pids[0]]) == pids[3]
    assert store.next_pair_id("bob", method="csr") == early
    other.close()


def test_progress_stats_and_training_pairs(store, make_pairs):
    a, b, c, d = make_pairs([0.1, 0.2, 0.3, 0.4], method="csr")
    [e] = make_pairs([0.5], method="stic")
    store.add_review(a, "ann", "accept")
    store.add_review(b, "ann", "swap")
    store.add_review(b, "bob", "accept")  # latest → accept
    store.add_review(c, "bob", "reject_both")
    store.add_review(d, "bob", "edit", edited_text="A red circle.")

    progress = store.progress(reviewer="ann")
    assert progress["total"] == 5 and progress["done"] == 4
    assert progress["per_reviewer"] == {"ann": {"done": 2, "total": 5}, "bob": {"done": 3, "total": 5}}
    assert progress["reviewer_done"] == 2
    assert store.progress(method="stic")["done"] == 0

    stats = store.stats()
    assert stats["tables"]["pairs"] == 5 and stats["tables"]["reviews"] == 5
    assert stats["pairs_by_method"] == {"csr": 4, "stic": 1}
    assert stats["reviews_by_decision"] == {"accept": 2, "swap": 1, "reject_both": 1, "edit": 1}
    assert stats["labels"] == {"auto": 1, "accept": 2, "swap": 0, "reject_both": 1, "edit": 1}
    assert stats["reviewers"] == ["ann", "bob"]

    rows = {r["pair_id"]: r for r in store.training_pairs()}
    assert set(rows) == {a, b, d}  # reject_both never, auto only on request
    assert rows[a]["chosen"] == "There is a red circle 0." and rows[a]["status"] == "accept"
    assert rows[b]["chosen"] == "There is a red circle 1."  # bob's later accept beats ann's swap
    assert rows[d]["chosen"] == "A red circle." and rows[d]["rejected"] == "There is a blue star 3."
    assert rows[a]["image_path"].endswith(".png") and rows[a]["prompt"] == "Describe the image."
    assert {r["pair_id"] for r in store.training_pairs(include_auto=True)} == {a, b, d, e}
    assert {r["pair_id"] for r in store.training_pairs(methods=["stic"], include_auto=True)} == {e}
    store.add_review(b, "bob", "undo")  # ann's swap is live again
    swapped = {r["pair_id"]: r for r in store.training_pairs()}[b]
    assert (
        swapped["chosen"] == "There is a blue star 1." and swapped["rejected"] == "There is a red circle 1."
    )


# ------------------------------------------------------------------------- rounds and eval outputs
def test_rounds_lifecycle(store):
    assert store.current_round() is None
    assert store.ensure_base_round("demo") == 0 and store.ensure_base_round("other") == 0
    base = store.get_round(0)
    assert base["status"] == "done" and base["adapter_path"] is None and base["base_model"] == "demo"
    assert store.current_round() is None  # round 0 = the base model

    r1 = store.create_round(0, "demo", {"lr": 1e-3})
    assert (
        r1 == 1
        and store.get_round(r1)["status"] == "queued"
        and store.get_round(r1)["config"] == {"lr": 1e-3}
    )
    store.update_round(r1, status="running", pid=123, progress=0.5)
    running = store.get_round(r1)
    assert running["started"] and running["finished"] is None and running["pid"] == 123
    store.log_round_step(r1, 2, {"loss": 0.5})
    store.log_round_step(r1, 1, {"loss": 0.7, "acc": 0.5})
    assert store.round_curve(r1) == [{"step": 1, "loss": 0.7, "acc": 0.5}, {"step": 2, "loss": 0.5}]
    store.update_round(r1, status="done", adapter_path="adapters/1", metrics={"chair_s": 0.1})
    assert store.get_round(r1)["finished"] and store.current_round()["id"] == r1
    r2 = store.create_round(r1, "demo", {})
    store.update_round(r2, status="failed", error="boom")
    assert store.current_round()["id"] == r1
    assert [r["id"] for r in store.list_rounds()] == [0, 1, 2]
    with pytest.raises(StoreError):
        store.update_round(r2, colour="red")
    with pytest.raises(StoreError):
        store.update_round(r2, status="exploded")
    with pytest.raises(NotFoundError):
        store.create_round(77, "demo", {})


def test_eval_outputs_atomic(store, make_items):
    items = make_items(2)
    store.ensure_base_round("demo")
    store.add_eval_outputs(
        0,
        [
            {"item_id": items[0], "answer": "A cat.", "objects": ["cat"], "hallucinated": []},
            {"item_id": items[1], "answer": "A dog.", "objects": ["dog"], "hallucinated": ["dog"]},
        ],
    )
    rows = store.eval_outputs(0)
    assert [r["answer"] for r in rows] == ["A cat.", "A dog."]
    assert rows[1]["hallucinated"] == ["dog"] and rows[0]["prompt"] == "Describe the image."
    with pytest.raises(sqlite3.IntegrityError):  # unknown item: the whole batch is refused
        store.add_eval_outputs(0, [{"item_id": items[0], "answer": "x"}, {"item_id": 999, "answer": "y"}])
    assert [r["answer"] for r in store.eval_outputs(0)] == ["A cat.", "A dog."]  # nothing replaced either
    with pytest.raises(NotFoundError):
        store.add_eval_outputs(5, [])


def test_a_later_evaluation_replaces_the_rounds_answer_per_item(store, make_items):
    """Evaluating a round again (a round job's evaluation, then `lvlm-studio eval` on more items)
    leaves one answer per item, the newer one, and keeps the items only the first run answered:
    Compare then pairs each item once and its answer count is the number of distinct items."""
    items = make_items(3)
    store.ensure_base_round("demo")
    store.add_eval_outputs(0, [{"item_id": items[0], "answer": "old 0"}, {"item_id": items[1], "answer": "old 1"}])
    store.add_eval_outputs(0, [{"item_id": items[1], "answer": "new 1"}, {"item_id": items[2], "answer": "new 2"}])
    assert [(r["item_id"], r["answer"]) for r in store.eval_outputs(0)] == [
        (items[0], "old 0"), (items[1], "new 1"), (items[2], "new 2")]


def test_integrity_report(store, make_items, settings):
    make_items(2)
    report = store.integrity()
    assert report == {"integrity_check": ["ok"], "foreign_key_violations": [], "missing_files": []}
    store.add_image("f" * 64, settings.images_dir / "gone.png", 1, 1, "t")
    assert store.integrity()["missing_files"] == [str((settings.images_dir / "gone.png").resolve())]


def test_queue_cursor_matches_brute_force_under_random_operations(store, make_pairs, settings):
    """Two Store objects (as two processes) add pairs, decide, undo and ask for the next pair;
    every answer equals the definition computed from scratch."""
    rng = random.Random(3)
    other = Store(settings.db_path)
    other._MAX_HOLES = 2  # exercise the fallback when too many pairs arrive at once
    make_pairs([rng.choice([None, rng.uniform(0, 3)]) for _ in range(30)], method="csr")
    make_pairs([rng.uniform(0, 3) for _ in range(10)], method="stic")

    def expected(reviewer, method, excluded):
        for pid in store.pair_ids(queue_order=True):
            pair = store.get_pair(pid)
            if method is not None and pair["method"] != method:
                continue
            if pid in excluded or store.reviewer_decision(pid, reviewer) is not None:
                continue
            return pid
        return None

    for step in range(250):
        s = rng.choice([store, other])
        reviewer = rng.choice(["ann", "bob"])
        method = rng.choice([None, "csr"])
        op = rng.random()
        if op < 0.08:
            k = rng.choice([1, 1, 4])
            make_pairs(
                [rng.choice([None, rng.uniform(0, 3)]) for _ in range(k)], method=rng.choice(["csr", "stic"])
            )
        elif op < 0.18:
            decided = [p for p in store.pair_ids() if store.reviewer_decision(p, reviewer) is not None]
            if decided:
                s.add_review(rng.choice(decided), reviewer, "undo")
        else:
            excluded = rng.sample(store.pair_ids(), 2) if rng.random() < 0.2 else []
            got = s.next_pair_id(reviewer, method=method, exclude=excluded)
            assert got == expected(reviewer, method, excluded), step
            if got is not None and rng.random() < 0.8:
                s.add_review(got, reviewer, "accept")
    other.close()


def test_a_pair_made_for_another_prompt_trains_and_exports_with_it(store, make_items, tmp_path):
    """STIC's chosen side answers its step-by-step prompt, not the item's ("Describe the image."):
    the pair's meta pair_prompt is the prompt training and exports use; other pairs keep the item's."""
    from lvlm_studio import io

    stic_item, plain_item = make_items(2, seed0=7000)
    step_by_step = "Describe the image step by step: the subjects, the setting, the colours."
    store.write_generation(stic_item, [{"text": "A red circle.", "source": "stic"},
                                       {"text": "A red circle and a dragon.", "source": "stic"}],
                           [{"chosen": 0, "rejected": 1, "method": "stic", "meta": {"pair_prompt": step_by_step}}])
    store.write_generation(plain_item, [{"text": "A blue star.", "source": "csr"}, {"text": "A cat.", "source": "csr"}],
                           [{"chosen": 0, "rejected": 1, "method": "csr", "meta": {"pair_prompt": "  "}}])
    prompts = {p["method"]: p["prompt"] for p in store.training_pairs(include_auto=True)}
    assert prompts["stic"] == step_by_step
    assert prompts["csr"] == store.get_item(plain_item)["prompt"]  # a blank pair_prompt is no prompt
    io.export_pairs(store, "llava", tmp_path / "out", include_auto=True, methods=["stic"])
    [record] = json.loads((tmp_path / "out" / "llava_dpo.json").read_text())
    assert step_by_step in record["conversations"][0]["value"]


def test_a_relative_data_root_becomes_absolute(tmp_path, monkeypatch):
    """The store keeps adapter and log paths under the data root: they must not depend on the
    working directory of whoever wrote them (round job, app, CLI)."""
    from lvlm_studio.config import Settings

    monkeypatch.chdir(tmp_path)
    settings = Settings(home="storage")
    assert settings.home == tmp_path / "storage" and settings.adapters_dir.is_absolute()
    assert Settings(home="~/x").home == Path.home() / "x"


# Tests from a mutation audit of the store, service, io and training helpers: each fails on a
# mutant the suite above let through.
def test_bulk_reviews_of_more_than_a_thousand_keys_rebuild_the_cache(store, make_pairs):
    """add_reviews touching over 1000 (pair, reviewer) keys rebuilds review_state in one pass
    instead of key by key: the live decisions must come out the same."""
    [pid] = make_pairs([0.1])
    reviews = [{"pair_id": pid, "reviewer": f"r{k}", "decision": "accept"} for k in range(1001)]
    reviews += [{"pair_id": pid, "reviewer": "r0", "decision": "swap"}, {"pair_id": pid, "reviewer": "r0", "decision": "undo"}]
    assert store.add_reviews(reviews) == 1003
    assert len(store.decisions_matrix()[pid]) == 1001 and store.live_decision(pid, "r0") == "accept"
    assert store.next_pair_id("r999") is None and store.next_pair_id("someone-else") == pid
    before = sorted(store.db.execute("SELECT * FROM review_state").fetchall())
    store.rebuild_review_state()
    assert sorted(store.db.execute("SELECT * FROM review_state").fetchall()) == before


def test_training_pairs_filter_by_the_round_that_made_them(store, make_pairs):
    """A round's pair_round option trains on the pairs one round generated."""
    [r0] = make_pairs([0.1], round=0)
    [r1] = make_pairs([0.2], round=1)
    assert [p["pair_id"] for p in store.training_pairs(include_auto=True, round=1)] == [r1]
    assert [p["pair_id"] for p in store.training_pairs(include_auto=True, round=0)] == [r0]
    assert [p["pair_id"] for p in store.training_pairs(include_auto=True)] == [r0, r1]


def test_current_round_is_the_latest_finished_trained_round(store):
    store.ensure_base_round("demo")
    r1 = store.create_round(0, "demo", {}, status="done")
    r2 = store.create_round(r1, "demo", {}, status="done")
    store.create_round(r2, "demo", {}, status="running")
    assert store.current_round()["id"] == r2


def test_a_failed_nested_transaction_undoes_only_its_own_writes(store, settings):
    """Nested transactions are savepoints: an inner failure the caller handles rolls back the
    inner writes and keeps the outer ones."""
    with store.transaction():
        store.add_image("outer", settings.images_dir / "o.png", 1, 1, "t")
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.add_image("inner", settings.images_dir / "i.png", 1, 1, "t")
                raise RuntimeError("boom")
    assert store.get_image("outer") is not None and store.get_image("inner") is None


def test_a_data_root_from_before_studio_meta_migrates_and_keeps_its_data(settings, make_pairs, store):
    [pid] = make_pairs([0.5])
    rid = store.create_round(store.ensure_base_round("m"), "m", {"beta": 0.3}, status="done")
    with store.transaction() as db:  # what a data root written before m002 looks like
        db.execute("DROP TABLE studio_meta")
        db.execute("ALTER TABLE rounds DROP COLUMN cancel_requested")
        db.execute("DELETE FROM _sqlite_migrations WHERE name IN ('m002_studio_meta', 'm003_round_cancel_requested', "
                   "'m004_evaluation_sets')")
    store.close()
    reopened = Store(settings.db_path)
    try:
        assert reopened.applied_migrations() == MIGRATIONS
        round_row = reopened.get_round(rid)
        assert round_row["config"] == {"beta": 0.3} and round_row["cancel_requested"] is None
        reopened.update_round(rid, cancel_requested="2026-01-01T00:00:00")
        assert reopened.get_round(rid)["cancel_requested"] == "2026-01-01T00:00:00"
        assert reopened.get_pair(pid) is not None and reopened.get_meta("demo_seed") is None
        reopened.set_meta("demo_seed", {"done": True})
        reopened.set_meta("demo_seed", {"done": False, "seed": 3})  # replaced, not duplicated
        assert reopened.get_meta("demo_seed") == {"done": False, "seed": 3}
    finally:
        reopened.close()


def test_evaluations_stored_before_sets_were_recorded_get_their_set(settings, store, make_items):
    """A data root from before evaluations were kept per set: a round job's evaluation (no dataset
    or split beside it) gets the set of the round's stored answers, a CLI evaluation the dataset and
    split it kept; then both rounds compare on that set instead of reading as different sets."""
    from lvlm_studio.evaluation import round_evaluations

    items = make_items(2, dataset="world")
    coco = make_items(1, seed0=5, dataset="coco")
    split = store.get_item(items[0])["split"]
    base = store.ensure_base_round("m")
    job = store.create_round(base, "m", {}, status="done")
    untouched = store.create_round(job, "m", {}, status="done")
    api = store.create_round(job, "m", {}, status="done")
    unknown = store.create_round(job, "m", {}, status="done")

    def answer(rid: int, item_ids: list[int]) -> None:
        store.add_eval_outputs(rid, [{"item_id": i, "answer": "A circle.", "objects": [], "hallucinated": []}
                                     for i in item_ids])

    for rid in (base, job, unknown):
        answer(rid, items)
    answer(api, coco)  # an earlier evaluation on coco, then one through the API on the world's items
    answer(api, items)
    cli_eval = {"chair_s": 0.5, "dataset": "world", "split": split, "scenes": 2}
    with store.transaction() as db:  # what such a data root holds
        for rid, metrics in ((base, {"eval": cli_eval}), (job, {"n_pairs": 4, "eval": {"chair_s": 0.25, "n_items": 2}}),
                             (untouched, {"eval": None, "eval_note": "no evaluation items"}),
                             (api, {"eval": {"chair_s": 0.0, "n_items": 2}}), (unknown, {"eval": {"chair_s": 0.1}})):
            db.execute("UPDATE rounds SET metrics = ? WHERE id = ?", (json.dumps(metrics), rid))
        db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm004_evaluation_sets'")
    store.close()
    reopened = Store(settings.db_path)
    try:
        label = f"world/{split}"
        assert round_evaluations(reopened.get_round(base)["metrics"]) == {
            label: {**cli_eval, "set": label, "eval_set": [["world", split]]}}
        job_metrics = reopened.get_round(job)["metrics"]
        assert job_metrics["n_pairs"] == 4 and job_metrics["eval"]["set"] == label
        assert list(round_evaluations(job_metrics)) == [label]
        assert reopened.get_round(untouched)["metrics"] == {"eval": None, "eval_note": "no evaluation items"}
        # Labelled by the answers the latest evaluation wrote (the last n_items), not every answer.
        assert list(round_evaluations(reopened.get_round(api)["metrics"])) == [label]
        # No n_items: which answers it wrote is unknown, so it is left unlabelled, not guessed.
        assert reopened.get_round(unknown)["metrics"] == {"eval": {"chair_s": 0.1}}
    finally:
        reopened.close()


def test_reviewed_pair_labels_and_method_names_in_one_query_each(store, make_pairs):
    """The agreement statistics read every reviewed pair's effective decision in one query (one
    get_pair per reviewed pair took 6.5 s at 100k pairs): it must equal each pair's own label."""
    csr = make_pairs([0.3, None, 0.1, 0.2])
    povid = make_pairs([None, None], method="povid")
    store.add_review(csr[0], "ann", "accept")
    store.add_review(csr[0], "bob", "swap")  # the later reviewer's word is the label
    store.add_review(csr[1], "ann", "reject_both")
    store.add_review(csr[2], "ann", "accept")
    store.add_review(csr[2], "ann", "undo")  # nothing live left on it
    store.add_review(povid[1], "bob", "edit", edited_text="There is a red circle.")
    store.add_review(csr[3], "bob", "accept")
    store.add_review(csr[3], "ann", "swap")
    store.add_review(csr[3], "ann", "undo")  # bob's accept is the live one again
    rows = store.reviewed_pair_labels()
    assert [r["pair_id"] for r in rows] == sorted([csr[0], csr[1], csr[3], povid[1]])
    for row in rows:
        pair = store.get_pair(row["pair_id"])
        assert row["decision"] == pair["label"]["status"] and row["method"] == pair["method"]
        assert row["margin"] == pair["margin"]
    assert store.method_names() == ["csr", "povid"]


def test_review_counts_are_cached_until_a_pair_or_a_review_is_added(store, make_pairs):
    [a, b] = make_pairs([0.1, 0.2])
    first = store.review_counts()
    assert first == {"csr": {"pairs": 2, "reviewed": 0, "usable": 0}}
    first["csr"]["pairs"] = 99  # the caller's copy: the cache is not changed through it
    assert store.review_counts()["csr"]["pairs"] == 2
    store.add_review(a, "ann", "reject_both")
    assert store.review_counts()["csr"] == {"pairs": 2, "reviewed": 1, "usable": 0}
    store.add_review(a, "bob", "accept")
    store.add_review(b, "bob", "swap")
    assert store.review_counts()["csr"] == {"pairs": 2, "reviewed": 2, "usable": 2}
    store.add_review(b, "bob", "undo")
    assert store.review_counts()["csr"] == {"pairs": 2, "reviewed": 1, "usable": 1}
    make_pairs([0.5], method="stic")
    assert store.review_counts() == {"csr": {"pairs": 2, "reviewed": 1, "usable": 1},
                                     "stic": {"pairs": 1, "reviewed": 0, "usable": 0}}
    # A hit: a change the token does not see (pairs are never updated by the store; this test
    # does it by hand) leaves the cached answer, while a fresh store reads the table.
    with store.transaction() as db:
        db.execute("UPDATE pairs SET method = 'povid' WHERE method = 'stic'")
    assert "stic" in store.review_counts()
    other = Store(store.path)
    try:
        assert "povid" in other.review_counts() and "stic" not in other.review_counts()
        other.add_review(a, "carol", "swap")  # another process reviews: the first store's cache is stale
    finally:
        other.close()
    assert store.review_counts()["povid"] == {"pairs": 1, "reviewed": 0, "usable": 0}


def test_pairs_count_the_system_prompt_their_candidates_were_generated_under(store, make_items, monkeypatch):
    """Store.pairs_system_prompts counts pairs by the prompt their chosen candidate recorded (None =
    generated with none); a candidate that records nothing (imported) is not counted. A round job
    warns about, and counts, the pairs made under another prompt than the one it trains with."""
    from lvlm_studio import jobs

    items = make_items(4)
    recorded = [{"system_prompt": "be brief ."}, {"system_prompt": "be brief ."}, {"system_prompt": None}, None]
    pair_ids = []
    for item, params in zip(items, recorded, strict=True):
        chosen = store.add_candidate(item, "a", "model", params=params)
        pair_ids.append(store.add_pair(item, chosen, store.add_candidate(item, "b", "model", params=params), "csr"))
    assert store.pairs_system_prompts(pair_ids) == {"be brief .": 2, None: 1}
    assert store.pairs_system_prompts(pair_ids[3:]) == {} and store.pairs_system_prompts([]) == {}
    pairs = [{"pair_id": pid} for pid in pair_ids]
    said = []
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", "be brief .")
    assert jobs.pairs_under_other_system_prompt(store, pairs, said.append) == 1
    assert said == ["warning: 1 of the 4 pairs were generated under another system prompt than this round trains "
                    "with ('be brief .'): 1 under none"]
    monkeypatch.delenv("LVLM_STUDIO_SYSTEM_PROMPT")
    assert jobs.pairs_under_other_system_prompt(store, pairs, said.append) == 2
    assert said[-1].endswith("(none): 2 under 'be brief .'")
