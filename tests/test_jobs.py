"""Rounds as subprocesses on a tiny LLaVA in a temporary home: full round, SIGKILL, cancel, stale pids."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lvlm_studio import jobs
from lvlm_studio.config import Settings
from lvlm_studio.models.tiny import build_tiny_llava
from lvlm_studio.store import Store
from lvlm_studio.world import world_items

FAST = {"learning_rate": 5e-3, "num_epochs": 2, "batch_size": 4, "include_auto": True, "sft_weight": 0.0,
        "eval_max_new_tokens": 12, "eval_batch_size": 8}
# Long enough to be interrupted mid-training (the job is killed or cancelled long before the end).
LONG = {**FAST, "num_epochs": 400, "eval_parent": False}


def _add(store: Store, home: Path, item: dict, dataset: str, split: str) -> int:
    data = item["image"].tobytes()
    image_id = hashlib.sha256(data).hexdigest()
    path = home / "images" / f"{image_id}.png"
    item["image"].save(path)
    store.add_image(image_id, path, *item["image"].size, source="shapesworld", objects=item["objects"])
    return store.add_item(image_id, item["prompt"], item["reference"], dataset, split, item["meta"])


def _populate(settings: Settings) -> dict:
    store = Store.open(settings)
    try:
        n_pairs = 0
        for i, item in enumerate(world_items("train", n=12, seed=3)):
            item_id = _add(store, settings.home, item, "shapesworld", "train")
            good = store.add_candidate(item_id, item["reference"], "reference")
            bad = store.add_candidate(item_id, item["reference"] + " There is a small green triangle at the top.",
                                      "povid_inject")
            # every third chosen side marked unfit to imitate (as CSR marks poorly rewarded answers)
            store.add_pair(item_id, good, bad, "povid", margin=1.0, meta={"sft": False} if i % 3 == 0 else None)
            n_pairs += 1
        test = world_items("test", n=3, seed=3, kinds=("describe", "pope"))
        for item in test:
            _add(store, settings.home, item, "shapesworld", "test")
        return {"n_pairs": n_pairs, "n_eval": len(test)}
    finally:
        store.close()


def _wait_for_steps(settings: Settings, round_id: int, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = jobs.status(settings, round_id)
        assert row["status"] in jobs.ACTIVE, row
        store = Store.open(settings)
        try:
            if len(store.round_curve(round_id)) >= n:
                return
        finally:
            store.close()
        time.sleep(0.2)
    raise AssertionError(f"round {round_id} logged fewer than {n} steps in {timeout} s")


def make_home(root: Path) -> dict:
    """A data root under ``root`` with a tiny model, 12 pairs (automatic labels) and 9 test items."""
    model = build_tiny_llava(root / "tiny")
    settings = Settings(home=root / "home", model=str(model), device="cpu").ensure_dirs()
    return {"settings": settings, **_populate(settings)}


def assert_store_intact(settings: Settings, previous_round: int | None) -> None:
    """The store passes its integrity checks and ``previous_round`` is still the current one."""
    store = Store.open(settings)
    try:
        assert (store.current_round() or {}).get("id") == previous_round
        integrity = store.integrity()
        assert integrity["integrity_check"] == ["ok"] and integrity["foreign_key_violations"] == []
    finally:
        store.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A home with a tiny model, 12 reviewed-by-default pairs, 9 test items and one finished round."""
    home = make_home(tmp_path_factory.mktemp("jobs"))
    settings = home["settings"]
    t0 = time.monotonic()
    round_id = jobs.start_round(settings, FAST)
    # One job at a time: a second start is refused while the first is queued or running.
    with pytest.raises(jobs.RoundBusyError, match="one training"):
        jobs.start_round(settings, FAST)
    row = jobs.wait(round_id, timeout=240, settings=settings)
    return {**home, "round_id": round_id, "row": row, "seconds": time.monotonic() - t0}


def test_full_round_through_subprocess(trained):
    settings, rid, row = trained["settings"], trained["round_id"], trained["row"]
    log = Path(row["log_path"]).read_text()
    assert row["status"] == "done", (row["error"], log[-3000:])
    assert "Loading weights" not in log and "it/s" not in log  # no library progress bars in a log file
    assert os.environ["LVLM_STUDIO_THREADS"] == "1" and "; 1 torch thread(s)" in log  # the job took the setting
    assert rid == 1 and row["parent_id"] == 0 and row["progress"] == pytest.approx(1.0)
    assert "evaluation images" not in (row["metrics"].get("eval_note") or "")  # train pairs, test evaluation
    adapter = Path(row["adapter_path"])
    assert adapter == settings.adapters_dir / f"round-{rid}"  # storage/adapters/round-N/
    assert (adapter / "adapter_config.json").is_file() and (adapter / "lineage.json").is_file()
    assert Path(row["log_path"]) == settings.runs_dir / f"round-{rid}" / "train.log"
    store = Store.open(settings)
    try:
        assert store.current_round()["id"] == rid
        curve = [c for c in store.round_curve(rid) if "loss" in c]  # the last record is the run summary
        assert len(curve) == 6 and all("rewards/margins" in c for c in curve)
        assert curve[-1]["rewards/margins"] > curve[0]["rewards/margins"]
        metrics = row["metrics"]
        assert metrics["n_pairs"] == trained["n_pairs"] and metrics["steps"] == 6
        assert metrics["n_dropped_by_balance"] == 0  # caption pairs: nothing to balance
        assert "0 left out by balance_answers" in Path(row["log_path"]).read_text()
        assert metrics["n_sft_rows"] == 0  # sft_weight 0: no row has the term
        assert metrics["n_pairs_other_system_prompt"] == 0 and "generated under another system prompt" not in log
        assert f"SFT term on 0 of {metrics['n_rows']} rows; float32 on cpu, gradient checkpointing off" in Path(
            row["log_path"]).read_text()
        assert metrics["hardware"]["dtype"] == "float32" and metrics["hardware"]["gradient_checkpointing"] is False
        ev = metrics["eval"]
        assert ev["extractor"] == "shapesworld" and ev["n_items"] == trained["n_eval"]
        # The evaluation says which set it answered, and is kept under it too.
        assert ev["set"] == "shapesworld/test" and metrics["evals"] == {"shapesworld/test": ev}
        assert {"chair_i", "chair_s", "recall", "pope_accuracy", "pope_yes_ratio"} <= set(ev)
        outputs = store.eval_outputs(rid)
        assert len(outputs) == trained["n_eval"]
        assert {o["meta"]["kind"] for o in outputs} == {"caption", "pope"}
        # The parent (base model, round 0) had no outputs: it was evaluated too, for before/after.
        assert len(store.eval_outputs(0)) == trained["n_eval"]
        assert store.get_round(0)["metrics"]["eval"]["n_items"] == trained["n_eval"]
    finally:
        store.close()
    assert "done" in log and jobs.reattach(settings) is None


