"""The lvlm-studio CLI: commands, --json, exit codes, LVLM_STUDIO_HOME, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, write_image
from test_io import assert_consistent, issue_folder
from typer.testing import CliRunner

from lvlm_studio.cli import EXIT_PARTIAL, app, main
from lvlm_studio.store import Store

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def _cli_process(args, home):
    env = {**os.environ, "LVLM_STUDIO_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lvlm_studio", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_init_uses_lvlm_studio_home(home):
    result = run("init", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["db"] == str((home / "studio.db").resolve())
    assert (home / "studio.db").is_file() and (home / "images").is_dir()
    assert "m001_initial_schema" in data["migrations"]


def test_partial_import_exit_code_in_a_real_process(home, settings, tmp_path):
    folder = issue_folder(tmp_path / "upload")
    proc = _cli_process(["import", str(folder)], home)
    assert proc.returncode == EXIT_PARTIAL == 3
    assert "partial" in proc.stdout and "1 imported (1 new item), 4 refused" in proc.stdout
    for name in ("truncated.jpg", "notes.png", "empty.jpg", "huge.png"):
        assert f"- {name}: " in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr

    proc = _cli_process(["import", str(folder), "--json"], home)  # idempotent, machine-readable
    assert proc.returncode == 3
    data = json.loads(proc.stdout)
    assert data["status"] == "partial" and data["ok"] is False  # partial is not ok
    assert data["imported"] == 1 and len(data["errors"]) == 4

    store = Store(settings.db_path)
    assert store.stats()["tables"]["images"] == 1
    assert_consistent(store, settings)
    store.close()


def test_import_export_stats_flow(home, tmp_path):
    src = tmp_path / "src"
    for k in range(3):
        write_image(src / f"{k}.png", seed=60 + k)
    rows = [
        {"image": f"{k}.png", "prompt": "Describe.", "chosen": f"Good {k}.", "rejected": f"Bad {k}."}
        for k in range(3)
    ]
    (src / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run(
        "import", str(src / "d.jsonl"), "--dataset", "demo", "--split", "val", "--method", "manual", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pairs"] == 3

    result = run("stats", "--json")
    stats = json.loads(result.stdout)
    assert stats["tables"]["pairs"] == 3 and stats["pairs_by_method"] == {"manual": 3}
    assert stats["datasets"] == {"demo": {"val": 3}} and stats["labels"]["auto"] == 3
    assert "pairs by method: manual 3" in run("stats").stdout

    result = run("export", str(tmp_path / "out"))  # nothing reviewed yet: a clear failure
    assert result.exit_code == 1
    assert "nothing to export" in result.stderr and "--include-auto" in result.stderr
    assert "Traceback" not in result.output

    for fmt in ("trl", "llava", "llamafactory"):
        result = run("export", "--format", fmt, str(tmp_path / fmt), "--include-auto", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["pairs"] == 3
    assert (tmp_path / "trl" / "state.json").is_file()
    assert (tmp_path / "llava" / "llava_dpo.json").is_file()
    assert (tmp_path / "llamafactory" / "dataset_info.json").is_file()
    result = run("export", "--format", "llava", str(tmp_path / "llava"), "--include-auto")
    assert result.exit_code == 1 and "not empty" in result.stderr


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["import", "/definitely/not/here"], "no such file or directory", 1),
        (["import", ".", "--format", "xml"], "unknown import format", 2),  # a bad option value: usage
        (["export", "--format", "csv", "OUT", "--include-auto"], "unknown export format", 2),
    ],
)
def test_user_errors_exit_1_without_traceback(home, args, message, code):
    result = run(*args)
    assert result.exit_code == code
    assert message in result.stderr and "Traceback" not in result.output
    result = run(*args, "--json")
    assert result.exit_code == code and json.loads(result.stdout) == {
        "ok": False,
        "error": result.stderr[7:].strip(),
    }


def test_failed_import_exit_1(home, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("nope")
    result = run("import", str(tmp_path / "bad"))
    assert result.exit_code == 1 and "failed" in result.stdout and "nothing was imported" in result.stderr


def test_main_entry_point(home):
    with pytest.raises(SystemExit) as info:
        main(["init", "--json"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["stats", "--json"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


@pytest.mark.parametrize("args, message", [
    (["eval", "--n", "20001"], "Invalid value for '--n': Input should be less than or equal to 20000"),
    (["compare", "0"], "Missing argument 'b'"),
    (["review", "decide", "abc", "accept"], "Invalid value for 'pair_id': Input should be a valid integer"),
    (["stats", "--nope"], "No such option: --nope"),
])
def test_json_usage_errors_from_the_parser_are_json_too(home, capsys, args, message):
    """The parser's own usage errors printed a box on stderr and nothing on stdout under --json."""
    with pytest.raises(SystemExit) as info:
        main([*args, "--json"])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    result = json.loads(out)
    assert result["ok"] is False and result["error"].startswith(message), result
    assert err.strip() == f"error: {result['error']}"


