"""service.Studio: seeding, generation with provenance and resume, review, compare, agreement, roles."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lvlm_studio.config import Settings
from lvlm_studio.service import Studio, User, cohen_kappa, fleiss_kappa, margin_buckets, parse_users
from lvlm_studio.store import NotFoundError

torch.set_num_threads(1)


@pytest.fixture
def studio(home):
    s = Studio(Settings(home=home), users={}, admins=())
    yield s
    s.store.close()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A random tiny LLaVA over the world's words and a random small open_clip CLIP, saved the way
    the demo ships them (loaded through models/registry like any model)."""
    import open_clip
    from transformers import AutoModelForImageTextToText

    from lvlm_studio.models.tiny import build_tiny_llava
    from lvlm_studio.world import world_words
    from lvlm_studio.world.build import demo_clip_cfg, save_clip

    root = tmp_path_factory.mktemp("models")
    vlm = build_tiny_llava(root / "vlm", words=world_words())
    # Random tiny weights attend almost uniformly, so the answers hardly depend on prompt or image
    # and STIC's good and bad answers coincide; sharper attention and projector make them depend.
    model = AutoModelForImageTextToText.from_pretrained(vlm)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name or "multi_modal_projector" in name:
                param.mul_(8)
    model.save_pretrained(vlm)
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**demo_clip_cfg())
    save_clip(clip, root / "clip", dtype="float32")
    return str(vlm), str(root / "clip")


def _world_describe(studio: Studio, split: str = "train") -> list[dict]:
    return studio._describe_items(split=split)


def test_seed_demo_fills_splits_and_kinds_once(studio):
    report = studio.seed_demo(n_train=4, n_test=3)
    stats = studio.stats()
    assert stats["datasets"]["shapesworld"]["train"] > 0 and stats["datasets"]["shapesworld"]["test"] > 0
    kinds = {(it["meta"] or {}).get("kind") for it in studio.store.list_items(dataset="shapesworld")}
    assert {"describe", "pope"} <= kinds
    # seeded items, plus the yes/no question items CSR's demo pairs derive (world defaults)
    derived = [it for it in studio.store.list_items() if (it["meta"] or {}).get("kind") == "csr_existence"]
    assert report["items"] == studio.store.count_items() - len(derived)
    assert studio.store.count_pairs() > 0, report["message"]  # a newcomer sees pairs at once
    again = studio.seed_demo(n_train=4, n_test=3)
    assert again["items"] == 0 and studio.store.count_items() == report["items"] + len(derived)


def test_povid_generation_is_resumable_and_records_provenance(studio):
    studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0)
    ids = [it["id"] for it in _world_describe(studio)][:3]
    first = studio.generate("povid", item_ids=ids[:2], seed=5, params={"make_image_rejected": False})
    assert first["pairs"] == 2 and first["skipped"] == 0
    again = studio.generate("povid", item_ids=ids, seed=5, params={"make_image_rejected": False})
    assert again["items"] == 1 and again["skipped"] == 2 and again["pairs"] == 1
    view = studio.next_pair("ann", method="povid")
    assert view["round"] == 0 and view["method"] == "povid"
    rej = studio.store.get_candidate(view["rejected"]["id"])
    assert rej["source"] == "povid_inject" and rej["spans"], "injected spans are stored for the UI"
    assert rej["model"] == "demo" and rej["round"] == 0 and rej["params"]["method"] == "povid"
    for span in rej["spans"]:
        assert span["end"] > span["start"] and rej["text"][span["start"]:span["end"]] == span["injected"]
    with pytest.raises(ValueError, match="unknown method"):
        studio.generate("dpo")


def test_a_run_racing_another_and_repeated_ids_store_each_items_pairs_once(studio, monkeypatch):
    """Two runs over the same items (the app and the CLI, two workers) both read "not done" before
    either writes: the later one must skip what the first stored, not pair the items again. An id
    named twice is generated for once."""
    studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0)
    ids = [it["id"] for it in _world_describe(studio)][:3]
    once = studio.generate("povid", item_ids=[ids[0], ids[0], ids[1], ids[0]], params={"make_image_rejected": False})
    assert once["items"] == 2 and once["pairs"] == 2 and studio.store.count_pairs("povid") == 2
    monkeypatch.setattr(studio.store, "items_with_pairs", lambda method, round: set())  # read before the other wrote
    racing = studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
    assert racing["pairs"] == 1 and racing["items"] == 1 and racing["skipped"] == 2, racing
    assert studio.store.count_pairs("povid") == 3
    per_item = studio.store.db.execute("SELECT item_id, count(*) FROM pairs GROUP BY item_id").fetchall()
    assert sorted(per_item) == sorted((i, 1) for i in ids)
    evaluated = studio.evaluate(0, item_ids=[ids[2], ids[2]], max_new_tokens=4)
    assert evaluated["n_items"] == 1
    assert studio.store.db.execute("SELECT count(*) FROM eval_outputs WHERE round_id = 0").fetchone()[0] == 1


def test_each_item_draws_with_its_own_seed_whatever_chunk_it_falls_in(studio):
    """The methods counted items from 0 in each chunk of 8, so items 0, 8, 16, ... drew the same
    injection (and STIC's rejection draw, POVID's noise); a resumed run drew differently."""
    from lvlm_studio.service import item_seed

    studio.seed_demo(n_train=12, n_test=1, pairs_per_method=0)
    items = _world_describe(studio)[:12]
    studio.generate("povid", item_ids=[it["id"] for it in items[5:]], seed=3, params={"make_image_rejected": False})
    studio.generate("povid", item_ids=[it["id"] for it in items], seed=3, params={"make_image_rejected": False})  # resumed
    stored = dict(studio.store.db.execute(
        "SELECT p.item_id, c.seed FROM pairs p JOIN candidates c ON c.id = p.rejected_id WHERE p.method = 'povid'"
    ).fetchall())
    assert stored == {it["id"]: item_seed(3, it) for it in items}


def test_a_model_that_cannot_load_is_refused_even_with_nothing_left_to_do(studio, monkeypatch):
    """Every item done: a run that would load the model still checks it (a bogus id used to
    'succeed' with 0 items); POVID's text-only pairs load no model, so they do not."""
    from lvlm_studio.models.base import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    studio.seed_demo(n_train=2, n_test=1, pairs_per_method=0)
    ids = [it["id"] for it in _world_describe(studio)][:2]
    studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
    with pytest.raises(ModelLoadError, match="'nonexistent-org/nonexistent-model'.*not in the Hugging Face cache"):
        studio.generate("povid", model="nonexistent-org/nonexistent-model", item_ids=ids)
    with pytest.raises(ModelLoadError, match="No model directory at './nowhere'"):
        studio.generate("povid", model="./nowhere", item_ids=ids)
    with pytest.raises(ModelLoadError, match="'org/a--b' is not a valid Hugging Face model id"):
        studio.generate("povid", model="org/a--b", item_ids=ids)
    text_only = studio.generate("povid", model="nonexistent-org/nonexistent-model", item_ids=ids,
                                params={"make_image_rejected": False})
    assert text_only["items"] == 0 and text_only["skipped"] == 2


def test_csr_and_stic_generate_pairs_with_a_tiny_model(home, tiny_models, monkeypatch):
    vlm, clip = tiny_models
    studio = Studio(Settings(home=home, model=vlm, clip=clip, device="cpu"), users={}, admins=())
    studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0)
    all_ids = [it["id"] for it in _world_describe(studio)][:4]
    ids = all_ids[:2]
    csr = studio.generate("csr", model=vlm, item_ids=ids, seed=1,
                          params={"num_candidates": 2, "max_sentences": 2, "max_new_tokens": 6, "item_batch": 2})
    assert csr["items"] == 2 and csr["pairs"] >= 1 and csr["pairs"] + csr["no_pair"] == 2
    view = studio.next_pair("ann", method="csr")
    assert view["margin"] is not None and view["chosen"]["text"] != view["rejected"]["text"]
    cand = studio.store.get_candidate(view["chosen"]["id"])
    assert cand["source"] == "csr" and cand["model"] == vlm and cand["seed"] == 1 and cand["round"] == 0
    assert cand["params"]["method"] == "csr" and cand["params"]["num_candidates"] == 2
    assert cand["params"]["baseline_cap"] is None  # the demo CLIP's ceiling is not for other CLIPs
    assert cand["sentences"] and all(s["reward"] is not None for s in cand["sentences"])
    assert cand["params"]["system_prompt"] is None  # generated with none
    # Greedy good and bad answers of a random model coincide on some items (no pair): use four.
    # A system prompt set while generating is recorded with each candidate.
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", "a red circle .")
    stic = studio.generate("stic", model=vlm, item_ids=all_ids, params={"max_new_tokens": 6})
    assert stic["items"] == 4 and stic["pairs"] >= 1
    pair = studio.next_pair("ann", method="stic")
    assert {pair["chosen"]["source"], pair["rejected"]["source"]} == {"stic_good", "stic_bad"}
    assert "draw" in pair["meta"] and pair["meta"]["model"] == vlm
    assert {studio.store.get_candidate(pair[side]["id"])["params"]["system_prompt"] for side in ("chosen", "rejected")
            } == {"a red circle ."}
    studio.store.close()


