"""The service-layer CLI commands: demo build/seed, generate, train/cancel/rounds, eval, compare,
serve. Tiny random models built here (a tiny LLaVA over the world's words, a tiny open_clip),
passed as --model PATH / --clip PATH; every test runs in its own data root."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import REPO_ROOT
from test_clip import save_tiny_clip
from typer.testing import CliRunner

from lvlm_studio.cli import Progress, app, mark_hallucinations
from lvlm_studio.config import Settings
from lvlm_studio.store import Store

torch.set_num_threads(1)
runner = CliRunner()

# A DPO round that ends in seconds on the tiny model (2 steps, 4 evaluation items).
FAST_ROUND = ["-c", "max_steps=2", "-c", "batch_size=4", "-c", "eval_limit=4", "-c", "eval_max_new_tokens=6"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert data["ok"] is True
    return data


def fails(*args: str, message: str, json_too: bool = True, code: int | None = None) -> str:
    """The command exits 1 (a failure) or 2 (a bad option value: a usage error, as the README
    says) with one clear 'error:' line on stderr and no traceback; ``code`` pins which."""
    result = run(*args)
    assert result.exit_code in ((code,) if code else (1, 2)), (result.stdout, result.stderr)
    expected = result.exit_code
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    if json_too:
        result = run(*args, "--json")
        assert result.exit_code == expected
        data = json.loads(result.stdout)
        assert data["ok"] is False and message in data["error"]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(vlm dir, clip dir): a random tiny LLaVA over ShapesWorld's words and a tiny open_clip."""
    from lvlm_studio.models.tiny import build_tiny_llava
    from lvlm_studio.world import world_words

    root = tmp_path_factory.mktemp("cli_models")
    return str(build_tiny_llava(root / "vlm", words=world_words())), str(save_tiny_clip(root / "clip"))


@pytest.fixture
def env(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id must fail at once, not try the network
    monkeypatch.setenv("LVLM_STUDIO_THREADS", "1")  # round subprocesses share the 2 cores
    for var in ("LVLM_STUDIO_USERS", "LVLM_STUDIO_USERS_FILE", "LVLM_STUDIO_ADMINS", "LVLM_STUDIO_USER",
                "LVLM_STUDIO_MODEL", "LVLM_STUDIO_CLIP"):
        monkeypatch.delenv(var, raising=False)
    return home


def open_store(home) -> Store:
    return Store(Settings(home=home).db_path)


def seed(train: int = 4, test: int = 2) -> dict:
    return ok_json("demo", "seed", "--train", train, "--test", test, "--pairs", 0)


# ----------------------------------------------------------------------------------------------
def test_help_in_a_real_process():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lvlm_studio", "--help"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("init", "import", "export", "stats", "demo", "generate", "train", "cancel", "rounds",
                    "compare", "eval", "serve"):
        assert f" {command} " in proc.stdout, command


def test_demo_seed_then_resumable_povid_generation(env):
    first = seed(train=4, test=2)
    store = open_store(env)
    n_items = store.count_items()
    assert first["items"] == n_items > 0 and first["tables"]["items"] == n_items
    assert store.count_items(split="test") > 0 and store.count_pairs() == 0
    assert seed()["items"] == 0 and store.count_items() == n_items  # idempotent
    text = run("demo", "seed", "--train", "4", "--test", "2", "--pairs", "0").stdout
    assert "the demo world was seeded before: 0 new scene items, new pairs: none" in text

    povid = ["generate", "--method", "povid", "--param", "make_image_rejected=false", "--seed", "7"]
    part = ok_json(*povid, "--n", "2")
    assert part["items"] == 2 and part["pairs"] == 2 and part["skipped"] == 0 and part["round"] == 0
    assert part["model"] == "demo"  # --json names the model used, the default one too
    rest = ok_json(*povid)  # resumes: the 2 done items are skipped, the other 2 train items run
    assert rest["items"] == 2 and rest["skipped"] == 2 and rest["pairs"] == 2
    assert store.count_pairs(method="povid") == 4
    train_items = {it["id"] for it in store.list_items(split="train")}
    assert store.items_with_pairs("povid", 0) <= train_items  # default split: train only
    text = run(*povid).stdout
    assert "nothing to do" in text and "4 items already have povid pairs" in text
    pair = store.get_pair(store.pair_ids()[0])
    rejected = store.get_candidate(pair["rejected"]["id"])
    # the run's seed on the pair; the candidate's own draw seed is the item's in that run
    from lvlm_studio.service import item_seed

    assert pair["meta"]["seed"] == 7 and rejected["seed"] == item_seed(7, {"id": pair["item_id"]})
    assert rejected["params"]["method"] == "povid"
    store.close()


def test_generate_csr_and_stic_with_tiny_models(env, tiny):
    vlm, clip = tiny
    seed(train=4, test=1)
    store = open_store(env)
    ids = [it["id"] for it in store.list_items(split="train") if it["meta"]["kind"] == "describe"]
    csr = ok_json("generate", "--method", "csr", "--model", vlm, "--clip", clip, "--items", f"{ids[0]},{ids[1]}",
                  "--seed", "3", "-p", "num_candidates=2", "-p", "max_sentences=2", "-p", "max_new_tokens=6")
    assert csr["items"] == 2 and csr["pairs"] + csr["no_pair"] == 2 and csr["pairs"] >= 1
    assert csr["model"] == vlm
    pair = store.get_pair(store.pair_ids()[0])
    chosen = store.get_candidate(pair["chosen"]["id"])
    assert chosen["source"] == "csr" and chosen["model"] == vlm and chosen["seed"] == 3
    assert chosen["params"]["num_candidates"] == 2 and all(s["reward"] is not None for s in chosen["sentences"])
    again = run("generate", "--method", "csr", "--model", vlm, "--clip", clip, "--items", f"{ids[0]},{ids[1]}")
    assert again.exit_code == 0 and "nothing to do (2 items already have csr pairs" in again.stdout

    stic = ok_json("generate", "--method", "stic", "--model", vlm, "--split", "all", "--n", "2",
                   "-p", "max_new_tokens=4")
    assert stic["items"] == 2 and stic["pairs"] + stic["no_pair"] == 2
    assert store.count_pairs(method="stic") == stic["pairs"]
    store.close()


def test_generate_user_errors(env, tiny):
    seed(train=2, test=1)
    line = fails("generate", "--method", "stic", "--model", "no-such-org/no-such-model",
                 message="Could not load model 'no-such-org/no-such-model'")
    assert "HF_HUB_OFFLINE" in line
    fails("generate", "--method", "stic", "--model", "./not/here", message="No model directory at './not/here'")
    fails("generate", "--method", "dpo", message="unknown method 'dpo'", code=2)
    fails("generate", "--method", "csr", "--param", "num_candidates", message="expected key=value (e.g. --param num_candidates=VALUE)", code=2)
    fails("generate", "--method", "csr", "--param", "candidates=3", message="unknown csr option", code=2)
    fails("generate", "--method", "csr", "--param", "num_candidates=many", message='num_candidates="many": expected int', code=2)
    fails("generate", "--method", "povid", "--items", "1,x", message="comma-separated integers", code=2)
    fails("generate", "--method", "povid", "--items", "1", "--dataset", "d", message="either --items or --dataset", code=2)
    fails("generate", "--method", "povid", "--items", "999", message="unknown item id(s): [999]")
    assert open_store(env).count_pairs() == 0


