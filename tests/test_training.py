"""DPO rounds on a tiny locally built LLaVA: training, adapter reload, lineage, stop, POVID balance."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import LLAVA_HF_TEMPLATE
from PIL import Image

from lvlm_studio.models.tiny import TinyLlavaSpec, build_tiny_llava
from lvlm_studio.training import (
    CURVE_KEYS,
    DPORoundConfig,
    adapter_chain,
    balance_answer_prior,
    build_dpo_dataset,
    check_sequence_lengths,
    concatenate_loras,
    load_base_model,
    materialize_round_model,
    merge_chain,
    pair_sft_weight,
    povid_row_weights,
    povid_term,
    sequence_logprobs,
    train_round,
)

torch.set_num_threads(2)

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def _pairs(n: int = 16) -> list[dict]:
    pairs = []
    for i in range(n):
        c, s = COLOURS[i % 4], SHAPES[i % 3]
        image = Image.new("RGB", (32, 32), (20 + 13 * i, 60, 200 - 9 * i))
        pairs.append(
            {
                "pair_id": i,
                "image": image,
                "prompt": "Describe the image.",
                "chosen": f"There is a {c} {s}.",
                "rejected": f"There is a {c} {s} and a green triangle.",
                "method": "csr",
            }
        )
    return pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava"))


def _mean_margin(model, processor, pairs) -> float:
    chosen = sequence_logprobs(model, processor, pairs, "chosen")
    rejected = sequence_logprobs(model, processor, pairs, "rejected")
    return sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def test_round_trains_saves_and_lineage(tiny, tmp_path):
    pairs = _pairs()
    cfg = DPORoundConfig(learning_rate=5e-3, num_epochs=3, batch_size=4, max_length=None, sft_weight=0.0, beta=0.1)
    logged: list[dict] = []
    r1 = train_round(pairs, tiny, None, tmp_path / "round_1", cfg, on_log=logged.append)

    # The adapter was written atomically: the directory is complete and no temp dirs remain.
    out = tmp_path / "round_1"
    assert r1.adapter_path == str(out) and not r1.stopped and r1.steps == 12
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parents"] == [] and lineage["n_pairs"] == 16 and lineage["config"]["beta"] == cfg.beta
    # On CPU the config's None picks fp32 without gradient checkpointing (tests/test_gpu_recipe.py
    # forces the CUDA choice, bf16 + checkpointing, and finds it recorded).
    assert lineage["hardware"] == {"device": "cpu", "dtype": "float32", "adapter_dtype": "float32", "quantization": None,
                                   "gradient_checkpointing": False}

    # The curve streamed through on_log has every key at every training step, and the reward
    # margin grew: a real effect, not a constant.
    steps = [rec for rec in logged if "loss" in rec]
    assert len(steps) == 12 and logged == r1.curve
    assert all(set(CURVE_KEYS) <= set(rec) for rec in steps)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # reference == policy at start
    assert steps[-1]["rewards/margins"] > 0.05
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["rewards/accuracies"] == 1.0

    # Reload: base + adapter prefers chosen over rejected more than the base does.
    base, processor = load_base_model(tiny)
    before = _mean_margin(base, processor, pairs)
    merged = merge_chain(base, [r1.adapter_path])
    after = _mean_margin(merged, processor, pairs)
    assert after > before + 0.5, (before, after)
    # The logged final reward margin is β·(margin gain) measured on the training batches.
    assert after - before == pytest.approx(steps[-1]["rewards/margins"] / cfg.beta, rel=0.35)

    # Round 2 starts from round 1 merged, which is also its reference: at its first step the
    # rewards are exactly 0 and the policy's log-probs are round 1's (one batch = all pairs).
    chain_logp = sum(sequence_logprobs(merged, processor, pairs, "chosen")) / len(pairs)
    base_logp = sum(sequence_logprobs(load_base_model(tiny)[0], processor, pairs, "chosen")) / len(pairs)
    cfg2 = DPORoundConfig(learning_rate=5e-3, num_epochs=2, batch_size=16, max_length=None, sft_weight=1.0)
    r2 = train_round(pairs, tiny, [r1.adapter_path], tmp_path / "round_2", cfg2)
    first = next(rec for rec in r2.curve if "loss" in rec)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] == pytest.approx(chain_logp, abs=1e-3)
    assert abs(chain_logp - base_logp) > 1e-3  # so the check above tells round 1 from the base
    assert adapter_chain(r2.adapter_path) == [r1.adapter_path, r2.adapter_path]

    # materialize_round_model rebuilds round 2's model from the chain and saves it loadable.
    model2, proc2 = materialize_round_model(tiny, adapter_chain(r2.adapter_path), tmp_path / "merged2")
    reloaded, _ = load_base_model(str(tmp_path / "merged2"))
    m_a = sequence_logprobs(model2, proc2, pairs[:3], "chosen")
    m_b = sequence_logprobs(reloaded, proc2, pairs[:3], "chosen")
    assert m_a == pytest.approx(m_b, abs=1e-4)
    # Another process's complete save is kept (a reader may be loading it), this one dropped; a
    # partial folder (no config.json) is replaced.
    (tmp_path / "merged2" / "reader-marker").write_text("in use")
    materialize_round_model(tiny, adapter_chain(r2.adapter_path), tmp_path / "merged2")
    assert (tmp_path / "merged2" / "reader-marker").is_file()
    (tmp_path / "merged2" / "config.json").unlink()
    materialize_round_model(tiny, adapter_chain(r2.adapter_path), tmp_path / "merged2")
    assert (tmp_path / "merged2" / "config.json").is_file() and not (tmp_path / "merged2" / "reader-marker").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged2")]  # no temporary copy left

    with pytest.raises(FileExistsError):
        train_round(pairs, tiny, None, tmp_path / "round_1", cfg)


def test_round_stops_cleanly(tiny, tmp_path):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # before load, after load, after step 1 → stop after step 2

    cfg = DPORoundConfig(learning_rate=1e-3, num_epochs=5, batch_size=4)
    result = train_round(_pairs(8), tiny, None, tmp_path / "r", cfg, should_stop=should_stop)
    assert result.stopped and result.adapter_path is None and result.steps == 2
    assert not (tmp_path / "r").exists() and list(tmp_path.iterdir()) == []


def test_no_pairs_and_missing_image(tiny, tmp_path):
    with pytest.raises(ValueError, match="no training pairs"):
        train_round([], tiny, None, tmp_path / "r")
    bad = [{**_pairs(1)[0], "image": None, "image_path": str(tmp_path / "gone.png")}]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        build_dpo_dataset(bad)


def test_dataset_is_trl_conversational_format(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    ds = build_dpo_dataset([{"image_path": str(path), "prompt": "Describe.", "chosen": "A.", "rejected": "B."}])
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": "Describe."}]
    assert row["chosen"] == [{"role": "assistant", "content": "A."}]
    assert row["rejected"] == [{"role": "assistant", "content": "B."}]
    assert row["images"][0].size == (8, 8)


def test_config_loss_types_and_validation():
    assert DPORoundConfig(sft_weight=0).loss_types() == (["sigmoid"], [1.0])
    assert DPORoundConfig().loss_types() == (["sigmoid", "sft"], [1.0, 1.0])  # default: DPO + SFT
    assert DPORoundConfig(sft_weight=0.5).loss_types() == (["sigmoid", "sft"], [1.0, 0.5])
    cfg = DPORoundConfig.from_dict({"beta": 0.2, "methods": ["csr"]})
    assert cfg.beta == 0.2 and DPORoundConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DPO round option"):
        DPORoundConfig.from_dict({"betta": 0.2})
    with pytest.raises(ValueError):
        DPORoundConfig(quantization="2bit")
    # The learning rate defaults per objective: the demo's DPO lr, or STIC stage 2's (the paper's
    # 2e-5) for an infusion round that does not set one; a stored round reads back the same.
    assert DPORoundConfig().learning_rate == 2e-4
    stage2 = DPORoundConfig.from_dict({"objective": "stic_infusion"})
    assert stage2.learning_rate == 2e-5 and DPORoundConfig.from_dict(stage2.to_dict()) == stage2
    assert DPORoundConfig(objective="stic_infusion", learning_rate=1e-4).learning_rate == 1e-4


def test_a_stored_rounds_describe_mode_is_read_even_when_todays_checks_refuse_its_config():
    """How a round answers when evaluated (describe-first for STIC stage 2) comes from its stored
    config; a config an older version stored that today's checks refuse (num_epochs 0 trained
    nothing then) must not fail the child round that evaluates it as a parent after training."""
    stage2 = DPORoundConfig(objective="stic_infusion")
    assert DPORoundConfig.describe_prompt_of(None) is None and DPORoundConfig.describe_prompt_of({}) is None
    assert DPORoundConfig.describe_prompt_of(stage2.to_dict()) == stage2.describe_prompt
    assert DPORoundConfig.describe_prompt_of(DPORoundConfig().to_dict()) is None
    with pytest.raises(ValueError):
        DPORoundConfig.from_dict({**stage2.to_dict(), "num_epochs": 0})
    assert DPORoundConfig.describe_prompt_of({**stage2.to_dict(), "num_epochs": 0}) == stage2.describe_prompt
    assert DPORoundConfig.describe_prompt_of({"objective": "stic_infusion", "betta": 1,
                                              "describe_prompt": "Say what you see."}) == "Say what you see."
    assert DPORoundConfig.describe_prompt_of({"objective": "dpo", "num_epochs": 0}) is None
    assert DPORoundConfig.describe_prompt_of({"eval_describe_first": True, "num_epochs": 0}) == stage2.describe_prompt


def test_answer_prior_balancing_cuts_each_question_to_equal_yes_and_no():
    def pair(pid, prompt, chosen, rejected):
        return {"pair_id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected}

    tri = "Is there a green triangle in the image?"
    sq = "Is there a red square in the image?"
    pairs = ([pair(i, tri, "No.", "Yes.") for i in range(5)] + [pair(10 + i, tri, "Yes.", "No.") for i in range(2)]
             + [pair(20 + i, sq, "No.", "Yes.") for i in range(3)]
             + [pair(30, "Describe.", "A cat.", "A dog."), pair(31, "Describe.", "A cat.", "A dog."),
                pair(32, "Describe.", "A hen.", "A dog."), pair(33, "Describe.", "A dog.", "A hen."),
                pair(40, "Is there a cat?", "Yes.", "No.")])
    kept, dropped = balance_answer_prior(pairs, seed=0)
    by_q: dict[tuple, list[int]] = {}
    for p in kept:
        by_q.setdefault((p["prompt"], p["chosen"]), []).append(p["pair_id"])
    # 5 "No" / 2 "Yes" on the triangle -> 2 of each, a seeded sample of the five
    assert len(by_q[(tri, "No.")]) == 2 and set(by_q[(tri, "No.")]) <= set(range(5)) and by_q[(tri, "Yes.")] == [10, 11]
    # one orientation only (a question never answered otherwise, or the same caption pair on two
    # images): nothing to balance against, left alone; captions preferred both ways: one of each
    assert by_q[(sq, "No.")] == [20, 21, 22] and by_q[("Describe.", "A cat.")] == [30, 31]
    assert by_q[("Describe.", "A hen.")] == [32] and by_q[("Describe.", "A dog.")] == [33]
    assert by_q[("Is there a cat?", "Yes.")] == [40]
    assert dropped == 3 and len(kept) == len(pairs) - 3
    assert [p["pair_id"] for p in kept] == sorted(p["pair_id"] for p in kept)  # original order
    assert balance_answer_prior(pairs, seed=0) == (kept, dropped)  # seeded: the same cut each time
    cuts = {tuple(p["pair_id"] for p in balance_answer_prior(pairs, seed=s)[0]) for s in range(6)}
    assert len(cuts) > 1  # another seed, another sample


def test_a_round_trains_on_the_balanced_questions_and_records_the_cut(tiny, tmp_path):
    images = [Image.new("RGB", (32, 32), (30 * i, 90, 120)) for i in range(6)]
    q = "Is there a green triangle in the image?"
    pairs = [{"pair_id": i, "image": images[i], "prompt": q, "method": "csr",
              "chosen": "No." if i < 4 else "Yes.", "rejected": "Yes." if i < 4 else "No."} for i in range(6)]
    cfg = DPORoundConfig(max_steps=1, batch_size=2, max_length=None)
    balanced = train_round(pairs, tiny, None, tmp_path / "balanced", cfg)
    assert (balanced.n_pairs, balanced.lineage["n_dropped_by_balance"]) == (4, 2)
    assert sorted(balanced.lineage["pair_ids"])[-2:] == [4, 5]  # both "Yes" pairs kept
    off = train_round(pairs, tiny, None, tmp_path / "off", DPORoundConfig(max_steps=1, batch_size=2, max_length=None,
                                                                          balance_answers=False))
    assert (off.n_pairs, off.lineage["n_dropped_by_balance"]) == (6, 0)


def test_povid_two_term_row_weights():
    text = [{"pair_id": i, "method": "povid", "meta": {"rejected_source": "povid_inject"}} for i in range(5)]
    noise = [{"pair_id": 10 + i, "method": "povid", "meta": {"rejected_source": "povid_noise"}} for i in range(2)]
    other = [{"pair_id": 99, "method": "csr", "meta": None}]
    assert [povid_term(p) for p in (text[0], noise[0], other[0])] == ["text", "noise", None]
    assert povid_term({"method": "povid_noise"}) == "noise"
    # As service.py writes POVID pairs: meta kind "text" / "image".
    assert povid_term({"method": "povid", "meta": {"kind": "image"}}) == "noise"
    assert povid_term({"method": "povid", "meta": {"kind": "text"}}) == "text"
    # 5 text + 2 noise POVID rows: each term carries half of the 7 rows' weight; others weigh 1.
    weights = povid_row_weights([*other, *text, *noise])
    assert weights == pytest.approx([1.0] + [0.7] * 5 + [1.75] * 2)
    assert sum(weights[1:6]) == pytest.approx(sum(weights[6:])) == pytest.approx(3.5)
    assert povid_row_weights(text) == [1.0] * 5  # one term only: unchanged
    # On by default: another loss type is refused only where the weights would apply, before a
    # model is loaded (the tiny model path here does not exist).
    hinge = DPORoundConfig(loss_type="hinge")
    assert hinge.povid_two_term
    with pytest.raises(ValueError, match="sigmoid.*povid_two_term=false"):
        train_round([*text, *noise], "no-such-model", None, "unused", hinge)



def test_povid_two_term_loss_counts_a_row_weighted_k_as_k_copies(tiny, tmp_path):
    """POVID's 0.5/0.5 loss by row weights: with the whole set in one batch per step, the weighted
    round (4 text-term + 2 noise-term pairs, weights 0.75 / 1.5) takes the same steps as an
    unweighted round on the 4 text pairs + the 2 noise pairs twice (both terms half of the loss),
    with DPO alone and with the SFT term; unweighted on the 6 pairs it does not. (Without the
    weighted DPO term the losses differ by 1.6e-4 to 4.4e-4 from step 2 on.)"""
    pairs = _pairs(6)
    for i, p in enumerate(pairs):
        p["method"], p["meta"] = "povid", {"kind": "image" if i >= 4 else "text"}

    def losses(result):
        return [rec["loss"] for rec in result.curve if "loss" in rec and "rewards/margins" in rec]

    for sft in (0.0, 1.0):
        same = dict(learning_rate=5e-3, max_steps=3, max_length=None, sft_weight=sft, beta=0.1, lora_dropout=0.0,
                    warmup_ratio=0.0, lr_scheduler_type="constant", balance_answers=False)
        weighted = train_round(pairs, tiny, None, tmp_path / f"w{sft}",
                               DPORoundConfig(batch_size=6, povid_two_term=True, **same))
        repeated = train_round(pairs + pairs[4:], tiny, None, tmp_path / f"r{sft}", DPORoundConfig(batch_size=8, **same))
        plain = train_round(pairs, tiny, None, tmp_path / f"p{sft}",
                            DPORoundConfig(batch_size=6, povid_two_term=False, **same))
        assert weighted.lineage["dpo_row_weights"] == [0.75, 1.5] and weighted.n_rows == 6
        assert plain.lineage["dpo_row_weights"] == [1.0]
        assert len(losses(weighted)) == len(losses(repeated)) == 3
        assert losses(weighted) == pytest.approx(losses(repeated), rel=None, abs=2e-5)
        assert abs(losses(weighted)[1] - losses(plain)[1]) > 1e-4


def test_per_pair_sft_weights_work_with_any_dpo_loss_type(tiny, tmp_path):
    """Only per-row DPO weights need the sigmoid loss; an SFT term on some rows adds to any loss."""
    pairs = _pairs(4)
    pairs[0]["meta"] = {"sft": False}
    cfg = DPORoundConfig(max_steps=2, batch_size=4, max_length=None, loss_type="hinge", learning_rate=5e-3)
    result = train_round(pairs, tiny, None, tmp_path / "hinge", cfg)
    steps = [rec for rec in result.curve if "loss" in rec and "rewards/margins" in rec]
    assert result.steps == 2 and result.lineage["n_sft_rows"] == 3
    # Step 1 (policy = reference): hinge loss 1 + the SFT term over the 3 kept rows.
    assert steps[0]["loss"] == pytest.approx(1.0 + steps[0]["sft_loss"], abs=1e-5) and steps[0]["sft_loss"] > 0


def test_weighted_rows_train_in_bf16_with_gradient_checkpointing(tiny, tmp_path):
    """What CUDA picks by itself (bf16, checkpointing) with both kinds of row weights: the hooks
    still see TRL's policy and reference passes (checkpointing re-runs the policy layers)."""
    pairs = _pairs(6)
    for i, p in enumerate(pairs):
        p["method"], p["meta"] = "povid", {"kind": "image" if i >= 4 else "text", "sft": i != 0}
    cfg = DPORoundConfig(max_steps=3, batch_size=6, max_length=None, learning_rate=5e-3, povid_two_term=True,
                         bf16=True, gradient_checkpointing=True)
    result = train_round(pairs, tiny, None, tmp_path / "bf16", cfg)
    steps = [rec for rec in result.curve if "loss" in rec and "rewards/margins" in rec]
    assert result.lineage["hardware"] == {"device": "cpu", "dtype": "bfloat16", "adapter_dtype": "float32", "quantization": None,
                                          "gradient_checkpointing": True}
    assert result.lineage["dpo_row_weights"] == [0.75, 1.5] and result.lineage["n_sft_rows"] == 5
    assert len(steps) == 3 and all(rec["sft_loss"] > 0 for rec in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2) + steps[0]["sft_loss"], abs=2e-2)  # bf16 rounding


