"""The Gradio app driven over HTTP with gradio_client: review decisions land in the store, a
training round starts from the Train tab's API and finishes, Compare returns both rounds' answers,
and 20 concurrent reviewers x 50 decisions store exactly 1000 decisions."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from conftest import image_bytes  # noqa: E402
from gradio_client import Client  # noqa: E402

from lvlm_studio.config import Settings  # noqa: E402
from lvlm_studio.service import Studio  # noqa: E402
from lvlm_studio.ui import launch  # noqa: E402


@pytest.fixture
def app(home):
    """A seeded studio (open mode) served on 127.0.0.1; yields (studio, url)."""
    studio = Studio(Settings(home=home), users={}, admins=())
    studio.seed_demo(n_train=6, n_test=3, pairs_per_method=0)
    ids = [it["id"] for it in studio._describe_items(split="train")]
    studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield studio, url
    demo.close()
    studio.store.close()


def test_review_decisions_from_the_api_and_the_ui_land_in_the_store(app):
    studio, url = app
    client = Client(url, verbose=False)
    view = client.predict("ann", "povid", "", "pending", api_name="/next_pair")
    assert view["method"] == "povid" and view["rejected"]["spans"]
    out = client.predict(view["pair_id"], "ann", "swap", "", "hmm", api_name="/decide")
    assert out["label"]["status"] == "swap"
    assert studio.store.reviewer_decision(view["pair_id"], "ann")["note"] == "hmm"
    # the Review tab's own handlers: load a pair, press Accept, the next pair comes up
    loaded = client.predict("bob", "all", "all", "pending", api_name="/review_load")
    shown_info = loaded[1]
    first = studio.next_pair("bob")
    assert f"pair #{first['pair_id']}" in shown_info
    after = client.predict("bob", "all", "all", "pending", "", "", api_name="/review_accept")
    assert studio.store.reviewer_decision(first["pair_id"], "bob")["decision"] == "accept"
    assert f"pair #{first['pair_id']}" in after[-1]  # the message names the decided pair
    assert client.predict("bob", api_name="/undo")["pair_id"] == first["pair_id"]
    assert studio.store.reviewer_decision(first["pair_id"], "bob") is None
    prog = client.predict("ann", api_name="/progress")
    assert prog["reviewer_done"] == 1 and prog["total"] == studio.store.count_pairs()
    with pytest.raises(Exception, match="unknown decision"):
        client.predict(view["pair_id"], "ann", "maybe", "", "", api_name="/decide")


def test_review_images_are_served_from_a_data_root_outside_the_working_and_temp_dirs(tmp_path):
    """Gradio serves files from the working and temp directories and allowed_paths only: with the
    data root elsewhere (LVLM_STUDIO_HOME=/data/studio) the Review tab could not show any image."""
    outside = Path(tempfile.mkdtemp(prefix="lvlm-test-home-", dir=Path.home()))
    try:
        assert not outside.is_relative_to(tempfile.gettempdir()) and not outside.is_relative_to(Path.cwd())
        studio = Studio(Settings(home=outside), users={}, admins=())
        studio.seed_demo(n_train=2, n_test=1, pairs_per_method=0)
        ids = [it["id"] for it in studio._describe_items(split="train")]
        studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
        demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            loaded = Client(url, verbose=False).predict("bob", "all", "all", "pending", api_name="/review_load")
            image = Path(loaded[0])
            assert image.is_file() and image.read_bytes() == Path(studio.next_pair("bob")["image_path"]).read_bytes()
        finally:
            demo.close()
            studio.store.close()
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_compare_returns_both_rounds_answers(app):
    studio, url = app
    items = [it["id"] for it in studio._describe_items(split="test")][:2]
    r1 = studio.store.create_round(0, "demo", {}, status="done")
    studio.store.add_eval_outputs(0, [{"item_id": items[0], "answer": "There is a red circle.",
                                       "objects": ["red circle"], "hallucinated": ["red circle"]},
                                      {"item_id": items[1], "answer": "Same.", "objects": [], "hallucinated": []}])
    studio.store.add_eval_outputs(r1, [{"item_id": items[0], "answer": "There is a blue square.",
                                        "objects": ["blue square"], "hallucinated": []},
                                       {"item_id": items[1], "answer": "Same.", "objects": [], "hallucinated": []}])
    client = Client(url, verbose=False)
    res = client.predict(0, r1, False, api_name="/compare")
    assert [r["a"]["answer"] for r in res["rows"]] == ["There is a red circle.", "Same."]
    assert [r["b"]["answer"] for r in res["rows"]] == ["There is a blue square.", "Same."]
    metrics, paired, html, *_plot = client.predict("0", str(r1), True, api_name="/compare_view")
    assert f"CHAIR_s on the same 2 captions: 0.500 (round 0) -> 0.000 (round {r1})" in paired
    assert "There is a blue square." in html and "Same." not in html  # only where they differ
    assert '<mark class="hallu">red circle</mark>' in html
    assert [row[0] for row in metrics["data"]] == ["0", str(r1)]  # the same items: no common rows


def test_compare_tab_evaluates_a_round_then_compares_it(app):
    """On a fresh start no round has answers: Compare says how to get some, and its Evaluate button
    answers the test scenes with the base model, stores answers and metrics, and shows them."""
    studio, url = app
    client = Client(url, verbose=False)
    html = client.predict("0", "0", False, api_name="/compare_view")[2]
    assert "evaluate a round below" in html
    summary, plot, note, plot_set, _a, b, compare_set = client.predict("0", 2, api_name="/evaluate_round")
    ev = studio.get_round(0)["metrics"]["eval"]
    assert ev["scenes"] == 2 and ev["split"] == "test" and ev["model"] == "demo"
    outputs = studio.store.eval_outputs(0)
    captions = [o for o in outputs if (o.get("meta") or {}).get("kind") != "pope"]
    assert len(captions) == 2 and len(outputs) > 2  # two descriptions and their POPE probes
    assert f"CHAIR_s **{ev['chair_s']:.3f}**" in summary and f"POPE F1 **{ev['pope_f1']:.3f}**" in summary
    assert f"Round 0 on {len(outputs)} items (2 test scenes, 0 items added)" in summary
    assert b["value"] == "0" and {row[0] for row in plot["value"]["data"]} == {"round 0"}
    assert note.startswith("Only round 0 is evaluated so far") and f"{ev['chair_s']:.3f}" in note
    assert plot_set["value"] == "shapesworld/test" and not plot_set["visible"]  # one set: no box to pick from
    # The comparison that follows (A = 0, B = 0) is offered the set just evaluated.
    assert [c[1] for c in compare_set["choices"]] == ["latest both share", "shapesworld/test"]
    metrics, paired, html, *_plot = client.predict("0", "0", False, api_name="/compare_view")
    assert captions[0]["answer"].split(".")[0] in html
    assert f"POPE F1 on the same {len(outputs) - 2} probes: {ev['pope_f1']:.3f} (round 0)" in paired  # probe by probe
    assert "paired bootstrap over 2 images p = 1 " in paired  # each scene's probes drawn together
    assert metrics["data"][0][1:5] == [round(ev[k], 4) for k in ("chair_s", "chair_i", "recall", "pope_f1")]
    # What the field can get wrong is said, and nothing is evaluated.
    for n, match in ((0, "test scenes or images: between 1 and 5000"), (5001, "between 1 and 5000"),
                     (None, "test scenes or images: enter a number")):
        with pytest.raises(Exception, match=match):
            client.predict("0", n, api_name="/evaluate_round")
    with pytest.raises(Exception, match="pick a round"):
        client.predict("", 2, api_name="/evaluate_round")
    with pytest.raises(Exception, match="round 7 does not exist"):
        client.predict("7", 2, api_name="/evaluate_round")
    with pytest.raises(Exception, match="unknown evaluation set 'coco/val'"):
        client.predict("0", 2, "coco/val", api_name="/evaluate_round")
    assert len(studio.store.eval_outputs(0)) == len(outputs)
    # An imported set with ground truth is offered and evaluated: its first N images' captions and probes.
    from conftest import write_coco

    studio.import_path(write_coco(studio.settings.home.parent / "coco", [["dog", "couch", "cup"], ["cat", "car", "person"]]))
    studio.add_pope_probes("coco", "val", per_image=1)
    assert list(studio.evaluation_sets()) == ["shapesworld/test", "coco/val"]
    world = ev
    summary, plot, note, plot_set, *_ = client.predict("0", 1, "coco/val", api_name="/evaluate_round")
    ev = studio.get_round(0)["metrics"]["eval"]
    assert (ev["dataset"], ev["split"], ev["images"], ev["extractor"]) == ("coco", "val", 1, "coco")
    assert summary.startswith("Round 0 on 3 items (coco/val, 1 image), model demo")
    assert "no caption names an object the extractor knows" in summary  # the demo model names no COCO object
    # The world's figures are kept beside the set's; the plot turns to the set just evaluated and
    # offers both, and the comparison reads one set (the latest by default, the other when picked).
    assert studio.get_round(0)["metrics"]["evals"]["shapesworld/test"] == world
    assert plot_set["value"] == "coco/val" and plot_set["visible"] and len(plot_set["choices"]) == 2
    assert note.startswith("On coco/val") and f"{ev['chair_s']:.3f}" in note
    metrics, paired, html, *_ = client.predict("0", "0", False, "latest both share", api_name="/compare_view")
    assert paired.startswith("On coco/val.") and metrics["data"][0][5] == 3
    metrics, paired, html, *_ = client.predict("0", "0", False, "shapesworld/test", api_name="/compare_view")
    assert paired.startswith("On shapesworld/test.") and metrics["data"][0][1] == round(world["chair_s"], 4)
    assert captions[0]["answer"].split(".")[0] in html and "dog" not in html


def test_train_tab_start_passes_its_fields_to_the_round(app):
    """The Train tab's button: its fields, POVID's two-term box and stage-1 epochs included, become the
    round's config."""
    studio, url = app
    client = Client(url, verbose=False)
    client.predict(["povid"], "0", True, 1e-4, 1, 0.2, 8, 0.5, 2, True, "dpo", 3, 24, api_name="/train_start")
    rid = max(r["id"] for r in studio.rounds())
    try:
        # A second start while this one runs: the reason, not a generic error.
        with pytest.raises(Exception, match=f"round {rid} is already .*one training job runs at a time"):
            client.predict(["povid"], "0", True, 1e-4, 1, 0.2, 8, 0.5, 2, True, api_name="/train_start")
        config = studio.get_round(rid)["config"]
        assert config["methods"] == ["povid"] and config["include_auto"] is True
        assert (config["learning_rate"], config["beta"], config["lora_r"], config["lora_alpha"]) == (1e-4, 0.2, 8, 24)
        assert config["sft_weight"] == 0.5 and config["eval_limit"] == 2 and config["povid_two_term"] is True
        assert config["povid_stage1_epochs"] == 3
    finally:
        studio.cancel_round(rid, None)
        assert studio.wait_round(rid, timeout=120)["status"] in ("cancelled", "failed", "done")