def test_csr_on_world_items_with_the_demo_clip_uses_its_world_defaults(studio):
    """The centring ceiling and the yes/no existence pairs (filled with unnamed objects) apply to
    world items scored by the demo CLIP; explicit params override them."""
    from lvlm_studio.service import WORLD_CSR_PARAMS

    studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0)
    ids = [it["id"] for it in _world_describe(studio)][:3]
    small = {"item_batch": 2}
    first = studio.generate("csr", item_ids=ids[:2], params=small)
    # explicit: item mean, no yes/no pairs, no SFT mark
    off = {**small, "baseline_cap": None, "existence_pairs": False, "sft_min_reward": None}
    second = studio.generate("csr", item_ids=ids[2:], params=off)
    caps, derived = {}, {}
    for row in studio.store.training_pairs(methods=["csr"], include_auto=True, round=0):
        pair = studio.get_pair(row["pair_id"])
        chosen = studio.store.get_candidate(pair["chosen"]["id"])
        if (pair["meta"] or {}).get("derived") == "existence":
            derived.setdefault(pair["meta"]["from_item"], []).append(chosen["text"])
        else:
            caps[pair["item_id"]] = chosen["params"]["baseline_cap"]
            # the chosen answer's lowest sentence reward, and whether it clears the SFT bar
            low = min(s["reward"] for s in chosen["sentences"])
            assert row["meta"]["chosen_min_reward"] == low
            bar = WORLD_CSR_PARAMS["sft_min_reward"] if pair["item_id"] in ids[:2] else None
            assert row["meta"].get("sft") == (None if bar is None else low >= bar)
    # both runs made a caption pair (the demo model's trees differ on these scenes), so neither
    # check below can pass on an empty set
    assert set(caps) & set(ids[:2]) and set(caps) & set(ids[2:]), caps
    assert all(caps[i] == WORLD_CSR_PARAMS["baseline_cap"] for i in ids[:2] if i in caps)
    assert all(caps[i] is None for i in ids[2:] if i in caps)
    # every caption pair of the defaults run names an object, so the unnamed fill gives each one
    # as many "No." questions as "Yes." ones; the explicit run made none
    assert set(derived) == {i for i in ids[:2] if i in caps} and first["existence_pairs"] == sum(map(len, derived.values()))
    assert all(answers.count("Yes.") == answers.count("No.") >= 1 for answers in derived.values())
    assert "existence_pairs" not in second


def test_decide_undo_and_queue_order(studio, make_pairs):
    p_hi, p_lo, p_mid = make_pairs([2.0, 0.1, 1.0])
    assert studio.next_pair("ann")["pair_id"] == p_lo  # least confident first
    out = studio.decide(p_lo, "ann", "swap", note="rejected is better")
    assert out["label"]["status"] == "swap" and out["label"]["chosen_id"] != studio.get_pair(p_lo)["chosen"]["id"]
    assert studio.next_pair("ann")["pair_id"] == p_mid
    assert studio.next_pair("bob")["pair_id"] == p_lo  # queues are per reviewer
    with pytest.raises(ValueError, match="edited text"):
        studio.decide(p_mid, "ann", "edit", edited_text="  ")
    with pytest.raises(ValueError, match="unknown decision"):
        studio.decide(p_mid, "ann", "maybe")
    with pytest.raises(ValueError, match="reviewer"):
        studio.decide(p_mid, " ", "accept")
    with pytest.raises(ValueError, match="the edited answer contains the image placeholder"):
        studio.decide(p_mid, "ann", "edit", edited_text="There is a <image> circle.")
    rejected = studio.store.get_pair(p_mid)["rejected"]["text"]
    with pytest.raises(ValueError, match="the edited answer is the rejected answer"):  # chosen == rejected
        studio.decide(p_mid, "ann", "edit", edited_text=rejected)
    with pytest.raises(ValueError, match="the edited answer is the rejected answer"):  # the same, as trained
        studio.decide(p_mid, "ann", "edit", edited_text=rejected + " \n")
    studio.decide(p_mid, "ann", "edit", edited_text="There is a red circle.")
    assert studio.store.effective_label(p_mid)["chosen_text"] == "There is a red circle."
    undone = studio.undo("ann")
    assert undone["pair_id"] == p_mid and undone["label"]["status"] == "auto"
    assert studio.undo("ann")["pair_id"] == p_lo
    assert studio.undo("ann") is None
    # the latest decision in time, whatever the pair ids; another reviewer's later one is not hers
    studio.decide(p_lo, "ann", "accept")
    studio.decide(p_hi, "ann", "accept")
    studio.decide(p_lo, "ann", "swap")  # her decision on p_lo replaced: now her latest
    studio.decide(p_mid, "bob", "accept")
    assert studio.undo("ann")["pair_id"] == p_lo and studio.store.live_decision(p_lo, "ann") == "accept"  # her earlier one
    assert studio.undo("ann")["pair_id"] == p_hi  # made after that accept
    assert studio.undo("ann")["pair_id"] == p_lo and studio.undo("ann") is None
    assert studio.store.live_decision(p_mid, "bob") == "accept"
    studio.undo("bob")
    prog = studio.progress("ann")
    assert prog["total"] == 3 and prog["done"] == 0
    assert studio.next_pair("ann", status="decided") is None
    studio.decide(p_hi, "ann", "accept")
    assert studio.next_pair("ann", status="decided")["pair_id"] == p_hi
    # A misspelt method is refused (it used to look like an empty queue); a known one with no pair
    # left is an empty queue.
    method = studio.get_pair(p_hi)["method"]
    with pytest.raises(ValueError, match=f"unknown method '{method}x'; the store's methods: csr, povid, stic"):
        studio.next_pair("ann", method=f"{method}x")
    assert studio.next_pair("ann", method="stic") is None


def test_compare_rounds_side_by_side(studio, make_items):
    items = make_items(3)
    r1 = studio.store.create_round(0, "m", {"methods": ["csr"]}, status="done")
    studio.store.add_eval_outputs(0, [
        {"item_id": items[0], "answer": "A red circle and a green triangle.", "objects": ["red circle", "green triangle"],
         "hallucinated": ["green triangle"]},
        {"item_id": items[1], "answer": "Same answer.", "objects": [], "hallucinated": []},
    ])
    studio.store.add_eval_outputs(r1, [
        {"item_id": items[0], "answer": "A red circle.", "objects": ["red circle"], "hallucinated": []},
        {"item_id": items[1], "answer": "Same answer.", "objects": [], "hallucinated": []},
        {"item_id": items[2], "answer": "Only in round 1.", "objects": [], "hallucinated": []},
    ])
    res = studio.compare(0, r1)
    assert [r["item_id"] for r in res["rows"]] == items
    assert res["rows"][0]["a"]["hallucinated"] == ["green triangle"] and res["rows"][0]["b"]["hallucinated"] == []
    assert res["rows"][2]["a"] is None
    diff = studio.compare(0, r1, only_diff=True)  # both answered, differently (item 2: round 1 only)
    assert [r["item_id"] for r in diff["rows"]] == [items[0]]
    by_round = {m["round"]: m for m in res["metrics"]}
    assert by_round[0]["chair_s"] == pytest.approx(0.5) and by_round[r1]["chair_s"] == 0.0
    # Paired over the 2 captions both rounds answered (item 2 is round 1's only).
    assert res["paired"] == {"n": 2, "chair_s_a": 0.5, "chair_s_b": 0.0, "only_a": 1, "only_b": 0, "both": 0,
                             "p_value": 1.0}
    assert studio.compare(r1, r1)["paired"]["n"] == 3
    assert res["paired_pope"] is None  # no POPE probes answered

    # Answers CHAIR does not score (a count question) are not captions.
    r2 = studio.store.create_round(r1, "m", {}, status="done")
    studio.store.add_eval_outputs(r2, [
        {"item_id": items[0], "answer": "A blue star.", "objects": ["blue star"], "hallucinated": ["blue star"]},
        {"item_id": items[1], "answer": "Two.", "objects": None, "hallucinated": None, "meta": {"kind": "count"}},
    ])
    res2 = studio.compare(0, r2)
    assert res2["paired"]["n"] == 1
    # Round r2 has no stored metrics: they are recomputed from its answers, over captions only.
    assert {m["round"]: m["chair_s"] for m in res2["metrics"]}[r2] == 1.0
    # "answers" counts what each round's figures cover: a stored evaluation's own n_items.
    studio.store.update_round(r2, metrics={"eval": {"chair_s": 1.0, "n_items": 1}})
    assert {m["round"]: m["answers"] for m in studio.compare(0, r2)["metrics"]} == {0: 2, r2: 1}