@pytest.mark.parametrize("args, message", [
    (["demo", "seed", "--train", "-1"], "Invalid value for '--train': Input should be greater than or equal to 0"),
    (["no-such-command"], "No such command 'no-such-command'."),
    (["stats", "--nope"], "No such option: --nope"),
])
def test_usage_errors_from_the_parser_are_one_error_line(home, capsys, args, message):
    """Without --json the parser's usage errors were a box drawn on stderr; they are one 'error:'
    line now, as every other failure, and where to find the command's help."""
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    command = " ".join(["lvlm-studio", *args[:2]]) if args[0] == "demo" else "lvlm-studio" + (
        f" {args[0]}" if args[0] == "stats" else "")
    assert err.splitlines() == [f"error: {message}", f"(see {command} --help)"]
    # A command group named alone shows its help, as before.
    with pytest.raises(SystemExit) as info:
        main(["demo"])
    out, _ = capsys.readouterr()
    assert info.value.code == 2 and out.count("Usage: lvlm-studio demo") == 1 and "seed" in out  # once


def test_json_mode_keeps_exit_codes_and_help(home, capsys):
    for args, code in ((["init", "--json"], 0), (["stats", "--json"], 0), (["init", "--help", "--json"], 0), (["rounds", "--json"], 0),
                       (["compare", "5", "6", "--json"], 1)):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == code, (args, capsys.readouterr())
    out = capsys.readouterr().out
    assert "Usage:" in out and '"error": "round 5 does not exist' in out