def test_handlers_say_what_is_wrong_and_create_nothing(app):
    """What a user can get wrong in the tabs is a message naming it, never the browser's generic
    "Error", and nothing is created on the way."""
    studio, url = app
    client = Client(url, verbose=False)
    train = ["povid", "0", True, 1e-4, 1, 0.2, 8, 0.5, 2, False]

    def fails(match: str, *args, api_name: str) -> None:
        with pytest.raises(Exception, match=match):
            client.predict(*args, api_name=api_name)

    fails("round 42 does not exist", ["povid"], "42", *train[2:], api_name="/train_start")
    fails("no round 'abc'", ["povid"], "abc", *train[2:], api_name="/train_start")
    fails("learning rate: enter a number", ["povid"], "0", True, None, *train[4:], api_name="/train_start")
    fails("no training pairs.*for methods stic", ["stic"], "0", False, *train[3:], api_name="/train_start")
    # The JSON API checks a round's option types as the CLI's --config does: "false" is not False.
    fails('include_auto="false": expected bool', {"methods": ["povid"], "include_auto": "false"}, "",
          api_name="/start_round")
    fails('num_epochs="3": expected float', {"methods": ["povid"], "num_epochs": "3"}, "", api_name="/start_round")
    fails("unknown DPO round option.*epochs", {"epochs": 3}, "", api_name="/start_round")
    fails("round 99 does not exist", "99", api_name="/train_cancel")
    fails("tick at least one method", "trl", [], True, api_name="/export")  # [] is not "every method"
    assert [r["id"] for r in studio.rounds()] == [0]  # no round was created to fail
    # The Train tab's timer polls whatever the Round box holds: a typed name is said, not raised.
    status = client.predict("abc", api_name="/train_refresh")[2]
    assert "No round abc" in status
    gen = ["csr", "demo", "0", "shapesworld", "train", 2, 0, "{}"]
    fails("n must be at least 1", *gen[:5], -1, *gen[6:], api_name="/generate_run")
    fails('num_candidates="three": expected int', *gen[:7], '{"num_candidates": "three"}', api_name="/generate_run")
    fails("no items to generate for: dataset 'nope'", *gen[:3], "nope", *gen[4:], api_name="/generate_run")
    fails("round 99 does not exist", "povid", "demo", "99", *gen[3:7], '{"make_image_rejected": false}',
          api_name="/generate_run")  # POVID's text pairs load no model, and were tagged with round 99
    fails("round 99 does not exist", "0", "99", False, api_name="/compare_view")
    # Two exports in the same second both land (the folder name no longer collides).
    first, second = (client.predict("trl", ["povid"], True, api_name="/export")[0] for _ in range(2))
    assert first["pairs"] == second["pairs"] > 0 and first["folder"] != second["folder"]