def test_backend_setting_errors(env, tiny, monkeypatch):
    seed(train=2, test=1)
    monkeypatch.setenv("LVLM_STUDIO_BACKEND", "vllm")
    fails("generate", "--method", "stic", "--model", tiny[0], message="needs the 'vllm' package (CUDA only)")
    monkeypatch.setenv("LVLM_STUDIO_BACKEND", "VLLM")
    fails("stats", message="LVLM_STUDIO_BACKEND must be one of hf, vllm, not 'VLLM'")
    # python app.py with a bad setting: one line on stderr and exit 1, no traceback.
    env_vars = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "app.py")], capture_output=True, text=True,
                          env=env_vars, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "LVLM Studio cannot start: LVLM_STUDIO_BACKEND must be one of hf, vllm, not 'VLLM'")
    monkeypatch.delenv("LVLM_STUDIO_BACKEND")
    # A bad PORT (a PaaS sets it) stops app.py the same way, before the store is seeded.
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "app.py")], capture_output=True, text=True,
                          env={**env_vars, "LVLM_STUDIO_BACKEND": "hf", "PORT": "0"}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "LVLM Studio cannot start: PORT must be a positive whole number (e.g. 7860), not '0'")
    assert open_store(env).count_pairs() == 0


def test_train_wait_rounds_eval_and_compare(env, tiny):
    vlm, _ = tiny
    seed(train=4, test=2)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")

    done = ok_json("train", "--model", vlm, "--include-auto", "--methods", "povid", *FAST_ROUND, "--wait")
    round_id = done["round"]
    assert round_id == 1 and done["status"] == "done" and done["parent"] == 0
    assert done["pairs"] == 4 and done["metrics"]["steps"] == 2
    # eval_limit=4 takes whole scenes (a caption and its 2 probes): one scene, not a second's caption
    assert done["metrics"]["eval"]["n_items"] == 3 and done["chair_s"] is not None

    rounds = ok_json("rounds")["rounds"]
    assert [r["id"] for r in rounds] == [0, 1]
    assert rounds[1]["status"] == "done" and rounds[1]["progress"] == 1.0 and rounds[1]["pairs"] == 4
    assert rounds[1]["config"]["methods"] == ["povid"] and rounds[1]["config"]["max_steps"] == 2
    table = run("rounds").stdout
    assert "CHAIR_s" in table and "POPE F1" in table and "\n1   0       done    100%" in table

    store = open_store(env)
    before = {r["item_id"]: r["answer"] for r in store.eval_outputs(round_id)}
    ev = ok_json("eval", "--round", round_id, "--n", "3", "--max-new-tokens", "6")
    # 3 scenes: 2 were seeded, the third is added (a describe item and its POPE probes).
    assert ev["added"] > 0 and ev["items"] == ev["metrics"]["n_items"] == 3 * 3
    assert ev["metrics"]["n_captions"] == 3 and ev["metrics"]["pope_n"] == 6
    assert 0 <= ev["metrics"]["pope_n_empty"] <= 6  # counted (POPE reads an empty answer as yes)
    # One answer per item: the 4 the round job answered are answered again (replaced), 5 are new.
    after = [r["item_id"] for r in store.eval_outputs(round_id)]
    assert len(after) == len(set(after)) == 9 and set(before) < set(after)
    stored = store.get_round(round_id)["metrics"]["eval"]
    assert stored["scenes"] == 3 and stored["split"] == "test" and stored["model"] == vlm
    assert store.get_round(round_id)["metrics"]["n_pairs"] == 4  # training metrics kept
    human = run("eval", "--round", "0", "--model", vlm, "--n", "3", "--max-new-tokens", "6")
    assert human.exit_code == 0 and "POPE yes-ratio" in human.stdout and "0 items added" in human.stdout
    assert "POPE answers saying nothing (read as yes)" in human.stdout
    assert store.get_round(0)["metrics"]["eval"]["n_items"] == 9

    cmp = ok_json("compare", "0", str(round_id))
    assert [m["round"] for m in cmp["metrics"]] == [0, round_id]
    assert cmp["items"] == 3 and all(r["a"] and r["b"] for r in cmp["rows"])  # describe items only
    text = run("compare", "0", str(round_id), "--limit", "1").stdout
    assert "showing 1" in text and f"  {round_id}: " in text
    fails("eval", "--round", "7", message="round 7 does not exist")
    fails("eval", "--split", "val", message="unknown split 'val'")
    fails("compare", "0", "9", message="round 9 does not exist")
    store.close()
    # POVID's two stages (max_steps caps each stage): --wait names them.
    staged = run("train", "--model", vlm, "--include-auto", "--methods", "povid", *FAST_ROUND,
                 "-c", "povid_stage1_epochs=1", "--wait")
    assert staged.exit_code == 0, staged.output
    assert "4 steps on 4 pairs" in staged.stdout and "POVID stages: 1: 4 pairs, 2 steps; 2: 4 pairs, 2 steps" in staged.stdout


def test_train_refusals_and_roles(env, tiny, monkeypatch):
    vlm, _ = tiny
    seed(train=2, test=1)
    fails("train", "--model", vlm, message="no training pairs")
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    fails("train", "--model", vlm, "--include-auto", "-c", "learning_rate=fast", message="expected float")
    fails("train", "--model", vlm, "--include-auto", "-c", "lr=1", message="unknown DPO round option")
    fails("train", "--model", vlm, "--include-auto", "--from-round", "4", message="round 4 does not exist")
    fails("cancel", "5", message="round 5 does not exist")
    monkeypatch.setenv("LVLM_STUDIO_USERS", "alice:pw:admin,bob:pw:reviewer")
    fails("train", "--model", vlm, "--include-auto", "--user", "bob", message="needs the admin role; 'bob' has the reviewer role")
    # the role is checked first: a reviewer is not told about pairs (it said "no training pairs" here)
    fails("train", "--model", vlm, "--methods", "stic", "--user", "bob", message="needs the admin role")
    monkeypatch.setenv("LVLM_STUDIO_USER", "bob")
    fails("cancel", "0", message="needs the admin role")
    assert [r["id"] for r in open_store(env).list_rounds()] == [0]  # nothing was started


def test_start_busy_and_cancel_a_running_round(env, tiny):
    vlm, _ = tiny
    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    started = ok_json("train", "--model", vlm, "--include-auto", "-c", "num_epochs=400", "-c", "eval_parent=false")
    rid = started["round"]
    assert started["status"] == "queued" and started["pid"] and started["pairs"] == 2
    # The pid is in `rounds --json` too (a round started elsewhere, or before a restart).
    assert ok_json("rounds")["rounds"][1]["pid"] == started["pid"]
    fails("train", "--model", vlm, "--include-auto", message=f"round {rid} is already", json_too=False, code=1)
    cancelled = ok_json("cancel", str(rid), "--timeout", "30")
    assert cancelled["was"] in ("queued", "running") and cancelled["status"] == "cancelled"
    store = open_store(env)
    assert store.get_round(rid)["status"] == "cancelled" and store.current_round() is None
    assert "nothing to cancel" in run("cancel", str(rid)).stdout
    assert ok_json("rounds")["rounds"][1]["status"] == "cancelled"
    store.close()