def test_sft_term_skips_automatic_answers_marked_unfit_to_imitate(tiny, tmp_path):
    """At step 1 the policy is its reference (LoRA B = 0), so every row's DPO loss is log 2 and
    the logged loss is log 2 + the SFT term: the per-pair term must equal TRL's own term over the
    rows it keeps, and be absent for the rest."""
    import math

    pairs = _pairs(6)
    for i, p in enumerate(pairs):
        p["meta"] = {"sft": i < 2}  # as CSR marks its pairs (CSRConfig.sft_min_reward)
    pairs[2]["status"] = "accept"  # a person vouched for it: kept although marked
    pairs[3]["meta"] = {"derived": "existence"}  # no mark: kept

    def first_loss(rows, name, **kw):
        cfg = DPORoundConfig(max_steps=1, batch_size=len(rows), max_length=None, balance_answers=False, **kw)
        result = train_round(rows, tiny, None, tmp_path / name, cfg)
        return result, next(rec["loss"] for rec in result.curve if "loss" in rec)

    assert [pair_sft_weight(p, DPORoundConfig(sft_weight=0.7)) for p in pairs] == [0.7, 0.7, 0.7, 0.7, 0.0, 0.0]
    assert {pair_sft_weight(p, DPORoundConfig(sft_weight=0.0)) for p in pairs} == {0.0}

    _, native_kept = first_loss(pairs[:4], "native_kept", sft_weight=0.7)
    mixed, per_pair = first_loss(pairs, "per_pair", sft_weight=0.7)
    assert per_pair == pytest.approx(native_kept, abs=1e-5)
    assert per_pair > math.log(2) + 0.1  # the term is there, not DPO alone
    assert mixed.lineage["n_sft_rows"] == 4
    first = next(rec for rec in mixed.curve if "loss" in rec)
    assert first["sft_loss"] == pytest.approx(per_pair - math.log(2), abs=1e-5)  # the term, logged

    # Every row marked: DPO alone, through TRL's plain loss.
    none, dpo_only = first_loss(pairs[4:], "none", sft_weight=0.7)
    assert dpo_only == pytest.approx(math.log(2), abs=1e-5) and none.lineage["n_sft_rows"] == 0

    # The per-pair term trains: after a few steps the kept rows' chosen answers are likelier
    # than after the same steps with DPO alone.
    def kept_logp(name, **kw):
        cfg = DPORoundConfig(max_steps=4, batch_size=6, max_length=None, learning_rate=5e-3, balance_answers=False,
                             **kw)
        adapter = train_round(pairs, tiny, None, tmp_path / name, cfg).adapter_path
        model, processor = load_base_model(tiny)
        return sum(sequence_logprobs(merge_chain(model, [adapter]), processor, pairs[:4], "chosen"))

    assert kept_logp("with", sft_weight=1.0) > kept_logp("without", sft_weight=0.0) + 0.5