def test_generate_tab_csr_defaults_pair_the_world_items(app):
    """The Generate tab's CSR parameters (once 3 candidates, with which most searches ended in one
    distinct answer and no pair, and every click retried the same items) pair nearly every item."""
    import json

    from lvlm_studio.ui.generate import DEFAULT_PARAMS

    studio, url = app
    client = Client(url, verbose=False)
    res = client.predict("csr", "demo", "0", "shapesworld", "train", 6, 0, json.dumps(DEFAULT_PARAMS["csr"]),
                         api_name="/generate_run")
    assert res["items"] == 6 and res["pairs"] >= 5, res
    assert ("note" in res) == (res["no_pair"] > 0)


def test_review_shows_a_saved_edit_and_re_edits_from_it(app):
    studio, url = app
    client = Client(url, verbose=False)
    client.predict("bob", "all", "all", "pending", api_name="/review_load")
    pair_id = studio.next_pair("bob")["pair_id"]
    client.predict("bob", "all", "all", "pending", "There is a <b>red</b> circle.", "", api_name="/review_edit")
    assert studio.store.effective_label(pair_id)["chosen_text"] == "There is a <b>red</b> circle."
    loaded = client.predict("bob", "all", "all", "decided", api_name="/review_load")
    assert f"pair #{pair_id}" in loaded[1]
    assert "Edited chosen answer (trains as chosen)" in loaded[1]
    assert "There is a &lt;b&gt;red&lt;/b&gt; circle." in loaded[1]  # shown, escaped
    opened = client.predict(api_name="/review_open_edit")  # the edit box (the button is not an API output)
    assert opened["value"] == "There is a <b>red</b> circle." and opened["visible"] is True