def test_sigkill_leaves_round_failed_and_store_consistent(trained):
    settings = trained["settings"]
    rid = jobs.start_round(settings, LONG)
    _wait_for_steps(settings, rid, 2)
    assert jobs.reattach(settings)["id"] == rid
    pid = jobs.status(settings, rid)["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (row := jobs.status(settings, rid))["status"] in jobs.ACTIVE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert row["status"] == "failed" and "SIGKILL" in row["error"], row
    assert row["parent_id"] == trained["round_id"] and row["adapter_path"] is None
    assert not (settings.adapters_dir / f"round-{rid}").exists()
    assert not list(settings.adapters_dir.glob(f".round-{rid}.*"))  # scratch dirs cleaned up
    assert_store_intact(settings, trained["round_id"])  # the previous adapter stays current
    assert jobs.reattach(settings) is None


def test_cancel_stops_cleanly(trained):
    settings = trained["settings"]
    rid = jobs.start_round(settings, LONG)
    _wait_for_steps(settings, rid, 1)
    with pytest.raises(jobs.RoundBusyError):
        jobs.start_round(settings, FAST)
    row = jobs.cancel_round(settings, rid, timeout=60, force=False)
    assert row["status"] == "cancelled", row
    assert "during training" in row["error"]  # the job itself recorded a clean stop, not a kill
    assert not (settings.adapters_dir / f"round-{rid}").exists()
    log = Path(row["log_path"]).read_text()
    assert "SIGTERM" in log
    store = Store.open(settings)
    try:
        assert store.current_round()["id"] == trained["round_id"]
    finally:
        store.close()


def test_a_sigterm_no_cancel_asked_for_fails_the_round_and_says_so(trained):
    """A SIGTERM from outside (the machine shutting down, an admin's kill) was recorded as the
    user's cancel: 'cancelled', as if someone had chosen to drop the round."""
    settings = trained["settings"]
    rid = jobs.start_round(settings, LONG)
    _wait_for_steps(settings, rid, 1)
    os.kill(jobs.status(settings, rid)["pid"], signal.SIGTERM)
    row = jobs.wait(rid, timeout=120, settings=settings)
    assert row["status"] == "failed", row
    assert row["error"].startswith("stopped by SIGTERM, which no cancel asked for (the machine shutting down, or "
                                   "the process stopped by hand); it stopped during training after "), row
    assert not (settings.adapters_dir / f"round-{rid}").exists()
    assert_store_intact(settings, trained["round_id"])


def test_a_round_evaluated_on_its_training_images_says_so(tmp_path):
    settings = make_home(tmp_path)["settings"]  # its own: a finished round here becomes current
    rid = jobs.start_round(settings, {**FAST, "num_epochs": 1, "eval_split": "train", "eval_limit": 6,
                                      "eval_parent": False})
    row = jobs.wait(rid, timeout=240, settings=settings)
    assert row["status"] == "done", row["error"]
    assert "of the round's 12 training rows are on its evaluation images" in row["metrics"]["eval_note"]


def test_a_round_job_takes_the_data_roots_device_when_its_own_is_auto(trained):
    """LVLM_STUDIO_DEVICE reached the job but was never read: with it set, the app generated on
    that device while its rounds took whatever 'auto' found. A device no machine has (cuda:99)
    now fails the round; it trained on the CPU before."""
    import dataclasses

    settings = dataclasses.replace(trained["settings"], device="cuda:99")
    rid = jobs.start_round(settings, {**FAST, "eval_parent": False})
    row = jobs.wait(rid, timeout=240, settings=settings)
    assert row["status"] == "failed" and any(w in row["error"].lower() for w in ("cuda", "nvidia", "device")), row
    assert_store_intact(settings, trained["round_id"])


def test_stale_running_row_of_unknown_process_is_failed(tmp_path):
    settings = Settings(home=tmp_path / "home", model="unused", device="cpu").ensure_dirs()
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = Store.open(settings)
    try:
        store.ensure_base_round("unused")
        rid = store.create_round(0, "unused", {})
        store.update_round(rid, status="running", pid=dead.pid)
    finally:
        store.close()
    # Killed after saving its adapter, before evaluating: the adapter no round points at is removed.
    orphan = settings.adapters_dir / f"round-{rid}"
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"x" * 16)
    # The app's rounds table (Studio.rounds) says so too, as the CLI's `rounds` does.
    from lvlm_studio.service import Studio

    studio = Studio(settings, users={}, admins=())
    try:
        listed = {r["id"]: r for r in studio.rounds()}
        assert listed[rid]["status"] == "failed" and f"pid {dead.pid}" in listed[rid]["error"]
    finally:
        studio.store.close()
    row = jobs.reattach(settings)
    assert row is None
    row = jobs.status(settings, rid)
    assert row["status"] == "failed" and f"pid {dead.pid}" in row["error"]
    assert not orphan.exists()
    # A pid that is alive but belongs to another program is not our job either.
    assert jobs.pid_alive(os.getpid()) is False


