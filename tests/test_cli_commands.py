"""The service-layer CLI commands: demo build/seed, generate, train/cancel/rounds, eval, compare,
serve. Tiny random models built here (a tiny LLaVA over the world's words, a tiny open_clip),
passed as --model PATH / --clip PATH; every test runs in its own data root."""

from __future__ import annotations

import json
import os
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

    povid = ["generate", "--method", "povid", "--param", "make_image_rejected=false", "--seed", "7"]
    part = ok_json(*povid, "--n", "2")
    assert part["items"] == 2 and part["pairs"] == 2 and part["skipped"] == 0 and part["round"] == 0
    rest = ok_json(*povid)  # resumes: the 2 done items are skipped, the other 2 train items run
    assert rest["items"] == 2 and rest["skipped"] == 2 and rest["pairs"] == 2
    assert store.count_pairs(method="povid") == 4
    train_items = {it["id"] for it in store.list_items(split="train")}
    assert store.items_with_pairs("povid", 0) <= train_items  # default split: train only
    text = run(*povid).stdout
    assert "nothing to do" in text and "4 items already have povid pairs" in text
    pair = store.get_pair(store.pair_ids()[0])
    rejected = store.get_candidate(pair["rejected"]["id"])
    assert rejected["seed"] == 7 and rejected["params"]["method"] == "povid"
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
    fails("generate", "--method", "dpo", message="unknown method 'dpo'")
    fails("generate", "--method", "csr", "--param", "num_candidates", message="expected key=value")
    fails("generate", "--method", "csr", "--param", "candidates=3", message="unknown csr option")
    fails("generate", "--method", "csr", "--param", "num_candidates=many", message='num_candidates="many": expected int')
    fails("generate", "--method", "povid", "--items", "1,x", message="comma-separated integers")
    fails("generate", "--method", "povid", "--items", "1", "--dataset", "d", message="either --items or --dataset")
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
    assert open_store(env).count_pairs() == 0


def test_train_wait_rounds_eval_and_compare(env, tiny):
    vlm, _ = tiny
    seed(train=4, test=2)
    ok_json("generate", "--method", "povid", "--param", "make_image_rejected=false")

    done = ok_json("train", "--model", vlm, "--include-auto", "--methods", "povid", *FAST_ROUND, "--wait")
    round_id = done["round"]
    assert round_id == 1 and done["status"] == "done" and done["parent"] == 0
    assert done["pairs"] == 4 and done["metrics"]["steps"] == 2
    assert done["metrics"]["eval"]["n_items"] == 4 and done["chair_s"] is not None

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
    # One answer per item: the 4 the round job answered are answered again (replaced), 5 are new.
    after = [r["item_id"] for r in store.eval_outputs(round_id)]
    assert len(after) == len(set(after)) == 9 and set(before) < set(after)
    stored = store.get_round(round_id)["metrics"]["eval"]
    assert stored["scenes"] == 3 and stored["split"] == "test" and stored["model"] == vlm
    assert store.get_round(round_id)["metrics"]["n_pairs"] == 4  # training metrics kept
    human = run("eval", "--round", "0", "--model", vlm, "--n", "3", "--max-new-tokens", "6")
    assert human.exit_code == 0 and "POPE yes-ratio" in human.stdout and "0 items added" in human.stdout
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
    fails("train", "--model", vlm, "--include-auto", "--user", "bob", message="needs the admin role; 'bob' is reviewer")
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
    assert [r["item_id"] for r in diff["rows"]] == [items[0]["item_id"]]
    assert diff["rows"][0]["a"]["hallucinated"] == [wrong] and diff["rows"][0]["b"]["hallucinated"] == []
    # Round r1 answers one more scene: its own metrics cover other items, so the items both
    # answered are measured again, side by side.
    studio = Studio(Settings(), users={}, admins=())
    more = studio.eval_items(kinds=("describe",), split="train")[0]
    studio.store.add_eval_outputs(r1, [row(more, f"There is a {wrong}.")])
    studio.store.close()
    text = run("compare", "0", str(r1)).stdout
    assert "the rounds answered different items; on the 2 items both answered:" in text
    assert text.count("CHAIR_s  0.500    0.000    -0.500") == 1  # the common table; round r1's own is 0.333
    assert ok_json("compare", "0", str(r1))["common_metrics"][1]["answers"] == 2
    assert mark_hallucinations(None) == "(no answer stored)"
    assert mark_hallucinations({"answer": "a x", "hallucinated": ["x"]}) == "a x  (hallucinated: x)"


def test_demo_build_small(env, tmp_path):
    out = tmp_path / "demo"
    data = ok_json("demo", "build", "--out", out, "--vlm-steps", "2", "--clip-steps", "2", "--train-scenes", "64",
                   "--no-eval", "--quiet", "--threads", "1")
    assert data["vlm_steps"] == 2 and data["clip_steps"] == 2 and data["vlm_final_loss"] > 0
    assert (out / "vlm" / "config.json").is_file() and (out / "clip" / "open_clip_config.json").is_file()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["build"]["train_scenes"] == 64 and recipe["seed"] == 0
    fails("demo", "build", "--out", tmp_path / "x", "--train-scenes", "10", message="--train-scenes must be at least 64")
    assert not (tmp_path / "x").exists()


def test_progress_bar_follows_tasks(capsys):
    bar = Progress("gen", disable=False)
    bar(1, 3, "CSR: 1/3 items")
    bar(3, 3, "CSR: 3/3 items")
    assert bar.bar.n == 3 and bar.bar.total == 3
    bar(1, 2, "POVID: 1/2 items")  # a new task: a new total, counted from zero
    assert bar.bar.n == 1 and bar.bar.total == 2
    bar.close()
    assert "gen: POVID" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_in_a_real_process(env):
    port = _free_port()
    proc_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "lvlm_studio", "serve", "--port", str(port), "--no-seed", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env)
    try:
        text = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            text += line
            if line.startswith("}"):
                break
        info = json.loads(text)
        assert info["ok"] and info["port"] == port and info["url"].startswith(f"http://127.0.0.1:{port}")
        assert info["auth"].startswith("open mode")
        with urllib.request.urlopen(info["url"], timeout=30) as resp:
            assert resp.status == 200 and b"gradio" in resp.read().lower()
        assert (env / "studio.db").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