@pytest.mark.slow
def test_twenty_concurrent_reviewers_store_every_decision_once(home):
    studio = Studio(Settings(home=home), users={}, admins=())
    from lvlm_studio.media import ingest_image

    decisions = ("accept", "swap", "reject_both")
    pair_ids = []
    for k in range(50):
        rec = ingest_image(studio.settings, image_bytes(k, "PNG"), name=f"{k}.png")
        studio.store.add_image(rec.id, rec.path, rec.width, rec.height, "test")
        item = studio.store.add_item(rec.id, "Describe the image.")
        studio.store.write_generation(item, [{"text": f"good {k}", "source": "csr"}, {"text": f"bad {k}", "source": "csr"}],
                                      [{"chosen": 0, "rejected": 1, "method": "csr", "margin": k / 10}])
        pair_ids.append(studio.store.find_pair(item, f"good {k}", f"bad {k}", "csr"))
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    errors: list[BaseException] = []

    def reviewer(r: int) -> None:
        try:
            client = Client(url, verbose=False)
            for k, pid in enumerate(pair_ids):
                client.predict(pid, f"rev{r}", decisions[(r + k) % 3], "", "", api_name="/decide")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=reviewer, args=(r,)) for r in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    elapsed = time.perf_counter() - t0
    try:
        assert not errors, errors[:3]
        stats = studio.store.stats()
        assert stats["tables"]["reviews"] == 1000, stats
        matrix = studio.store.decisions_matrix()
        assert sorted(matrix) == sorted(pair_ids)
        for k, pid in enumerate(pair_ids):
            assert matrix[pid] == {f"rev{r}": decisions[(r + k) % 3] for r in range(20)}
        print(f"1000 decisions from 20 clients in {elapsed:.1f} s")
    finally:
        demo.close()
        studio.store.close()