def test_usage_errors_exit_2_and_failures_say_so_on_stderr(home, tmp_path, monkeypatch):
    """Bad option values are usage errors (exit 2, as the README says); a failed import says so on
    stderr under --json too; a data root that is a file is one error line, not a traceback."""
    for args, message in ((["compare", "0", "0", "--limit", "-1"], "--limit must be 0 or more"),
                          (["import", str(tmp_path), "--limit", "-1"], "--limit must be 1 or more"),
                          (["train", "--config", "learning_rate=fast"], "expected float"),
                          (["train", "--config", "nonsense"], "expected key=value"),
                          (["generate", "--method", "dpo"], "unknown method")):
        result = run(*args)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, args
    # Python's None/True/False are read as JSON's null/true/false (eval_limit=None means no limit).
    from lvlm_studio.cli import config_options
    from lvlm_studio.training import DPORoundConfig

    assert config_options(DPORoundConfig, ["eval_limit=None", "include_auto=True", "bf16=False", "eval_split=val"],
                          "--config", "DPO round") == {"eval_limit": None, "include_auto": True, "bf16": False,
                                                       "eval_split": "val"}
    # A list option of a method is accepted (the CLI makes it a tuple, the service checks it again):
    # the run gets as far as finding no items.
    assert run("init").exit_code == 0
    result = run("generate", "--method", "povid", "--param", 'categories=["object"]')
    assert result.exit_code == 1 and "no items to generate" in result.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("nope")
    result = run("import", str(tmp_path / "bad"), "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["status"] == "failed"
    assert result.stderr.startswith("error: nothing was imported")
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("LVLM_STUDIO_HOME", str(afile))
    result = run("rounds", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert json.loads(result.stdout)["error"].startswith(f"the data root {afile} is a file")


def test_import_options_reach_the_importer(home, settings, tmp_path):
    """--prompt and --limit reach the importer (the items get the prompt, no more records land
    than asked), and --images is the root that a file's image paths resolve against."""
    folder = tmp_path / "folder"
    for k in range(3):
        write_image(folder / f"{k}.png", seed=80 + k)
    result = run("import", str(folder), "--prompt", "What is here?", "--limit", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 2
    store = Store(settings.db_path)
    try:
        assert [it["prompt"] for it in store.list_items()] == ["What is here?"] * 2
    finally:
        store.close()

    pictures, meta = tmp_path / "pictures", tmp_path / "meta"
    write_image(pictures / "p.png", seed=90)
    meta.mkdir()
    row = {"image": "p.png", "prompt": "Describe.", "chosen": "Good.", "rejected": "Bad."}
    (meta / "d.jsonl").write_text(json.dumps(row))
    result = run("import", str(meta / "d.jsonl"), "--images", str(pictures), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pairs"] == 1


def test_export_options_select_pairs_and_stats_shows_reviews(home, settings, tmp_path):
    """export --method and --round select the pairs written, --overwrite replaces an earlier
    export; stats lists review decisions."""
    from lvlm_studio.service import Studio

    src = tmp_path / "src"
    for method, ks in (("a", (0, 1)), ("b", (2,))):
        for k in ks:
            write_image(src / f"{k}.png", seed=70 + k)
        rows = [{"image": f"{k}.png", "prompt": "Describe.", "chosen": f"Good {k}.", "rejected": f"Bad {k}."}
                for k in ks]
        (src / f"{method}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        assert run("import", str(src / f"{method}.jsonl"), "--method", method).exit_code == 0
    out = tmp_path / "out"
    result = run("export", str(out), "--include-auto", "--method", "b", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["pairs"] == 1, result.output
    result = run("export", str(out), "--include-auto", "--overwrite", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["pairs"] == 3, result.output
    result = run("export", str(tmp_path / "r1"), "--include-auto", "--round", "1")
    assert result.exit_code == 1 and "no round 1: the rounds table has none and no pair carries it" in result.stderr
    # Round 0 of an import-only root is in no rounds table yet, but its pairs carry it (review next
    # --round 0 reached them; export refused them).
    result = run("export", str(tmp_path / "r0"), "--include-auto", "--round", "0", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["pairs"] == 3, result.output

    made = Studio(settings, users={}, admins=())  # holds the base round 0
    assert made.store.create_round(0, "demo", {}, status="done") == 1  # round 1: it exists, but made no pairs
    made.store.close()
    result = run("export", str(tmp_path / "r1"), "--include-auto", "--round", "1")
    assert result.exit_code == 1 and "nothing to export" in result.stderr
    # A method no pair carries is a typo (a usage error naming the methods there are), for train too.
    result = run("export", str(tmp_path / "m"), "--include-auto", "--method", "nosuch")
    assert result.exit_code == 2 and "unknown method 'nosuch'; the store's methods: csr, povid, stic, a, b" in result.stderr
    result = run("train", "--methods", "a,nosuch", "--include-auto")
    assert result.exit_code == 2 and "unknown method 'nosuch'" in result.stderr
    assert not (tmp_path / "m").exists()

    studio = Studio(settings, users={}, admins=())
    studio.decide(studio.store.pair_ids()[0], "ann", "accept")
    studio.store.close()
    assert "reviews: accept 1" in run("stats").stdout


def test_debug_env_lets_the_traceback_through(home, monkeypatch):
    """LVLM_STUDIO_DEBUG=1 re-raises a user error (the README's way to see its traceback)."""
    from lvlm_studio.io import DataImportError

    assert run("import", "/definitely/not/here").exception.__class__ is SystemExit
    monkeypatch.setenv("LVLM_STUDIO_DEBUG", "1")
    assert isinstance(run("import", "/definitely/not/here").exception, DataImportError)
    for off in ("0", "false", " No ", ""):  # switched off the way people write it
        monkeypatch.setenv("LVLM_STUDIO_DEBUG", off)
        assert run("import", "/definitely/not/here").exception.__class__ is SystemExit, off


def test_listen_address_follows_the_environment(monkeypatch):
    """app.py and `serve` listen where config.listen_address says: options, then GRADIO_SERVER_NAME
    (0.0.0.0 on a Space), then PORT before GRADIO_SERVER_PORT; a bad port is one clear error."""
    from lvlm_studio.config import listen_address

    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert listen_address() == ("127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "me/studio")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")
    assert listen_address() == ("0.0.0.0", 7000)
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.0.0.5")
    assert listen_address() == ("10.0.0.5", 8080)
    assert listen_address("localhost", 9000) == ("localhost", 9000)
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(ValueError, match="PORT must be a positive whole number .* not 'eighty'"):
        listen_address()
    result = run("serve", "--no-seed")
    assert result.exit_code == 1 and result.stderr.strip() == (
        "error: PORT must be a positive whole number (e.g. 7860), not 'eighty'")
    monkeypatch.setenv("PORT", "70000")
    with pytest.raises(ValueError, match=r"PORT must be in 1\.\.65535, not 70000"):
        listen_address()
    result = run("serve", "--no-seed", "--port", "0")  # typed: a usage error
    assert result.exit_code == 2 and "--port" in result.stderr


def test_a_corrupt_database_is_one_error_line(home):
    """A data root whose studio.db is not a database (sqlite3.Error): exit 1, one error line."""
    home.mkdir(parents=True)
    (home / "studio.db").write_text("this is not a database" * 100)
    result = run("stats", "--json")
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert json.loads(result.stdout)["ok"] is False


def test_out_of_range_numbers_are_refused_by_name(home):
    """Negative seeds, counts and timeouts are usage errors (exit 2, before anything runs); a
    round id too large for SQLite is one error line, not an OverflowError traceback; an empty
    --methods no longer means every method."""
    assert run("init").exit_code == 0
    for args, message in ((["generate", "--method", "povid", "--seed", "-1"], "--seed"),
                          (["generate", "--method", "povid", "--seed", str(2**70)], "--seed"),
                          (["demo", "seed", "--train", "-5"], "--train"),
                          (["train", "--include-auto", "--wait", "--timeout", "-5"], "--timeout"),
                          (["cancel", "1", "--timeout", "-5"], "--timeout"),
                          (["train", "--methods", ",", "--include-auto"], "--methods names no method"),
                          (["demo", "seed", "--test", "99999999"], "--test"),  # used to fill memory silently
                          (["eval", "--n", "100000000"], "--n"),
                          (["eval", "--round", str(2**70)], "--round"),
                          (["generate", "--method", "povid", "--round", "-1"], "--round"),
                          (["generate", "--method", "povid", "--n", str(2**70)], "--n"),
                          (["export", "out", "--round", "-1"], "--round"),
                          (["train", "--from-round", "-1"], "--from-round")):
        result = run(*args)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, args
    for args in (["cancel", str(2**70)], ["compare", "0", str(2**70)]):
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
        assert result.stderr.startswith("error: ") and ("must be at most" in result.stderr
                                                        or "does not exist" in result.stderr), result.stderr
    store = Store(home / "studio.db")
    assert [r["id"] for r in store.list_rounds()] == [0]  # no round was started
    store.close()


def test_commands_that_read_the_store_refuse_a_data_root_without_one(home, tmp_path):
    """A mistyped LVLM_STUDIO_HOME: the commands that read or review what is stored say there is
    no store there, and how to make one, instead of creating an empty one and showing zeros; they
    leave nothing on disk. Commands that build a store (init, import, demo seed, eval) still create it."""
    for args in (["stats"], ["rounds"], ["compare", "0", "1"], ["export", str(tmp_path / "out")], ["cancel", "1"],
                 ["generate", "--method", "csr"], ["train", "--include-auto"],
                 ["review", "next", "--reviewer", "amy"], ["review", "show", "1"],
                 ["review", "decide", "1", "accept", "--reviewer", "amy"], ["review", "undo", "--reviewer", "amy"],
                 ["review", "progress"], ["review", "agreement"]):
        for extra in ([], ["--json"]):
            result = run(*args, *extra)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.strip() == (f"error: no LVLM Studio store at {home} (LVLM_STUDIO_HOME): "
                                              "`lvlm-studio init` creates one, `lvlm-studio demo seed` fills it "
                                              "with the demo world"), args
    assert not home.exists() and not (tmp_path / "out").exists()
    assert run("init").exit_code == 0 and run("stats").exit_code == 0


def test_an_empty_setting_is_its_default_not_the_working_directory(monkeypatch, tmp_path):
    """`LVLM_STUDIO_HOME= lvlm-studio init` used to make the working directory the data root
    (studio.db, images/, adapters/ wherever the command ran); an empty model was no model."""
    from lvlm_studio.config import DEFAULT_HOME, Settings

    monkeypatch.chdir(tmp_path)
    for name in ("LVLM_STUDIO_HOME", "LVLM_STUDIO_MODEL", "LVLM_STUDIO_CLIP", "LVLM_STUDIO_DEVICE",
                 "LVLM_STUDIO_BACKEND"):
        monkeypatch.setenv(name, " ")
    s = Settings()
    assert s.home == tmp_path / DEFAULT_HOME and (s.model, s.clip, s.device, s.backend) == ("demo", "demo", "auto", "hf")


def test_the_evaluation_table_says_when_chair_saw_no_object():
    """A model answering in another vocabulary (the demo model on COCO) names no object CHAIR
    knows: CHAIR_s 0.000 read as a perfect round, with 'silent' computed but never shown."""
    from lvlm_studio.cli import eval_table

    nothing = eval_table({"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "silent": 1.0, "n_captions": 6,
                          "n_mentions": 0})
    assert "silent (captions naming no object of a non-empty image)" in nothing and "1.0" in nothing
    assert "note: no caption names an object the extractor knows" in nothing
    named = eval_table({"chair_s": 0.0, "silent": 0.0, "n_captions": 6, "n_mentions": 9})
    assert "note:" not in named
