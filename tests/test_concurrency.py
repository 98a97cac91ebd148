"""Concurrent writers: separate processes, each with its own Store, write at the same time."""

from __future__ import annotations

import multiprocessing as mp
import traceback

from conftest import write_image

from lvlm_studio.config import Settings
from lvlm_studio.store import Store

PROCESSES = 8
WRITES = 200


def _review_worker(db_path, pair_ids, reviewer, barrier, results):
    try:
        store = Store(db_path)
        barrier.wait(timeout=60)  # everyone starts writing at once
        decisions = ("accept", "swap", "reject_both", "edit")
        for k in range(WRITES):
            decision = decisions[k % 4]
            store.add_review(
                pair_ids[k % len(pair_ids)],
                reviewer,
                decision,
                edited_text=f"edit {k}" if decision == "edit" else None,
                note=f"{reviewer}-{k}",
            )
        store.close()
        results.put((reviewer, WRITES, None))
    except Exception:  # noqa: BLE001 - reported to the parent
        results.put((reviewer, 0, traceback.format_exc()))


def test_eight_processes_write_reviews_at_once(store, make_pairs):
    pair_ids = make_pairs([k / 10 for k in range(10)])
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_review_worker, args=(str(store.path), pair_ids, f"r{k}", barrier, results))
        for k in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [err for _, _, err in outcomes if err]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs)

    stats = store.stats()
    assert stats["tables"]["reviews"] == PROCESSES * WRITES == 1600
    assert stats["reviews_by_decision"] == {d: 400 for d in ("accept", "edit", "reject_both", "swap")}
    notes = {r["note"] for pid in pair_ids for r in store.pair_reviews(pid)}
    assert notes == {f"r{p}-{k}" for p in range(PROCESSES) for k in range(WRITES)}  # nothing lost
    matrix = store.decisions_matrix()
    assert all(set(matrix[pid]) == {f"r{k}" for k in range(PROCESSES)} for pid in pair_ids)
    before = sorted(store.db.execute("SELECT * FROM review_state").fetchall())
    store.rebuild_review_state()  # the derived cache stayed exact under contention
    assert sorted(store.db.execute("SELECT * FROM review_state").fetchall()) == before
    assert store.integrity()["integrity_check"] == ["ok"]


def _import_worker(home, folder, barrier, results):
    try:
        from lvlm_studio import io

        settings = Settings(home=home).ensure_dirs()
        store = Store(settings.db_path)
        barrier.wait(timeout=60)
        report = io.import_path(store, settings, folder, "folder")
        store.close()
        results.put((report.imported, report.errors))
    except Exception:  # noqa: BLE001
        results.put((0, [traceback.format_exc()]))


def test_concurrent_imports_of_the_same_folder(settings, tmp_path):
    folder = tmp_path / "imgs"
    for k in range(12):
        write_image(folder / f"{k}.jpg", seed=200 + k)
    Store(settings.db_path).close()  # the parent created the database; children only migrate-check
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_import_worker, args=(str(settings.home), str(folder), barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(errors == [] and imported == 12 for imported, errors in outcomes), outcomes
    store = Store(settings.db_path)
    assert store.stats()["tables"]["images"] == 12 and store.count_items() == 12
    from lvlm_studio.media import stored_files

    assert len(stored_files(settings)) == 12
    store.close()


_SEED_SCRIPT = """
import sys
from lvlm_studio.service import Studio
from lvlm_studio.config import Settings
s = Studio(Settings(home=sys.argv[1]), users={}, admins=())
print(s.seed_demo(n_train=4, n_test=2, pairs_per_method=1, top_up=sys.argv[2] == "cli")["message"])
"""


def test_two_processes_seeding_a_new_data_root_make_each_pair_once(tmp_path):
    """An app start and a `demo seed` at the same moment on a new data root: each used to make the
    demo pairs (duplicates), and one sometimes died with "database is locked" switching the new
    database to WAL. Seeding is now one process at a time and WAL setup retries."""
    import subprocess
    import sys

    home = tmp_path / "fresh"
    procs = [subprocess.Popen([sys.executable, "-c", _SEED_SCRIPT, str(home), who], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in ("app", "cli")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    store = Store(Settings(home=home).db_path)
    try:
        texts = [(p["item_id"], p["chosen"], p["rejected"]) for p in store.training_pairs(include_auto=True)]
        assert texts and len(texts) == len(set(texts))  # no pair twice
        assert store.get_meta("demo_seed")["done"] is True
    finally:
        store.close()