def test_job_without_pairs_fails_with_reason(tmp_path):
    model = build_tiny_llava(tmp_path / "tiny")
    settings = Settings(home=tmp_path / "home", model=str(model), device="cpu").ensure_dirs()
    # Refused at the start: no round is created only to fail.
    with pytest.raises(jobs.JobError, match="no training pairs.*for methods csr"):
        jobs.start_round(settings, {"methods": ["csr"]})
    store = Store(settings.db_path)
    assert [r["id"] for r in store.list_rounds()] == [0]
    # The job checks again when it runs (pairs can change while a round is queued): a queued round
    # with nothing to train on fails with the reason.
    rid = store.create_round(0, str(model), {"methods": ["csr"]})
    store.close()
    done = subprocess.run(jobs.job_command(rid, settings.home), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LVLM_STUDIO_MODEL": str(model), "LVLM_STUDIO_DEVICE": "cpu"})
    assert done.returncode != 0
    row = jobs.status(settings, rid)
    assert row["status"] == "failed" and "no training pairs" in row["error"]
    rid_pairs = rid
    # A log that cannot be written (a full disk; /dev/full) hid that reason: the traceback's write
    # failed first, and the round stayed 'running' with no error until the stale check.
    store = Store(settings.db_path)
    rid_full = store.create_round(0, str(model), {"methods": ["csr"]})
    store.close()
    with open("/dev/full", "w") as full:
        done = subprocess.run(jobs.job_command(rid_full, settings.home), stdout=full, stderr=full, timeout=120,
                              env={**os.environ, "LVLM_STUDIO_MODEL": str(model), "LVLM_STUDIO_DEVICE": "cpu"})
    assert done.returncode != 0
    store = Store(settings.db_path)
    row = store.get_round(rid_full)
    store.close()
    assert row["status"] == "failed" and "no training pairs" in row["error"], row
    rid = rid_full
    with pytest.raises(ValueError, match="unknown DPO round option"):
        jobs.start_round(settings, {"learning_rat": 1})
    # POVID's two-stage schedule needs text-hallucinated POVID pairs for stage 1: refused at the
    # start when the round's pairs (here one CSR pair) have none.
    store = Store(settings.db_path)
    item = next(iter(world_items("train", n=1, seed=3)))
    item_id = _add(store, settings.home, item, "shapesworld", "train")
    store.add_pair(item_id, store.add_candidate(item_id, item["reference"], "csr"),
                   store.add_candidate(item_id, item["reference"] + " There is a red star.", "csr"), "csr")
    store.close()
    with pytest.raises(jobs.JobError, match="none of this round's 1 pairs is one"):
        jobs.start_round(settings, {"include_auto": True, "povid_stage1_epochs": 3})
    # Options that cannot train are refused before a round row exists (they used to end as a
    # "done" round with no step, or as a failed one once the job had started).
    for bad, message in (({"num_epochs": 0}, "train nothing"), ({"learning_rate": -1.0}, "learning_rate must be a number > 0 and at most 1")):
        with pytest.raises(ValueError, match=message):
            jobs.start_round(settings, {"include_auto": True, **bad})
    store = Store(settings.db_path)
    assert [r["id"] for r in store.list_rounds()] == [0, rid_pairs, rid]
    store.close()


def test_a_failed_or_cancelled_round_cannot_be_a_parent(tmp_path):
    """A killed round has no adapter; skipping it in the chain would train from its parent under
    its name. Starting from it (or from a round above it) is refused, and nothing is created."""
    settings = Settings(home=tmp_path / "home", device="cpu").ensure_dirs()
    store = Store(settings.db_path)
    base = store.ensure_base_round(settings.model)
    failed = store.create_round(base, "m", {}, status="failed")
    cancelled = store.create_round(base, "m", {}, status="cancelled")
    store.close()
    for parent in (failed, cancelled):
        with pytest.raises(jobs.JobError, match=f"round {parent} is (failed|cancelled), not done: it cannot be a parent"):
            jobs.start_round(settings, {"include_auto": True}, parent_id=parent)
    store = Store(settings.db_path)
    assert len(store.list_rounds()) == 3
    store.close()


def test_a_round_trained_on_another_base_model_is_not_continued_nor_generated_with(tmp_path):
    """A data root whose model changed (LVLM_STUDIO_MODEL, --model): the current round's adapter
    was trained on the old base and does not fit the new one. Continuing from it, or from a
    round above it, and generating with it are refused, nothing is created; round 0 (the base,
    no adapter) and the same model spelt as another path to its folder are fine."""
    from lvlm_studio.service import Studio

    (tmp_path / "llava").mkdir()
    settings = Settings(home=tmp_path / "home", model=str(tmp_path / "llava"), device="cpu").ensure_dirs()
    store = Store(settings.db_path)
    base = store.ensure_base_round("demo")
    old = store.create_round(base, "demo", {}, status="done")
    store.update_round(old, adapter_path=str(tmp_path / "adapters" / "round-1"))
    above = store.create_round(old, str(tmp_path / "llava"), {}, status="done")
    store.close()
    for parent in (None, old, above):  # None: the current round, `above`
        with pytest.raises(jobs.JobError, match=f"round {old} was trained on 'demo', not on '{settings.model}'"):
            jobs.start_round(settings, {"include_auto": True}, parent_id=parent)
    store = Store(settings.db_path)
    assert len(store.list_rounds()) == 3
    jobs.adapter_lineage(store, base, settings.model)  # the base round fits any model
    store.update_round(old, base_model=f"{tmp_path}/home/../llava")
    jobs.adapter_lineage(store, above, str(tmp_path / "llava"))  # one folder, two spellings
    store.update_round(old, base_model="demo")
    store.close()
    studio = Studio(settings)
    try:
        with pytest.raises(jobs.JobError, match="its adapter does not fit this model"):
            studio.backend(settings.model, old)
    finally:
        studio.store.close()


def test_a_round_says_when_it_trained_on_its_evaluation_images():
    material = [{"image_id": "a"}, {"image_id": "b"}, {"image_id": "a"}]
    assert jobs.training_on_evaluation_images(material, [{"image_id": "c"}]) is None
    assert jobs.training_on_evaluation_images(material, [{"image_id": "a"}, {"image_id": "c"}]) == (
        "2 of the round's 3 training rows are on its evaluation images: its metrics are not held out (train on "
        "another split than eval_split)")


def test_refuse_broken_round():
    rows = [{"item_id": 1, "answer": " "}, {"item_id": 2, "answer": ""}]
    with pytest.raises(jobs.JobError, match="answers all 2 evaluation items with nothing"):
        jobs.refuse_broken_round(False, rows)
    with pytest.raises(jobs.JobError, match="training diverged"):
        jobs.refuse_broken_round(True, [{"answer": "There is a red circle."}])
    jobs.refuse_broken_round(False, [*rows, {"item_id": 3, "answer": "No."}])  # one answer is enough
    jobs.refuse_broken_round(False, [])  # nothing evaluated: nothing to judge


def test_a_round_whose_model_answers_nothing_fails_and_is_not_current(tmp_path, monkeypatch):
    """The job body (in this process) trains for real; its evaluation is replaced by one whose
    every answer is empty, as a model wrecked by a huge learning rate gives. The round must fail
    with the reason, store no answers and leave the current round as it was (it used to end
    'done' with CHAIR_s 0 and become the parent of the next round)."""
    import signal

    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    store.ensure_base_round(settings.model)
    rid = store.create_round(0, settings.model, {**FAST, "num_epochs": 1, "eval_parent": False}, status="queued")
    store.close()
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers

    def silent_model(model, processor, model_id, device, items, extractor, cfg, progress, should_stop):
        return {"chair_s": 0.0, "silent": 1.0}, [{"item_id": it["item_id"], "answer": ""} for it in items]

    monkeypatch.setattr(jobs, "_evaluate", silent_model)
    assert jobs.run_round(rid, settings.home) == 1
    store = Store.open(settings)
    try:
        row = store.get_round(rid)
        assert row["status"] == "failed" and "evaluation items with nothing" in row["error"], row
        assert store.current_round() is None and store.eval_outputs(rid) == []
        assert not (settings.adapters_dir / f"round-{rid}").exists()  # the refused adapter is removed
    finally:
        store.close()


def test_a_cancel_or_failure_after_the_adapter_is_saved_leaves_no_adapter(tmp_path, monkeypatch):
    """The job body (in this process) trains for real. A cancel asked for during the evaluation,
    after the job's last look at its stop flag, ends the round 'cancelled', not 'done'; an error
    while evaluating ends it 'failed'. Neither becomes current, and the saved adapter is removed."""
    import signal

    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    store.ensure_base_round(settings.model)
    late_cancel = store.create_round(0, settings.model, {**FAST, "num_epochs": 1, "eval_parent": False})
    store.close()
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    real_evaluate = jobs._evaluate

    def cancel_asked_meanwhile(*args):
        assert (settings.adapters_dir / f"round-{late_cancel}" / "adapter_config.json").is_file()
        _request_cancel(settings, late_cancel)  # as cancel_round records it (its SIGTERM came too late)
        return real_evaluate(*args)

    monkeypatch.setattr(jobs, "_evaluate", cancel_asked_meanwhile)
    assert jobs.run_round(late_cancel, settings.home) == 1
    broken = _active_round(settings, status="queued")
    _set_round(settings, broken, config={**FAST, "num_epochs": 1, "eval_parent": False}, base_model=settings.model)
    monkeypatch.setattr(jobs, "_evaluate", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert jobs.run_round(broken, settings.home) == 1
    store = Store.open(settings)
    try:
        row = store.get_round(late_cancel)
        assert row["status"] == "cancelled" and row["error"] == (
            "cancelled by request as it finished; the adapter was not made current"), row
        row = store.get_round(broken)
        assert row["status"] == "failed" and "No space left on device" in row["error"], row
        assert store.current_round() is None and store.eval_outputs(late_cancel) == []
        assert not list(settings.adapters_dir.glob("*round*"))  # neither adapter, nor scratch
    finally:
        store.close()


def test_a_diverged_round_fails_before_it_is_evaluated(tmp_path, monkeypatch):
    """Training whose last logged loss was NaN fails the round at once: no evaluation is spent on
    the wrecked model, its adapter is deleted and the current round stays as it was."""
    import signal

    from lvlm_studio import training

    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    store.ensure_base_round(settings.model)
    rid = store.create_round(0, settings.model, {**FAST, "eval_parent": False}, status="queued")
    store.close()
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers

    def diverging(pairs, base, chain, out_dir, cfg, on_log=None, should_stop=None):
        Path(out_dir).mkdir(parents=True)
        curve = [{"step": 1, "loss": 0.69}, {"step": 2, "loss_nonfinite": True}]
        return training.TrainResult(str(out_dir), False, 2, len(pairs), len(pairs), curve, 0.1, {})

    monkeypatch.setattr(training, "train_round", diverging)
    monkeypatch.setattr(jobs, "_evaluate", lambda *a, **k: pytest.fail("a diverged round was evaluated"))
    assert jobs.run_round(rid, settings.home) == 1
    store = Store.open(settings)
    try:
        row = store.get_round(rid)
        assert row["status"] == "failed" and "training diverged" in row["error"], row
        assert store.current_round() is None and not (settings.adapters_dir / f"round-{rid}").exists()
    finally:
        store.close()


def test_an_outcome_written_before_a_late_failure_stands(tmp_path, monkeypatch):
    """The job body's failure handler re-reads the round: an outcome already stored (done, or failed
    by whoever saw the launcher die) is not overwritten by a failure that comes after it."""
    import signal

    home = make_home(tmp_path)
    settings = home["settings"]
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    store = Store.open(settings)
    store.ensure_base_round(settings.model)
    outcomes = {"done": {"status": "done", "adapter_path": str(tmp_path / "adapter")},
                "failed": {"status": "failed", "error": "the launcher died"}}
    try:
        for status, fields in outcomes.items():
            rid = store.create_round(0, settings.model, dict(FAST), status="queued")

            def written_then_raises(store_, parent_id, rid=rid, fields=fields):
                store_.update_round(rid, **fields)
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(jobs, "adapter_lineage", written_then_raises)
            assert jobs.run_round(rid, settings.home) == 1
            row = store.get_round(rid)
            assert row["status"] == status and row["error"] == fields.get("error"), row
        rid = store.create_round(0, settings.model, dict(FAST), status="queued")
        monkeypatch.setattr(jobs, "adapter_lineage", lambda *a: (_ for _ in ()).throw(OSError(28, "disk full")))
        assert jobs.run_round(rid, settings.home) == 1
        assert store.get_round(rid)["status"] == "failed" and "disk full" in store.get_round(rid)["error"]
    finally:
        store.close()


def test_a_round_whose_process_cannot_start_fails_and_blocks_nothing(tmp_path, monkeypatch):
    """A start that fails after its round row is created (the run folder cannot be made, the
    process cannot be spawned) ends that round failed with the reason; it used to stay 'queued'
    and refuse every start for the next two minutes."""
    home = make_home(tmp_path)
    settings = home["settings"]
    (settings.runs_dir / "round-1").write_text("a file where the run folder goes")
    with pytest.raises(jobs.JobError, match="could not start the training process: .*File exists"):
        jobs.start_round(settings, FAST)
    row = jobs.status(settings, 1)
    assert row["status"] == "failed" and row["error"].startswith("could not start the job: "), row

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(jobs.JobError, match="Resource temporarily unavailable"):
        jobs.start_round(settings, FAST)  # not "round 1 is already queued"
    assert jobs.status(settings, 2)["status"] == "failed"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jobs.start_round(settings, FAST)
    assert jobs.status(settings, 3)["status"] == "failed"
    store = Store.open(settings)
    try:
        assert store.current_round() is None and store.integrity()["integrity_check"] == ["ok"]
    finally:
        store.close()


def test_stic_stage_two_round_describes_then_fine_tunes_then_describes_first(tmp_path):
    """STIC's stage 2 as a round: the parent model describes each instruction image, the round
    fine-tunes (SFT + LoRA, loss on the answer) on "Image description: ... + question" -> the
    reference answer, and it is evaluated describing before answering each question."""
    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    try:
        for item in world_items("train", n=2, seed=5, kinds=("pope",)):
            _add(store, settings.home, item, "shapesworld", "train")
    finally:
        store.close()
    cfg = {**FAST, "objective": "stic_infusion", "infusion_dataset": "shapesworld", "infusion_limit": 10,
           "max_steps": 2, "learning_rate": 1e-3}
    rid = jobs.start_round(settings, cfg)
    row = jobs.wait(rid, timeout=300, settings=settings)
    assert row["status"] == "done", row.get("error")
    lineage = json.loads((Path(row["adapter_path"]) / "lineage.json").read_text())
    assert lineage["objective"] == "stic_infusion" and lineage["n_rows"] == 10 and lineage["steps"] == 2
    assert row["metrics"]["eval"]["describe_first"] is True
    store = Store.open(settings)
    try:
        assert store.current_round()["id"] == rid and {r["step"] for r in store.round_curve(rid)} == {1, 2}
        probes = [o for o in store.eval_outputs(rid) if (o.get("meta") or {}).get("kind") == "pope"]
        captions = [o for o in store.eval_outputs(rid) if (o.get("meta") or {}).get("kind") == "caption"]
        assert probes and all("description" in o["meta"] for o in probes)
        assert captions and not any("description" in o["meta"] for o in captions)  # a caption is not a question
    finally:
        store.close()
    log = Path(row["log_path"]).read_text()
    assert "instruction items (STIC stage 2)" in log and "Image description:" in log
    # Nothing to fine-tune on: refused before a round is created.
    with pytest.raises(jobs.JobError, match="no instruction items"):
        jobs.start_round(settings, {**cfg, "infusion_split": "nope"})


# --- Gaps found by a mutation audit of lvlm_studio/jobs.py (fast: no training process) -----------


def _bare_home(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", model="unused", device="cpu").ensure_dirs()


@contextmanager
def _bare_store(tmp_path: Path) -> Iterator[tuple[Settings, Store]]:
    settings = _bare_home(tmp_path)
    store = Store.open(settings)
    try:
        yield settings, store
    finally:
        store.close()


def _active_round(settings: Settings, status: str = "running", pid: int | None = None) -> int:
    store = Store.open(settings)
    try:
        base = store.ensure_base_round("unused")
        rid = store.create_round(base, "unused", {})
        if status != "queued" or pid is not None:
            store.update_round(rid, status=status, pid=pid, log_path=str(settings.runs_dir / f"round-{rid}.log"))
        return rid
    finally:
        store.close()


def test_a_fresh_queued_round_blocks_a_second_start_until_its_grace_ends(tmp_path, monkeypatch):
    """A round queued a moment ago (its process not spawned yet) is active: a second start is
    refused and the row is left alone; past QUEUED_GRACE_S without a pid it is a start that died."""
    settings = _bare_home(tmp_path)
    rid = _active_round(settings, status="queued")
    with pytest.raises(jobs.RoundBusyError, match=f"round {rid} is already queued"):
        jobs.start_round(settings, {"include_auto": True})
    assert jobs.status(settings, rid)["status"] == "queued"
    with pytest.raises(TimeoutError, match=f"round {rid} is still queued"):
        jobs.wait(rid, timeout=0.2, settings=settings, poll=0.05)
    monkeypatch.setattr(jobs, "QUEUED_GRACE_S", 0.0)
    row = jobs.status(settings, rid)
    assert row["status"] == "failed" and "queued but its process never started" in row["error"]
    assert jobs.wait(rid, timeout=0, settings=settings)["status"] == "failed"
    with pytest.raises(jobs.JobError, match="round 99 does not exist"):
        jobs.status(settings, 99)


def test_a_dead_child_round_says_how_its_process_ended(tmp_path, monkeypatch):
    settings = _bare_home(tmp_path)
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    for proc in (exited, killed):
        proc.wait()
    rid = _active_round(settings, pid=exited.pid)
    monkeypatch.setitem(jobs._CHILDREN, rid, exited)  # as start_round records its children
    # the trainer's scratch dirs (and those of the older round_N naming) are removed with it
    scratch = [settings.adapters_dir / f".round-{rid}.run-{exited.pid}", settings.adapters_dir / f".round_{rid}.tmp-1"]
    keep = settings.adapters_dir / f".round-{rid + 1}.run-1"  # another round's: left alone
    for path in (*scratch, keep):
        path.mkdir(parents=True)
    row = jobs.status(settings, rid)
    assert not any(path.exists() for path in scratch) and keep.is_dir()
    assert row["status"] == "failed"
    assert row["error"] == (f"the training process (pid {exited.pid}) exited with code 3 before finishing; "
                            f"see the log {settings.runs_dir / f'round-{rid}.log'}")
    rid = _active_round(settings, pid=killed.pid)
    monkeypatch.setitem(jobs._CHILDREN, rid, killed)
    assert f"(pid {killed.pid}) was killed by SIGKILL" in jobs.status(settings, rid)["error"]
    assert rid not in jobs._CHILDREN  # forgotten once its round has an outcome


def test_a_zombie_is_not_a_running_process():
    """An exited child nobody has reaped yet still has a pid (os.kill(pid, 0) succeeds): it is dead."""
    proc = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # wait for the exit, leave the zombie
        assert jobs.process_running(proc.pid) is False
        assert jobs.process_running(os.getpid()) is True
        assert jobs.pid_alive(0) is False and jobs.pid_alive(None) is False  # no pid recorded (0: our own group)
        # Numbers no process has (a hand-edited store): not running, where kill() signalled a
        # process group (0, negatives) or raised OverflowError (beyond pid_t).
        for pid in (0, -1, -os.getpgid(0), 2**40, True):
            assert jobs.process_running(pid) is False and jobs.pid_alive(pid) is False, pid
    finally:
        proc.wait()


def _other_users_process(monkeypatch, proc: subprocess.Popen) -> None:
    """Make ``proc`` look as another user's process does to a non-root app: os.kill raises
    PermissionError (the tests run as root, who may signal anything)."""
    real_kill = os.kill

    def kill(pid, sig):
        if pid == proc.pid:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(jobs.os, "kill", kill)
    monkeypatch.setattr(jobs.os, "killpg", lambda pgid, sig: kill(pgid, sig))


def test_a_stale_pid_reused_by_another_users_program_is_not_a_running_round(tmp_path, monkeypatch):
    """After a crash or reboot a round's pid may belong to another user's program: the round is
    failed, not running forever (which would refuse every later start and make cancel crash)."""
    settings = _bare_home(tmp_path)
    other = subprocess.Popen(["sleep", "60"])
    try:
        _other_users_process(monkeypatch, other)
        rid = _active_round(settings, pid=other.pid)
        assert jobs.pid_alive(other.pid) is False
        assert jobs.status(settings, rid)["status"] == "failed"
        assert jobs.cancel_round(settings, rid, timeout=1)["status"] == "failed"
        assert other.poll() is None  # nothing was signalled
    finally:
        monkeypatch.undo()  # jobs.os is os: signal the process for real again
        other.kill()
        other.wait()


def _fake_job(settings: Settings, code: str, **popen) -> tuple[int, subprocess.Popen]:
    """A running round whose process runs ``code`` under a round job's command line (its round id
    and data root), as pid_alive checks it."""
    rid = _active_round(settings)
    job = subprocess.Popen([sys.executable, "-c", code, *jobs.job_command(rid, settings.home)[2:]],
                           start_new_session=True, **popen)
    _set_round(settings, rid, pid=job.pid)
    return rid, job


def _request_cancel(settings: Settings, rid: int) -> None:
    store = Store.open(settings)
    try:
        assert store.request_round_cancel(rid)["cancel_requested"]
    finally:
        store.close()


def _set_round(settings: Settings, rid: int, **fields) -> None:
    store = Store.open(settings)
    try:
        store.update_round(rid, **fields)
    finally:
        store.close()


def test_another_users_round_job_is_alive_and_cancel_says_whose_it_is(tmp_path, monkeypatch):
    settings = _bare_home(tmp_path)
    rid, job = _fake_job(settings, "import time; time.sleep(60)")
    try:
        _other_users_process(monkeypatch, job)
        assert jobs.pid_alive(job.pid) is True and jobs.status(settings, rid)["status"] == "running"
        with pytest.raises(jobs.JobError, match=f"pid {job.pid}.* belongs to another user"):
            jobs.cancel_round(settings, rid, timeout=1)
        row = jobs.status(settings, rid)
        assert row["status"] == "running" and job.poll() is None
        # the refused request is taken back: the round, reaching its end, is not read as cancelled
        assert row["cancel_requested"] is None
    finally:
        monkeypatch.undo()
        job.kill()
        job.wait()


def test_cancelling_a_round_whose_process_already_died_keeps_its_own_end(tmp_path, monkeypatch):
    """A job killed (the OOM killer's SIGKILL) before anyone looked: a cancel asked afterwards
    finds it gone and records why it ended, not a cancel by request."""
    settings = _bare_home(tmp_path)
    rid, job = _fake_job(settings, "import time; time.sleep(60)")
    monkeypatch.setitem(jobs._CHILDREN, rid, job)
    job.kill()
    job.wait()
    row = jobs.cancel_round(settings, rid, timeout=0)
    assert row["status"] == "failed" and not row["cancel_requested"]
    assert row["error"].startswith(f"the training process (pid {job.pid}) was killed by SIGKILL")


_IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    "print('ready', flush=True); time.sleep(60)")


def test_cancel_waits_for_the_job_and_kills_only_when_forced(tmp_path, monkeypatch):
    settings = _bare_home(tmp_path)
    # A job that does not stop on SIGTERM (e.g. stuck in a long step); its command line names
    # lvlm_studio.jobs, as a round process's does.
    rid, stuck = _fake_job(settings, _IGNORES_SIGTERM, stdout=subprocess.PIPE, text=True)
    # what a trainer killed mid-save leaves: scratch dirs, and an adapter no round points at
    leftovers = [settings.adapters_dir / f".round-{rid}.run-{stuck.pid}", settings.adapters_dir / f"round-{rid}"]
    for path in leftovers:
        path.mkdir(parents=True)
    try:
        assert stuck.stdout.readline().strip() == "ready"
        # timeout 0: ask, then return at once (no SIGKILL, no waiting)
        assert jobs.cancel_round(settings, rid, timeout=0)["status"] == "running"
        assert jobs.cancel_round(settings, rid, timeout=0.3, force=False)["status"] == "running"
        assert stuck.poll() is None and jobs.pid_alive(stuck.pid)
        assert all(path.exists() for path in leftovers)  # nothing removed while it runs
        row = jobs.cancel_round(settings, rid, timeout=0.3)  # force: SIGKILL after the timeout
        assert row["status"] == "cancelled" and row["error"] == "cancelled by request"
        assert stuck.wait(5) == -signal.SIGKILL
        assert not any(path.exists() for path in leftovers)
        assert jobs.cancel_round(settings, rid, timeout=0)["status"] == "cancelled"  # ended: left as it is
    finally:
        if stuck.poll() is None:
            stuck.kill()
        stuck.wait()
    # A job that dies of the SIGTERM before recording anything (its handler not installed yet).
    quiet = subprocess.Popen(["sleep", "30"])
    rid = _active_round(settings, pid=quiet.pid)
    monkeypatch.setitem(jobs._CHILDREN, rid, quiet)
    row = jobs.cancel_round(settings, rid, timeout=10, force=False)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by request"
    assert quiet.wait(5) == -signal.SIGTERM
    # The same asked with timeout 0 (return at once): whoever sees it dead next records the cancel,
    # not a failure.
    quiet = subprocess.Popen(["sleep", "30"])
    rid = _active_round(settings, pid=quiet.pid)
    monkeypatch.setitem(jobs._CHILDREN, rid, quiet)
    jobs.cancel_round(settings, rid, timeout=0)
    assert quiet.wait(5) == -signal.SIGTERM
    row = jobs.status(settings, rid)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by request" and row["cancel_requested"]


def test_a_queued_round_cancelled_before_its_process_runs_stays_cancelled(tmp_path, monkeypatch):
    import signal as signal_module

    settings = _bare_home(tmp_path)
    rid = _active_round(settings, status="queued")  # no pid yet: created, its process not started
    row = jobs.cancel_round(settings, rid, timeout=0)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by request"
    monkeypatch.setattr(signal_module, "signal", lambda *args: None)  # keep pytest's own handlers
    assert jobs.run_round(rid, settings.home) == 0  # the process that starts late does nothing
    assert jobs.status(settings, rid)["status"] == "cancelled"
    # asked while its process was starting: the job itself ends it before training
    rid = _active_round(settings, status="queued")
    _request_cancel(settings, rid)
    assert jobs.run_round(rid, settings.home) == 0
    row = jobs.status(settings, rid)
    assert row["status"] == "cancelled" and row["error"] == "cancelled by request before it started"


def test_a_round_is_alive_only_while_its_own_job_runs(tmp_path):
    """The recorded pid must run this round's job of this data root: a pid reused by another
    round's job (another data root's, say) is not it, and the round is marked failed."""
    settings = _bare_home(tmp_path)
    other_home = tmp_path / "other"
    other_home.mkdir()
    sleep = "import time; time.sleep(60)"
    rid, job = _fake_job(settings, sleep)
    others = [subprocess.Popen([sys.executable, "-c", sleep, *jobs.job_command(*args)[2:]], start_new_session=True)
              for args in ((rid + 100, settings.home), (rid, other_home))]
    try:
        assert jobs.status(settings, rid)["status"] == "running"
        assert jobs.pid_alive(job.pid, rid, settings.home) and jobs.pid_alive(job.pid)
        for other in others:
            assert jobs.pid_alive(other.pid)  # a round job...
            assert not jobs.pid_alive(other.pid, rid, settings.home)  # ...but not this round's
            wrong = _active_round(settings, pid=other.pid)
            row = jobs.status(settings, wrong)
            assert row["status"] == "failed" and f"pid {other.pid}" in row["error"]
            assert other.poll() is None  # and nothing was signalled
    finally:
        for proc in (job, *others):
            proc.kill()
            proc.wait()


def test_a_finished_child_is_reaped_and_forgotten(tmp_path, monkeypatch):
    """The app starts each round's process: once it has exited and its round has an outcome, it
    is reaped (no zombie per round) and forgotten (its pid may later be another round's)."""
    settings = _bare_home(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    rid = _active_round(settings, pid=child.pid)
    monkeypatch.setitem(jobs._CHILDREN, rid, child)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it has exited, nobody reaped it yet
    _set_round(settings, rid, status="done")  # as the job writes before it exits
    assert jobs.status(settings, rid)["status"] == "done"
    assert child.returncode == 0 and rid not in jobs._CHILDREN
    assert not Path(f"/proc/{child.pid}").exists() or jobs.process_running(child.pid)  # not a zombie of ours


@pytest.mark.timeout(60)
def test_adapter_lineage_is_oldest_first_and_checked(tmp_path):
    with _bare_store(tmp_path) as (settings, store):
        base = store.ensure_base_round("unused")
        r1 = store.create_round(base, "unused", {}, status="done")
        store.update_round(r1, adapter_path="/adapters/round-1")
        r2 = store.create_round(r1, "unused", {}, status="done")
        store.update_round(r2, adapter_path="/adapters/round-2")
        assert jobs.adapter_lineage(store, r2) == ["/adapters/round-1", "/adapters/round-2"]
        assert jobs.adapter_lineage(store, base) == [] and jobs.adapter_lineage(store, None) == []
        with pytest.raises(jobs.JobError, match="round 99 does not exist"):
            jobs.adapter_lineage(store, 99)
        # A corrupt table whose parents loop is refused, not walked forever or cut silently.
        store.update_round(r1, parent_id=r2)
        with pytest.raises(jobs.JobError, match="loops back to round"):
            jobs.adapter_lineage(store, r2)
    with pytest.raises(jobs.JobError, match="round 99 does not exist"):
        jobs.start_round(settings, {"include_auto": True}, parent_id=99)


def test_evaluation_set_and_extractor(tmp_path):
    from conftest import image_bytes

    from lvlm_studio.media import ingest_image
    from lvlm_studio.training import DPORoundConfig

    with _bare_store(tmp_path) as (settings, store):
        def item(seed, objects, split="test", kind=None, dataset="d"):
            rec = ingest_image(settings, image_bytes(seed, "PNG"), name=f"{seed}.png")
            store.add_image(rec.id, rec.path, rec.width, rec.height, "test", objects=objects)
            return store.add_item(rec.id, "Describe it.", "ref", dataset, split, {"kind": kind} if kind else None)

        empty = item(1, [])  # ground truth that says "nothing there" is ground truth
        caption = item(2, ["red circle"])
        pope = item(3, ["blue square"], kind="pope")
        item(4, None)  # no ground truth
        item(5, ["red circle"], split="train")
        item(6, ["red circle"], kind="csr_existence")
        item(7, ["red circle"], dataset="other")
        chosen = jobs.eval_items_for(store, DPORoundConfig(eval_dataset="d"))
        assert [it["item_id"] for it in chosen] == [empty, caption, pope]
        assert [it["item_id"] for it in jobs.eval_items_for(store, DPORoundConfig(eval_dataset="d", eval_limit=2))] \
            == [empty, caption]
        assert len(jobs.eval_items_for(store, DPORoundConfig(eval_dataset=None))) == 4
    assert jobs.evaluation_plan("auto", chosen)[0].name == "shapesworld"
    assert jobs.evaluation_plan("auto", [{"objects": []}, {"objects": ["dog", "surfboard"]}])[0].name == "coco"
    assert jobs.evaluation_plan("coco", chosen)[0].name == "coco"
    # A split mixing the world's scenes and COCO items: the larger group is scored and the note says
    # so (COCO's extractor refused the world's objects, failing a round after it had trained).
    coco = [{"objects": ["dog", "surfboard"], "dataset": "coco"}] * 4
    world = [{**it, "dataset": "shapesworld"} for it in chosen if it["objects"]]  # ("nothing there" parses in both)
    extractor, kept, note = jobs.evaluation_plan("auto", [*world, *coco])
    assert extractor.name == "coco" and kept == coco
    assert note == ("the evaluation items mix vocabularies: scored 4 of 6 with the coco extractor; left out the "
                    "items of dataset(s) shapesworld (set eval_dataset to pick one)")
    extractor, kept, note = jobs.evaluation_plan("auto", [*world, *coco[:1]])
    assert extractor.name == "shapesworld" and kept == world and "dataset(s) coco" in note
    assert jobs.evaluation_plan("auto", world)[1:] == (world, None)
    # A named extractor scores what it parses and says what it left out (it failed the round after
    # training); nothing parsed is refused: such a round was scored on 0 items and made current.
    extractor, kept, note = jobs.evaluation_plan("coco", [*world, *coco])
    assert extractor.name == "coco" and kept == coco
    assert note.startswith("the evaluation items are not all in the coco vocabulary: scored 4 of 6")
    unknown = [{"objects": ["widget", "gizmo"], "dataset": "custom"}] * 2
    with pytest.raises(jobs.JobError, match=re.escape(
            "none of the 2 evaluation items has ground-truth objects the shapesworld or coco vocabulary knows "
            "(e.g. 'widget')")):
        jobs.evaluation_plan("auto", unknown)
    with pytest.raises(jobs.JobError, match="the shapesworld vocabulary knows"):
        jobs.evaluation_plan("shapesworld", coco)
    # Images without objects parse in both vocabularies: an imported set's are read with COCO's
    # table (its captions name COCO objects), the world's with its own.
    assert jobs.evaluation_plan("auto", [{"objects": [], "dataset": "coco"}])[0].name == "coco"
    assert jobs.evaluation_plan("auto", [{"objects": [], "dataset": "shapesworld"}])[0].name == "shapesworld"


def test_round_material_for_dpo_and_stic_rounds(tmp_path):
    from lvlm_studio.training import DPORoundConfig

    with _bare_store(tmp_path) as (settings, store):
        items = list(world_items("train", n=4, seed=3))
        ids = [_add(store, settings.home, it, "shapesworld", "train") for it in items[:2]]
        # a CSR pair: a plain (one-stage) round trains on it; POVID's stage 1 is not asked for
        good, bad = (store.add_candidate(ids[0], text, "csr") for text in (items[0]["reference"], "There is a star."))
        store.add_pair(ids[0], good, bad, "csr")
        assert len(jobs.training_material(store, DPORoundConfig(include_auto=True))) == 1
        # STIC stage 2: items with a reference, not CSR's derived yes/no questions, at most the limit
        blank = _add(store, settings.home, {**items[2], "reference": "  "}, "shapesworld", "train")
        derived = _add(store, settings.home, {**items[3], "meta": {"kind": "csr_existence"}}, "shapesworld", "train")
        cfg = DPORoundConfig(infusion_dataset="shapesworld", infusion_limit=None)
        chosen = [it["id"] for it in jobs.infusion_items(store, cfg)]
        assert chosen == ids and blank not in chosen and derived not in chosen
        assert [it["id"] for it in jobs.infusion_items(store, DPORoundConfig(infusion_dataset="shapesworld",
                                                                             infusion_limit=1))] == ids[:1]


def test_an_evaluation_set_chosen_by_hand_that_selects_nothing_is_refused_before_the_round(tmp_path):
    """A mistyped eval_split / eval_kinds / eval_dataset gave a round that ended 'done' with no
    evaluation; the defaults selecting nothing (no test split) still train, unevaluated."""
    from lvlm_studio.training import DPORoundConfig

    with _bare_store(tmp_path) as (settings, store):
        _populate(settings)  # train pairs; test items: describe and pope, with objects
        refusals = {
            "no item is in split 'tset' (splits in the store: test, train)": {"eval_split": "tset"},
            "no item is in split 'test' of dataset 'coco': the store has no such dataset (its datasets: "
            "shapesworld)": {"eval_dataset": "coco"},
            "no item is in split 'val' of dataset 'shapesworld' (its splits: test, train)": {
                "eval_dataset": "shapesworld", "eval_split": "val"},
            "no item of split 'test' with ground-truth objects is of a kind in eval_kinds ['descibe'] "
            "(kinds there: describe, pope)": {"eval_kinds": ["descibe"]},
        }
        for message, change in refusals.items():
            with pytest.raises(jobs.JobError, match="the evaluation set is empty: " + re.escape(message)):
                jobs.start_round(settings, {**FAST, **change})
        # An extractor chosen by hand that knows none of the set's objects (the world's scenes read
        # with COCO's table): refused, not trained and then 'not evaluated'.
        with pytest.raises(jobs.JobError, match="evaluation items has ground-truth objects the coco vocabulary knows"):
            jobs.start_round(settings, {**FAST, "extractor": "coco"})
        assert [r["id"] for r in store.list_rounds()] == [0]  # no round row was created
        jobs.check_evaluation_choice(store, DPORoundConfig(eval_kinds=["pope"]))  # a subset that selects items
        store.db.execute("UPDATE items SET split = 'val' WHERE split = 'test'")
        jobs.check_evaluation_choice(store, DPORoundConfig())  # the default selecting nothing: allowed
        jobs.check_evaluation_choice(store, DPORoundConfig(eval_split="val"))
        # Test items whose ground truth no vocabulary knows: chosen by hand, refused before the round
        # (it trained, was scored on 0 items and became current as if evaluated); the default set
        # is allowed, and the round says it was not evaluated (tests/test_jobs.py, below).
        store.db.execute("UPDATE items SET split = 'test' WHERE split = 'val'")
        store.db.execute("""UPDATE images SET objects = '["widget"]'""")
        with pytest.raises(jobs.JobError, match="evaluation items has ground-truth objects the shapesworld or coco"):
            jobs.start_round(settings, {**FAST, "eval_dataset": "shapesworld"})
        assert [r["id"] for r in store.list_rounds()] == [0]
        jobs.check_evaluation_choice(store, DPORoundConfig())


def test_a_round_on_a_default_set_no_vocabulary_knows_trains_and_says_it_was_not_evaluated(tmp_path):
    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    try:
        store.db.execute("""UPDATE images SET objects = '["widget"]'""")
    finally:
        store.close()
    rid = jobs.start_round(settings, {**FAST, "num_epochs": 1})
    row = jobs.wait(rid, timeout=300, settings=settings)
    assert row["status"] == "done", row["error"]
    assert row["metrics"]["eval"] is None
    assert row["metrics"]["eval_note"].startswith("not evaluated: none of the 9 evaluation items has ground-truth "
                                                  "objects the shapesworld or coco vocabulary knows (e.g. 'widget')")
    store = Store.open(settings)
    try:
        assert store.eval_outputs(rid) == []
        # An empty evaluation set: the note names the sets that have ground truth, and how to pick one.
        store.db.execute("UPDATE items SET split = 'val' WHERE split = 'test'")
        from lvlm_studio.training import DPORoundConfig

        assert jobs.no_evaluation_items_note(store, DPORoundConfig()) == (
            "no evaluation items (split 'test' with ground-truth objects); sets with ground-truth objects here: "
            "shapesworld/train, shapesworld/val (--config eval_dataset=D --config eval_split=S)")
    finally:
        store.close()


def test_a_parent_evaluated_on_another_set_only_is_evaluated_on_the_rounds_set_too(tmp_path):
    """A parent whose stored answers are on another set (here: the base model evaluated on the train
    split) used to count as evaluated, so its child's figures on the test set had nothing to be
    compared with. It is evaluated on the test set now, and keeps its figures on the other set."""
    from lvlm_studio.evaluation import round_evaluations, with_evaluation
    from lvlm_studio.service import Studio

    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    try:
        train_item = store.list_items(split="train")[0]
        store.ensure_base_round(settings.model)
        store.add_eval_outputs(0, [{"item_id": train_item["id"], "answer": "There is a red circle.",
                                    "objects": ["red circle"], "hallucinated": []}])
        train_eval = {"chair_s": 0.0, "n_items": 1, "set": "shapesworld/train", "eval_set": [["shapesworld", "train"]]}
        store.update_round(0, metrics=with_evaluation(None, train_eval))
    finally:
        store.close()
    rid = jobs.start_round(settings, {**FAST, "num_epochs": 1})
    row = jobs.wait(rid, timeout=300, settings=settings)
    assert row["status"] == "done", row["error"]
    studio = Studio(settings, users={}, admins=())
    try:
        base = round_evaluations(studio.store.get_round(0)["metrics"])
        assert list(base) == ["shapesworld/train", "shapesworld/test"] and base["shapesworld/train"] == train_eval
        assert base["shapesworld/test"]["n_items"] == home["n_eval"]
        assert len(studio.store.eval_outputs(0)) == home["n_eval"] + 1
        res = studio.compare(0, rid)  # both on the round's set, the base's train answer left out
        assert res["set"] == "shapesworld/test" and res["sets"] == ["shapesworld/test"]
        assert res["answered"] == (home["n_eval"], home["n_eval"]) and res["note"] is None
        assert [m["answers"] for m in res["metrics"]] == [home["n_eval"], home["n_eval"]]
    finally:
        studio.store.close()


def test_a_parent_is_answered_as_it_is_used_at_its_childs_length(monkeypatch):
    """A parent evaluated by its child's job is answered in its own mode (describe-first only for a
    STIC stage-2 parent; round 0 plainly, as ``Studio.evaluate`` answers it) at the child's answer
    length, which its figures record; it used to take the child's describe-first mode."""
    from lvlm_studio import evaluation
    from lvlm_studio.models import hf
    from lvlm_studio.training import DPORoundConfig

    asked = []
    monkeypatch.setattr(hf, "HFBackend", lambda *a: None)
    monkeypatch.setattr(evaluation, "evaluate_backend",
                        lambda backend, items, extractor, params, *a, describe_prompt=None: (
                            asked.append((describe_prompt, params.max_new_tokens)) or {}, []))
    stage2 = DPORoundConfig(objective="stic_infusion", eval_max_new_tokens=40)
    plain = DPORoundConfig()
    for mode_of in (None, {"id": 0, "config": {}}, {"id": 1, "config": plain.to_dict()},
                    {"id": 2, "config": stage2.to_dict()}):
        metrics, _ = jobs._evaluate(None, None, "m", "cpu", [], None, stage2, None, lambda: False, mode_of=mode_of)
        assert metrics == {"describe_first": asked[-1][0] is not None, "max_new_tokens": 40}
    assert asked == [(stage2.describe_prompt, 40), (None, 40), (None, 40), (stage2.describe_prompt, 40)]


def test_a_parent_counts_as_evaluated_only_on_the_same_set_with_every_item_answered(tmp_path):
    from lvlm_studio.evaluation import with_evaluation

    store = Store.open(Settings(home=tmp_path / "home").ensure_dirs())
    try:
        home = Settings(home=tmp_path / "home")
        items = [{**it, "item_id": _add(store, home.home, it, "shapesworld", "test"), "split": "test",
                  "dataset": "shapesworld"} for it in world_items("test", n=1, seed=3, kinds=("describe", "pope"))]
        base = store.ensure_base_round("m")
        answers = [{"item_id": it["item_id"], "answer": "Yes.", "objects": [], "hallucinated": []} for it in items]
        store.add_eval_outputs(base, answers)
        other = {"chair_s": 0.0, "set": "coco/val", "eval_set": [["coco", "val"]]}
        store.update_round(base, metrics=with_evaluation(None, other))
        assert not jobs.parent_evaluated_on(store, store.get_round(base), items)  # answered, on another set's record
        smaller = {"chair_s": 0.0, "set": "shapesworld/test", "eval_set": [["shapesworld", "test"]], "n_items": 1}
        store.update_round(base, metrics=with_evaluation(store.get_round(base)["metrics"], smaller))
        # its figures on the set cover one item (a later, smaller evaluation): evaluated again
        assert not jobs.parent_evaluated_on(store, store.get_round(base), items)
        same = {**smaller, "n_items": len(items)}
        store.update_round(base, metrics=with_evaluation(store.get_round(base)["metrics"], same))
        assert jobs.parent_evaluated_on(store, store.get_round(base), items)
        store.db.execute("DELETE FROM eval_outputs WHERE item_id = ?", (items[-1]["item_id"],))
        assert not jobs.parent_evaluated_on(store, store.get_round(base), items)  # an item unanswered
    finally:
        store.close()


def test_a_new_round_never_takes_the_id_of_a_folder_on_disk(tmp_path, monkeypatch):
    """A store restored from a backup (or replaced) beside its data root's folders gave a new round
    the id of an old adapter folder: the round refused to overwrite it, then its cleanup deleted it
    (and merged/, chains/ would have served the old weights as the new round's)."""
    with _bare_store(tmp_path) as (settings, store):
        _populate(settings)
        old = settings.home / "adapters" / "round-4"
        old.mkdir(parents=True)
        (old / "adapter_model.safetensors").write_bytes(b"an older round's weights")
        (settings.home / "chains" / ".round-6.tmp-123-4").mkdir(parents=True)  # a killed writer's scratch
        (settings.home / "merged" / "round-2").mkdir(parents=True)
        (settings.home / "adapters" / "notes-round-9").mkdir()  # not a round folder
        (settings.home / "runs" / "round-12").write_text("a file, not a round's folder")
        assert jobs._highest_round_folder(settings.home) == 6
        monkeypatch.setattr(jobs, "_spawn", lambda *a, **k: subprocess.Popen(["true"]))  # no job: the id is the point
        rid = jobs.start_round(settings, FAST)  # the store holds round 0 only: it would have been round 1
        assert rid == 7
        store.update_round(rid, status="failed", error="test")
        jobs.remove_leftovers(store, rid)
        assert (old / "adapter_model.safetensors").read_bytes() == b"an older round's weights"
        assert store.create_round(0, "unused", {}, status="failed", min_id=9) == 9
        assert store.create_round(0, "unused", {}, status="failed", min_id=2) == 10  # above every round, too


def test_the_job_process_leaves_a_round_that_is_not_queued_alone(tmp_path):
    with _bare_store(tmp_path) as (settings, store):
        base = store.ensure_base_round("unused")
        rid = store.create_round(base, "unused", {}, status="cancelled")
    done = subprocess.run(jobs.job_command(rid, settings.home), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "not queued: nothing to do" in done.stdout
    assert jobs.status(settings, rid)["status"] == "cancelled"
    missing = subprocess.run(jobs.job_command(99, settings.home), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "round 99 does not exist" in missing.stderr


def test_the_job_runs_this_package_whatever_the_working_directory(tmp_path, monkeypatch):
    """`python -m` puts the working directory first on the import path: started from a folder
    holding another lvlm_studio (an old checkout), the job would run that code instead."""
    settings = _bare_home(tmp_path)
    shadow = tmp_path / "elsewhere" / "lvlm_studio"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("print('SHADOW package')\n")
    (shadow / "jobs.py").write_text("print('SHADOW jobs')\n")
    monkeypatch.chdir(shadow.parent)
    rid = _active_round(settings, status="queued")
    monkeypatch.setattr(jobs, "job_command", lambda *args: [sys.executable, "-m", "lvlm_studio.jobs", "--help"])
    store = Store.open(settings)
    try:
        proc = jobs._spawn(settings, store, rid, 1)
        assert proc.wait(60) == 0
        log = Path(store.get_round(rid)["log_path"]).read_text()
    finally:
        store.close()
    assert "SHADOW" not in log and "usage: python -m lvlm_studio.jobs" in log, log