def test_each_evaluation_set_keeps_its_figures_and_a_plot_or_comparison_reads_one(studio, make_items):
    """A round evaluated on the world's test scenes and then on an imported set used to keep only the
    latest figures: the plot drew one round's world figures and the next one's set figures on one
    line, and Compare set them side by side as a change. Each set's figures are kept now, and a plot
    or a comparison reads one set."""
    from lvlm_studio.evaluation import (
        evaluation_set_label,
        evaluation_set_of,
        round_evaluations,
        with_evaluation,
    )

    world, coco = make_items(2, dataset="world"), make_items(2, seed0=10, dataset="coco")
    split = studio.store.get_item(world[0])["split"]
    on_world, on_coco = f"world/{split}", f"coco/{split}"
    r1 = studio.store.create_round(0, "m", {}, status="done")
    r2 = studio.store.create_round(r1, "m", {}, status="done")

    def evaluate(rid: int, items: list[int], chair_s: float) -> None:
        studio.store.add_eval_outputs(rid, [
            {"item_id": i, "answer": f"Round {rid} on {i}.", "objects": ["circle"],
             "hallucinated": ["circle"] if k < chair_s * len(items) else []} for k, i in enumerate(items)])
        sets = evaluation_set_of(studio.store.get_item(i) for i in items)
        ev = {"chair_s": chair_s, "n_items": len(items), "eval_set": sets, "set": evaluation_set_label(sets)}
        studio.store.update_round(rid, metrics=with_evaluation(studio.store.get_round(rid)["metrics"], ev))

    evaluate(0, world, 0.5)
    evaluate(0, coco, 1.0)
    evaluate(r1, world, 0.0)
    evaluate(r2, coco, 0.5)
    assert list(round_evaluations(studio.store.get_round(0)["metrics"])) == [on_world, on_coco]
    # Two rounds on each set: the newest round's set (coco) comes first.
    assert studio.evaluated_sets() == [on_coco, on_world]
    assert {(r["round"], r["value"]) for r in studio.round_metrics(on_world)} == {(0, 0.5), (r1, 0.0)}
    assert {(r["round"], r["value"]) for r in studio.round_metrics()} == {(0, 1.0), (r2, 0.5)}
    # Round 0 vs round 1: on the world's set (round 1's only), not round 0's latest (coco, 1.0).
    res = studio.compare(0, r1)
    assert res["set"] == on_world and [m["chair_s"] for m in res["metrics"]] == [0.5, 0.0]
    assert [r["item_id"] for r in res["rows"]] == world and res["paired"]["n"] == 2 and res["note"] is None
    res = studio.compare(0, r2)
    assert res["set"] == on_coco and [r["item_id"] for r in res["rows"]] == coco
    assert [m["chair_s"] for m in res["metrics"]] == [1.0, 0.5]
    # Picked by hand: a set the round was not evaluated on is refused, naming the ones it was.
    assert studio.compare(0, 0, evaluation_set=on_world)["metrics"][0]["chair_s"] == 0.5
    with pytest.raises(ValueError, match=f"round {r2} was not evaluated on {on_world} \\(its evaluations: {on_coco}\\)"):
        studio.compare(0, r2, evaluation_set=on_world)
    # Rounds with no set in common: each is read on its latest set, with a note, nothing item by item.
    res = studio.compare(r1, r2)
    assert res["set"] is None and res["paired"] is None
    assert res["note"].startswith(f"round {r1} was evaluated on {on_world} and round {r2} on {on_coco}, no set both")
    # Round 0 (latest: coco) against a round whose answers have no stored evaluation (world): round
    # 0 is read on coco alone, so nothing is shared, and the note says so (its coco figures used to
    # sit beside the other's world answers unannounced).
    bare = studio.store.create_round(0, "m", {}, status="done")
    studio.store.add_eval_outputs(bare, [{"item_id": i, "answer": "A circle.", "objects": ["circle"],
                                          "hallucinated": []} for i in world])
    res = studio.compare(0, bare)
    assert res["set"] is None and res["answered"] == (2, 2) and res["paired"] is None
    assert {r["item_id"] for r in res["rows"] if r["a"]} == set(coco)
    assert res["note"].startswith("the two rounds answered no item in common")
    # An evaluation stored with the CLI's dataset and split only (no eval_set) still selects its answers.
    studio.store.update_round(r1, metrics={"eval": {"chair_s": 0.0, "dataset": "world", "split": split}})
    res = studio.compare(0, r1)
    assert res["set"] == on_world and [r["item_id"] for r in res["rows"]] == world
    # Both rounds on both sets, each latest on another one: round B's latest is read.
    evaluate(r1, coco, 0.0)
    evaluate(r2, world, 1.0)
    assert studio.compare(r1, r2)["set"] == on_world and studio.compare(r2, r1)["set"] == on_coco
    assert studio.compare(r1, r2)["sets"] == [on_coco, on_world]
    # A later evaluation on a set replaces that set's figures only, and is the latest.
    evaluate(0, world, 0.0)
    evals = round_evaluations(studio.store.get_round(0)["metrics"])
    assert list(evals) == [on_coco, on_world] and evals[on_world]["chair_s"] == 0.0 and evals[on_coco]["chair_s"] == 1.0
    assert studio.store.get_round(0)["metrics"]["eval"] == evals[on_world]


def test_an_evaluation_that_ends_while_another_ran_keeps_both_sets(studio, make_items, monkeypatch):
    """Studio.evaluate reads the round's metrics again when it stores its own: an evaluation of the
    same round on another set that ended meanwhile (a round job evaluating its parent) keeps its
    figures instead of being overwritten by the metrics read before the long evaluation."""
    from lvlm_studio import evaluation

    items = make_items(1, dataset="coco")
    split = studio.store.get_item(items[0])["split"]
    monkeypatch.setattr(studio, "backend", lambda *a, **kw: object())

    def evaluate_backend(backend, eval_items, extractor, params, **kw):
        meanwhile = {"chair_s": 0.3, "set": "shapesworld/test", "eval_set": [["shapesworld", "test"]]}
        studio.store.update_round(0, metrics=evaluation.with_evaluation(studio.store.get_round(0)["metrics"], meanwhile))
        return {"chair_s": 0.1, "set": f"coco/{split}", "eval_set": [["coco", split]]}, [
            {"item_id": items[0], "answer": "A cup.", "objects": [], "hallucinated": []}]

    monkeypatch.setattr(evaluation, "evaluate_backend", evaluate_backend)
    monkeypatch.setattr("lvlm_studio.service._evaluation_plan", lambda extractor, its: (None, its, None))
    studio.evaluate(0, item_ids=items)
    evals = evaluation.round_evaluations(studio.store.get_round(0)["metrics"])
    assert {k: v["chair_s"] for k, v in evals.items()} == {"shapesworld/test": 0.3, f"coco/{split}": 0.1}


def test_a_round_trained_without_evaluation_items_compares_and_plots(studio, make_items):
    """A round whose job found no evaluation items stores "eval": None; Compare and the metrics
    plot used to crash on it with an AttributeError."""
    items = make_items(1)
    studio.store.add_eval_outputs(0, [{"item_id": items[0], "answer": "A red circle.", "objects": ["red circle"],
                                       "hallucinated": []}])
    rid = studio.store.create_round(0, "m", {}, status="done")
    studio.store.update_round(rid, metrics={"eval": None, "eval_note": "no evaluation items"})
    res = studio.compare(0, rid)
    assert [m["answers"] for m in res["metrics"]] == [1, 0] and res["rows"][0]["b"] is None
    assert {r["round"] for r in studio.round_metrics()} <= {0}


def test_compare_says_why_a_round_without_answers_cannot_be_compared(studio, make_items):
    """A failed, cancelled or running round has no answers: comparing it names its status and
    reason instead of an empty table. A done round without answers yet is an empty comparison."""
    items = make_items(1)
    studio.store.add_eval_outputs(0, [{"item_id": items[0], "answer": "A red circle.", "objects": ["red circle"],
                                       "hallucinated": []}])
    failed = studio.store.create_round(0, "m", {}, status="failed")
    studio.store.update_round(failed, error="ValueError: Invalid learning rate: -1.0")
    with pytest.raises(ValueError, match=r"round \d+ is failed \(ValueError: Invalid learning rate: -1.0\): "
                                         "it has no answers to compare"):
        studio.compare(0, failed)
    cancelled = studio.store.create_round(0, "m", {}, status="cancelled")
    with pytest.raises(ValueError, match=f"round {cancelled} is cancelled: it has no answers"):
        studio.compare(cancelled, 0)
    done = studio.store.create_round(0, "m", {}, status="done")
    assert studio.compare(0, done)["rows"][0]["b"] is None


def test_compare_measures_both_rounds_again_on_the_items_both_answered(studio, make_items):
    """Each round's stored metrics may come from different items (another eval_limit, a later
    `lvlm-studio eval`); Compare then adds both rounds' measures on the items both answered."""
    from lvlm_studio.ui.compare import metrics_frame

    items = make_items(4)
    r1 = studio.store.create_round(0, "m", {}, status="done")
    studio.store.update_round(r1, metrics={"eval": {"chair_s": 0.3, "pope_f1": 0.9}})  # a run on other items
    probe = {"kind": "pope", "label": "yes"}
    studio.store.add_eval_outputs(0, [
        {"item_id": items[0], "answer": "A red circle and a green triangle.", "objects": ["red circle", "green triangle"],
         "hallucinated": ["green triangle"]},
        {"item_id": items[1], "answer": "No.", "meta": {**probe, "prediction": "no"}},
    ])
    studio.store.add_eval_outputs(r1, [
        {"item_id": items[0], "answer": "A red circle.", "objects": ["red circle"], "hallucinated": []},
        {"item_id": items[1], "answer": "Yes.", "meta": {**probe, "prediction": "yes"}},
        {"item_id": items[2], "answer": "A blue star.", "objects": ["blue star"], "hallucinated": ["blue star"]},
        {"item_id": items[3], "answer": "A blue star.", "objects": ["blue star"], "hallucinated": ["blue star"]},
    ])
    res = studio.compare(0, r1)
    assert {m["round"]: m["chair_s"] for m in res["metrics"]} == {0: 1.0, r1: 0.3}  # as each round stored it
    common = {m["round"]: m for m in res["common_metrics"]}
    assert common[0]["answers"] == common[r1]["answers"] == 2
    assert (common[0]["chair_s"], common[r1]["chair_s"]) == (1.0, 0.0)
    assert (common[0]["pope_f1"], common[r1]["pope_f1"]) == (0.0, 1.0)
    frame = metrics_frame(res)
    assert list(frame["round"]) == ["0", str(r1), "0 (on the 2 items both answered)",
                                    f"{r1} (on the 2 items both answered)"]
    assert studio.compare(r1, r1)["common_metrics"] == []  # the same items: nothing to add
    assert res["note"] is None and studio.compare(r1, r1)["note"] is None
    # Two rounds evaluated on sets that share no item (the world's scenes, an imported set): their
    # figures side by side read as a change, and nothing said otherwise.
    r2 = studio.store.create_round(0, "m", {}, status="done")
    studio.store.add_eval_outputs(r2, [
        {"item_id": items[3], "answer": "A red circle.", "objects": ["red circle"], "hallucinated": []}])
    r3 = studio.store.create_round(0, "m", {}, status="done")
    studio.store.add_eval_outputs(r3, [
        {"item_id": items[2], "answer": "A red circle.", "objects": ["red circle"], "hallucinated": []}])
    disjoint = studio.compare(r2, r3)
    assert disjoint["common_metrics"] == [] and disjoint["note"].startswith("the two rounds answered no item in common")
    # Recall is measured against the truth the evaluation scored with (stored in the answer's meta:
    # COCO adds the categories the human captions name), not the image's objects as written.
    scored = {"kind": "caption", "gt": ["couch", "dog"], "recalled": ["couch"]}
    studio.store.add_eval_outputs(0, [{"item_id": items[0], "answer": "A couch.", "objects": ["couch"],
                                       "hallucinated": [], "meta": scored}])
    assert {m["round"]: m["recall"] for m in studio.compare(0, r1)["common_metrics"]}[0] == 0.5
    # The same items answered, but round r1's metrics come from a later, smaller evaluation
    # (n_items 2 of its 4 stored answers): its figures are not comparable, so both are measured again.
    r2 = studio.store.create_round(r1, "m", {}, status="done")
    studio.store.add_eval_outputs(r2, studio.store.eval_outputs(r1))
    studio.store.update_round(r1, metrics={"eval": {"chair_s": 0.5, "n_items": 2}})
    studio.store.update_round(r2, metrics={"eval": {"chair_s": 0.5, "n_items": 4}})
    again = studio.compare(r1, r2)
    assert [m["answers"] for m in again["common_metrics"]] == [4, 4]
    assert {m["chair_s"] for m in again["common_metrics"]} == {2 / 3}  # the same answers: the same figures
    studio.store.update_round(r1, metrics={"eval": {"chair_s": 0.5, "n_items": 4}})
    assert studio.compare(r1, r2)["common_metrics"] == []  # both cover what they answered