@pytest.mark.slow
def test_training_round_from_the_train_tab_api_finishes(home, tmp_path):
    """A real round (TRL DPO + LoRA, subprocess) on a tiny random LLaVA, started through the API."""
    from lvlm_studio.models.tiny import build_tiny_llava
    from lvlm_studio.world import world_words

    vlm = str(build_tiny_llava(tmp_path / "vlm", words=world_words()))
    studio = Studio(Settings(home=home, model=vlm, device="cpu"), users={}, admins=())
    studio.seed_demo(n_train=6, n_test=2, pairs_per_method=0)
    ids = [it["id"] for it in studio._describe_items(split="train")]
    studio.generate("povid", model=vlm, item_ids=ids, params={"make_image_rejected": False})
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        while (view := client.predict("ann", "", "", "pending", api_name="/next_pair")) is not None:
            client.predict(view["pair_id"], "ann", "accept", "", "", api_name="/decide")
        config = {"methods": ["povid"], "max_steps": 2, "batch_size": 4, "eval_limit": 4,
                  "eval_max_new_tokens": 8, "device": "cpu"}
        round_id = client.predict(config, "", api_name="/start_round")
        row = studio.wait_round(round_id, timeout=300)
        assert row["status"] == "done", row.get("error")
        status = client.predict(round_id, api_name="/round_status")
        assert status["round"]["status"] == "done" and status["curve"], "the curve is in the store"
        res = client.predict(0, round_id, False, api_name="/compare")
        assert res["rows"] and all(r["a"] is not None and r["b"] is not None for r in res["rows"])
        # The Train tab's button with its default parent continues from the round that finished.
        client.predict(["povid"], "current", False, 1e-4, 1, 0.3, 8, 1.0, 2, False, "dpo", 0, api_name="/train_start")
        second = max(r["id"] for r in studio.rounds())
        try:
            assert second != round_id and studio.get_round(second)["parent_id"] == round_id
            # No α sent (an older client): DPORoundConfig's, as the CLI's `-c lora_r=8` keeps it.
            from lvlm_studio.training import DPORoundConfig

            assert studio.get_round(second)["config"]["lora_alpha"] == DPORoundConfig().lora_alpha
        finally:
            studio.cancel_round(second, None)
            studio.wait_round(second, timeout=120)
    finally:
        demo.close()
        studio.store.close()


def test_train_tab_starts_from_the_measured_round_defaults(home):
    """The Train tab's parameter fields show DPORoundConfig's defaults (the ones the README's demo
    loop measured), not a second hand-written set."""
    from lvlm_studio.training import DPORoundConfig
    from lvlm_studio.ui.app import build_app

    studio = Studio(Settings(home=home), users={}, admins=())
    try:
        demo = build_app(studio)
        fields = {b.elem_id: b.value for b in demo.blocks.values() if str(getattr(b, "elem_id", "")).startswith("train-")}
        d = DPORoundConfig()
        assert fields["train-lr"] == d.learning_rate and fields["train-epochs"] == d.num_epochs
        assert fields["train-beta"] == d.beta and fields["train-sft"] == d.sft_weight
        assert fields["train-lora-r"] == d.lora_r and fields["train-povid-two-term"] is d.povid_two_term
        assert fields["train-lora-alpha"] == d.lora_alpha
        assert fields["train-povid-stage1"] == d.povid_stage1_epochs
        assert fields["train-eval-n"] == d.eval_limit
        assert fields["train-parent"] == "current"  # one click continues from the current round
    finally:
        studio.store.close()


