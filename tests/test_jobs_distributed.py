"""A round with two data-parallel workers (torchrun, gloo on CPU): the same job code that serves
several GPUs. Rank 0 alone writes the store, the curve and the adapter; a cancel stops every worker."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from test_jobs import FAST, LONG, _wait_for_steps, assert_store_intact, make_home

from lvlm_studio import jobs
from lvlm_studio.config import Settings
from lvlm_studio.store import Store

TWO = {**FAST, "num_processes": 2}


def _workers_of(launcher_pid: int) -> list[int]:
    """Live processes whose parent is the launcher (the torchrun workers)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == launcher_pid and stat[0] not in ("Z", "X"):
                out.append(int(proc.name))
    return out


def _start_two_workers(settings: Settings) -> tuple[int, int, list[int]]:
    """A long two-worker round, once it has logged a step: (round id, launcher pid, worker pids)."""
    rid = jobs.start_round(settings, {**LONG, "num_processes": 2})
    _wait_for_steps(settings, rid, 1, timeout=180)
    launcher = jobs.status(settings, rid)["pid"]
    workers = _workers_of(launcher)
    assert len(workers) == 2, workers
    return rid, launcher, workers


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(jobs.process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(jobs.process_running(p) for p in pids)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("ddp"))


def test_job_command_uses_torchrun_for_several_processes():
    assert jobs.job_command(3, "/h")[1:] == ["-m", "lvlm_studio.jobs", "run", "3", "--home", "/h"]
    cmd = jobs.job_command(3, "/h", 4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=4" in cmd
    assert cmd[-6:] == ["-m", "lvlm_studio.jobs", "run", "3", "--home", "/h"]


def test_two_process_round_shards_data_and_writes_once(home):
    settings = home["settings"]
    rid = jobs.start_round(settings, TWO)
    row = jobs.wait(rid, timeout=300, settings=settings)
    log = Path(row["log_path"]).read_text()
    assert row["status"] == "done", (row["error"], log[-3000:])
    # 12 pairs, 4 per worker per step, 2 workers: 2 steps per epoch, 2 epochs (one worker: 6 steps).
    assert row["metrics"]["steps"] == 4 and row["metrics"]["n_pairs"] == home["n_pairs"]
    adapter = Path(row["adapter_path"])
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and (adapter / "adapter_model.safetensors").is_file()
    assert not list(settings.adapters_dir.glob(".round-*"))  # no worker left scratch behind
    store = Store.open(settings)
    try:
        curve = store.round_curve(rid)
        steps = [c["step"] for c in curve if "loss" in c]
        assert steps == [1, 2, 3, 4]  # one record per step: rank 1 wrote nothing
        assert len(store.eval_outputs(rid)) == home["n_eval"]
        assert store.current_round()["id"] == rid
    finally:
        store.close()
    # The adapter loads on top of its parent like any single-process one.
    from lvlm_studio.training import load_base_model, materialize_round_model

    model, _ = materialize_round_model(settings.model, [str(adapter)])
    base = load_base_model(settings.model)[0].state_dict()
    moved = [k for k, v in model.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert moved and all("language_model" in k for k in moved)  # the trained LoRA, merged into its layers


def test_two_process_round_with_the_sft_term_on_some_pairs_only(home):
    """The per-pair SFT trainer under data parallelism: 4 of the 12 pairs are marked unfit to
    imitate, so the term trains on 8 rows, spread over both workers' shards."""
    settings = home["settings"]
    rid = jobs.start_round(settings, {**TWO, "sft_weight": 1.0, "num_epochs": 1})
    row = jobs.wait(rid, timeout=300, settings=settings)
    log = Path(row["log_path"]).read_text()
    assert row["status"] == "done", (row["error"], log[-3000:])
    assert row["metrics"]["n_sft_rows"] == 8 and row["metrics"]["steps"] == 2
    assert "SFT term on 8 of 12 rows" in log


def test_two_process_round_with_povid_two_term_weights(tmp_path):
    """POVID's per-row DPO weights under data parallelism: each worker's reference pass goes
    through the unwrapped model, not the DDP wrapper; both passes must reach the weighted loss."""
    home = make_home(tmp_path)
    settings = home["settings"]
    store = Store.open(settings)
    try:  # 4 noise-term pairs beside the 12 text-term ones
        for pair in store.training_pairs(include_auto=True)[:4]:
            item = store.get_item(pair["item_id"])
            good = store.add_candidate(item["id"], item["reference"] + " That is all.", "reference")
            bad = store.add_candidate(item["id"], "There is a large blue square in the middle.", "povid_noise")
            store.add_pair(item["id"], good, bad, "povid", margin=1.0, meta={"kind": "image"})
    finally:
        store.close()
    rid = jobs.start_round(settings, {**TWO, "sft_weight": 1.0, "num_epochs": 1, "povid_two_term": True})
    row = jobs.wait(rid, timeout=300, settings=settings)
    log = Path(row["log_path"]).read_text()
    assert row["status"] == "done", (row["error"], log[-3000:])
    lineage = json.loads((Path(row["adapter_path"]) / "lineage.json").read_text())
    assert lineage["n_pairs"] == 16 and lineage["dpo_row_weights"] == pytest.approx([2 / 3, 2.0])
    assert row["metrics"]["n_sft_rows"] == 12  # 4 of the 12 text pairs are marked unfit to imitate

    # POVID's two stages on two workers: every worker loads stage 1 (saved by rank 0) for stage 2.
    rid = jobs.start_round(settings, {**TWO, "num_epochs": 1, "povid_stage1_epochs": 1})
    row = jobs.wait(rid, timeout=300, settings=settings)
    log = Path(row["log_path"]).read_text()
    assert row["status"] == "done", (row["error"], log[-3000:])
    # stage 1: the 12 text pairs, 4 per worker per step: 2 steps; stage 2: all 16 pairs, 2 steps
    assert [(s["n_pairs"], s["steps"]) for s in row["metrics"]["povid_stages"]] == [(12, 2), (16, 2)]
    store = Store.open(settings)
    try:
        curve = [c for c in store.round_curve(rid) if "loss" in c]
    finally:
        store.close()
    assert [(c["step"], c["stage"], c["max_steps"]) for c in curve] == [(1, 1, 4), (2, 1, 4), (3, 2, 4), (4, 2, 4)]
    assert json.loads((Path(row["adapter_path"]) / "adapter_config.json").read_text())["r"] == 2 * 16
    assert not list(settings.adapters_dir.glob(".round-*"))  # no stage or worker scratch left


def test_cancel_stops_every_worker(home):
    settings = home["settings"]
    before = jobs.refresh(settings)
    current = max((r["id"] for r in before if r["status"] == "done"), default=None)
    rid, _, workers = _start_two_workers(settings)
    row = jobs.cancel_round(settings, rid, timeout=90, force=False)
    assert row["status"] == "cancelled", row
    assert _wait_gone(workers, 30)
    assert not (settings.adapters_dir / f"round-{rid}").exists()
    assert_store_intact(settings, current)


def test_sigkilled_launcher_stops_its_workers_and_fails_the_round(home):
    settings = home["settings"]
    current = max((r["id"] for r in jobs.refresh(settings) if r["status"] == "done"), default=None)
    rid, launcher, workers = _start_two_workers(settings)
    os.kill(launcher, signal.SIGKILL)  # the launcher alone, as an OOM killer would
    assert _wait_gone(workers, 60)  # they did not train on as orphans
    row = jobs.status(settings, rid)
    assert row["status"] == "failed" and row["adapter_path"] is None, (row["error"], Path(row["log_path"]).read_text()[-3000:])
    assert "launcher" in row["error"] and "died" in row["error"], row["error"]  # recorded by rank 0 itself
    assert not (settings.adapters_dir / f"round-{rid}").exists()
    assert_store_intact(settings, current)


def test_a_cancel_whose_launcher_ends_first_is_still_a_cancel(home):
    """A cancel signals the launcher too, which may end before rank 0 records the stop: the round
    was then recorded 'failed: the launcher died' though a user had cancelled it."""
    settings = home["settings"]
    rid, launcher, workers = _start_two_workers(settings)
    store = Store.open(settings)
    try:
        current = (store.current_round() or {}).get("id")
        store.request_round_cancel(rid)  # as cancel_round records it, before its signals
    finally:
        store.close()
    os.kill(launcher, signal.SIGKILL)  # the launcher gone first
    assert _wait_gone(workers, 60)
    row = jobs.status(settings, rid)
    assert row["status"] == "cancelled" and "launcher" not in (row["error"] or ""), row["error"]
    assert_store_intact(settings, current)