def test_kappa_on_hand_built_cases():
    assert cohen_kappa(list("yynn"), list("ynnn")) == pytest.approx(0.5)
    assert cohen_kappa(list("abab"), list("abab")) == pytest.approx(1.0)
    assert cohen_kappa(list("aaaa"), list("aaaa")) == 1.0
    assert cohen_kappa([], []) is None
    assert cohen_kappa(list("ab"), list("ba")) == pytest.approx(-1.0)
    # P_i = 1, 1, 1/3 -> P = 7/9; p = (5/9, 4/9) -> Pe = 41/81; kappa = 22/40
    assert fleiss_kappa([list("aaa"), list("bbb"), list("aab")]) == pytest.approx(0.55)
    assert fleiss_kappa([["a"]]) is None
    assert margin_buckets([0.5, 0.1, 0.4, 0.2, float("nan"), 0.3], 2) == [[0.1, 0.2], [0.3, 0.4, 0.5]]
    assert margin_buckets([], 4) == [] and margin_buckets([1.0], 4) == [[1.0]]
    # Equal margins are never split across buckets (each bucket's label is its lowest-highest).
    assert margin_buckets([1.07] * 6 + [2.0, 3.0], 4) == [[1.07] * 6, [2.0, 3.0]]
    assert margin_buckets([0.5] * 5, 4) == [[0.5] * 5]


def test_agreement_and_override_rate_from_the_store(studio, make_pairs):
    pairs = make_pairs([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    for p in pairs:
        studio.decide(p, "ann", "accept")
        studio.decide(p, "bob", "accept")
    for p in pairs[:4]:  # the low-margin half: carol overrules, last word wins
        studio.decide(p, "carol", "swap")
    ag = studio.agreement(buckets=2)
    assert ag["reviewers"] == ["ann", "bob", "carol"]
    ann_bob = next(c for c in ag["cohen"] if (c["a"], c["b"]) == ("ann", "bob"))
    assert ann_bob["kappa"] == 1.0 and ann_bob["n"] == 8
    assert ag["fleiss_kappa"] < 1.0 and ag["items_multi_rated"] == 8
    rates = [b["override_rate"] for b in ag["override_by_margin"]]
    assert rates == [1.0, 0.0] and sum(b["n"] for b in ag["override_by_margin"]) == 8


def test_roles_and_users(home, monkeypatch):
    users = parse_users("alice:pw:admin,bob:secret:reviewer,carl:x")
    assert users["alice"].role == "admin" and users["carl"].role == "reviewer"
    assert parse_users('{"dana": {"password": "p", "role": "admin"}}')["dana"] == User("dana", "p", "admin")
    with pytest.raises(ValueError, match="role"):
        parse_users("eve:pw:root")
    studio = Studio(Settings(home=home), users=users, admins={"hf-admin"})
    assert studio.auth_enabled and not studio.open_mode
    assert studio.check_password("bob", "secret") and not studio.check_password("bob", "nope")
    assert studio.role("alice") == "admin" and studio.role("hf-admin") == "admin" and studio.role("bob") == "reviewer"
    with pytest.raises(PermissionError, match="admin"):
        studio.start_round({"methods": ["csr"]}, "bob")
    with pytest.raises(PermissionError):
        studio.start_round({"methods": ["csr"]}, None)
    with pytest.raises(PermissionError):
        studio.cancel_round(0, "bob")
    studio.store.close()
    monkeypatch.delenv("LVLM_STUDIO_USERS", raising=False)
    monkeypatch.delenv("LVLM_STUDIO_ADMINS", raising=False)
    open_studio = Studio(Settings(home=home))
    assert open_studio.open_mode and open_studio.role(None) == "admin"
    assert open_studio.auth_summary() == "open mode: no accounts configured"
    open_studio.store.close()


def test_existence_pairs_are_stored_on_question_items_once(studio):
    from lvlm_studio.methods.csr import CSRCandidate, CSRConfig, CSRResult

    studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0)
    item = _world_describe(studio)[0]
    cand = lambda text, score: CSRCandidate(text, [], [], score, 0.0, "eos")  # noqa: E731
    res = CSRResult(item["prompt"], item["image_id"],
                    [cand("There is a small red circle at the top. There is a large blue square at the left.", 9.0),
                     cand("There is a small red circle at the top. There is a small green triangle at the right.", 1.0)],
                    0, 1, 8.0)
    cfg = CSRConfig(existence_pairs=True)
    prov = studio._prov("csr", "demo", 0, {}, 0)
    report = {"pairs": 0, "no_pair": 0}
    studio._write_existence_pairs(item, res, cfg, prov, 0, 0, report)
    studio._write_existence_pairs(item, res, cfg, prov, 0, 0, report)  # resumed: nothing new
    assert report["existence_pairs"] == 2
    rows = studio.store.training_pairs(methods=["csr"], include_auto=True, round=0)
    assert len(rows) == 2
    by_answer = {r["meta"]["object"]: (r["chosen"], r["rejected"], r["prompt"], r["image_id"]) for r in rows}
    # the rejected-only object is asked about with "No." chosen, one object the chosen names with "Yes."
    assert by_answer["green triangle"][:2] == ("No.", "Yes.")
    assert [v[:2] for k, v in by_answer.items() if k != "green triangle"] == [("Yes.", "No.")]
    assert all(v[2].startswith("Is there a ") and v[3] == item["image_id"] for v in by_answer.values())
    # question items are not describe items: CSR never searches them as captions
    assert item["id"] in {it["id"] for it in _world_describe(studio)}
    assert not any(it["prompt"].startswith("Is there") for it in _world_describe(studio))


def test_upload_refuses_a_blank_prompt_before_storing_any_image(studio, tmp_path):
    from conftest import write_image

    write_image(tmp_path / "a.png", seed=5)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="a prompt is needed"):
        studio.upload_images([tmp_path / "a.png"], prompt="   ")
    with pytest.raises(ValueError, match="the prompt contains the image placeholder '<image>'"):
        studio.upload_images([tmp_path / "a.png"], prompt="<image> What is here?")
    assert studio.store.stats()["tables"]["images"] == 0 and not list(studio.settings.images_dir.rglob("*.*"))
    calls = []
    res = studio.upload_images([tmp_path / "a.png", tmp_path / "bad.png"], prompt="What is here?",
                               progress=lambda *a: calls.append(a))
    assert calls == [(1, 2, "1/2 images"), (2, 2, "2/2 images")]
    assert len(res["items"]) == 1 and res["rejected"][0]["file"] == "bad.png"
    assert res["rejected"][0]["reason"].startswith("not a recognised image")  # the file is named once, beside


def test_upload_refuses_a_missing_dataset_or_split_before_storing_any_image(studio, tmp_path):
    """dataset=None used to store the image row and then skip its item silently (SQLite's INSERT OR
    IGNORE skips a NOT NULL violation), then fail with a TypeError."""
    from conftest import write_image

    write_image(tmp_path / "a.png", seed=6)
    for kw in ({"dataset": None}, {"dataset": "  "}, {"split": ""}, {"split": 3}):
        with pytest.raises(ValueError, match="the uploaded images' items need a (dataset|split) name"):
            studio.upload_images([tmp_path / "a.png"], **kw)
    assert studio.store.stats()["tables"]["images"] == 0
    from lvlm_studio.store import StoreError

    with pytest.raises(StoreError, match="an item needs a dataset name"):
        studio.store.add_item("0" * 64, "Q?", dataset=None)


def test_upload_bounds_its_prompt_and_names_as_an_import_does(studio, tmp_path):
    """An upload is open to reviewers: it held a 5-million-character prompt and a 100,000-character
    dataset name, where an import refuses anything over 20,000 / 200."""
    from conftest import write_image

    write_image(tmp_path / "a.png", seed=7)
    for kw, message in (({"prompt": "x" * 20_001}, "the prompt is 20,001 characters long"),
                        ({"dataset": "d" * 201}, "the dataset name is 201 characters long"),
                        ({"split": "s" * 300}, "the split name is 300 characters long")):
        with pytest.raises(ValueError, match=message):
            studio.upload_images([tmp_path / "a.png"], **kw)
    assert studio.store.stats()["tables"]["images"] == 0
    res = studio.upload_images([tmp_path / "a.png"], prompt="x" * 20_000, dataset="d" * 200)
    assert len(res["items"]) == 1


def test_an_upload_and_a_folder_import_of_one_image_make_one_item(studio, tmp_path):
    """Items are unique on (image, prompt, dataset): the upload's default prompt is the import's,
    so the same picture uploaded in the app and imported from a folder is one item, not two."""
    from conftest import write_image

    write_image(tmp_path / "pics" / "a.png", seed=7)
    first = studio.upload_images([tmp_path / "pics" / "a.png"], dataset="pics")
    studio.import_path(tmp_path / "pics", kind="folder", dataset="pics")
    items = studio.store.list_items(dataset="pics")
    assert [it["id"] for it in items] == first["items"]  # one item, the upload's


def test_povid_on_an_imported_dataset_injects_objects_that_co_occur_there(studio, tmp_path):
    """On non-world items POVID's injector learns co-occurrence from the dataset's annotated images
    (the paper's "co-occurring absent objects"); before, it drew uniformly from 80 COCO names."""
    import json

    from conftest import write_image

    rows = []
    for k in range(6):  # dogs are seen with frisbees, never with anything else
        write_image(tmp_path / f"d{k}.png", seed=50 + k)
        rows.append({"image": f"d{k}.png", "prompt": "Describe.", "objects": ["dog", "frisbee"]})
    write_image(tmp_path / "q.png", seed=70)
    rows.append({"image": "q.png", "prompt": "Describe the image.", "objects": ["dog"],
                 "reference": "A dog sits on the grass."})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    studio.import_path(tmp_path / "set.jsonl", dataset="pets")
    [item] = [it for it in studio.store.list_items(dataset="pets") if it.get("reference")]
    rep = studio.generate("povid", item_ids=[item["id"]], seed=3,
                          params={"make_image_rejected": False, "categories": ("object",), "n_injections": 1})
    assert rep["pairs"] == 1
    [pair] = studio.store.training_pairs(include_auto=True, methods=["povid"])
    assert "frisbee" in pair["rejected"] and pair["chosen"] == "A dog sits on the grass."
    assert rep["povid_cooccurrence"] == {"pets": "annotations"} and "uniformly" not in (rep.get("note") or "")