def test_compare_reports_pope_f1_probe_by_probe(env):
    """POPE probes both rounds answered: their F1s and the paired bootstrap line, in text and JSON."""
    from lvlm_studio.service import Studio

    seed(train=1, test=2)
    studio = Studio(Settings(), users={}, admins=())
    # one probe of each of two images (the bootstrap draws images: one image leaves nothing to test)
    probes = list({studio.store.get_item(p["item_id"])["image_id"]: p for p in studio.eval_items(kinds=("pope",))
                   }.values())[:2]
    r1 = studio.store.create_round(0, "m", {}, status="done")
    for rid, answers in ((0, ("yes", "yes")), (r1, ("yes", "no"))):  # labels yes / no
        studio.store.add_eval_outputs(rid, [
            {"item_id": item["item_id"], "answer": said, "meta": {"kind": "pope", "label": label, "prediction": said}}
            for item, label, said in zip(probes, ("yes", "no"), answers, strict=True)])
    studio.store.close()
    text = run("compare", "0", str(r1)).stdout
    assert f"POPE F1 on the same 2 probes: 0.667 (round 0) -> 1.000 (round {r1}); paired bootstrap p = " in text
    assert len(probes) == 2
    paired = ok_json("compare", "0", str(r1))["paired_pope"]
    assert (paired["n"], paired["f1_a"], paired["f1_b"]) == (2, pytest.approx(2 / 3), 1.0)


def test_compare_marks_hallucinated_objects(env):
    """Evaluation rows scored by the real ShapesWorld extractor, stored as evaluate stores them."""
    from lvlm_studio.evaluation import ShapesWorldExtractor, score_caption
    from lvlm_studio.service import Studio
    from lvlm_studio.world import CATEGORIES

    seed(train=1, test=2)
    studio = Studio(Settings(), users={}, admins=())
    items = studio.eval_items(kinds=("describe",))
    extractor = ShapesWorldExtractor.from_world()

    def row(item, answer):
        s = score_caption(answer, item["objects"], extractor)
        spans = [{"start": m.start, "end": m.end, "object": m.object, "hallucinated": m.object not in s.gt}
                 for m in extractor.mentions(answer)]
        return {"item_id": item["item_id"], "answer": answer, "objects": s.objects, "hallucinated": s.hallucinated,
                "meta": {"kind": "caption", "spans": spans}}

    truth = items[0]["objects"][0]
    wrong = next(c for c in CATEGORIES if c not in items[0]["objects"])
    r1 = studio.store.create_round(0, "m", {}, status="done")
    studio.store.add_eval_outputs(0, [row(items[0], f"There is a {truth}. There is a {wrong}."),
                                      row(items[1], "There is nothing.")])
    studio.store.add_eval_outputs(r1, [row(items[0], f"There is a {truth}."), row(items[1], "There is nothing.")])
    studio.store.close()

    text = run("compare", "0", str(r1)).stdout
    assert f"  0: There is a {truth}. There is a [{wrong}]." in text
    assert f"  {r1}: There is a {truth}." in text and "2 item(s)" in text
    assert "CHAIR_s  0.500    0.000    -0.500" in text
    assert (f"CHAIR_s on the same 2 captions: 0.500 (round 0) -> 0.000 (round {r1}); only round 0 hallucinates "
            f"in 1, only round {r1} in 0, both in 0; McNemar exact p = 1: within noise") in text
    diff = ok_json("compare", "0", str(r1), "--only-diff")
    assert diff["paired"]["n"] == 2 and diff["paired"]["only_a"] == 1  # over every caption, not only the shown
    assert diff["paired_pope"] is None and "POPE F1 on the same" not in text  # no POPE probes answered
    assert [r["item_id"] for r in diff["rows"]] == [items[0]["item_id"]]
    assert "1 item(s) both rounds answered, differently" in run("compare", "0", str(r1), "--only-diff").stdout
    # A round whose metrics name their items but whose answers are gone still gets the hint.
    bare = open_store(env)
    r_bare = bare.create_round(0, "m", {}, status="done")
    bare.update_round(r_bare, metrics={"eval": {"chair_s": 0.1, "n_items": 4}})
    bare.close()
    assert f"no evaluation answers stored for round(s) {r_bare}" in run("compare", "0", str(r_bare)).stdout
    limited = ok_json("compare", "0", str(r1), "--limit", "1")  # "items" counts all, "rows" the shown
    assert limited["items"] == 2 and [r["item_id"] for r in limited["rows"]] == [items[0]["item_id"]]
    assert diff["rows"][0]["a"]["hallucinated"] == [wrong] and diff["rows"][0]["b"]["hallucinated"] == []
    # Round r1 answers one more scene: its own metrics cover other items, so the items both
    # answered are measured again, side by side.
    studio = Studio(Settings(), users={}, admins=())
    more = studio.eval_items(kinds=("describe",), split="train")[0]
    studio.store.add_eval_outputs(r1, [row(more, f"There is a {wrong}.")])
    studio.store.close()
    text = run("compare", "0", str(r1)).stdout
    assert "these metrics cover different items" in text and "on the 2 items both answered:" in text
    assert text.count("CHAIR_s  0.500    0.000    -0.500") == 1  # the common table; round r1's own is 0.333
    assert ok_json("compare", "0", str(r1))["common_metrics"][1]["answers"] == 2
    assert mark_hallucinations(None) == "(no answer stored)"
    assert mark_hallucinations({"answer": "a x", "hallucinated": ["x"]}) == "a x  (hallucinated: x)"
    # spans in any order; a span inside one already marked is not marked again
    spans = [{"start": 19, "end": 23, "hallucinated": True}, {"start": 2, "end": 12, "hallucinated": True},
             {"start": 6, "end": 12, "hallucinated": True}]
    assert mark_hallucinations({"answer": "a red circle and a star", "spans": spans}) == "a [red circle] and a [star]"


def test_demo_build_small(env, tmp_path):
    out = tmp_path / "demo"
    data = ok_json("demo", "build", "--out", out, "--vlm-steps", "2", "--clip-steps", "2", "--train-scenes", "64",
                   "--eval-scenes", "3", "--no-eval", "--quiet", "--threads", "1")
    assert data["vlm_steps"] == 2 and data["clip_steps"] == 2 and data["vlm_final_loss"] > 0
    assert (out / "vlm" / "config.json").is_file() and (out / "clip" / "open_clip_config.json").is_file()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["build"]["train_scenes"] == 64 and recipe["seed"] == 0 and recipe["build"]["eval_scenes"] == 3
    # A config's seed holds when no seed is passed (it was overwritten with 0), and the config is not changed.
    from lvlm_studio.world.build import BuildConfig, build_demo

    config = BuildConfig(seed=5, vlm_steps=2, clip_steps=2, train_scenes=64, eval_scenes=3, threads=1)
    assert build_demo(tmp_path / "seeded", config=config, progress=False, evaluate=False)["seed"] == 5
    assert build_demo(tmp_path / "seeded", seed=7, config=config, progress=False, evaluate=False)["seed"] == 7
    assert config.seed == 5
    # Refused before anything is built (small sizes, so that a missing check fails fast, not in minutes).
    small = ["--clip-steps", "2", "--no-eval", "--quiet", "--threads", "1"]
    fails("demo", "build", "--out", tmp_path / "x", "--vlm-steps", "2", "--train-scenes", "10", *small,
          message="--train-scenes must be at least 64", code=2)
    fails("demo", "build", "--out", tmp_path / "x", "--vlm-steps", "0", "--train-scenes", "64", *small,
          message="--vlm-steps must be at least 1", code=2)
    assert not (tmp_path / "x").exists()