def test_tabs_open_on_the_newest_round(home):
    """The Train tab's Round box starts on the newest round (Gradio's default, the first choice,
    is round 0, which has no curve); Compare's metrics plot has one labelled tick per round."""
    from lvlm_studio.ui.app import build_app
    from lvlm_studio.ui.compare import metrics_plot, metrics_plot_frame

    studio = Studio(Settings(home=home), users={}, admins=())
    try:
        # Gradio draws lines only: with fewer than two evaluated rounds the note under it has the figures.
        assert metrics_plot(studio)[1] == "No round evaluated yet."
        r1 = studio.store.create_round(0, "demo", {}, status="done")
        studio.store.update_round(r1, metrics={"eval": {"chair_s": 0.1, "recall": 0.9}})
        note = metrics_plot(studio)[1]
        assert note.startswith(f"Only round {r1} is evaluated") and "CHAIR_s ↓ 0.100" in note
        assert "recall ↑ 0.900" in note
        studio.store.update_round(0, metrics={"eval": {"chair_s": 0.25, "recall": 0.95}})
        assert metrics_plot(studio)[1] == ""
        demo = build_app(studio)
        values = {b.elem_id: getattr(b, "value", None) for b in demo.blocks.values() if getattr(b, "elem_id", None)}
        assert values["train-round"] == str(r1)
        # Compare's Round B is the newest finished round, not a newer failed or cancelled one.
        studio.store.create_round(r1, "demo", {}, status="cancelled")
        values = {b.elem_id: getattr(b, "value", None) for b in build_app(studio).blocks.values()
                  if getattr(b, "elem_id", None)}
        assert values["compare-b"] == str(r1)
        frame = metrics_plot_frame(studio)
        assert sorted(set(frame["round"])) == ["round 0", f"round {r1}"]
        assert set(frame["metric"]) == {"CHAIR_s ↓", "recall ↑"} and frame["value"].dtype == float
    finally:
        studio.store.close()


def test_model_handlers_queue_one_at_a_time_and_evaluate_opens_on_a_fresh_start(home):
    """Generate (tab and /generate) and Compare's Evaluate load a model on the same cores: they share
    one queue slot. The Evaluate box is open while no round has metrics, closed once one has."""
    from lvlm_studio.ui.app import build_app

    studio = Studio(Settings(home=home), users={}, admins=())
    try:
        def evaluate_box_open() -> bool:
            demo = build_app(studio)
            slots = {f.api_name: (f.concurrency_id, f.concurrency_limit) for f in demo.fns.values()
                     if f.api_name in ("generate_run", "generate", "evaluate_round")}
            assert len(slots) == 3 and len(set(slots.values())) == 1 and next(iter(slots.values()))[1] == 1
            return next(b.open for b in demo.blocks.values() if getattr(b, "elem_id", None) == "compare-eval-box")

        assert evaluate_box_open()
        studio.store.update_round(studio.store.ensure_base_round("demo"), metrics={"eval": {"chair_s": 0.25}})
        assert not evaluate_box_open()
    finally:
        studio.store.close()