def test_povid_without_annotations_learns_co_occurrence_from_the_references_or_says_it_draws_uniformly(
        studio, tmp_path):
    """A dataset with captions but no object annotations: the COCO objects its references name
    together are its co-occurrence (dogs are captioned with frisbees), so the injected object is a
    frisbee, not a uniform draw from 80 names. Where no reference names two objects the draw is
    uniform, and the report says so rather than pass it off as the paper's co-occurring objects."""
    import json

    from conftest import write_image

    def dataset(name: str, captions: list[str]) -> list[int]:
        rows = []
        for k, caption in enumerate(captions):
            write_image(tmp_path / name / f"{k}.png", seed=80 + k + 10 * len(name))
            rows.append({"image": f"{k}.png", "prompt": "Describe the image.", "reference": caption})
        (tmp_path / name / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        studio.import_path(tmp_path / name / "set.jsonl", dataset=name)
        return [it["id"] for it in studio.store.list_items(dataset=name)]

    params = {"make_image_rejected": False, "categories": ("object",), "n_injections": 1}
    pets = dataset("pets", ["A dog catches a frisbee."] * 5 + ["A dog sits on the grass."])
    rep = studio.generate("povid", item_ids=pets[-1:], seed=3, params=params)
    assert rep["pairs"] == 1 and rep["povid_cooccurrence"] == {"pets": "references"}
    [pair] = studio.store.training_pairs(include_auto=True, methods=["povid"])
    assert "frisbee" in pair["rejected"]
    lone = dataset("lone", ["A dog sits on the grass.", "A cat sleeps."])
    rep = studio.generate("povid", item_ids=lone[:1], seed=3, params=params)
    assert rep["pairs"] == 1 and rep["povid_cooccurrence"] == {"lone": "none"}
    assert "POVID drew injected objects uniformly for dataset(s) lone" in rep["note"]


# Tests from a mutation audit of the store, service, io and training helpers: each fails on a
# mutant the suite above let through.
def test_margin_buckets_move_a_cut_past_equal_margins():
    """A cut that would split equal margins moves past them (forward), not before them."""
    assert margin_buckets([1.0, 2.0, 2.0, 2.0, 3.0, 4.0], 2) == [[1.0, 2.0, 2.0, 2.0], [3.0, 4.0]]


def test_override_rate_follows_the_margin_counts_edits_and_skips_pairs_without_one(studio, make_pairs):
    """Buckets follow the margin, not the pair id; an edit overrules the automatic label; a
    reviewed pair without a margin is left out of the margin buckets (and does not crash them)."""
    high, low = make_pairs([0.9, 0.1])
    [no_margin] = make_pairs([None], method="povid")
    studio.decide(low, "ann", "edit", edited_text="A red circle.")
    studio.decide(high, "ann", "accept")
    studio.decide(no_margin, "ann", "swap")
    ag = studio.agreement(buckets=2)
    assert [(b["lo"], b["n"], b["override_rate"]) for b in ag["override_by_margin"]] == [(0.1, 1, 1.0), (0.9, 1, 0.0)]
    # the overall rate counts every reviewed pair (POVID's and STIC's have no margin): 2 of 3 overruled
    assert ag["override_rate"] == pytest.approx(2 / 3) and ag["override_pairs"] == 3
    assert ag["override_by_method"] == {"csr": {"n": 2, "override_rate": 0.5}, "povid": {"n": 1, "override_rate": 1.0}}


def test_reviewed_counts_per_method(studio, make_pairs):
    """The Train tab's counts: pairs, pairs with a human label, and those usable for DPO."""
    a, b, _ = make_pairs([0.1, 0.2, 0.3], method="csr")
    make_pairs([0.4], method="stic")
    studio.decide(a, "ann", "accept")
    studio.decide(b, "ann", "reject_both")
    counts = studio.reviewed_counts()
    assert counts["csr"] == {"pairs": 3, "reviewed": 2, "usable": 1}
    assert counts["stic"] == {"pairs": 1, "reviewed": 0, "usable": 0}
    assert counts["povid"] == {"pairs": 0, "reviewed": 0, "usable": 0}


def test_compare_recomputes_chair_i_recall_and_pope_f1_on_the_common_items(studio, make_items):
    """common_metrics from the stored answers: CHAIR_i per mentioned object, recall over the
    ground truth (make_items: ["circle"]), POPE F1 over the probes that carry a yes/no label and a
    parsed yes/no prediction."""
    items = make_items(6)
    r1 = studio.store.create_round(0, "m", {}, status="done")
    answers = [
        {"item_id": items[0], "answer": "A circle and a star.", "objects": ["circle", "star"], "hallucinated": ["star"]},
        {"item_id": items[1], "answer": "A square, a star and a dog.", "objects": ["square", "star", "dog"],
         "hallucinated": ["square", "star", "dog"]},
        {"item_id": items[2], "answer": "Yes.", "meta": {"kind": "pope", "label": "yes", "prediction": "yes"}},
        {"item_id": items[3], "answer": "Yes.", "meta": {"kind": "pope", "prediction": "yes"}},  # no label: not scored
        {"item_id": items[5], "answer": "Maybe.", "meta": {"kind": "pope", "label": "yes"}},  # no parse: not scored
    ]
    studio.store.add_eval_outputs(0, answers)
    studio.store.add_eval_outputs(r1, [*answers, {"item_id": items[4], "answer": "A circle.", "objects": ["circle"],
                                                   "hallucinated": []}])
    res = studio.compare(0, r1)
    # neither round stored metrics: the main table's figures are recomputed too, POPE F1 included
    assert {m["round"]: m["pope_f1"] for m in res["metrics"]} == {0: 1.0, r1: 1.0}
    common = {m["round"]: m for m in res["common_metrics"]}
    assert common[0]["answers"] == 5
    assert (common[0]["chair_s"], common[0]["chair_i"], common[0]["recall"], common[0]["pope_f1"]) == (
        1.0, pytest.approx(0.8), 0.5, 1.0)


def test_decide_refuses_undo_and_undo_of_a_pair_without_a_live_decision_is_none(studio, make_pairs):
    a, b = make_pairs([0.1, 0.2])
    studio.decide(a, "ann", "accept")
    with pytest.raises(ValueError, match="unknown decision"):
        studio.decide(a, "ann", "undo")  # undo has its own call
    assert studio.undo("ann", pair_id=b) is None  # nothing of hers there
    assert studio.store.live_decision(a, "ann") == "accept"
    assert studio.undo("ann", pair_id=a)["label"]["status"] == "auto"


def test_a_reviewer_name_of_the_maximum_length_is_accepted(studio, make_pairs):
    [a] = make_pairs([0.1])
    assert studio.decide(a, "x" * 64, "accept")["label"]["reviewer"] == "x" * 64
    with pytest.raises(ValueError, match="at most 64"):
        studio.decide(a, "y" * 65, "accept")


def test_parse_users_refuses_malformed_entries_and_defaults_to_reviewer():
    for bad in ("alice", "alice:", ":pw", "alice:pw:admin:extra"):
        with pytest.raises(ValueError, match="bad user entry"):
            parse_users(bad)
    assert parse_users('[{"name": "erin", "password": "p"}]')["erin"] == User("erin", "p", "reviewer")
    assert parse_users('{"finn": "pw"}')["finn"] == User("finn", "pw", "reviewer")
    # JSON of the wrong shape is a clear refusal, not a crash now (or at sign-in, for a number password)
    for bad, message in (('["alice"]', "a user entry is an object"),
                         ('{"alice": 123}', "password is text, not int"),
                         ('[{"name": "bo", "role": ["admin"]}]', "role is text, not list")):
        with pytest.raises(ValueError, match=message):
            parse_users(bad)


def test_a_misspelt_method_is_refused_by_export_and_rounds_alike(studio, make_pairs, tmp_path):
    """The service itself names an unknown method (the app's export and train buttons, a JSON
    client): it used to be checked in the CLI only, so the app said "nothing to export"."""
    from lvlm_studio.service import UnknownMethodError

    make_pairs([0.5], method="imported-x")
    rounds_before = studio.store.list_rounds()
    for call in (lambda: studio.export("llava", tmp_path / "e", methods=["nosuch"], include_auto=True),
                 lambda: studio.training_material_count({"methods": ["csr", "nosuch"], "include_auto": True}),
                 lambda: studio.start_round({"methods": ["nosuch"], "include_auto": True}, None)):
        with pytest.raises(UnknownMethodError, match="unknown method 'nosuch'; the store's methods: "
                                                     "csr, povid, stic, imported-x"):
            call()
    assert not (tmp_path / "e").exists() and studio.store.list_rounds() == rounds_before  # no round created
    assert studio.export("llava", tmp_path / "e", methods=["imported-x"], include_auto=True)["pairs"] == 1
    with pytest.raises(ValueError, match="round must be a whole number, not 'abc'"):
        studio.next_pair("ann", round="abc")
    assert studio.next_pair("ann", round="0")["method"] == "imported-x"


# Found by an audit of what a JSON client or script can send the service (each failed before).
def test_item_ids_must_be_a_list_and_methods_a_non_empty_list(studio, make_items, make_pairs):
    """item_ids="12" was iterated as items 1 and 2 (pairs written for the wrong items); methods=[]
    trained on every method; a method name string was read letter by letter."""
    make_items(12)
    with pytest.raises(ValueError, match="item ids are a list of whole numbers, not str"):
        studio.generate("povid", item_ids="12", params={"make_image_rejected": False})
    with pytest.raises(ValueError, match="an item id must be a whole number, not 'x'"):
        studio.generate("povid", item_ids=[1, "x"], params={"make_image_rejected": False})
    assert studio.store.count_pairs() == 0
    make_pairs([0.5])
    rounds_before = studio.store.list_rounds()
    for config, message in (({"methods": [], "include_auto": True}, "no method named"),
                            ({"methods": "csr", "include_auto": True}, "expected list"),
                            ("abc", "round options are a JSON object")):
        with pytest.raises(ValueError, match=message):
            studio.start_round(config, None)
    with pytest.raises(ValueError, match="parent_id must be a whole number, not 'abc'"):
        studio.start_round({"include_auto": True, "parent_id": "abc"}, None)
    assert studio.store.list_rounds() == rounds_before
    assert list(studio.store.training_pairs(methods=[], include_auto=True)) == []  # the store agrees
    with pytest.raises(ValueError, match="methods are a list of names, not str"):
        studio.export("llava", methods="csr", include_auto=True)


def test_ids_seeds_and_counts_are_checked_by_name(studio, make_pairs, make_items):
    [pid] = make_pairs([0.5])
    huge = 2**70
    for call, message in (
        (lambda: studio.get_pair("abc"), "pair id must be a whole number, not 'abc'"),
        (lambda: studio.get_pair(huge), "pair id must be at most"),
        (lambda: studio.decide("abc", "ann", "accept"), "pair id must be a whole number"),
        (lambda: studio.compare("a", 0), "round A must be a whole number, not 'a'"),
        (lambda: studio.cancel_round(huge, None), "round must be at most"),
        (lambda: studio.get_round("x"), "round must be a whole number, not 'x'"),
        (lambda: studio.next_pair("ann", method=["csr"]), "method is a name, not list"),
        (lambda: studio.next_pair("ann", round=huge), "round must be at most"),
        (lambda: studio.generate("povid", seed=-1, params={"make_image_rejected": False}), "seed must be at least 0"),
        (lambda: studio.generate("povid", seed=huge, params={"make_image_rejected": False}), "seed must be at most 4294967295"),
        (lambda: studio.generate("povid", round=huge), "round must be at most"),
        (lambda: studio.seed_demo(n_train=-5), "n_train must be at least 0, not -5"),
        (lambda: studio.seed_demo(seed=huge), "seed must be at most"),
        (lambda: studio.seed_demo(n_test=10**8), "n_test must be at most 20000, not 100000000"),
        (lambda: studio.ensure_world_items("test", 10**8), "the number of scenes must be at most 20000"),
        (lambda: studio.evaluate_world(0, n=10**8), "the number of evaluation scenes must be at most 20000"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert studio.store.count_pairs() == 1 and studio.store.count_items() == 1
    assert studio.store.get_meta("demo_seed") is None  # a refused seeding records no plan


def test_review_text_is_checked_for_type_size_and_printable_names(studio, make_pairs):
    """A number where text belongs raised AttributeError / sqlite3 errors; a 10-MB edit or note was
    stored and then sent to every reviewer of the pair; a tab in a reviewer name was accepted by
    the app but refused by an import of its own export."""
    from lvlm_studio.service import EDIT_MAX_CHARS, NOTE_MAX_CHARS

    [pid] = make_pairs([0.5])
    for kwargs, message in (
        ({"reviewer": 123, "decision": "accept"}, "a reviewer name is text, not int"),
        ({"reviewer": "ann\tlee", "decision": "accept"}, "printable characters only"),
        ({"reviewer": "bo\x00b", "decision": "accept"}, "printable characters only"),
        ({"reviewer": "ann", "decision": "edit", "edited_text": 123}, "the edited answer is text, not int"),
        ({"reviewer": "ann", "decision": "accept", "note": {"a": 1}}, "a note is text, not dict"),
        ({"reviewer": "ann", "decision": "edit", "edited_text": "x" * (EDIT_MAX_CHARS + 1)},
         f"the edited answer is at most {EDIT_MAX_CHARS:,} characters"),
        ({"reviewer": "ann", "decision": "accept", "note": "n" * (NOTE_MAX_CHARS + 1)},
         f"a note is at most {NOTE_MAX_CHARS:,} characters"),
        ({"reviewer": "ann", "decision": ["accept"]}, "unknown decision"),
    ):
        with pytest.raises(ValueError, match=message):
            studio.decide(pid, **kwargs)
    assert studio.store.pair_reviews(pid) == []
    studio.decide(pid, " zed ", "swap", note="n" * NOTE_MAX_CHARS)
    assert studio.get_pair(pid, " zed ")["my_decision"] == "swap"  # the name as stored: trimmed
    with pytest.raises(ValueError, match="a reviewer name is at most 64 characters"):
        parse_users("a" * 65 + ":pw")


def test_an_empty_evaluation_never_replaces_a_rounds_metrics(studio, make_items):
    [item] = make_items(1)
    studio.store.update_round(0, metrics={"eval": {"chair_s": 0.5, "n_items": 3}})
    for call, message in ((lambda: studio.evaluate_world(0, n=0), "must be at least 1"),
                          (lambda: studio.evaluate_world(0, n=-1), "must be at least 0"),
                          (lambda: studio.evaluate(0, item_ids=[]), "no items to evaluate"),
                          (lambda: studio.evaluate(0), "no items to evaluate .the world's test split holds none")):
        with pytest.raises(ValueError, match=message):
            call()
    assert studio.store.get_round(0)["metrics"]["eval"] == {"chair_s": 0.5, "n_items": 3}



def test_evaluating_a_missing_or_unfinished_round_stores_no_scenes_first(studio):
    """Compare's Evaluate accepts a typed round: a round that does not exist, or has no finished
    adapter, is refused before any world scene is rendered and stored."""
    failed = studio.store.create_round(0, "m", {}, status="failed")
    before = len(studio.store.list_items())
    with pytest.raises(NotFoundError, match="round 99 does not exist"):
        studio.evaluate_world(99, n=20)
    with pytest.raises(ValueError, match=f"round {failed} has no finished adapter"):
        studio.evaluate_world(failed, n=20)
    assert len(studio.store.list_items()) == before


def test_an_interrupted_first_start_is_completed_by_the_next(studio):
    """seed_demo used to seed items only when the world had none and pairs only when the store
    had none: an evaluation run first (test items only), or a start stopped half-way through
    the pairs, left the Review tab empty or without STIC for good. Its plan is now recorded and
    carried out by the next start; once done, starts do nothing (no model load, no retry)."""
    studio.ensure_world_items("test", 2)  # what `lvlm-studio eval` does on a fresh data root

    def stop_in_povid(done, total, message):  # Ctrl-C while POVID writes: STIC never starts
        if message.startswith("POVID"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        studio.seed_demo(n_train=6, n_test=2, pairs_per_method=2, progress=stop_in_povid)
    assert studio.store.count_items(dataset="shapesworld", split="train") > 0
    assert studio.store.count_pairs("csr") > 0 and studio.store.count_pairs("stic") == 0
    csr_pairs, test_items = studio.store.count_pairs("csr"), studio.store.count_items(split="test")
    report = studio.seed_demo()  # the next start, with the defaults: the recorded plan is what runs
    assert studio.store.count_pairs("stic") > 0 and report["pairs"]["stic"] > 0, report
    assert studio.store.count_pairs("csr") == csr_pairs and report["items"] == 0
    assert studio.store.count_items(split="test") == test_items  # the eval's test split was left alone
    again = studio.seed_demo()
    assert again == {"items": 0, "pairs": {}, "message": "the demo world was seeded before"}


def test_demo_seeding_leaves_a_store_with_its_own_work_alone(studio, make_items, monkeypatch):
    """A store whose world items came from another seed gets no seed-0 scenes at start, and one
    whose pairs are the user's own (even on world items) gets no demo pairs; the CLI's top-up adds
    the scenes it names."""
    studio.ensure_world_items("train", 3, seed=7)  # the test split stays empty (an old `demo seed --test 0`)
    studio.generate("povid", split="train", params={"make_image_rejected": False}, seed=1)
    items, pairs = studio.store.count_items(), studio.store.count_pairs()
    report = studio.seed_demo()  # what app.py does at every start
    assert report == {"items": 0, "pairs": {}, "message": "nothing to seed (the store already held world items and pairs)"}
    assert (studio.store.count_items(), studio.store.count_pairs()) == (items, pairs)
    monkeypatch.setattr(studio, "generate", lambda *a, **k: pytest.fail("no generation once seeded"))
    topped = studio.seed_demo(n_train=5, n_test=0, seed=7, top_up=True)  # lvlm-studio demo seed --train 5 --seed 7
    assert topped["items"] == studio.store.count_items() - items > 0 and studio.store.count_pairs() == pairs
    assert studio.store.count_items(split="test") == 0  # --test 0: the test split is left alone


def test_demo_seed_adds_pairs_later_to_a_root_first_seeded_without(studio):
    """`demo seed --pairs 0`, then `demo seed --pairs 1`: the second adds demo pairs (the first's
    recorded plan used to end seeding for good); an app start in between adds none, and once
    pairs exist a further `--pairs 1` adds no more."""
    first = studio.seed_demo(n_train=4, n_test=1, pairs_per_method=0, top_up=True)
    assert first["items"] > 0 and studio.store.count_pairs() == 0
    assert studio.seed_demo()["message"] == "the demo world was seeded before"  # app start
    assert studio.store.count_pairs() == 0
    later = studio.seed_demo(n_train=4, n_test=1, pairs_per_method=1, top_up=True)
    assert later["items"] == 0 and sum(later["pairs"].values()) >= 1
    pairs = studio.store.count_pairs()
    assert pairs == sum(later["pairs"].values()) + later.get("existence_pairs", 0)
    again = studio.seed_demo(n_train=4, n_test=1, pairs_per_method=1, top_up=True)
    assert again["pairs"] == {} and studio.store.count_pairs() == pairs


def test_demo_seed_adds_pairs_later_when_the_first_seeding_had_no_train_scene(tmp_path):
    """`demo seed --train 0` plans pairs but has no train item to pair: it says so, and a later
    `demo seed --train 2` pairs them."""
    studio = Studio(Settings(home=tmp_path / "home"), users={}, admins=())
    try:
        first = studio.seed_demo(n_train=0, n_test=1, pairs_per_method=1, top_up=True)
        assert first["message"] == ("seeded demo items only (no train-split scene to pair: a later "
                                    "`demo seed --train N` pairs some)") and studio.store.count_pairs() == 0
        later = studio.seed_demo(n_train=2, n_test=1, pairs_per_method=1, top_up=True)
        assert sum(later["pairs"].values()) >= 1 and studio.store.count_pairs() > 0
    finally:
        studio.store.close()


def test_what_forms_and_scripts_send_is_still_accepted(studio, make_pairs, make_items, monkeypatch, tmp_path):
    """The checks refuse nothing a form or a script sends: 3.0 from a number field, "3" from a
    dropdown, numpy integers; and an image whose item cannot be stored leaves no row and no file."""
    import numpy as np

    from lvlm_studio.media import stored_files
    from lvlm_studio.service import whole_number

    assert [whole_number(v, "x") for v in (3, 3.0, " 3 ", np.int64(3), np.uint8(3))] == [3] * 5
    for bad in (3.5, "3.5", True, None, [3]):
        with pytest.raises(ValueError, match="x must be a whole number"):
            whole_number(bad, "x")
    [pid] = make_pairs([0.5])
    assert studio.get_pair(np.int64(pid))["pair_id"] == pid
    assert studio.compare(np.int64(0), "0")["a"] == 0
    with pytest.raises(ValueError, match=r"n must be at least 1 \(or unset for every item\), not 0"):
        studio.generate("povid", n=0)
    for kw, message in (({"model": 5}, "model is a name, not int"), ({"split": ["train"]}, "split is a name, not list")):
        with pytest.raises(ValueError, match=message):
            studio.generate("povid", **kw)
    from conftest import write_image

    write_image(tmp_path / "a.png", seed=9)
    files_before = stored_files(studio.settings)
    monkeypatch.setattr(studio.store, "add_item", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        studio.upload_images([tmp_path / "a.png"])
    assert stored_files(studio.settings) == files_before and studio.store.stats()["tables"]["images"] == 1


def test_an_interrupted_top_up_and_a_split_csr_pair_are_completed(studio, home, tmp_path, monkeypatch):
    """`demo seed` stopped while adding scenes is completed by the next app start (its plan is
    recorded first); a stop between a CSR caption pair and the yes/no pairs it implies loses
    neither (they are written in one transaction, so the resumed run makes both)."""
    def stop_at_train_scene_3(done, total, message):
        if message.startswith("world train scenes") and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        studio.seed_demo(n_train=6, n_test=2, pairs_per_method=1, progress=stop_at_train_scene_3, top_up=True)
    writes = {"n": 0}
    real_write = studio.store.write_generation

    def stop_at_second_write(*args, **kwargs):  # the first yes/no pair after the first caption pair
        writes["n"] += 1
        if writes["n"] == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(studio.store, "write_generation", stop_at_second_write)
    with pytest.raises(KeyboardInterrupt):
        studio.seed_demo()
    monkeypatch.setattr(studio.store, "write_generation", real_write)
    studio.seed_demo()  # the next start
    reference = Studio(Settings(home=tmp_path / "reference"), users={}, admins=())
    try:
        reference.seed_demo(n_train=6, n_test=2, pairs_per_method=1)  # the same, never interrupted
        for split in ("train", "test"):
            assert studio.store.count_items(split=split) == reference.store.count_items(split=split)
        for method in ("csr", "povid", "stic"):
            assert studio.store.count_pairs(method) == reference.store.count_pairs(method), method
        assert reference.store.count_pairs("csr") > 1  # the caption pair and its yes/no pairs
    finally:
        reference.store.close()


def test_compare_pairs_pope_probes_answered_by_both_rounds(studio, make_items):
    """POPE F1 compared probe by probe (paired bootstrap) over the probes both rounds answered; a
    probe only one round answered, or one without a yes/no label, is left out."""
    from lvlm_studio.evaluation import paired_pope_f1

    items = make_items(6)
    labels = ["yes", "no", "yes", "no", "yes"]
    said = {0: ["yes", "yes", "yes", "yes", "yes"], 1: ["yes", "no", "yes", "no", "no"]}
    r1 = studio.store.create_round(0, "m", {}, status="done")
    for rid in (0, r1):
        studio.store.add_eval_outputs(rid, [
            {"item_id": item, "answer": p.capitalize() + ".", "meta": {"kind": "pope", "label": t, "prediction": p}}
            for item, t, p in zip(items, labels, said[0 if rid == 0 else 1], strict=False)])
    studio.store.add_eval_outputs(r1, [{"item_id": items[5], "answer": "Yes.",
                                        "meta": {"kind": "pope", "label": "yes", "prediction": "yes"}}])
    res = studio.compare(0, r1)["paired_pope"]
    assert res == paired_pope_f1(said[0], said[1], labels)  # five images, one probe each
    assert res["n"] == 5 and res["f1_a"] == pytest.approx(0.75) and res["f1_b"] == pytest.approx(0.8)
    # A second probe of items[0]'s image is drawn with it (POPE asks a yes and a no of each image).
    image = studio.store.get_item(items[0])["image_id"]
    twin = studio.store.add_item(image, "Is there a blue square in the image?")
    for rid, said_now in ((0, "yes"), (r1, "no")):
        studio.store.add_eval_outputs(rid, [{"item_id": twin, "answer": said_now.capitalize() + ".",
                                             "meta": {"kind": "pope", "label": "no", "prediction": said_now}}])
    res = studio.compare(0, r1)["paired_pope"]
    images = [studio.store.get_item(i)["image_id"] for i in (*items[:5], twin)]
    assert res["n"] == 6 and res["units"] == 5
    assert res == paired_pope_f1([*said[0], "yes"], [*said[1], "no"], [*labels, "no"], groups=images)


def test_an_item_whose_stored_image_was_damaged_is_skipped_and_named_not_fatal(studio):
    """A stored image changed on disk after its import (truncated, overwritten) used to end a
    generate run with PIL's traceback; the run pairs the other items, names the skipped ones and
    leaves them undone. Evaluation says which file, as a clear error."""
    from lvlm_studio.evaluation import _load_image
    from lvlm_studio.media import ImageRejected

    studio.seed_demo(n_train=4, n_test=0, pairs_per_method=0)
    items = studio._describe_items(split="train")
    broken = items[1]
    Path(broken["image_path"]).write_bytes(b"garbage, not a PNG")
    report = studio.generate("povid", item_ids=[it["id"] for it in items], params={"make_image_rejected": False})
    assert report["unreadable_items"] == [broken["id"]] and report["pairs"] == 3
    assert f"items {broken['id']}" in report["note"] and "can no longer be read" in report["note"]
    assert broken["id"] not in studio.store.items_with_pairs("povid", 0)
    with pytest.raises(ImageRejected, match="stored image cannot be read"):
        _load_image(broken)


def test_generation_and_evaluation_see_a_transparent_image_as_training_does(tmp_path):
    """Training reads a stored RGBA PNG over white (media.load_image); generation and evaluation
    used Pillow's convert("RGB"), which shows the hidden colour of transparent pixels instead."""
    from PIL import Image

    from lvlm_studio.evaluation import _load_image
    from lvlm_studio.media import load_image

    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(path)
    report: dict = {}
    [(_, generated)] = Studio._readable([{"id": 1, "image_path": str(path)}], report)
    evaluated = _load_image({"image_path": str(path)})
    assert generated.getpixel((0, 0)) == evaluated.getpixel((0, 0)) == load_image(path).getpixel((0, 0)) == (255, 255, 255)
    assert report == {}


def test_evaluating_a_stic_stage_2_round_again_describes_first_as_its_job_did(studio, monkeypatch):
    """The round job evaluates STIC's stage-2 rounds describe-then-respond; `eval --round` and the
    Compare tab's Evaluate replaced those answers and metrics with plain ones."""
    from lvlm_studio import evaluation
    from lvlm_studio.training import DPORoundConfig

    stic = studio.store.create_round(0, "demo", {"objective": "stic_infusion"}, status="done")
    dpo = studio.store.create_round(0, "demo", {"methods": ["csr"]}, status="done")
    assert Studio._describe_prompt(studio.store.get_round(stic)) == DPORoundConfig().describe_prompt
    assert Studio._describe_prompt(studio.store.get_round(dpo)) is None
    assert Studio._describe_prompt(studio.store.get_round(0)) is None
    studio.ensure_world_items("test", 1)
    asked = []

    def answer(backend, items, extractor, params=None, batch_size=8, progress=None, should_stop=None,
               describe_prompt=None):
        asked.append(describe_prompt)
        return {"chair_s": 0.0}, []

    monkeypatch.setattr(evaluation, "evaluate_backend", answer)
    monkeypatch.setattr(studio, "backend", lambda model, round_id=None: None)
    assert studio.evaluate(stic)["describe_first"] is True and studio.evaluate(dpo)["describe_first"] is False
    assert asked == [DPORoundConfig().describe_prompt, None]


# ---------------------------------------------------------------------------- POPE on imported sets
_COCO_OBJECTS = [["dog", "couch", "cup"], ["person", "car", "dog", "bicycle"], ["cat", "couch"],
                 ["person", "chair", "cup", "dining table"], ["car", "truck", "person"], ["bottle", "cup", "chair"]]


def _probes(studio, dataset="coco", split="val") -> list[dict]:
    return [it for it in studio.store.list_items(dataset=dataset, split=split)
            if (it.get("meta") or {}).get("kind") == "pope"]


def test_pope_probes_for_an_imported_set_follow_its_ground_truth(studio, tmp_path):
    """COCO imports had no POPE probes, so rounds evaluated on them reported CHAIR only although
    eval_kinds asks for POPE; build_pope_questions was used by nothing but tests."""
    from conftest import write_coco

    from lvlm_studio.evaluation import CocoExtractor, pope_label

    studio.import_path(write_coco(tmp_path / "coco", _COCO_OBJECTS))
    truth = {it["image_id"]: set(it["objects"]) for it in studio.store.list_items(dataset="coco")}
    res = studio.add_pope_probes("coco", "val", strategy="adversarial", images=4, per_image=2, seed=3)
    assert (res["eligible_images"], res["images"], res["extractor"]) == (5, 4, "coco")  # image 3 has 2 objects
    assert res["probes"] == res["added"] == 16 and res["yes"] == 8 and res["note"] is None
    probes = _probes(studio)
    assert len(probes) == 16 and len({p["image_id"] for p in probes}) == 4
    vocabulary = set(CocoExtractor().vocabulary)
    for p in probes:
        obj = p["meta"]["probe"]
        assert p["prompt"] == f"Is there a {obj} in the image?" and obj in vocabulary
        assert pope_label(p) == p["meta"]["label"] == ("yes" if obj in truth[p["image_id"]] else "no")
        assert p["reference"] == {"yes": "Yes.", "no": "No."}[p["meta"]["label"]] and p["split"] == "val"
        assert len(truth[p["image_id"]]) >= 3
    # Adversarial "no" probes are objects that co-occur with the present ones in this set.
    co_occurring = {o for objs in truth.values() for o in objs}
    assert all(p["meta"]["probe"] in co_occurring for p in probes if p["meta"]["label"] == "no")
    # Idempotent; another draw adds only what is new; the set's describe items are unchanged.
    assert studio.add_pope_probes("coco", "val", images=4, per_image=2, seed=3)["added"] == 0
    assert studio.add_pope_probes("coco", "val", images=None, per_image=2, seed=3)["images"] == 5
    assert len(_probes(studio)) > 16
    studio.add_pope_probes("coco", "val", images=None, per_image=3, seed=8)  # another size and draw
    labels = Counter((p["image_id"], p["meta"]["label"]) for p in _probes(studio))
    assert all(labels[(image, "yes")] == labels[(image, "no")] for image, _ in labels)  # every image balanced
    assert len([it for it in studio.store.list_items(dataset="coco") if pope_label(it) is None]) == 6


def test_pope_probes_refuse_what_they_cannot_ask_about(studio, tmp_path):
    from conftest import write_coco, write_image

    for kwargs, message in (({"strategy": "hard"}, "unknown POPE strategy 'hard'"),
                            ({"per_image": 0}, "probes per image"), ({"images": 0}, "the number of images")):
        with pytest.raises(ValueError, match=message):
            studio.add_pope_probes("coco", "val", **kwargs)
    with pytest.raises(ValueError, match="no item of dataset 'coco', split 'val' has ground-truth objects"):
        studio.add_pope_probes("coco", "val")
    write_image(tmp_path / "f" / "a.png", seed=3)
    studio.import_path(tmp_path / "f", dataset="plain", split="val")  # no objects
    with pytest.raises(ValueError, match="has ground-truth objects to ask about"):
        studio.add_pope_probes("plain", "val")
    studio.import_path(write_coco(tmp_path / "coco", [["dog", "cat"], ["car"]]))
    with pytest.raises(ValueError, match="no image of dataset 'coco', split 'val' has 3 or more objects"):
        studio.add_pope_probes("coco", "val")
    assert studio.add_pope_probes("coco", "val", min_objects=2, per_image=1)["probes"] == 2
    # One POPE figure over two strategies matches neither: another strategy on the same set is refused.
    with pytest.raises(ValueError, match=r"coco/val already holds POPE probes of another strategy \(2 adversarial\)"):
        studio.add_pope_probes("coco", "val", strategy="random", min_objects=2, per_image=1)
    # A question CSR's yes/no pairs already made an item of (kind csr_existence) is not a probe.
    from lvlm_studio.evaluation import POPE_TEMPLATE

    studio.import_path(write_coco(tmp_path / "coco2", [["dog", "cat"]]), dataset="coco2")
    cat_item = next(it for it in studio.store.list_items(dataset="coco2") if it["objects"] == ["cat", "dog"])
    studio.store.add_item(cat_item["image_id"], POPE_TEMPLATE.format(object="cat"), "Yes.", "coco2", "val",
                          {"kind": "csr_existence"})
    # ... and leaving it out would unbalance that image's yes and no: the image gets no probes.
    res = studio.add_pope_probes("coco2", "val", min_objects=2, per_image=2, seed=4)
    assert (res["probes"], res["images"], res["added"]) == (0, 0, 0)
    assert "1 image(s) got no probes: one of their questions is already an item of another kind" in res["note"]
    # An image that has probes keeps them: another size or seed would mix two draws on it.
    again = studio.add_pope_probes("coco", "val", min_objects=2, per_image=2, seed=9)
    assert (again["probes"], again["images"], again["added"], again["already_probed"]) == (2, 1, 0, 1)
    with pytest.raises(Exception, match="admin"):
        Studio(studio.settings, users=parse_users("alice:pw:admin,bob:pw:reviewer"), admins=()).add_pope_probes(
            "coco", "val", min_objects=2, user="bob")


def test_a_rounds_evaluation_set_takes_an_images_probes_with_its_caption(studio, tmp_path):
    """Probes added after the import come after every caption item in the store: a limit took the
    captions only. The evaluation set keeps an image's items together, the images in order."""
    from conftest import write_coco

    from lvlm_studio import jobs
    from lvlm_studio.evaluation import ShapesWorldExtractor, evaluate_backend
    from lvlm_studio.training import DPORoundConfig

    studio.import_path(write_coco(tmp_path / "coco", _COCO_OBJECTS))
    studio.add_pope_probes("coco", "val", images=None, per_image=1)
    cfg = DPORoundConfig(eval_dataset="coco", eval_split="val", eval_limit=6)
    items = jobs.eval_items_for(studio.store, cfg)
    first = studio.store.list_items(dataset="coco")[0]["image_id"]
    assert [studio.store.get_item(it["item_id"])["image_id"] for it in items[:3]] == [first] * 3
    assert [(it["meta"] or {}).get("kind", "describe") for it in items[:3]] == ["describe", "pope", "pope"]
    # The limit counts items of whole images: never an image's "yes" probe without its "no" one.
    for limit, n in ((4, 3), (1, 3), (6, 6), (8, 7)):  # image 3 has 2 objects: a caption, no probes
        got = jobs.eval_items_for(studio.store, DPORoundConfig(eval_dataset="coco", eval_split="val", eval_limit=limit))
        assert len(got) == n, limit
    extractor, scored, note = jobs.evaluation_plan("auto", jobs.eval_items_for(studio.store, DPORoundConfig(
        eval_dataset="coco", eval_split="val", eval_limit=None)))
    assert extractor.name == "coco" and note is None and not isinstance(extractor, ShapesWorldExtractor)

    class SaysYes:  # a model that answers yes to everything: POPE recall 1, precision 0.5
        def sample(self, images, prompts, n=1, params=None):
            from types import SimpleNamespace

            return [[SimpleNamespace(text="Yes, there is a dog.")] for _ in prompts]

    metrics, rows = evaluate_backend(SaysYes(), scored, extractor)
    assert metrics["pope_n"] == 10 and metrics["pope_recall"] == 1.0 and metrics["pope_precision"] == 0.5
    assert metrics["n_captions"] == 6 and "chair_s" in metrics


def test_evaluate_set_counts_what_it_scored_and_names_what_it_left_out(studio, tmp_path):
    """A set mixing vocabularies is scored on its larger part: the counts said every item, and the
    note said 'left out the items of dataset(s) None'."""
    from conftest import write_coco, write_image

    studio.import_path(write_coco(tmp_path / "coco", _COCO_OBJECTS[:2]))
    write_image(tmp_path / "w" / "shape.png", seed=77)
    (tmp_path / "w" / "d.jsonl").write_text(json.dumps(
        {"image": "shape.png", "prompt": "Describe the image.", "objects": ["red circle"], "split": "val"}))
    studio.import_path(tmp_path / "w" / "d.jsonl", dataset="coco")
    res = studio.evaluate_set(0, dataset="coco", split="val", max_new_tokens=6)
    assert (res["items"], res["images"]) == (2, 2) == (res["metrics"]["n_items"], res["metrics"]["images"])
    assert res["metrics"]["max_new_tokens"] == 6
    # Unless told, a round is answered at the length its own job evaluated it with (a round scored
    # at 512 tokens was re-scored at 64 from the app), else the default 64.
    assert studio.evaluate_set(0, dataset="coco", split="val", images=1)["metrics"]["max_new_tokens"] == 64
    studio.store.ensure_base_round("demo")
    studio.store.update_round(0, config={"eval_max_new_tokens": 5})
    assert studio.evaluate_set(0, dataset="coco", split="val", images=1)["metrics"]["max_new_tokens"] == 5
    assert res["metrics"]["extractor"] == "coco"
    assert "scored 2 of 3 with the coco extractor; left out the items of dataset(s) coco" in res["metrics"]["eval_note"]


def test_csr_yes_no_pairs_never_land_on_an_evaluation_probe(studio, tmp_path):
    """CSR's yes/no question for an object is POPE's question for it: on a split that holds `pope`
    probes, its pair was written onto the evaluation probe (a training pair on an evaluation item)."""
    from conftest import write_coco

    from lvlm_studio.methods.csr import CSRCandidate, CSRConfig, CSRResult

    studio.import_path(write_coco(tmp_path / "coco", [["dog", "couch", "cup"]]))
    studio.add_pope_probes("coco", "val", per_image=3)
    [caption] = [it for it in studio.store.list_items(dataset="coco") if (it.get("meta") or {}).get("kind") != "pope"]
    probes_before = {it["id"] for it in studio.store.list_items(dataset="coco") if it["meta"].get("kind") == "pope"}

    def cand(text: str) -> CSRCandidate:
        return CSRCandidate(text, [], [], 0.0, 0.0, "eos")

    res = CSRResult("Describe.", caption["image_id"], [cand("A dog on a couch."), cand("A cat on a couch.")], 0, 1, 1.0)
    report: dict = {}
    studio._write_existence_pairs(caption, res, CSRConfig(existence_pairs=True), {"model": "demo"}, 0, 0, report)
    paired_items = {studio.store.get_pair(pid)["item_id"] for pid in studio.store.pair_ids()}
    assert report["existence_on_probes"] >= 1 and not paired_items & probes_before
    assert all(studio.store.get_item(i)["meta"]["kind"] == "csr_existence" for i in paired_items)