def test_sequence_lengths_are_checked_before_training(tiny, tmp_path):
    """A max_length that cannot hold the prompt with its image tokens fails before any step with
    what to set (TRL would fail at the first step, or train on rows whose image was cut); one that
    cuts answers is counted in the lineage."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    pairs = _pairs(4)
    pairs[3] = {**pairs[3], "chosen": "There is a red circle. " * 6}  # the longest answer
    full = check_sequence_lengths(processor, pairs, None)
    image_tokens = AutoConfig.from_pretrained(tiny).image_seq_length  # 16 for the test model
    assert full["prompt_tokens"] > image_tokens and full["answers_cut"] == 0
    assert full["longest_answer_tokens"] > 6 * 5
    cut = check_sequence_lengths(processor, pairs, full["prompt_tokens"] + 20)
    assert cut["answers_cut"] == 1  # only the long one
    with pytest.raises(ValueError, match=rf"max_length {image_tokens} is too short .* at least \d+"):
        check_sequence_lengths(processor, pairs, image_tokens)
    with pytest.raises(ValueError, match="too short"):
        train_round(pairs, tiny, None, tmp_path / "a", DPORoundConfig(max_length=image_tokens, max_steps=1))
    assert not (tmp_path / "a").exists()


def _random_lora(tiny: str, out, r: int, alpha: int, seed: int, target=r".*\blanguage_model\b.*\.(q_proj|v_proj)") -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, _ = load_base_model(tiny)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target, init_lora_weights=False))
    peft.save_pretrained(str(out))
    return str(out)


def test_concatenated_loras_equal_the_adapters_merged_one_after_the_other(tiny, tmp_path):
    """The two-stage POVID round's saved adapter: loading it is merging both stages in order."""
    first = _random_lora(tiny, tmp_path / "a", r=4, alpha=16, seed=1)
    second = _random_lora(tiny, tmp_path / "b", r=8, alpha=8, seed=2)
    both = concatenate_loras([first, second], tmp_path / "ab")
    config = json.loads((both / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12

    base = dict(load_base_model(tiny)[0].state_dict())
    sequential = merge_chain(load_base_model(tiny)[0], [first, second]).state_dict()
    concatenated = merge_chain(load_base_model(tiny)[0], [str(both)]).state_dict()
    changed = [k for k in base if not torch.equal(base[k], sequential[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # the adapters did something
    assert max((sequential[k] - concatenated[k]).abs().max().item() for k in base) < 1e-5
    with pytest.raises(FileExistsError):
        concatenate_loras([first, second], tmp_path / "ab")
    other = _random_lora(tiny, tmp_path / "c", r=4, alpha=8, seed=3, target=r".*\blanguage_model\b.*\.k_proj")
    with pytest.raises(ValueError, match="other modules"):
        concatenate_loras([first, other], tmp_path / "ac")


def _povid_pairs(n_text: int, n_noise: int) -> list[dict]:
    pairs = _pairs(n_text + n_noise)
    for i, p in enumerate(pairs):
        p["method"], p["meta"] = "povid", {"kind": "image" if i >= n_text else "text"}
    return pairs


def test_povid_two_stage_round_trains_text_pairs_then_every_pair_on_stage_one_merged(tiny, tmp_path):
    pairs = _povid_pairs(4, 2)
    cfg = DPORoundConfig(learning_rate=2e-2, num_epochs=2, povid_stage1_epochs=3, batch_size=6, max_length=None,
                         beta=0.1, sft_weight=0.0, balance_answers=False)
    logged: list[dict] = []
    result = train_round(pairs, tiny, None, tmp_path / "round_1", cfg, on_log=logged.append)

    # Stage 1: the 4 text pairs, 3 epochs of one step; stage 2: all 6 pairs, 2 epochs of one step.
    steps = [rec for rec in logged if "loss" in rec]
    assert result.steps == 5 and [rec["step"] for rec in steps] == [1, 2, 3, 4, 5]
    assert [rec["stage"] for rec in steps] == [1, 1, 1, 2, 2]
    assert {rec["max_steps"] for rec in logged} == {5} and logged == result.curve
    # Stage 2 starts from stage 1 merged, which is also its reference: at its first step (one batch
    # = all 6 pairs) the rewards are 0 again and the policy's log-probs are no longer the base's.
    base, processor = load_base_model(tiny)
    base_logp = sum(sequence_logprobs(base, processor, pairs, "chosen")) / len(pairs)
    assert steps[3]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert steps[3]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert abs(steps[3]["logps/chosen"] - base_logp) > 1e-2

    out = tmp_path / "round_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_1"]  # stages' scratch removed
    lineage = json.loads((out / "lineage.json").read_text())
    assert [(s["stage"], s["n_pairs"], s["steps"], s["epochs"]) for s in lineage["povid_stages"]] == [
        (1, 4, 3, 3), (2, 6, 2, 2)]
    assert lineage["dpo_row_weights"] == [0.75, 1.5]  # stage 2: the two-term loss
    assert lineage["parents"] == [] and lineage["config"]["povid_stage1_epochs"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * cfg.lora_r
    assert json.loads((out / "curve.json").read_text()) == result.curve

    # The round's one adapter moves the model like both stages did: chosen gains on rejected.
    before = _mean_margin(base, processor, pairs)
    after = _mean_margin(merge_chain(load_base_model(tiny)[0], adapter_chain(out)), processor, pairs)
    assert after > before + 0.2, (before, after)  # a no-op adapter gives exactly `before`


def test_povid_two_stage_round_counts_balanced_pairs_and_accumulated_steps(tiny, tmp_path):
    """Both stages see the pairs balance_answers kept (counted once), and the progress total is
    right with gradient accumulation (a partial last update counts) from the first step on."""
    probes = _pairs(6)
    for i, p in enumerate(probes):  # 5 x "Yes" preferred, 1 x "No": balancing keeps one of each
        p.update(pair_id=100 + i, prompt="Is there a red circle?", chosen="Yes." if i else "No.",
                 rejected="No." if i else "Yes.", method="csr")
    cfg = DPORoundConfig(learning_rate=1e-3, num_epochs=1, povid_stage1_epochs=1, batch_size=1,
                         gradient_accumulation_steps=2, max_length=None)
    result = train_round(_povid_pairs(5, 0) + probes, tiny, None, tmp_path / "r", cfg)
    steps = [rec for rec in result.curve if "loss" in rec]
    # stage 1: 5 text pairs = 5 batches = 3 updates; stage 2: 5 + 2 kept probes = 7 batches = 4 updates
    assert [(rec["step"], rec["stage"]) for rec in steps] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2), (7, 2)]
    assert {rec["max_steps"] for rec in result.curve} == {7}
    assert result.n_pairs == result.n_rows == 7 and result.lineage["n_dropped_by_balance"] == 4
    assert [s["n_pairs"] for s in result.lineage["povid_stages"]] == [5, 7]


def test_povid_two_stage_round_refuses_without_text_pairs_and_stops_cleanly(tiny, tmp_path):
    cfg = DPORoundConfig(learning_rate=1e-3, num_epochs=1, povid_stage1_epochs=1, batch_size=2, max_length=None)
    with pytest.raises(ValueError, match="text-hallucinated"):
        train_round(_pairs(4), tiny, None, tmp_path / "csr_only", cfg)
    calls = {"n": 0}

    def should_stop() -> bool:  # stage 1: 2 load checks + 2 steps; stage 2: 2 load checks, stop after step 2
        calls["n"] += 1
        return calls["n"] > 7

    result = train_round(_povid_pairs(4, 2), tiny, None, tmp_path / "r", cfg, should_stop=should_stop)
    assert result.stopped and result.adapter_path is None and result.steps == 4
    assert list(tmp_path.iterdir()) == []
    for bad in (dict(povid_stage1_epochs=-1),
                dict(povid_stage1_epochs=3, objective="stic_infusion"), dict(povid_stage1_epochs=3, loss_type="ipo")):
        with pytest.raises(ValueError):
            DPORoundConfig(**bad)


# Tests from a mutation audit of the store, service, io and training helpers: each fails on a
# mutant the suite above let through.
def test_povid_term_names_noisy_variants():
    assert povid_term({"method": "povid", "meta": {"variant": "noisy_image"}}) == "noise"
    assert povid_term({"method": "povid", "meta": {"term": "noisy"}}) == "noise"


@pytest.mark.parametrize("bad", [
    dict(sft_weight=-0.1), dict(batch_size=0), dict(lora_r=0), dict(num_processes=0), dict(objective="sft"),
    dict(povid_stage1_epochs=-1), dict(povid_stage1_epochs=3, objective="stic_infusion"),
    dict(povid_stage1_epochs=3, loss_type="ipo"),
    dict(learning_rate=0.0), dict(learning_rate=-1.0), dict(learning_rate=float("nan")), dict(num_epochs=0),
    dict(num_epochs=-1, max_steps=0), dict(beta=0.0), dict(lora_alpha=0), dict(lora_dropout=1.0),
    dict(warmup_ratio=1.0), dict(warmup_ratio=-0.1), dict(gradient_accumulation_steps=0), dict(logging_steps=0),
    dict(max_length=0), dict(eval_limit=0), dict(learning_rate=float("inf")), dict(beta=float("inf")),
    dict(num_epochs=float("inf")), dict(sft_weight=float("nan")), dict(eval_batch_size=0),
    dict(eval_max_new_tokens=0), dict(loss_type="dpo"), dict(extractor="world"), dict(num_epochs=1e9),
    dict(learning_rate=1e9), dict(learning_rate=1.5), dict(lora_r=10**9), dict(povid_stage1_epochs=1e9),
    dict(povid_stage1_epochs=float("inf")), dict(max_steps=10**15), dict(max_steps=float("nan")),
    # each of these passed and failed only in the job, after the model loaded (or forked 10**6 workers)
    dict(loss_type="exo_pair"), dict(lr_scheduler_type="foo"), dict(lr_scheduler_type="cosine_with_min_lr"),
    dict(seed=-1), dict(seed=2**32), dict(num_processes=10**6), dict(infusion_limit=-1), dict(infusion_limit=0),
    dict(lora_alpha=float("nan")), dict(lora_alpha=float("inf")), dict(batch_size=float("nan")),
    dict(lora_r=float("nan")),
])
def test_config_refuses_out_of_range_options(bad):
    with pytest.raises(ValueError):
        DPORoundConfig(**bad)


def test_the_loss_types_allowed_are_those_trl_knows():
    """DPORoundConfig refuses a loss type up front with TRL's own list; each listed one is a branch
    of TRL's DPOTrainer (a TRL upgrade that renames one fails here, not in a round)."""
    import inspect

    from trl import DPOTrainer

    from lvlm_studio.training import TRL_DPO_LOSS_TYPES

    source = inspect.getsource(DPOTrainer)
    for loss_type in TRL_DPO_LOSS_TYPES:
        assert f'"{loss_type}"' in source, loss_type
        assert DPORoundConfig(loss_type=loss_type).loss_type == loss_type


def test_every_scheduler_allowed_builds_without_extra_arguments():
    """A round passes no lr_scheduler_kwargs: each scheduler it allows must build without them."""
    from transformers import get_scheduler

    from lvlm_studio.training import LR_SCHEDULERS

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in LR_SCHEDULERS:
        assert get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10) is not None, name
        assert DPORoundConfig(lr_scheduler_type=name).lr_scheduler_type == name


def test_config_accepts_the_edges_it_means():
    """max_steps > 0 overrides epochs (so 0 epochs is fine then); no warmup, no cut, no eval limit."""
    assert DPORoundConfig(num_epochs=0, max_steps=5).max_steps == 5
    assert DPORoundConfig(num_epochs=1000).num_epochs == 1000
    assert DPORoundConfig(learning_rate=1.0, lora_r=4096).lora_r == 4096
    assert DPORoundConfig(seed=2**32 - 1, num_processes=64, infusion_limit=None).seed == 2**32 - 1
    assert DPORoundConfig(warmup_ratio=0.0, max_length=None, eval_limit=None, lora_dropout=0.0).warmup_ratio == 0.0


def test_dataset_weights_follow_their_pairs_and_bad_rows_are_refused(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    pairs = [{"pair_id": k, "image_path": str(path), "prompt": "Describe.", "chosen": f"A{k}.", "rejected": "B."}
             for k in range(2)]
    ds = build_dpo_dataset(pairs, sft_weights=[1.0, 0.0], dpo_weights=[0.5, 1.5])
    assert ds["sft_weight"] == [1.0, 0.0] and ds["dpo_weight"] == [0.5, 1.5]
    with pytest.raises(ValueError, match="one weight per pair"):
        build_dpo_dataset(pairs, sft_weights=[1.0])
    with pytest.raises(ValueError, match="non-empty"):
        build_dpo_dataset([{**pairs[0], "chosen": "  "}])


def test_a_one_step_round_trains_its_step(tiny, tmp_path):
    """transformers rounds the 3% warmup up to one step and that step runs at lr 0: a round of a
    few reviewed pairs and one epoch (one step) used to end "done" with every LoRA B still zero."""
    from safetensors.torch import load_file

    cfg = DPORoundConfig(num_epochs=1, batch_size=8, max_length=None, learning_rate=5e-3)
    result = train_round(_pairs(3), tiny, None, tmp_path / "one", cfg)
    assert result.steps == 1
    assert next(rec["learning_rate"] for rec in result.curve if "learning_rate" in rec) == pytest.approx(5e-3)
    lora_b = [t for k, t in load_file(str(tmp_path / "one" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    # A longer round keeps its warmup: the first of two steps still starts at lr 0.
    two = train_round(_pairs(3), tiny, None, tmp_path / "two", DPORoundConfig(num_epochs=2, batch_size=8,
                                                                              max_length=None, learning_rate=5e-3))
    assert [rec["learning_rate"] for rec in two.curve if "learning_rate" in rec][0] == 0.0
    assert cfg.warmup_ratio == 0.03  # the config the caller passed is left as it was


def test_a_non_finite_last_loss_marks_the_round_diverged():
    """The curve keeps NaN/inf out (it is stored as strict JSON) but flags it, so a round whose
    last logged loss was not finite is known as diverged; one that recovered is not."""
    from types import SimpleNamespace

    from lvlm_studio.training import TrainResult, _callback

    curve: list[dict] = []
    stream = _callback(None, None, curve)
    state = SimpleNamespace(is_world_process_zero=True, global_step=1, max_steps=3)
    result = TrainResult(None, False, 3, 1, 1, curve, 0.0, {})
    stream.on_log(None, state, None, logs={"loss": 0.69, "rewards/margins": 0.0})
    assert result.diverged is False
    state.global_step = 2
    stream.on_log(None, state, None, logs={"loss": float("nan"), "rewards/margins": float("inf")})
    assert result.diverged is True and "loss" not in curve[-1] and "rewards/margins" not in curve[-1]
    state.global_step = 3
    stream.on_log(None, state, None, logs={"loss": 0.5})
    assert result.diverged is False  # recovered
    stream.on_log(None, state, None, logs={"train_loss": float("nan"), "train_runtime": 1.0})
    assert "train_loss" not in curve[-1] and result.diverged is False
    json.dumps(curve, allow_nan=False)  # what the store writes


def test_trainer_arguments_let_a_nan_loss_reach_the_log(tmp_path):
    """transformers replaces a NaN/inf step loss by the window's mean by default (0.0 once every step
    is NaN), which would hide a diverged round from TrainResult.diverged; the round's arguments turn
    that off, and TRL's config takes them (the checkpointing flag under this transformers' name)."""
    from trl import DPOConfig

    from lvlm_studio.training import _trainer_args

    args = _trainer_args(DPORoundConfig(), {"cuda": False, "bf16": False, "grad_ckpt": True, "stacked": False},
                         tmp_path)
    assert args["logging_nan_inf_filter"] is False and args["ddp_broadcast_buffers"] is None
    stacked = {"cuda": False, "bf16": True, "grad_ckpt": False, "stacked": True}
    assert _trainer_args(DPORoundConfig(), stacked, tmp_path)["ddp_broadcast_buffers"] is False  # buffers: the chain
    built = DPOConfig(**args, beta=0.3)
    assert built.logging_nan_inf_filter is False and built.gradient_checkpointing is True


def test_an_adapter_reaches_the_disk_before_its_folder_is_renamed_into_place(tmp_path, monkeypatch):
    """Every file of the adapter is fsynced before the rename, and the folder holding it after:
    the round is marked done only once both are on the disk."""
    from lvlm_studio import training

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    def weights(folder: Path):  # as PEFT's save_pretrained: the folder is made by the writer
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"w")
        (folder / "adapter_config.json").write_text("{}")

    monkeypatch.setattr(training.os, "fsync", fsync)
    monkeypatch.setattr(training.os, "replace", replace)
    out = tmp_path / "adapters" / "round-1"
    training._write_adapter(out, weights, {"round": 1}, [])
    assert events[-2:] == ["rename", "fsync adapters"]
    assert sorted(events[:-2]) == ["fsync adapter_config.json", "fsync adapter_model.safetensors", "fsync curve.json",
                                   "fsync lineage.json"]
    assert json.loads((out / "lineage.json").read_text()) == {"round": 1}


def test_a_merged_model_saved_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    """The other process's save lands between the check and the move: the move fails (a folder that
    is not empty) and this save is dropped, not raised as an error nor left behind."""
    from lvlm_studio import training

    out, tmp = tmp_path / "round-2", tmp_path / ".round-2.tmp-1"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    real_replace = os.replace

    def theirs_first(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "config.json").write_text('{"theirs": true}')
        return real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", theirs_first)
    training._publish_folder(tmp, out, "config.json")
    assert (out / "config.json").read_text() == '{"theirs": true}' and not tmp.exists()


def test_a_killed_writers_scratch_goes_once_its_process_is_gone(tmp_path):
    """A save killed half-way (a merged 7B model is GBs) left .round-N.tmp-PID-THREAD for good:
    only this process's own name was cleared."""
    import subprocess
    import threading

    from lvlm_studio import training

    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid  # exited and reaped: no process has this id now
    out = tmp_path / "round-3"
    gone = tmp_path / f".round-3.tmp-{dead}-1"
    alive = tmp_path / f".round-3.tmp-{os.getppid()}-1"  # another process still writing
    other_round = tmp_path / f".round-33.tmp-{dead}-1"
    for folder in (gone, alive, other_round):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    tmp = training._fresh_tmp_sibling(out)
    assert tmp.name == f".round-3.tmp-{os.getpid()}-{threading.get_ident()}"
    assert not gone.exists() and alive.exists() and other_round.exists()


def _llava_hf_like(processor):
    """Make the tiny processor tokenise as llava-hf/llava-1.5-7b-hf's does: a chat template that
    writes no BOS, and a tokenizer that adds <s> itself."""
    from tokenizers.processors import TemplateProcessing

    tok = processor.tokenizer
    processor.chat_template = processor.chat_template.replace("{{ bos_token }}", "", 1)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return processor


def test_a_round_trains_on_the_prompt_ids_the_model_is_asked_with(tiny):
    """TRL tokenises the chat template's text without special tokens; HFBackend lets the tokenizer
    add its BOS when the template writes none (llava-hf's LLaVA-1.5). The round's processor gets
    the BOS into its template, so TRL's prompt ids are the generation's, token for token."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from lvlm_studio.models.hf import HFBackend
    from lvlm_studio.training import match_generation_bos

    backend = HFBackend.from_pretrained(tiny, device="cpu", dtype="float32")
    _llava_hf_like(backend.processor)
    pair = _pairs(1)[0]
    asked = backend._inputs([pair["image"]], [backend.chat_text(pair["prompt"])])["input_ids"][0].tolist()
    assert asked[0] == backend.tokenizer.bos_token_id  # generation: the tokenizer's BOS

    def trained_prompt(processor) -> list[int]:
        row = build_dpo_dataset([pair])[0]
        batch = DataCollatorForVisionPreference(processor)([row])
        prompt = (batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)
        return batch["input_ids"][0][prompt].tolist()

    assert trained_prompt(backend.processor) == asked[1:]  # TRL as it is: the BOS is missing
    assert match_generation_bos(backend.processor) is True
    assert trained_prompt(backend.processor) == asked
    assert match_generation_bos(backend.processor) is False  # written once
    from transformers import AutoProcessor

    assert match_generation_bos(AutoProcessor.from_pretrained(tiny)) is False  # the demo template writes its own


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_lora_dropout_applies_to_dpo_rounds_only_when_dropout_is_not_disabled(tiny, tmp_path, monkeypatch,
                                                                           disable_dropout):
    """TRL's DPO switches every dropout off by default (LoRA's too): lora_dropout reached a DPO round
    only as a number in its lineage. Now the lineage says what was applied, and disable_dropout=False
    applies it."""
    import trl

    seen: list[set[float]] = []

    class Recording(trl.DPOTrainer):
        def train(self, *args, **kwargs):
            seen.append({m.p for name, m in self.model.named_modules()
                         if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in name})
            return super().train(*args, **kwargs)

    monkeypatch.setattr(trl, "DPOTrainer", Recording)
    cfg = DPORoundConfig(max_steps=1, lora_dropout=0.05, disable_dropout=disable_dropout, sft_weight=0.0)
    result = train_round(_pairs(4), tiny, None, tmp_path / "a", cfg)
    assert seen == [{0.0} if disable_dropout else {0.05}]
    assert result.lineage["lora_dropout_applied"] == (0.0 if disable_dropout else 0.05)


def test_the_length_check_measures_the_largest_image_of_a_dynamic_resolution_model(tmp_path):
    """Qwen2-VL gives a larger image more tokens: the pair whose prompt is longest in tokens can be
    neither the first nor the one with the longest prompt text."""
    from transformers import AutoProcessor

    from lvlm_studio.models.tiny import build_tiny

    processor = AutoProcessor.from_pretrained(build_tiny("qwen2_vl", tmp_path / "qwen"))
    processor.image_processor.size = {"shortest_edge": 8 * 8, "longest_edge": 128 * 128}  # dynamic, up to 128²
    pairs = _pairs(3)
    pairs[1] = {**pairs[1], "prompt": "Describe the image in great detail, every object."}
    pairs[2] = {**pairs[2], "image": Image.new("RGB", (128, 128), (9, 90, 200))}
    small = check_sequence_lengths(processor, pairs[:2], None)["prompt_tokens"]
    large = check_sequence_lengths(processor, pairs, None)["prompt_tokens"]
    assert large > small + 20  # the 128² image's tokens, not the 32² ones'
    with pytest.raises(ValueError, match="too short"):
        check_sequence_lengths(processor, pairs, small + 10)


def _scaled_lora(tiny: str, out, scale: float) -> str:
    """A random LoRA whose B factors are multiplied by ``scale`` (how small a round's update is)."""
    from peft import PeftModel

    path = _random_lora(tiny, out, r=4, alpha=8, seed=3)
    model, _ = load_base_model(tiny)
    peft = PeftModel.from_pretrained(model, path)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft.save_pretrained(path)
    return path


def test_merging_a_tiny_update_into_bf16_weights_is_measured_and_warned_about(tiny, tmp_path):
    """A parent round's update far below bf16's resolution survives its merge only as rounding
    noise: the round records how far off the merge is and warns; float32 merges exactly."""
    from peft import PeftModel

    from lvlm_studio.training import MERGE_ERROR_WARN, merge_rounding_error

    small, large = _scaled_lora(tiny, tmp_path / "small", 1e-5), _scaled_lora(tiny, tmp_path / "large", 1.0)
    errors = {}
    for name, path in (("small", small), ("large", large)):
        model, _ = load_base_model(tiny, bf16=True)
        errors[name] = merge_rounding_error(PeftModel.from_pretrained(model, path))
    assert errors["small"] > 0.9 and errors["large"] < MERGE_ERROR_WARN < 0.9  # 1: the update is lost
    assert merge_rounding_error(PeftModel.from_pretrained(load_base_model(tiny)[0], small)) is None  # float32: exact
    cfg = DPORoundConfig(max_steps=1, bf16=True, sft_weight=0.0, parent_lineage="merged")
    with pytest.warns(UserWarning, match=r"rounding error of \d+\.\d\d .* --config parent_lineage=stacked"):
        result = train_round(_pairs(4), tiny, [small], tmp_path / "round", cfg)
    assert result.lineage["parent_merge_error"] == [pytest.approx(errors["small"])]
    assert result.lineage["parent_lineage"] == "merged"


def test_the_sft_term_can_be_normalised_as_stics_reference_code_does(tiny, tmp_path):
    """sft_normalization "sum_1024": each chosen answer's summed NLL / 1024, averaged over the batch
    (STIC's code); the default "token_mean" is TRL's mean token NLL. At step 1 the policy is the
    reference, so the DPO term is log 2 and the rest of the loss is the SFT term, checked against
    the chosen answers' log-probs under the untrained model."""
    from transformers import AutoProcessor

    pairs = _pairs(4)
    model, processor = load_base_model(tiny)
    nll = [-lp for lp in sequence_logprobs(model, processor, pairs, "chosen")]
    tok = AutoProcessor.from_pretrained(tiny).tokenizer
    steps = {}
    for form in ("sum_1024", "token_mean"):
        cfg = DPORoundConfig(max_steps=1, batch_size=4, max_length=None, sft_weight=1.0, sft_normalization=form)
        result = train_round(pairs, tiny, None, tmp_path / form, cfg)
        steps[form] = next(rec for rec in result.curve if "loss" in rec and "rewards/margins" in rec)
    assert steps["sum_1024"]["sft_loss"] == pytest.approx(sum(nll) / len(nll) / 1024, rel=1e-3)
    assert steps["sum_1024"]["loss"] == pytest.approx(math.log(2) + steps["sum_1024"]["sft_loss"], abs=1e-5)
    tokens = sum(len(_encode_turns_completion(tok, processor, p)) for p in pairs)
    assert steps["token_mean"]["loss"] == pytest.approx(math.log(2) + sum(nll) / tokens, rel=1e-3)
    with pytest.raises(ValueError, match="sft_normalization must be one of token_mean, sum_1024"):
        DPORoundConfig(sft_normalization="sum")


def _encode_turns_completion(tok, processor, pair) -> list[int]:
    from lvlm_studio.training import _encode_turns

    return _encode_turns(processor, pair["image"], pair["prompt"], pair["chosen"])[1][0].tolist()


LLAVA_HF_STYLE_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's form: a system turn's text, then USER: / ASSISTANT:
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def test_a_round_on_llava_hf_s_template_trains_each_answer_to_end_with_eos(tiny, tmp_path):
    """llava-hf's LLaVA-1.5 template ends an assistant turn with a bare " " and no EOS: TRL's own
    rendering trains every answer without the </s> that LLaVA-1.5 stops with. A round's collator
    (``AnswersAsWritten``) trains the answer as the model writes it, then </s>; a round trained
    from a saved model with that template records the closing it trained."""
    import shutil

    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from lvlm_studio.models.base import answer_closing, backend_answer_ids
    from lvlm_studio.models.hf import HFBackend
    from lvlm_studio.training import AnswersAsWritten

    backend = HFBackend.from_pretrained(tiny, device="cpu", dtype="float32")
    backend.processor.chat_template = LLAVA_HF_TEMPLATE
    eos = backend.tokenizer.eos_token_id
    assert answer_closing(backend.processor) == "</s>"
    pair = _pairs(1)[0]

    def completions(collator) -> list[list[int]]:
        batch = collator([build_dpo_dataset([pair])[0]])
        return [batch["input_ids"][r][batch["completion_mask"][r] == 1].tolist() for r in (0, 1)]

    trl_own = completions(DataCollatorForVisionPreference(backend.processor))
    assert all(eos not in ids for ids in trl_own)
    ours = completions(AnswersAsWritten(DataCollatorForVisionPreference(backend.processor), backend.processor))
    assert ours == [backend_answer_ids(backend, pair["prompt"], pair[k]) + [eos] for k in ("chosen", "rejected")]
    assert [ids[:-1] for ids in ours] == [ids[: len(o) - 1] for ids, o in zip(trl_own, ours, strict=True)]

    model = tmp_path / "llava-hf-like"
    shutil.copytree(tiny, model)
    (model / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE)
    result = train_round([pair], str(model), None, tmp_path / "round", DPORoundConfig(max_steps=1, sft_weight=0.0))
    assert result.lineage["answer_closing"] == "</s>"
    assert json.loads((Path(result.adapter_path) / "lineage.json").read_text())["answer_closing"] == "</s>"


def test_a_system_prompt_is_asked_alike_in_generation_and_training(tiny, tmp_path, monkeypatch):
    """LVLM_STUDIO_SYSTEM_PROMPT (LLaVA-1.5's vicuna_v1 system line) reaches every prompt: the
    backend's chat text and TRL's prompt ids are the same tokens, and the round's lineage says
    which system prompt it trained with. Unset, nothing changes."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from lvlm_studio.models.hf import HFBackend
    from lvlm_studio.training import _encode_turns

    backend = HFBackend.from_pretrained(tiny, device="cpu", dtype="float32")
    backend.processor.chat_template = LLAVA_HF_STYLE_TEMPLATE
    pair = _pairs(1)[0]
    plain = backend.chat_text(pair["prompt"])
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", "a chat between a red circle and a blue square .")
    asked = backend.chat_text(pair["prompt"])
    assert asked == "a chat between a red circle and a blue square . " + plain
    ids = backend._inputs([pair["image"]], [asked])["input_ids"][0].tolist()
    batch = DataCollatorForVisionPreference(backend.processor)([build_dpo_dataset([pair])[0]])
    prompt = (batch["attention_mask"][0] == 1) & (batch["completion_mask"][0] == 0)
    assert batch["input_ids"][0][prompt].tolist() == ids  # what TRL trains on
    assert _encode_turns(backend.processor, pair["image"], pair["prompt"])[0]["input_ids"][0].tolist() == ids
    # The tiny model's own template (the demo's) has no system branch: the round says it trained
    # without the system turn, and warns, rather than claim it.
    with pytest.warns(UserWarning, match="writes no system turn: the round trains without it"):
        result = train_round([pair], tiny, None, tmp_path / "round", DPORoundConfig(max_steps=1, sft_weight=0.0))
    assert result.lineage["system_prompt"] is None
    assert result.lineage["system_prompt_dropped_by_template"] == "a chat between a red circle and a blue square ."
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", "look at <image> now")  # every prompt would have 2 images
    with pytest.raises(ValueError, match="LVLM_STUDIO_SYSTEM_PROMPT contains the image placeholder"):
        backend.chat_text(pair["prompt"])
    monkeypatch.delenv("LVLM_STUDIO_SYSTEM_PROMPT")
    assert backend.chat_text(pair["prompt"]) == plain and build_dpo_dataset([pair])[0]["prompt"] == [
        {"role": "user", "content": pair["prompt"]}]


def test_a_stacked_parent_keeps_an_update_that_merging_into_bf16_turns_into_noise(capsys):
    """benchmarks/lineage_precision.py: a 2048-wide bf16 layer and a LoRA update of mean size 2e-5
    (a weight's bf16 resolution is ~1e-4 there). Merged into the weights, the layer's output moves
    by rounding noise larger than the update itself; stacked, by the update, up to the bf16
    output's own rounding."""
    from benchmarks import lineage_precision

    errors = lineage_precision.main(["--sizes", "2e-5"])[2e-5]
    assert errors["merged"] > 1.2  # worse than no update at all
    assert errors["stacked"] < 0.85 and errors["stacked"] < errors["merged"] / 1.5
    assert "merged  stacked" in capsys.readouterr().out


def test_stacking_a_chain_computes_what_merging_it_does_in_float32(tiny, tmp_path):
    """Adapters that adapt different modules stack into one update per module; in float32 the
    stacked model's logits are the merged chain's. A chain for another model, a second stack on the
    same layers and a DoRA adapter are refused. Merging is exact only where every linear layer
    holds float32 weights."""
    from lvlm_studio.models.lora import merges_exactly, stack_loras

    first = _random_lora(tiny, tmp_path / "a", r=4, alpha=16, seed=1)
    second = _random_lora(tiny, tmp_path / "b", r=8, alpha=8, seed=2, target=r".*\blanguage_model\b.*\.(k_proj|q_proj)")
    model, processor = load_base_model(tiny)
    pairs = _pairs(3)
    merged = sequence_logprobs(merge_chain(load_base_model(tiny)[0], [first, second]), processor, pairs, "chosen")
    base = sequence_logprobs(model, processor, pairs, "chosen")
    assert stack_loras(model, [first, second]) == 3  # q, k and v of the one text layer
    stacked = sequence_logprobs(model, processor, pairs, "chosen")
    assert max(abs(m - b) for m, b in zip(merged, base, strict=True)) > 0.05  # the chain does something
    assert stacked == pytest.approx(merged, abs=1e-4)
    assert not any("stacked" in key for key in model.state_dict())  # the chain is not saved with the model
    q_proj = model.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    x = torch.randn(2, q_proj.in_features)
    assert torch.equal(q_proj(input=x), q_proj(x)) and not torch.equal(q_proj(x), torch.nn.functional.linear(
        x, q_proj.weight, q_proj.bias))  # the update is added however the layer is called
    assert merges_exactly(model)
    model.model.language_model.layers[0].mlp.to(torch.bfloat16)  # one block kept in another dtype
    assert not merges_exactly(model)
    with pytest.raises(ValueError, match="already holds"):
        stack_loras(model, [first])
    other = build_tiny_llava(tmp_path / "other", spec=TinyLlavaSpec(text_width=48))
    with pytest.raises(ValueError, match="the layer is"):
        stack_loras(load_base_model(str(other))[0], [first])
    config = json.loads((Path(first) / "adapter_config.json").read_text())
    (Path(first) / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="not plain LoRA .*use_dora"):
        stack_loras(load_base_model(tiny)[0], [first])


def test_a_round_trains_from_and_against_its_stacked_parent_chain(tiny, tmp_path):
    """parent_lineage "stacked": the round's first step sees the parent chain's log-probs (policy
    and reference are both base + chain: margin 0), and its adapter goes on top of the chain like
    a merged-lineage one. "auto" stacks on bf16 weights (here with gradient checkpointing) and
    merges on float32 ones."""
    from lvlm_studio.models.lora import stack_loras

    pairs = _pairs(4)
    parent = _random_lora(tiny, tmp_path / "parent", r=4, alpha=16, seed=1)
    model, processor = load_base_model(tiny)
    base = sequence_logprobs(model, processor, pairs, "chosen")
    chain_logps = sequence_logprobs(merge_chain(model, [parent]), processor, pairs, "chosen")
    assert max(abs(c - b) for c, b in zip(chain_logps, base, strict=True)) > 0.1  # the parent matters
    cfg = DPORoundConfig(max_steps=2, batch_size=4, max_length=None, sft_weight=0.0, learning_rate=5e-3,
                         parent_lineage="stacked")
    result = train_round(pairs, tiny, [parent], tmp_path / "round", cfg)
    first = next(rec for rec in result.curve if "rewards/margins" in rec)
    assert first["logps/chosen"] == pytest.approx(sum(chain_logps) / len(pairs), abs=1e-3)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert result.lineage["parent_lineage"] == "stacked" and "parent_merge_error" not in result.lineage
    assert adapter_chain(result.adapter_path) == [parent, result.adapter_path]
    trained, _ = materialize_round_model(tiny, adapter_chain(result.adapter_path))
    assert sequence_logprobs(trained, processor, pairs, "chosen") != pytest.approx(chain_logps, abs=1e-4)

    auto = DPORoundConfig(max_steps=1, sft_weight=0.0)
    bf16 = train_round(pairs, tiny, [parent], tmp_path / "bf16", replace(auto, bf16=True, gradient_checkpointing=True))
    fp32 = train_round(pairs, tiny, [parent], tmp_path / "fp32", auto)
    first_round = train_round(pairs, tiny, None, tmp_path / "first", replace(auto, bf16=True))
    assert (bf16.lineage["parent_lineage"], fp32.lineage["parent_lineage"]) == ("stacked", "merged")
    bf16_parent, _ = load_base_model(tiny, bf16=True)
    stack_loras(bf16_parent, [parent])
    first = next(rec for rec in bf16.curve if "rewards/margins" in rec)
    bf16_logps = sequence_logprobs(bf16_parent, processor, pairs, "chosen")
    assert first["logps/chosen"] == pytest.approx(sum(bf16_logps) / len(pairs), abs=0.3)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first_round.lineage["parent_lineage"] is None
    with pytest.raises(ValueError, match="parent_lineage must be one of auto, merged, stacked"):
        DPORoundConfig(parent_lineage="unmerged")