def test_progress_bar_follows_tasks(capsys):
    bar = Progress("gen", disable=False)
    bar(1, 3, "CSR: 1/3 items")
    bar(3, 3, "CSR: 3/3 items")
    assert bar.bar.n == 3 and bar.bar.total == 3
    bar(1, 2, "POVID: 1/2 items")  # a new task: a new total, counted from zero
    assert bar.bar.n == 1 and bar.bar.total == 2
    bar(2, 2, "POVID: 2/2 items")
    bar(1, 2, "STIC: 1/2 items")  # a new task with the same total: counted from zero again
    assert bar.bar.n == 1 and bar.bar.total == 2
    bar.close()
    assert "gen: POVID" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C a served app, as a user stops it; killed if it has not ended within 20 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_serve_in_a_real_process(env):
    port = _free_port()
    proc_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    import queue
    import threading

    # stderr to a file (a pipe nobody reads could fill and block the server); stdout read on a
    # thread, so the deadline holds even if the server never prints a line
    errors = env.parent / "serve.err"
    with open(errors, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lvlm_studio", "serve", "--port", str(port), "--no-seed",
                                 "--json"], stdout=subprocess.PIPE, stderr=err, text=True, env=proc_env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put("")], daemon=True).start()
    try:
        text, line = "", ""
        deadline = time.monotonic() + 90
        while not line.startswith("}"):  # the JSON's closing brace (nested ones are indented)
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"serve printed no JSON in 90 s: {text!r}\n{errors.read_text()[-2000:]}")
            assert line, f"serve ended: {text!r}\n{errors.read_text()[-2000:]}"
            text += line
        info = json.loads(text)
        assert info["ok"] and info["port"] == port and info["url"].startswith(f"http://127.0.0.1:{port}")
        assert info["auth"].startswith("open mode")
        with urllib.request.urlopen(info["url"], timeout=30) as resp:
            assert resp.status == 200 and b"gradio" in resp.read().lower()
        assert (env / "studio.db").is_file()
    finally:
        _interrupt(proc)


def test_python_app_py_seeds_a_new_data_root_and_serves(env):
    """The README's start command on a fresh data root: app.py seeds the demo world (items and
    pairs of each method), then serves the app where GRADIO_SERVER_PORT says."""
    port = _free_port()
    proc_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_SERVER_PORT": str(port)}
    proc_env.pop("PORT", None)
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=proc_env)
    try:
        deadline, page = time.monotonic() + 180, None
        while page is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.read().decode()
            except OSError:
                time.sleep(1)
        assert page is not None and "LVLM Studio" in page, "app.py did not serve within 180 s"
        store = open_store(env)
        try:
            assert store.count_items(split="test") > 0 and store.count_items(split="train") > 0
            assert {m for m in ("csr", "povid", "stic") if store.count_pairs(m)} == {"csr", "povid", "stic"}
        finally:
            store.close()
    finally:
        _interrupt(proc)
    # the start-up line says what the first start seeded (a later start seeds nothing and says nothing)
    assert re.search(r"^LVLM Studio: seeded demo items and pairs \(\d+ items, pairs \{'csr': \d+",
                     proc.stdout.read(), re.M)


def test_generate_csr_with_existence_pairs_on_the_demo_model(env):
    """`--param existence_pairs=true` on the shipped demo: caption pairs plus yes/no pairs on
    question items of the same images; running again only does the items not done yet."""
    home = env
    ok_json("demo", "seed", "--train", "4", "--test", "1", "--pairs", "0")
    first = ok_json("generate", "--method", "csr", "--n", "3", "--param", "existence_pairs=true")
    assert first["pairs"] == 3 and first["existence_pairs"] >= 2 and first["existence_pairs"] % 2 == 0
    store = Store(home / "studio.db")
    try:
        def derived() -> list[dict]:
            pairs = store.training_pairs(methods=["csr"], include_auto=True, round=0)
            return [p for p in pairs if (p["meta"] or {}).get("derived") == "existence"]

        made = derived()
        assert len(made) == first["existence_pairs"]
        # balanced: as many "Yes." as "No." chosen, each against the other answer
        assert sorted((p["chosen"], p["rejected"]) for p in made).count(("Yes.", "No.")) == len(made) // 2
        assert sorted((p["chosen"], p["rejected"]) for p in made).count(("No.", "Yes.")) == len(made) // 2
        assert all(p["prompt"] == f"Is there a {p['meta']['object']} in the image?" for p in made)
        sources = {p["meta"]["from_item"] for p in made}
        again = ok_json("generate", "--method", "csr", "--param", "existence_pairs=true")
        assert again["skipped"] == 3  # the three caption items done above, not their question items
        # nothing derived from the first three items was written twice
        assert [p for p in derived() if p["meta"]["from_item"] in sources] == made
    finally:
        store.close()


def _fake_start(status: str = "queued", **fields):
    """A Studio.start_round that only records its arguments and creates the round row (no job)."""
    calls: list[tuple] = []

    def start_round(self, config, user, parent_id=None):
        calls.append((config, user, parent_id))
        rid = self.store.create_round(parent_id, "m", config, status=status)
        if fields:
            self.store.update_round(rid, **fields)
        return rid

    return start_round, calls


def test_train_wait_says_how_many_pairs_balancing_left_out(env, monkeypatch):
    """`train` announces the pairs it selected; the finish line says how many of them balancing
    left out, so '66 pairs' at the start and 'on 56 pairs' at the end do not disagree silently."""
    from lvlm_studio.service import Studio

    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    metrics = {"steps": 1, "n_pairs": 1, "n_dropped_by_balance": 3, "train": {"loss": 0.5}, "eval": {}}
    monkeypatch.setattr(Studio, "start_round", _fake_start("done", metrics=metrics)[0])
    monkeypatch.setattr(Studio, "training_material_count", lambda self, config: 1)
    text = run("train", "--include-auto", "--wait").stdout
    assert "1 step on 1 pair (3 left out by balance_answers), final loss 0.5000" in text, text
    assert ", 1 pair); following it" in text, text  # not '1 pairs'


def test_wait_follows_a_round_started_earlier(env, monkeypatch):
    """`lvlm-studio wait N` follows a round that `train` started without --wait (or after Ctrl-C),
    then reports it as `train --wait` does; an ended round is reported at once, a failed one exits 1
    with its reason, an unknown one is refused."""
    from lvlm_studio.service import Studio

    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    monkeypatch.setattr(Studio, "start_round", _fake_start("running")[0])
    assert "follow it: lvlm-studio wait 1;" in run("train", "--include-auto").stdout
    metrics = {"steps": 3, "n_pairs": 2, "train": {"loss": 0.25}, "eval": {}}
    store = open_store(env)
    try:
        polls = []

        def sleep(seconds):  # the round finishes while `wait` follows it
            polls.append(seconds)
            store.update_round(1, status="done", metrics=metrics)

        monkeypatch.setattr(time, "sleep", sleep)
        text = run("wait", "1").stdout
        assert polls and "following round 1 (running;" in text
        assert "round 1 done" in text and "3 steps on 2 pairs, final loss 0.2500" in text, text
        data = ok_json("wait", "1")  # ended: reported at once
        assert data["round"] == 1 and data["status"] == "done" and data["metrics"]["steps"] == 3
        store.update_round(1, status="failed", error="out of memory")
        fails("wait", "1", message="round 1 failed: out of memory", code=1, json_too=False)
        result = run("wait", "1", "--json")
        data = json.loads(result.stdout)
        assert result.exit_code == 1 and data["ok"] is False and data["status"] == "failed"
    finally:
        store.close()
    fails("wait", "99", message="round 99 does not exist")
    # Round 0 is the base model: it was never trained ("None steps on None pairs" before).
    text = run("wait", "0").stdout
    assert text.startswith("round 0 is the base model (demo): nothing was trained") and "None" not in text