def test_a_typed_name_grants_nothing_once_admins_are_named(home, tmp_path):
    """With an admin list but no accounts (a Space whose admins sign in with Hugging Face), an
    anonymous caller who types an admin's name must not train, cancel, decide or undo as them; the
    header names no one. With accounts on, a reviewer cannot import from a server path."""
    from lvlm_studio.service import parse_users

    studio = Studio(Settings(home=home), users={}, admins={"alice"})
    studio.seed_demo(n_train=2, n_test=1, pairs_per_method=0)
    ids = [it["id"] for it in studio._describe_items(split="train")]
    studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        pair_id = studio.next_pair("someone")["pair_id"]
        with pytest.raises(Exception, match="needs the admin role: sign in as an admin \\(no user was given\\)"):
            client.predict({"methods": ["povid"], "include_auto": True}, "alice", api_name="/start_round")
        with pytest.raises(Exception, match="needs the admin role"):
            client.predict(0, "alice", api_name="/cancel_round")
        with pytest.raises(Exception, match="sign in first"):
            client.predict(pair_id, "alice", "reject_both", "", "", api_name="/decide")
        with pytest.raises(Exception, match="sign in first"):
            client.predict("alice", api_name="/undo")
        assert [r["id"] for r in studio.rounds()] == [0] and studio.store.reviewer_decision(pair_id, "alice") is None
        assert "alice" not in studio.auth_summary() and "sign-in required" in studio.auth_summary()
    finally:
        demo.close()
        studio.store.close()

    studio = Studio(Settings(home=home), users=parse_users("alice:pw:admin,bob:pw:reviewer"), admins=())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("SECRET")
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        items = studio.store.count_items()
        bob = Client(url, auth=("bob", "pw"), verbose=False)
        with pytest.raises(Exception, match="importing from a path on the server needs the admin role; 'bob'"):
            bob.predict(str(tmp_path / "outside"), "folder", "", api_name="/import_path")
        alice = Client(url, auth=("alice", "pw"), verbose=False)
        report = alice.predict(str(tmp_path / "outside"), "folder", "", api_name="/import_path")
        assert report["status"] == "failed" and studio.store.count_items() == items  # no image there
        assert studio.auth_summary() == "accounts on: 2 (1 admin)"
        # POPE probes for an imported set: the Data tab's button, admins only (it changes what every
        # later round is evaluated on).
        from conftest import write_coco

        coco = write_coco(tmp_path / "coco", [["dog", "couch", "cup"], ["person", "car", "dog", "cup"]])
        assert alice.predict(str(coco), "coco", "", api_name="/import_path")["imported"] == 2
        with pytest.raises(Exception, match="adding POPE probes to an evaluation set needs the admin role"):
            bob.predict("coco", "val", "random", 500, api_name="/add_pope_probes")
        probes = alice.predict("coco", "val", "random", 500, api_name="/add_pope_probes")
        assert (probes["images"], probes["probes"], probes["added"]) == (2, 12, 12)
        from lvlm_studio.ui.common import report_markdown

        assert report_markdown(probes).startswith("**12 POPE probes** (random, 6 yes) on 2 images of coco/val: 12 new")
    finally:
        demo.close()
        studio.store.close()


def test_train_tab_starts_a_stic_stage_two_round(app):
    """The Train tab's objective picks STIC's stage 2 (no pair methods needed): the round's config
    says so, and the job is the real one (cancelled here; tests/test_jobs.py runs one to the end)."""
    studio, url = app
    client = Client(url, verbose=False)
    # Picking the objective puts its default learning rate in the field: the paper's 2e-5 for stage 2.
    assert client.predict("stic_infusion", api_name="/train_objective_lr") == 2e-5
    assert client.predict("dpo", api_name="/train_objective_lr") == 2e-4
    client.predict([], "0", False, 2e-5, 1, 0.3, 8, 1.0, 2, False, "stic_infusion", api_name="/train_start")
    rid = max(r["id"] for r in studio.rounds())
    try:
        config = studio.get_round(rid)["config"]
        assert config["objective"] == "stic_infusion" and config["learning_rate"] == 2e-5
    finally:
        studio.cancel_round(rid, None)
        assert studio.wait_round(rid, timeout=120)["status"] in ("cancelled", "failed", "done")
    with pytest.raises(Exception, match="pick at least one method"):
        client.predict([], "0", False, 2e-5, 1, 0.3, 8, 1.0, 2, False, "dpo", api_name="/train_start")


def test_round_status_shows_povid_stages_and_escapes_what_it_shows():
    from lvlm_studio.ui.train import status_html

    html = status_html({"id": 3, "status": "done", "progress": 1.0, "error": "<script>alert(1)</script>",
                        "metrics": {"povid_stages": [{"stage": 1, "n_pairs": 200, "steps": 75},
                                                     {"stage": 2, "n_pairs": 400, "steps": 50}],
                                    "eval": {"chair_s": 0.25}}})
    assert "POVID stages: 1: 200 pairs, 75 steps; 2: 400 pairs, 50 steps" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "POVID stages" not in status_html({"id": 2, "status": "done", "metrics": {"eval": {"chair_s": 0.1}}})
    # The evaluation set's label holds an imported dataset's name: shown as text too.
    hostile = "<img src=x onerror=alert(1)>/val"
    for ev in ({"chair_s": 0.1, "n_captions": 3, "set": hostile}, {"chair_s": 0.1, "set": hostile}):
        html = status_html({"id": 2, "status": "done", "metrics": {"eval": ev}})
        assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;/val" in html


def test_export_offers_the_methods_the_store_holds(tmp_path):
    """An imported file names its own method ("imported" when it does not): the Data tab's export
    offers it beside the three generators, ticked, instead of leaving those pairs out."""
    from lvlm_studio.ui.data import method_choices

    studio = Studio(Settings(home=tmp_path / "home"), users={}, admins=())
    try:
        assert method_choices(studio.stats()) == ["csr", "povid", "stic"]
        studio.seed_demo(n_train=2, n_test=0, pairs_per_method=0)
        item = studio.store.list_items()[0]["id"]
        good, bad = (studio.store.add_candidate(item, t, "imported") for t in ("A red circle.", "A blue star."))
        studio.store.add_pair(item, good, bad, "imported")
        assert method_choices(studio.stats()) == ["csr", "povid", "stic", "imported"]
    finally:
        studio.store.close()


def test_train_tab_offers_and_ticks_imported_methods(tmp_path):
    """The Train tab's methods are the generators and whatever the store holds, all ticked (the
    CLI's `train` without --methods trains on every method), and a method imported after the page
    opened is offered and ticked while the user's other ticks stay as they were."""
    from lvlm_studio.ui.app import build_app
    from lvlm_studio.ui.common import ticked_methods

    studio = Studio(Settings(home=tmp_path / "home"), users={}, admins=())
    try:
        studio.seed_demo(n_train=2, n_test=0, pairs_per_method=0)
        item = studio.store.list_items()[0]["id"]
        good, bad = (studio.store.add_candidate(item, t, "imported") for t in ("A red circle.", "A blue star."))
        studio.store.add_pair(item, good, bad, "my-file")
        box = next(b for b in build_app(studio).blocks.values() if getattr(b, "elem_id", None) == "train-methods")
        assert [c[1] for c in box.choices] == box.value == ["csr", "povid", "stic", "my-file"]
        # The poll: nothing new, no update (the user's ticks stand); a newly imported method, ticked.
        from lvlm_studio.ui.train import methods_update

        known = ["csr", "povid", "stic", "my-file"]
        assert all(isinstance(u, dict) and u.get("__type__") == "update" and len(u) == 1
                   for u in methods_update(studio, ["csr"], known))
        studio.store.add_pair(item, bad, good, "later-file")
        update, now = methods_update(studio, ["csr"], known)
        assert now == [*known, "later-file"] and update.value == ["csr", "later-file"]
    finally:
        studio.store.close()
    assert ticked_methods(["csr", "povid", "stic", "new"], ["csr"], ["csr", "povid", "stic"]) == ["csr", "new"]
    assert ticked_methods(["csr", "povid"], ["csr", "gone"], ["csr", "gone"]) == ["csr", "povid"]


def test_an_upload_over_the_image_limit_is_refused_before_it_reaches_the_disk(home, tmp_path):
    """Gradio writes an upload to its cache before any handler runs: the app caps it there at the
    image limit (a multi-GB upload used to fill the disk before being refused)."""
    from gradio_client import handle_file

    studio = Studio(Settings(home=home, max_file_bytes=30_000), users={}, admins=())
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    big.write_bytes(image_bytes(1, "PNG", (300, 300)))  # ~270 KB of noise
    small.write_bytes(image_bytes(2, "PNG", (40, 40)))
    assert big.stat().st_size > 30_000 > small.stat().st_size
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="(?i)size|large|limit|413"):
            client.predict([handle_file(str(big))], "Describe.", "up", api_name="/upload_images")
        assert studio.store.count_items() == 0
        report = client.predict([handle_file(str(small))], "Describe.", "up", api_name="/upload_images")
        assert len(report["items"]) == 1 and not report["rejected"] and studio.store.count_items() == 1
    finally:
        demo.close()
        studio.store.close()