def test_train_options_reach_start_round(env, monkeypatch):
    """--from-round, --methods (spaces allowed), --include-auto, -c and --user reach
    Studio.start_round as given; --json reports the new round (no job is started here)."""
    from lvlm_studio.service import Studio

    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    start_round, calls = _fake_start(pid=4242, log_path="/tmp/round.log")
    monkeypatch.setattr(Studio, "start_round", start_round)
    monkeypatch.setenv("LVLM_STUDIO_USERS", "alice:pw:admin")
    started = ok_json("train", "--from-round", "0", "--methods", "povid, csr", "--include-auto",
                      "-c", "max_steps=2", "-c", "eval_limit=None", "--user", "alice")
    config, user, parent = calls[0]
    assert config == {"max_steps": 2, "eval_limit": None, "methods": ["povid", "csr"], "include_auto": True}
    assert user == "alice" and parent == 0
    assert started == {"ok": True, "round": 1, "parent": 0, "status": "queued", "pid": 4242, "pairs": 2,
                       "log": "/tmp/round.log"}
    # only csr pairs: nothing to train on, refused before a round is created
    fails("train", "--methods", "csr", "--include-auto", "--user", "alice", message="no training pairs")
    assert len(calls) == 1


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_train_wait_fails_on_a_round_that_did_not_finish(env, monkeypatch, status):
    """--wait exits 1 with the round's reason when it ends failed or cancelled, not only 'done' counts."""
    from lvlm_studio.service import Studio

    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    monkeypatch.setattr(Studio, "start_round", _fake_start(status, error="boom")[0])
    line = fails("train", "--include-auto", "--wait", message=f"round 1 {status}: boom", code=1, json_too=False)
    assert line.startswith("error:")
    result = run("train", "--include-auto", "--wait", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["ok"] is False and data["status"] == status


def test_train_wait_timeout_stops_following(env, monkeypatch):
    """--wait --timeout gives up following a round that is still running (exit 1, the round keeps
    running); a fake sleep ends the test if the timeout is ignored."""
    from lvlm_studio.service import Studio

    seed(train=2, test=1)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")
    monkeypatch.setattr(Studio, "start_round", _fake_start("running")[0])
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) > 20:
            raise AssertionError("--timeout was not honoured")

    monkeypatch.setattr(time, "sleep", sleep)
    result = run("train", "--include-auto", "--wait", "--timeout", "0")
    assert result.exit_code == 1 and "round 1 is still running after 0 s" in result.stderr, result.output
    assert open_store(env).get_round(1)["status"] == "running"
    # --json says which round keeps running, so a script can follow or cancel it
    sleeps.clear()
    result = run("train", "--include-auto", "--wait", "--timeout", "0", "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["ok"] is False and data["round"] == 2 and data["status"] == "running"
    assert "round 2 is still running after 0 s" in data["error"]

    # Ctrl-C while following: exit 130, the round is left running and the message says how to stop it.
    monkeypatch.setattr(time, "sleep", lambda seconds: (_ for _ in ()).throw(KeyboardInterrupt))
    result = run("train", "--include-auto", "--wait")
    assert result.exit_code == 130, result.output
    assert ("stopped following; round 3 keeps running (lvlm-studio wait 3 follows it again, lvlm-studio cancel 3 "
            "stops it)") in " ".join(result.stderr.split())
    assert open_store(env).get_round(3)["status"] == "running"
    result = run("train", "--include-auto", "--wait", "--json")
    data = json.loads(result.stdout)  # JSON even when interrupted
    assert result.exit_code == 130 and data == {"ok": False, "round": 4, "status": "running",
                                                "error": "stopped following; round 4 keeps running "
                                                         "(lvlm-studio wait 4 follows it again, lvlm-studio cancel "
                                                         "4 stops it)"}


def test_cancel_a_finished_round_and_the_timeout_option(env, monkeypatch):
    """cancel on a finished round says there is nothing to cancel; on an active one it calls
    Studio.cancel_round with the user and --timeout given."""
    from lvlm_studio.service import Studio

    init = ok_json("init")
    assert init["ok"]
    assert ok_json("cancel", "0") == {"ok": True, "round": 0, "was": "done", "status": "done", "error": None}
    assert run("cancel", "0").stdout.strip() == "round 0 is already done: nothing to cancel"
    store = open_store(env)
    rid = store.create_round(0, "m", {}, status="running")
    store.close()
    calls = []

    def cancel_round(self, round_id, user, timeout=30.0):
        calls.append((round_id, user, timeout))
        self.store.update_round(round_id, status="cancelled", error="cancelled by request")
        return self.store.get_round(round_id)

    monkeypatch.setattr(Studio, "cancel_round", cancel_round)
    assert run("cancel", rid, "--timeout", "5", "--user", "carol").stdout.strip() == f"round {rid}: running -> cancelled"
    assert calls == [(rid, "carol", 5.0)]

    # A job that has not ended when cancel_round returns (its stop signal is sent) is reported as
    # requested, not as a change of status it has not made.
    still = open_store(env)
    slow = still.create_round(0, "m", {}, status="running")
    still.close()
    monkeypatch.setattr(Studio, "cancel_round", lambda self, round_id, user, timeout=30.0: self.store.get_round(round_id))
    assert run("cancel", slow).stdout.strip() == (
        f"round {slow}: cancel requested, still running (see lvlm-studio rounds)")
    assert ok_json("cancel", slow)["status"] == "running"

    # A round that finished between the CLI's read and the cancel: the cancel failed, and says so.
    def finished(self, round_id, user, timeout=30.0):
        self.store.update_round(round_id, status="done")
        return self.store.get_round(round_id)

    monkeypatch.setattr(Studio, "cancel_round", finished)
    result = run("cancel", slow, "--json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["ok"] is False and data["status"] == "done" and data["was"] == "running"
    assert data["error"] == f"round {slow} finished before the cancel reached it"
    assert f"error: round {slow} finished before the cancel reached it" in result.stderr


def test_a_commands_model_stays_that_commands_and_eval_checks_it_before_rendering(env, tmp_path):
    """generate/eval --model is that run's model: on a fresh root it used to become round 0's base
    model for good (a typo included, and every later eval failed on it); eval with a model that
    cannot load used to render and store its n scenes first."""
    from conftest import write_image

    assert ok_json("init")
    for k in range(2):
        write_image(tmp_path / "pics" / f"{k}.png", seed=k)
    ok_json("import", tmp_path / "pics")
    fails("generate", "--method", "stic", "--model", "./typo-model", message="No model directory at './typo-model'")
    fails("eval", "--model", "./typo-model", "--n", 50, message="No model directory at './typo-model'")
    store = open_store(env)
    try:
        assert store.get_round(0)["base_model"] == "demo"
        assert store.count_items(dataset="shapesworld") == 0  # nothing rendered for the failed eval
    finally:
        store.close()


def test_rounds_lists_stored_rounds(env):
    """rounds --json: config, pid, pairs, duration; a round whose process is gone is marked failed on
    the way; the table shows progress in percent and each failed round's reason."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    seed(train=1, test=1)  # a studio command: the data root with its base round 0
    store = open_store(env)
    done = store.create_round(0, "m", {"methods": ["csr"], "max_steps": 2}, status="queued")
    store.update_round(done, status="done", pid=111, progress=1.0, started="2030-01-01T00:00:00Z",
                       finished="2030-01-01T00:00:10Z", metrics={"n_pairs": 5, "eval": {"chair_s": 0.25}})
    failed = store.create_round(done, "m", {}, status="failed")
    store.update_round(failed, error="out of memory")
    gone = store.create_round(done, "m", {}, status="running")
    store.update_round(gone, pid=dead.pid)
    store.close()
    rounds = {r["id"]: r for r in ok_json("rounds")["rounds"]}
    assert rounds[done]["config"] == {"methods": ["csr"], "max_steps": 2} and rounds[done]["methods"] == ["csr"]
    assert rounds[done]["pid"] == 111 and rounds[done]["pairs"] == 5 and rounds[done]["chair_s"] == 0.25
    assert rounds[done]["seconds"] == 10.0 and rounds[failed]["parent"] == done
    assert rounds[gone]["status"] == "failed" and "is gone" in rounds[gone]["error"]
    text = run("rounds").stdout
    assert f"\n{done}   0       done    100%" in text
    assert f"round {failed}: out of memory" in text and f"round {gone}: the training process" in text


def test_eval_and_compare_option_errors(env):
    """Bad eval/compare values are usage errors (2); a missing round is a failure (1) caught
    before any model loads; compare --limit 0 is allowed; rounds with no stored answers get a hint."""
    ok_json("init")
    fails("eval", "--split", "val", message="unknown split 'val'", code=2)
    fails("eval", "--n", "0", message="--n must be at least 1, not 0", code=2)
    fails("eval", "--max-new-tokens", "0", message="--max-new-tokens must be at least 1, not 0", code=2)
    fails("eval", "--round", "7", "--n", "1", "--max-new-tokens", "1", message="round 7 does not exist", code=1)
    fails("compare", "0", "9", message="round 9 does not exist", code=1)
    assert ok_json("compare", "0", "0", "--limit", "0")["rows"] == []
    assert "no evaluation answers stored for round(s) 0, 0: run lvlm-studio eval --round N" in run(
        "compare", "0", "0").stdout


def test_generate_tags_pairs_with_the_round_and_checks_its_options(env):
    """--round reaches the generator (the pairs belong to that round), --split all reaches every
    split; --n 0 and an empty --items are usage errors (2)."""
    seed(train=2, test=1)
    store = open_store(env)
    r1 = store.create_round(0, "m", {}, status="done")
    store.update_round(r1, adapter_path="adapters/round-1")  # POVID's text pairs never load it
    povid = ["generate", "--method", "povid", "--param", "make_image_rejected=false"]
    made = ok_json(*povid, "--round", r1, "--n", "1")
    assert made["round"] == r1 and made["pairs"] == 1
    assert len(store.items_with_pairs("povid", r1)) == 1 and not store.items_with_pairs("povid", 0)
    assert ok_json(*povid, "--split", "all", "--n", "1")["items"] == 1
    fails(*povid, "--n", "0", message="--n must be at least 1", code=2)
    fails(*povid, "--items", ",", message="--items is empty", code=2)
    # A round that does not exist or never finished is refused, even by a method that loads no model.
    failed = store.create_round(0, "demo", {}, status="failed")
    fails(*povid, "--round", "99", "--n", "1", message="round 99 does not exist", code=1)
    fails(*povid, "--round", str(failed), "--n", "1", message=f"round {failed} has no finished adapter", code=1)
    assert not store.items_with_pairs("povid", 99) and not store.items_with_pairs("povid", failed)
    store.close()


def test_generate_from_a_round_whose_parent_adapter_is_gone(env, tiny):
    """A round whose parent's adapter folder was deleted (FileNotFoundError): one error line, no traceback."""
    vlm, _ = tiny
    seed(train=2, test=1)
    store = open_store(env)
    r1 = store.create_round(0, vlm, {}, status="done")
    store.update_round(r1, adapter_path=str(env / "adapters" / "gone-1"))
    r2 = store.create_round(r1, vlm, {}, status="done")
    store.update_round(r2, adapter_path=str(env / "adapters" / "gone-2"))
    store.close()
    fails("generate", "--method", "stic", "--model", vlm, "--round", r2, "--n", "1",
          message=f"Adapter directory {str(env / 'adapters' / 'gone-1')!r} does not exist", code=1)


def test_options_that_cannot_run_are_refused_and_out_of_memory_is_one_line(env, monkeypatch):
    """JSON's 1e999 is inf: refused by name for train and generate, as are a zero answer length and
    an unknown Literal value (which lists the allowed ones); a size that exhausts memory (here a
    stand-in for torch's allocator error) is one error line, not a traceback."""
    seed(train=2, test=1)
    fails("train", "-c", "learning_rate=1e999", message="learning_rate=inf: expected a finite number", code=2)
    fails("train", "-c", "eval_max_new_tokens=0", message="eval_batch_size and eval_max_new_tokens must be >= 1", code=2)
    fails("train", "-c", "num_epochs=0", message="--config: num_epochs must be > 0", code=2)
    csr = ["generate", "--method", "csr", "--n", "1"]
    fails(*csr, "--param", "max_new_tokens=0", message="max_new_tokens and num_beam_groups must be >= 1", code=2)
    fails(*csr, "--param", "keep_top=0", "--param", "keep_bottom=0", message="--param: keep_top + keep_bottom", code=2)
    fails("generate", "--method", "stic", "--n", "1", "--param", "p_misleading=2", message="p_misleading must be a probability",
          code=2)
    fails("generate", "--method", "povid", "--n", "1", "--param", "noise_step=5000", message="noise_step must be in [0",
          code=2)
    fails("train", "-c", "loss_type=dpo", message="loss_type must be one of TRL's", code=2)
    for method in ("csr", "stic"):  # a negative temperature used to run and make no pair
        fails("generate", "--method", method, "--n", "1", "--param", "temperature=-1",
              message="temperature must be a finite number >= 0, not -1", code=2)
    fails(*csr, "--param", "expansion=bogus", message='expected one of "diverse_beam", "sample"', code=2)
    store = open_store(env)
    assert [r["id"] for r in store.list_rounds()] == [0]  # no round was created
    before = store.stats()
    store.close()
    from lvlm_studio.service import Studio

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 3788800000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Studio, "generate", exhausted)
    result = run(*csr, "--param", "num_candidates=100000000")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: out of memory: [enforce fail") and "fewer candidates" in result.stderr
    store = open_store(env)
    assert store.stats() == before
    store.close()


# ------------------------------------------------------------------------------ review
def _reviewable_pairs(store, make_items) -> tuple[int, int]:
    """A CSR pair whose sentences carry calibrated rewards (margin 0.5) and a POVID pair whose
    rejected side holds two injected hallucinations (margin 2.0): (csr pair id, povid pair id)."""
    csr_item, povid_item = make_items(2, seed0=700)
    good, bad = "There is a red circle. There is a blue star.", "There is a <b>green</b> square."
    store.write_generation(csr_item, [
        {"text": good, "source": "csr", "model": "m", "round": 0, "score": 1.25, "sentences": [
            {"start": 0, "end": 22, "text": good[:22], "reward": 0.875},
            {"start": 23, "end": 44, "text": good[23:], "reward": -0.5}]},
        {"text": bad, "source": "csr", "model": "m", "round": 0, "score": -2.0, "sentences": [
            {"start": 0, "end": len(bad), "text": bad, "reward": -3.25}]},
    ], [{"chosen": 0, "rejected": 1, "method": "csr", "margin": 0.5, "round": 0}])
    truth, injected = "There is a large red circle at the top.", "There is a small red star at the top."
    store.write_generation(povid_item, [
        {"text": truth, "source": "reference", "model": "m", "round": 0},
        {"text": injected, "source": "povid_inject", "model": "m", "round": 0, "spans": [
            {"start": 11, "end": 16, "category": "attribute", "original": "large", "injected": "small"},
            {"start": 21, "end": 25, "category": "object", "original": "circle", "injected": "star"}]},
    ], [{"chosen": 0, "rejected": 1, "method": "povid", "margin": 2.0, "round": 0}])
    return (store.find_pair(csr_item, good, bad, "csr"), store.find_pair(povid_item, truth, injected, "povid"))


def test_review_commands_walk_a_queue_and_store_every_decision(env, store, make_items, monkeypatch):
    """`review next` serves the lowest margin first and shows each sentence's reward and the
    injected hallucinations in brackets with their category; `decide` appends decisions that set
    the label; `show` gives this reviewer's decision and the notes; `undo` cancels the latest;
    `progress` and `agreement` read the same decisions."""
    csr_pair, povid_pair = _reviewable_pairs(store, make_items)
    monkeypatch.setenv("LVLM_STUDIO_USER", "amy")  # the reviewer, unless --reviewer names another

    first = run("review", "next")
    assert first.exit_code == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"pair {csr_pair} · csr · round 0 · margin 0.500 · label: auto"
    assert "     0.875  There is a red circle." in lines and "    -0.500  There is a blue star." in lines
    assert "    -3.250  There is a <b>green</b> square." in lines  # text, as typed: no markup here
    assert ok_json("review", "next")["pair"]["pair_id"] == csr_pair

    povid = run("review", "next", "--method", "povid").stdout.splitlines()
    assert "  There is a [small] red [star] at the top." in povid
    assert "    [small] injected attribute, was 'large'" in povid and "    [star] injected object, was 'circle'" in povid

    decided = ok_json("review", "decide", csr_pair, "swap", "--note", "the star is absent")
    assert decided["label"]["status"] == "swap" and decided["label"]["chosen_text"].startswith("There is a <b>")
    assert ok_json("review", "next")["pair"]["pair_id"] == povid_pair  # amy's queue moved on
    edit = ok_json("review", "decide", povid_pair, "edit", "--reviewer", "bob", "--text", "A red circle.")
    assert edit["label"] == {**edit["label"], "status": "edit", "chosen_text": "A red circle.", "reviewer": "bob"}
    ok_json("review", "decide", csr_pair, "accept", "--reviewer", "bob")

    shown = run("review", "show", csr_pair).stdout  # amy, from the environment
    assert "label: accept by bob" in shown and "your decision: swap" in shown
    assert "note by amy (swap): the star is absent" in shown

    progress = ok_json("review", "progress")
    assert (progress["total"], progress["done"], progress["reviewer_done"]) == (2, 2, 1)
    assert progress["per_reviewer"] == {"amy": {"done": 1, "total": 2}, "bob": {"done": 2, "total": 2}}
    agreement = ok_json("review", "agreement")
    assert agreement["reviewers"] == ["amy", "bob"] and agreement["cohen"][0]["n"] == 1
    assert agreement["override_rate"] == 0.5  # bob accepted the CSR pair, edited the POVID one
    shown_agreement = run("review", "agreement").stdout
    assert "amy         bob         1" in shown_agreement
    assert "override rate (swap, reject both, edit): 0.500 of 2 reviewed pairs" in shown_agreement
    assert agreement["override_by_method"] == {"csr": {"n": 1, "override_rate": 0.0}, "povid": {"n": 1, "override_rate": 1.0}}
    assert run("review", "progress").stdout.splitlines() == [
        "2 of 2 pairs decided by someone", "you (amy): 1 decided", "  amy: 1 decided", "  bob: 2 decided"]

    undone = ok_json("review", "undo")
    assert undone["undone"]["pair_id"] == csr_pair and undone["undone"]["label"]["status"] == "accept"
    assert ok_json("review", "undo")["undone"] is None  # amy has nothing left to undo
    assert "note by amy (swap, undone)" in run("review", "show", csr_pair).stdout
    decisions = [(r["reviewer"], r["decision"]) for r in store.pair_reviews(csr_pair)]
    assert decisions == [("amy", "swap"), ("bob", "accept"), ("amy", "undo")]


def test_review_commands_refuse_bad_input_without_writing(env, store, make_items, monkeypatch):
    csr_pair, _ = _reviewable_pairs(store, make_items)
    fails("review", "decide", csr_pair, "maybe", "--reviewer", "amy",
          message="decision must be one of accept, swap, reject_both, edit, not 'maybe'", code=2)
    fails("review", "decide", csr_pair, "accept", "--reviewer", "amy", "--text", "x",
          message="--text goes with the edit decision only", code=2)
    fails("review", "decide", csr_pair, "edit", "--reviewer", "amy", message="an edit needs the edited text", code=2)
    fails("review", "decide", csr_pair, "edit", "--reviewer", "amy", "--text", " ", message="an edit needs", code=2)
    fails("review", "decide", csr_pair, "accept", message="name the reviewer: --reviewer NAME, or set LVLM_STUDIO_USER",
          code=2)
    fails("review", "undo", "--reviewer", " ", message="name the reviewer", code=2)
    fails("review", "undo", "--reviewer", "amy", "--pair", 99999, message="pair 99999 does not exist", code=1)
    assert run("review", "next", "--reviewer", "amy", "--round", 99).stdout.strip() == "no pair carries round 99"
    # a round that only pairs carry (an import keeps its export's round numbers) is a queue too
    item, = make_items(1, seed0=730)
    store.write_generation(item, [{"text": "A red star.", "source": "import", "round": 5},
                                  {"text": "A blue cat.", "source": "import", "round": 5}],
                           [{"chosen": 0, "rejected": 1, "method": "povid", "margin": None, "round": 5}])
    assert ok_json("review", "next", "--reviewer", "amy", "--round", 5)["pair"]["round"] == 5
    fails("review", "progress", "--method", "csrr", message="unknown method 'csrr'", code=2)
    fails("review", "decide", 99999, "accept", "--reviewer", "amy", message="pair 99999 does not exist", code=1)
    fails("review", "show", 99999, message="pair 99999 does not exist", code=1)
    fails("review", "next", "--reviewer", "amy", "--method", "csrr", message="unknown method 'csrr'", code=2)
    fails("review", "next", "--reviewer", "amy", "--status", "open", message="--status must be one of", code=2)
    assert store.pair_reviews(csr_pair) == []
    assert run("review", "next", "--reviewer", "amy", "--method", "stic").stdout.strip() == (
        "no pair left in this queue")


def test_cli_shows_terminal_control_characters_in_stored_text_as_escapes(env, store, make_items):
    """An imported answer is untrusted text: an ANSI escape (which can retitle or clear the
    terminal), a carriage return or a bidirectional override in it is printed as a visible escape,
    in the human output and in --json, whose parser still reads back the stored text."""
    item, = make_items(1, seed0=720)
    hostile = "A red circle.\x1b]0;owned\x07\rA blue \u202estar\x9b2J."
    store.write_generation(item, [{"text": hostile, "source": "csr", "model": "m", "round": 0},
                                  {"text": "A green square.", "source": "csr", "model": "m", "round": 0}],
                           [{"chosen": 0, "rejected": 1, "method": "csr", "margin": 1.0, "round": 0}])
    pair = store.find_pair(item, hostile, "A green square.", "csr")
    shown = run("review", "show", pair)
    assert shown.exit_code == 0, shown.stderr
    assert "A red circle.\\x1b]0;owned\\x07\\x0dA blue \\u202estar\\x9b2J." in shown.stdout
    assert not any(ch in shown.stdout for ch in "\x1b\x07\r\u202e\x9b")
    raw = run("review", "show", pair, "--json").stdout
    assert not any(ch in raw for ch in "\x1b\x07\r\u202e\x9b")
    assert json.loads(raw)["pair"]["chosen"]["text"] == hostile
    error = run("review", "next", "--reviewer", "amy", "--method", "x\x1b[2J")  # echoed in the error line
    assert error.exit_code == 2 and "x\\x1b[2J" in error.stderr and "\x1b" not in error.stderr


def test_review_text_shows_every_character_and_spans_across_sentences():
    """The CLI's candidate lines show text outside the stored sentences too (a reviewer must not
    accept words never shown), bracket a hallucination that crosses a sentence boundary in each
    sentence it touches, and skip offsets that do not fit the text."""
    from lvlm_studio.cli import candidate_lines

    text = "A red circle. A blue star. Trailing words"
    sentences = [{"start": 0, "end": 13, "reward": 1.5}, {"start": 14, "end": 26, "reward": -0.25},
                 {"start": 30, "end": 99, "reward": 9.0}, {"start": "x", "end": 3}]
    spans = [{"start": 6, "end": 18, "category": "object", "original": "square"}]
    assert candidate_lines(text, sentences, spans) == [
        "     1.500  A red [circle.]", "    -0.250  [A bl]ue star.", "  Tra", "     9.000  iling words",
        "    [circle. A bl] injected object, was 'square'"]
    assert candidate_lines(text, sentences[:2], []) == [
        "     1.500  A red circle.", "    -0.250  A blue star.", "  Trailing words"]
    assert candidate_lines("No sentences stored.", None, None) == ["  No sentences stored."]
    broken = [{"start": 0, "end": 13, "reward": float("nan")}, {"start": 14, "end": 26, "reward": True}]
    assert candidate_lines(text, broken, [])[:2] == ["  A red circle.", "  A blue star."]  # no score shown


def test_no_library_progress_bars_in_a_pipe(env, tiny):
    """In a pipe or a log, the CLI's stderr holds no progress bars, the libraries' own included:
    loading a model (transformers' "Loading weights" bar) leaves stderr empty."""
    proc = subprocess.run([sys.executable, "-m", "lvlm_studio", "eval", "--model", tiny[0], "--n", "1",
                           "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
    # datasets' bars too ("Saving the dataset" when a TRL export writes its Arrow files)
    assert run("import", _one_pair_jsonl(env.parent / "one")).exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "lvlm_studio", "export", str(env.parent / "trl"), "--format", "trl",
                           "--include-auto"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and "exported 1 pair (1 image) as trl" in proc.stdout, proc.stderr
    assert proc.stderr == "", proc.stderr


def _one_pair_jsonl(folder) -> str:
    from PIL import Image

    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "a.png")
    (folder / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "Describe the image.",
                                                    "chosen": "A red square.", "rejected": "A blue cat."}) + "\n")
    return str(folder / "pairs.jsonl")


def test_pope_adds_probes_to_an_imported_set(env, tmp_path, monkeypatch):
    from conftest import write_coco

    root = write_coco(tmp_path / "coco", [["dog", "couch", "cup"], ["person", "car", "dog"], ["cat", "couch"]])
    assert ok_json("import", root)["imported"] == 3
    data = ok_json("pope", "--dataset", "coco", "--split", "val", "--strategy", "popular", "--per-image", "1")
    assert (data["images"], data["probes"], data["yes"], data["added"], data["strategy"]) == (2, 4, 2, 4, "popular")
    human = run("pope", "--dataset", "coco", "--split", "val", "--strategy", "popular", "--per-image", "1")
    assert human.exit_code == 0
    assert human.stdout.startswith("4 popular POPE probes (2 yes) on 2 images of coco/val (2 with 3+ objects, coco "
                                   "vocabulary); 0 new items")
    fails("pope", "--dataset", "coco", "--split", "val", "--strategy", "hard", message="unknown POPE strategy 'hard'",
          code=2)
    fails("pope", "--dataset", "coco", "--split", "train", message="no item of dataset 'coco', split 'train'", code=1)
    fails("pope", "--dataset", "coco", "--split", "val", "--images", "0", message="--images must be at least 1", code=2)
    fails("pope", "--dataset", "coco", "--split", "val", "--per-image", "-1", message="--per-image must be at least 1",
          code=2)
    # The base model evaluated on the imported set, its probes with its captions (the demo model
    # names no COCO object: the table says CHAIR saw none, rather than a clean 0).
    ev = ok_json("eval", "--dataset", "coco", "--split", "val", "--n", "1", "--max-new-tokens", "8")
    assert (ev["round"], ev["images"], ev["items"]) == (0, 1, 3)
    assert ev["metrics"]["extractor"] == "coco" and ev["metrics"]["pope_n"] == 2 and ev["metrics"]["n_captions"] == 1
    assert (ev["metrics"]["dataset"], ev["metrics"]["split"], ev["metrics"]["images"]) == ("coco", "val", 1)
    text = run("eval", "--dataset", "coco", "--split", "val", "--max-new-tokens", "8").stdout
    assert text.startswith("round 0 on 7 items of coco/val (3 images), model demo") and "POPE F1" in text
    fails("eval", "--dataset", "coco", "--split", "test", message="no item of dataset 'coco', split 'test' has "
          "ground-truth objects to evaluate on (imported sets that have: coco/val)")
    # Then on the world's scenes: both sets' figures are kept; rounds names the latest's set, and
    # compare reads one set (the latest both share, or --set).
    ok_json("eval", "--n", "1", "--max-new-tokens", "8")
    assert ok_json("rounds")["rounds"][0]["eval_set"] == "shapesworld/test"
    assert "evaluated on" in run("rounds").stdout and "shapesworld/test" in run("rounds").stdout
    cmp = ok_json("compare", "0", "0")
    assert cmp["set"] == "shapesworld/test" and cmp["sets"] == ["coco/val", "shapesworld/test"]
    on_coco = ok_json("compare", "0", "0", "--set", "coco/val")
    assert on_coco["set"] == "coco/val" and on_coco["items"] == 3 and on_coco["metrics"][0]["answers"] == 7
    assert run("compare", "0", "0").stdout.startswith("on shapesworld/test (both were also evaluated on: coco/val; "
                                                      "--set picks one)")
    fails("compare", "0", "0", "--set", "coco/test", message="round 0 was not evaluated on coco/test (its evaluations: "
          "coco/val, shapesworld/test)")
    assert ok_json("compare", "0", "0", "--set", " coco/val ")["set"] == "coco/val"  # typed with spaces
    assert ok_json("compare", "0", "0", "--set", "")["set"] == "shapesworld/test"  # empty: the default
    # The demo model names no COCO object: CHAIR 0 there is said to be no clean result, here too.
    text = run("compare", "0", "0", "--set", "coco/val").stdout
    assert "note: round 0: no caption names an object the extractor knows" in text
    # `wait` names the set of the figures it shows (the latest evaluation's).
    assert "nothing was trained\nevaluated on shapesworld/test:\nmetric" in run("wait", "0").stdout
    # Two rounds with no set in common: the note comes first and no "change" is computed.
    from lvlm_studio.evaluation import with_evaluation

    store = open_store(env)
    try:
        rounds = {}
        for label in ("shapesworld/test", "coco/val"):
            dataset, split = label.split("/")
            rid = rounds[label] = store.create_round(0, "demo", {}, status="done")
            rows = [o for o in store.eval_outputs(0) if (o["dataset"], o["split"]) == (dataset, split)]
            store.add_eval_outputs(rid, rows)
            ev = {"chair_s": 0.5, "n_items": len(rows), "set": label, "eval_set": [[dataset, split]]}
            store.update_round(rid, metrics=with_evaluation(None, ev))
    finally:
        store.close()
    text = run("compare", str(rounds["shapesworld/test"]), str(rounds["coco/val"])).stdout
    assert text.startswith(f"note: round {rounds['shapesworld/test']} was evaluated on shapesworld/test and round "
                           f"{rounds['coco/val']} on coco/val, no set both"), text
    assert "+0.000" not in text and "CHAIR_s" in text
    monkeypatch.setenv("LVLM_STUDIO_USERS", "alice:pw:admin,bob:pw:reviewer")
    fails("pope", "--dataset", "coco", "--split", "val", "--user", "bob", message="admin")
