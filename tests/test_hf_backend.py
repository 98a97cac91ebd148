"""HFBackend on a tiny random LLaVA: the log-prob contract, caching, batching, decoding rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import LLAVA_HF_TEMPLATE
from PIL import Image

from lvlm_studio.models.base import GenerationParams as GP
from lvlm_studio.models.base import ModelLoadError
from lvlm_studio.models.hf import HFBackend
from lvlm_studio.models.tiny import build_tiny_llava

torch.set_num_threads(1)
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def be(model_dir):
    return HFBackend.from_pretrained(str(model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((36, 44, 3)) * 255).astype("uint8")) for _ in range(3)]


PROMPTS = ["describe the image", "what colour is the circle at the top left ?", "how many"]


def close(a, b, tol=TOL):
    assert len(a) == len(b)
    assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < tol


def reference_next_logprobs(be, image, prompt, ids):
    """Full recompute with the model's own forward (no cache, no padding, default positions)."""
    inputs = be._inputs([image], [be.chat_text(prompt)])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids], dtype=torch.long)], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        return torch.log_softmax(be.model(**inputs).logits[0, -1].float(), -1)


def test_sampled_logprobs_equal_score(be, images):
    out = be.sample(images[:2], PROMPTS[:2], n=3, params=GP(max_new_tokens=12, temperature=1.0, seed=3))
    assert [len(r) for r in out] == [3, 3]
    flat = [(i, s) for i, row in enumerate(out) for s in row]
    assert all(len(s.token_ids) == len(s.token_logprobs) > 0 for _, s in flat)
    # by token ids and by text (the word tokenizer round-trips)
    by_ids = be.score([images[i] for i, _ in flat], [PROMPTS[i] for i, _ in flat], [s.token_ids for _, s in flat])
    for (_, s), lp in zip(flat, by_ids, strict=True):
        close(s.token_logprobs, lp)
    texts = [s for _, s in flat if s.finish_reason == "length"]
    i0 = next(i for i, s in flat if s.finish_reason == "length")
    by_text = be.score([images[i0]], [PROMPTS[i0]], [texts[0].text])
    close(texts[0].token_logprobs, by_text[0])


def test_seeded_sampling_is_reproducible(be, images):
    p = GP(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a = be.sample(images[:2], PROMPTS[:2], n=2, params=p)
    b = be.sample(images[:2], PROMPTS[:2], n=2, params=p)
    c = be.sample(images[:2], PROMPTS[:2], n=2, params=GP(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=12))
    ids = lambda r: [[s.token_ids for s in row] for row in r]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_top_p_restricts_to_nucleus(be, images):
    # top_p tiny: only the most likely token survives, so sampling equals greedy
    g = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=8))
    s = be.sample(images[:1], PROMPTS[:1], n=3, params=GP(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert all(x.token_ids == g[0][0].token_ids for x in s[0])


def test_greedy_batch_equals_one_by_one(be, images):
    p = GP(max_new_tokens=10)
    batch = be.sample(images, PROMPTS, params=p)
    for im, pr, row in zip(images, PROMPTS, batch, strict=True):
        single = be.sample([im], [pr], params=p)[0][0]
        assert row[0].token_ids == single.token_ids
        close(row[0].token_logprobs, single.token_logprobs)
    # and chunked batches (max_batch=2) give the same
    small = HFBackend(be.model, be.processor, be.model_id, "cpu", max_batch=2)
    assert [r[0].token_ids for r in small.sample(images, PROMPTS, params=p)] == [r[0].token_ids for r in batch]


def test_greedy_matches_reference_forward(be, images):
    seq = be.sample(images[1:2], PROMPTS[1:2], params=GP(max_new_tokens=6))[0][0]
    for t in range(len(seq.token_ids)):
        ref = reference_next_logprobs(be, images[1], PROMPTS[1], seq.token_ids[:t])
        assert int(ref.argmax()) == seq.token_ids[t]
        assert abs(float(ref[seq.token_ids[t]]) - seq.token_logprobs[t]) < TOL


def test_extend_equals_full_recompute(be, images):
    base = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=8))[0][0].token_ids
    partials = [base[:5], [], base[:1], be.encode_text("there is a red")]
    prefix = be.open_prefix(images[0], PROMPTS[0])
    out = be.extend(prefix, partials, n=2, params=GP(max_new_tokens=7, temperature=1.0, seed=5))
    assert [len(r) for r in out] == [2, 2, 2, 2]
    for part, row in zip(partials, out, strict=True):
        for s in row:
            full = be.score([images[0]], [PROMPTS[0]], [part + s.token_ids])[0]
            close(s.token_logprobs, full[len(part):])
    # greedy extend of the empty partial == greedy sample; of a prefix of it == its remainder
    g = be.extend(prefix, [[], base[:3]], params=GP(max_new_tokens=8))
    assert g[0][0].token_ids == base
    assert g[1][0].token_ids[:5] == base[3:8]


def test_extend_does_not_mutate_prefix(be, images):
    prefix = be.open_prefix(images[2], PROMPTS[2])
    before = [t.clone() for t in (prefix.state.mask, prefix.state.last_logits)]
    p = GP(max_new_tokens=6)
    a = be.extend(prefix, [[5, 6], [7]], params=p)
    b = be.extend(prefix, [[5, 6], [7]], params=p)
    assert [r[0].token_ids for r in a] == [r[0].token_ids for r in b]
    assert torch.equal(before[0], prefix.state.mask) and torch.equal(before[1], prefix.state.last_logits)
    assert prefix.image_key and len(prefix.image_key) == 64


def test_sample_from_text_matches_extend(be, images):
    partial = be.encode_text("there is a small red circle")
    text = " " + be.decode(partial)  # the chat prompt ends with "ASSISTANT:"
    p = GP(max_new_tokens=6)
    slow = be.sample_from_text(images[0], PROMPTS[0], text, params=p)
    fast = be.extend(be.open_prefix(images[0], PROMPTS[0]), [partial], params=p)[0]
    assert slow[0].token_ids == fast[0].token_ids
    close(slow[0].token_logprobs, fast[0].token_logprobs)
    pg = GP(max_new_tokens=4, num_beam_groups=3, diversity_penalty=3.0)
    assert [s.token_ids for s in be.sample_from_text(images[0], PROMPTS[0], text, params=pg)] == [
        s.token_ids for s in be.extend(be.open_prefix(images[0], PROMPTS[0]), [partial], params=pg)[0]
    ]


def test_diverse_group_search_rule(be, images):
    p = GP(max_new_tokens=5, num_beam_groups=5, diversity_penalty=3.0)
    groups = be.sample(images[:1], PROMPTS[:1], n=5, params=p)[0]
    assert len(groups) == 5
    greedy = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=5))[0][0]
    assert groups[0].token_ids == greedy.token_ids  # group 0 has no penalty
    # independent check of the rule: argmax(logprobs - 3 * count of earlier groups' picks this step)
    for t in range(5):
        picked: list[int] = []
        for g in groups:
            if t >= len(g.token_ids):
                continue
            ref = reference_next_logprobs(be, images[0], PROMPTS[0], g.token_ids[:t])
            pen = ref.clone()
            pen[be.banned_ids] = float("-inf")
            for tok in picked:
                pen[tok] -= 3.0
            assert int(pen.argmax()) == g.token_ids[t]
            assert abs(float(ref[g.token_ids[t]]) - g.token_logprobs[t]) < TOL  # raw log-prob recorded
            picked.append(g.token_ids[t])
    assert len({g.token_ids[0] for g in groups}) == 5
    with pytest.raises(ValueError):
        be.sample(images[:1], PROMPTS[:1], n=3, params=p)


def test_stop_string_and_length(be, images):
    g = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=8))[0][0]
    assert g.finish_reason == "length" and len(g.token_ids) == 8
    stop = be.decode(g.token_ids[3:4]).strip()
    s = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=8, stop=(stop,)))[0][0]
    assert s.finish_reason == "stop"
    assert s.text.endswith(stop)
    k = next(i for i in range(1, 9) if stop in be.decode(g.token_ids[:i]))
    assert s.token_ids == g.token_ids[:k]
    assert len(s.token_logprobs) == k


def test_eos_included_with_logprob(be, images):
    model = copy.deepcopy(be.model)
    eos = be.eos_ids[0]
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[eos] = 3.5  # EOS likely but not certain: some samples stop after a few tokens
    model.lm_head = head
    b2 = HFBackend(model, be.processor, "eos-biased", "cpu")
    out = b2.sample(images[:1], PROMPTS[:1], n=12, params=GP(max_new_tokens=6, temperature=1.0, seed=0))[0]
    ended = [s for s in out if s.finish_reason == "eos"]
    assert ended, "expected some sequences to end with EOS"
    assert any(len(s.token_ids) > 1 for s in ended)
    for s in ended:
        assert s.token_ids[-1] == eos and s.finished
        assert eos not in s.token_ids[:-1]
        scored = b2.score(images[:1], PROMPTS[:1], [s.token_ids[:-1]], add_eos=True)[0]
        close(s.token_logprobs, scored)
        assert s.text == b2.decode(s.token_ids[:-1])
    # an empty answer + EOS scores one token: the first step's EOS log-prob
    first = b2.score(images[:1], PROMPTS[:1], [""], add_eos=True)[0]
    assert len(first) == 1
    immediate = [s for s in ended if len(s.token_ids) == 1]
    if immediate:
        assert first[0] == pytest.approx(immediate[0].token_logprobs[0], abs=TOL)
    assert b2.score(images[:1], PROMPTS[:1], [""])[0] == []


def test_encode_decode_roundtrip(be):
    ids = be.encode_text("there is a red circle at the top left.")
    assert be.decode(ids) == "there is a red circle at the top left."
    assert be.tokenizer.bos_token_id not in ids


def test_bfloat16_and_lora_adapter(model_dir, be, images, tmp_path):
    bf = HFBackend.from_pretrained(str(model_dir), device="cpu", dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    s = bf.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=5, temperature=1.0, seed=1))[0][0]
    close(s.token_logprobs, bf.score(images[:1], PROMPTS[:1], [s.token_ids])[0], tol=0.05)

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(be.model)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cont = [be.encode_text("there is a red circle")]
    merged = HFBackend.from_pretrained(str(model_dir), device="cpu", adapter=str(tmp_path / "adapter"))
    unmerged = HFBackend.from_pretrained(str(model_dir), device="cpu", adapter=str(tmp_path / "adapter"), merge_adapter=False)
    lp_m = merged.score(images[:1], PROMPTS[:1], cont)[0]
    lp_u = unmerged.score(images[:1], PROMPTS[:1], cont)[0]
    lp_b = be.score(images[:1], PROMPTS[:1], cont)[0]
    close(lp_m, lp_u)
    assert max(abs(a - b) for a, b in zip(lp_m, lp_b, strict=True)) > 1e-3
    assert merged.model_id.endswith("adapter")
    # the unmerged PeftModel still decodes through the same loop
    g = unmerged.extend(unmerged.open_prefix(images[0], PROMPTS[0]), [cont[0][:2]], params=GP(max_new_tokens=4))[0][0]
    close(g.token_logprobs, unmerged.score(images[:1], PROMPTS[:1], [cont[0][:2] + g.token_ids])[0][2:])


def test_a_round_chain_is_merged_into_float32_weights_and_stacked_beside_bf16_ones(model_dir, be, images, tmp_path):
    """A round's model is base + its chain of adapters. In float32 they are merged (exact); in bf16
    merging would round small updates into the weights, so the chain is stacked beside them: the
    weights stay the base's and the scores follow the float32 chain."""
    from peft import LoraConfig, get_peft_model

    from lvlm_studio.models.lora import STACKED_A

    chain = []
    for k, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "q_proj"])):
        torch.manual_seed(k)
        get_peft_model(copy.deepcopy(be.model), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
                       ).save_pretrained(tmp_path / f"a{k}")
        chain.append(str(tmp_path / f"a{k}"))
    cont = [be.encode_text("there is a red circle")]
    fp32 = HFBackend.from_pretrained(str(model_dir), device="cpu", adapter=chain)
    one_by_one = HFBackend.from_pretrained(str(model_dir), device="cpu", adapter=chain[0])
    bf16 = HFBackend.from_pretrained(str(model_dir), device="cpu", dtype="bfloat16", adapter=chain)
    assert fp32.model_id == "+".join([str(model_dir), *chain])
    assert not any(hasattr(m, STACKED_A) for m in fp32.model.modules())
    stacked = [n for n, m in bf16.model.named_modules() if hasattr(m, STACKED_A)]
    assert stacked and all(n.endswith(("q_proj", "k_proj", "v_proj")) for n in stacked)
    base_bf16 = dict(HFBackend.from_pretrained(str(model_dir), device="cpu", dtype="bfloat16").model.named_parameters())
    assert all(torch.equal(p, base_bf16[n]) for n, p in bf16.model.named_parameters())  # nothing merged
    lp = {name: b.score(images[:1], PROMPTS[:1], cont)[0] for name, b in
          (("fp32", fp32), ("bf16", bf16), ("first", one_by_one), ("base", be))}
    assert max(abs(a - b) for a, b in zip(lp["fp32"], lp["first"], strict=True)) > 1e-2  # the second adapter counts
    close(lp["bf16"], lp["fp32"], tol=0.05)
    with pytest.raises(ModelLoadError, match="Check that the adapter was trained on this base model"):
        HFBackend.from_pretrained(str(model_dir), device="cpu", dtype="bfloat16", adapter=[chain[0], str(model_dir)])


# --- extend_many: several prefixes in one decode loop --------------------------------------------


def _ids(rows):
    return [[s.token_ids for s in row] for row in rows]


def _assert_many_equals_extend(backend, prefixes, partials, n, params, reference=None):
    many = backend.extend_many(prefixes, partials, n=n, params=params)
    ref = reference or backend
    single = [ref.extend(p, ps, n=n, params=params) for p, ps in zip(prefixes, partials, strict=True)]
    assert [len(r) for r in many] == [len(ps) for ps in partials]
    for m_item, s_item in zip(many, single, strict=True):
        assert _ids(m_item) == _ids(s_item)
        for m_row, s_row in zip(m_item, s_item, strict=True):
            for a, b in zip(m_row, s_row, strict=True):
                assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
                close(a.token_logprobs, b.token_logprobs)
    return many


def _mixed_partials(be, images):
    base = be.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=8))[0][0].token_ids
    return [
        [base[:5], [], be.encode_text("there is a red")],
        [[]],
        [be.encode_text("a small blue square"), base[:1], [], be.encode_text("the")],
    ]


@pytest.mark.parametrize(
    "n,params",
    [
        (1, GP(max_new_tokens=7)),
        (3, GP(max_new_tokens=6, num_beam_groups=3, diversity_penalty=3.0)),
    ],
    ids=["greedy", "diverse_groups"],
)
def test_extend_many_equals_per_prefix_extend(be, images, n, params):
    # three prompts of different lengths: the stacked caches are left-padded to the longest
    prefixes = [be.open_prefix(im, pr) for im, pr in zip(images, PROMPTS, strict=True)]
    assert len({p.state.mask.shape[1] for p in prefixes}) == 3
    partials = _mixed_partials(be, images)
    before = [(p.state.mask.clone(), p.state.last_logits.clone(), p.state.cache.layers[0].keys.clone()) for p in prefixes]
    many = _assert_many_equals_extend(be, prefixes, partials, n, params)
    assert all(len(row) == n for item in many for row in item)
    # chunks that split an item's partials across decode loops (2 partials per chunk) agree too
    small = HFBackend(be.model, be.processor, be.model_id, "cpu", max_rows=2 * n)
    small.backend_id = be.backend_id
    assert [_ids(r) for r in small.extend_many(prefixes, partials, n=n, params=params)] == [_ids(r) for r in many]
    # the prefixes are untouched (they are reused for every depth of a CSR search)
    for p, (m, lg, k0) in zip(prefixes, before, strict=True):
        assert torch.equal(m, p.state.mask) and torch.equal(lg, p.state.last_logits)
        assert torch.equal(k0, p.state.cache.layers[0].keys)


def test_extend_many_with_stops_matches_full_recompute(be, images):
    # rows stop at different steps (stop string), so the decode loop drops rows mid-way
    prefixes = [be.open_prefix(images[i], PROMPTS[i]) for i in (2, 0)]
    partials = [[[], be.encode_text("there is")], [[], be.encode_text("a red circle"), []]]
    g = be.extend(prefixes[1], [[]], params=GP(max_new_tokens=8))[0][0].token_ids
    stop = be.decode(g[2:3]).strip()
    params = GP(max_new_tokens=8, stop=(stop,), num_beam_groups=2, diversity_penalty=3.0)
    many = _assert_many_equals_extend(be, prefixes, partials, 2, params)
    reasons = {s.finish_reason for item in many for row in item for s in row}
    assert "stop" in reasons
    for (im, pr), item, parts in zip([(images[2], PROMPTS[2]), (images[0], PROMPTS[0])], many, partials, strict=True):
        for part, row in zip(parts, item, strict=True):
            for s in row:
                close(s.token_logprobs, be.score([im], [pr], [part + s.token_ids])[0][len(part):])


def test_lazy_compaction_equals_eager(be, images):
    # finished rows kept in the batch (fed masked pads) must not change the other rows
    eos_bias = copy.deepcopy(be.model)
    head = torch.nn.Linear(eos_bias.lm_head.in_features, eos_bias.lm_head.out_features, bias=True)
    head.weight.data.copy_(eos_bias.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[be.eos_ids[0]] = 0.2  # the random model's logits are flat: rows end at many steps
    eos_bias.lm_head = head
    lazy = HFBackend(eos_bias, be.processor, "eos-biased", "cpu")
    eager = HFBackend(eos_bias, be.processor, "eos-biased", "cpu")
    eager.backend_id = lazy.backend_id
    lazy.COMPACT_SHARE, eager.COMPACT_SHARE = 1.0, 0.0  # never compact / compact at every finish
    prefixes = [lazy.open_prefix(im, pr) for im, pr in zip(images, PROMPTS, strict=True)]
    partials = [[[], [5]], [[], [7, 8]], [[]]]
    params = GP(max_new_tokens=10, num_beam_groups=4, diversity_penalty=1.0)
    many = _assert_many_equals_extend(lazy, prefixes, partials, 4, params, reference=eager)
    lengths = {len(s.token_ids) for item in many for row in item for s in row}
    assert len(lengths) > 2 and any(s.finish_reason == "eos" for item in many for row in item for s in row)


def test_extend_many_qwen2vl_mrope(tmp_path, images):
    # M-RoPE: each row continues at its own max(prefill position)+1; stacking must keep that
    from lvlm_studio.models.tiny import build_tiny

    q = HFBackend.from_pretrained(str(build_tiny("qwen2_vl", tmp_path / "q")), device="cpu", dtype="float32")
    with torch.no_grad():  # sharpen attention so that a position error shows above TOL
        for name, param in q.model.named_parameters():
            if "language_model" in name and (".q_proj." in name or ".k_proj." in name):
                param.mul_(8)
    ims = [images[0], images[1].resize((28, 40))]
    prefixes = [q.open_prefix(im, pr) for im, pr in zip(ims, PROMPTS[:2], strict=True)]
    assert prefixes[0].state.mask.shape[1] != prefixes[1].state.mask.shape[1]
    partials = [[[], q.encode_text("there is a red")], [q.encode_text("a"), []]]
    _assert_many_equals_extend(q, prefixes, partials, 1, GP(max_new_tokens=5))


def test_extend_many_checks_and_row_budget(be, images):
    prefixes = [be.open_prefix(images[0], PROMPTS[0]), be.open_prefix(images[1], PROMPTS[1])]
    with pytest.raises(ValueError, match="partial lists"):
        be.extend_many(prefixes, [[[]]])
    other = HFBackend(be.model, be.processor, be.model_id, "cpu")
    with pytest.raises(ValueError, match="another backend"):
        other.extend_many(prefixes, [[[]], [[]]])
    assert be.extend_many(prefixes, [[], [[]]])[0] == []
    # the default row limit follows the KV budget: a budget for ~3 rows of 100 tokens gives 3
    tight = HFBackend(be.model, be.processor, be.model_id, "cpu", kv_budget_bytes=be._kv_bytes_per_token * 300)
    assert tight._rows_per_chunk(100) == 3 and tight._rows_per_chunk(10**6) == 1
    assert be._rows_per_chunk(100) == HFBackend.MAX_ROWS_DEFAULT  # tiny model: the cap decides
    assert HFBackend(be.model, be.processor, be.model_id, "cpu", max_rows=7)._rows_per_chunk(10**6) == 7


def test_stop_prefilter_equals_decoding_every_step(be, images, monkeypatch):
    # The token-level prefilter (_stop_candidates) must not change where any row stops: compare
    # with a backend that decodes every row at every step. Stops: one token's text, a string that
    # spans two tokens, and one that never occurs; rows stop at different steps.
    greedy = [r[0] for r in be.sample(images, PROMPTS, params=GP(max_new_tokens=10))]
    one = be.decode(greedy[0].token_ids[3:4]).strip()
    span = be.decode(greedy[1].token_ids[:6])[-4:]
    stops = (one, span, "@@never@@")
    runs = [GP(max_new_tokens=10, stop=stops), GP(max_new_tokens=10, temperature=1.0, seed=3, stop=stops)]
    fast = [be.sample(images, PROMPTS, n=1 if p.temperature == 0 else 3, params=p) for p in runs]
    period = be._stop_candidates((".",))
    monkeypatch.setattr(HFBackend, "_stop_candidates", lambda self, stops: [True] * 10**6)
    slow = [be.sample(images, PROMPTS, n=1 if p.temperature == 0 else 3, params=p) for p in runs]

    def rows(out):
        return [[(s.text, s.token_ids, s.finish_reason) for s in row] for run in out for row in run]

    assert rows(fast) == rows(slow)
    assert sum(s.finish_reason == "stop" for run in fast for row in run for s in row) >= 2
    assert 0 < sum(period) < len(period) / 4, "only tokens holding a '.' (or partial pieces) may stop at '.'"


# --- Gaps found by a mutation audit of lvlm_studio/models/hf.py (its pure helpers) ---------------


def test_resolve_dtype():
    from lvlm_studio.models.hf import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    if not torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == torch.float32  # no GPU after all: CPU's dtype
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="not 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_auto_dtype_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100, which only emulate bf16 (far slower
    than float16 there): 'auto' reads the device's compute capability instead."""
    from lvlm_studio.models.hf import resolve_dtype

    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (7, 5), 1: (8, 0)}[device.index or 0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_dtype("auto", "cuda") == torch.float16  # a T4 (sm 7.5)
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16  # an A100 (sm 8.0): the device asked about
    assert [str(d) for d in asked] == ["cuda", "cuda:1"]


def test_eos_and_banned_token_ids():
    from types import SimpleNamespace as NS

    from lvlm_studio.models.hf import banned_token_ids, eos_token_ids

    tok = NS(eos_token_id=2, unk_token_id=0, convert_tokens_to_ids=lambda t: {"<image>": 32000}.get(t, 0))
    # every EOS of the generation config in its order (Qwen2.5-VL: <|im_end|>, the end of a turn,
    # before <|endoftext|>), then the tokenizer's, once each
    assert eos_token_ids(NS(eos_token_id=[151645, 2, 151643]), tok) == [151645, 2, 151643]
    assert eos_token_ids(NS(eos_token_id=[151645, 151643]), tok) == [151645, 151643, 2]
    assert eos_token_ids(NS(eos_token_id=7), tok) == [7, 2]
    assert eos_token_ids(NS(eos_token_id=None), tok) == [2] and eos_token_ids(None, tok) == [2]
    assert eos_token_ids(NS(eos_token_id=[5]), NS(eos_token_id=None)) == [5]
    # the config's placeholders and the processor's image token; never unk nor a negative id
    assert banned_token_ids(NS(image_token_id=-1, video_token_id=151656), NS(image_token=None), tok) == [32000, 151656]
    assert banned_token_ids(NS(image_token_index=9), NS(image_token="<img>"), tok) == [9]  # "<img>" is unk here


def test_find_stop_cuts_after_the_earliest_stop():
    from lvlm_studio.models.base import find_stop

    text = "a red circle. Then a star\n and more"
    assert text[: find_stop(text, ("\n", "."))] == "a red circle."
    assert text[: find_stop(text, ("star", "circle"))] == "a red circle"
    assert find_stop(text, ("@@",)) is None


def test_find_stop_under_the_sentence_rule():
    from lvlm_studio.models.base import find_stop

    assert find_stop("1. A red car. It", (".",)) == 2  # "any": every period, as vLLM and HF stop
    assert find_stop("1. A red car. It", (".",), "sentence") == 13
    assert find_stop("Fruit, e.g. a pear. x", (".",), "sentence") == 19
    assert find_stop("Mr. Smith is here. x", (".",), "sentence") == 18
    assert find_stop("There is a. x", (".",), "sentence") == 11  # the demo model's fragment still stops
    assert find_stop("1. A red car\n", (".", "\n"), "sentence") == 13  # the earliest stop that counts
    assert find_stop("1. e.g.", (".",), "sentence") is None
    assert find_stop("Mr. X!", ("!",), "sentence") == 6  # a stop without a period is never held back
    assert find_stop("It is 3.5 m. x", (".",), "sentence") == 12  # a decimal point, once its digit is written
    assert find_stop("There are 3. x", (".",), "sentence") == 12
    assert find_stop("See www.a.com now.", (".",), "sentence") == 18  # a letter right after: no sentence end
    with pytest.raises(ValueError, match="non-empty"):
        GP(stop=("",))  # an empty stop string would end every answer before its first token


def test_a_text_answer_gets_its_in_context_tokens_on_a_byte_level_bpe_vocabulary():
    # SmolVLM's vocabulary is byte-level BPE: "A" alone and " A" after "Assistant:" are different
    # tokens, and the model writes the second. Trained here on a few lines (no download).
    from tokenizers import ByteLevelBPETokenizer

    from lvlm_studio.models.base import answer_token_ids

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["User: Describe the image.\nAssistant: A red circle at the top. A blue square."] * 20,
                            vocab_size=300, min_frequency=1, show_progress=False)

    def tokenize(text):
        return bpe.encode(text).ids

    asked = "User: Describe the image.\nAssistant:"
    ids = answer_token_ids(tokenize, asked, " ", "A red circle.")
    assert tokenize(asked) + ids == tokenize(asked + " A red circle.") and bpe.decode(ids) == " A red circle."
    assert ids[0] != tokenize("A red circle.")[0]  # what the answer alone would have been scored as
    assert answer_token_ids(tokenize, asked, " ", " A red circle.") == ids  # a stored leading space is not doubled
    assert answer_token_ids(tokenize, asked, "", "") == [] and answer_token_ids(tokenize, asked, " ", "  ") == []


def test_answer_token_ids_falls_back_to_the_shorter_form_alone():
    # When the prompt's ids do not begin the joint ids, the answer is tokenised alone, with the
    # opening unless that costs tokens: a SentencePiece vocabulary writes " A" alone as "▁▁" "A".
    from lvlm_studio.models.base import answer_token_ids

    pieces = {"Q:": [1, 2], "Q: A": [1, 9, 5], " A": [3, 4], "A": [5]}
    assert answer_token_ids(pieces.__getitem__, "Q:", " ", "A") == [5]
    pieces[" A"] = [6]  # a byte-level vocabulary: " A" is one token, the one the model writes
    assert answer_token_ids(pieces.__getitem__, "Q:", " ", "A") == [6]


def test_the_answer_opening_follows_a_changed_template(be):
    from lvlm_studio.models.base import backend_answer_ids

    mine = copy.copy(be)
    mine.processor = copy.copy(be.processor)
    assert backend_answer_ids(mine, "what is it?", "a red circle") == be.encode_text("a red circle")
    mine.processor.chat_template = mine.processor.chat_template.replace(" ASSISTANT: ", " ASSISTANT: circle ")
    assert backend_answer_ids(mine, "what is it?", "a red circle")[0] == be.encode_text("circle")[0]


def test_answer_opening_of_llava_hf_and_qwen_templates(be):
    from lvlm_studio.models.base import answer_opening

    llava_hf = LLAVA_HF_TEMPLATE
    qwen = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
            "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = copy.copy(be.processor)
    for template, opening in ((llava_hf, " "), (qwen, "")):
        processor.chat_template = template
        assert answer_opening(processor) == opening


def test_answer_opening_reads_the_template():
    from types import SimpleNamespace as NS

    from jinja2 import Template

    from lvlm_studio.models.base import answer_opening

    def processor(template):
        def apply(messages, add_generation_prompt=False, tokenize=False):
            return Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
        return NS(apply_chat_template=apply)

    smolvlm_hub = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                   "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                   "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                   "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                   "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    assert answer_opening(processor(smolvlm_hub)) == " "
    refuses = "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise('no') }}{% endif %}{% endfor %}"
    assert answer_opening(processor(refuses)) == ""  # a template without assistant turns: nothing assumed


def test_which_stops_wait_for_the_next_token():
    from lvlm_studio.models.base import find_stop, stop_awaits_next_token

    def waits(text, rule="sentence"):
        return stop_awaits_next_token(text, find_stop(text, (".",), rule), rule)

    assert waits("It is 3.") and waits("Fruit, e.") and waits("x i.")  # "3.5", "e.g.", "i.e." may follow
    assert not waits("There is a.") and not waits("It is big.") and not waits("I see the.")
    assert not waits("It is 3.", "any") and not waits("It is 3. x") and not waits("no stop")
    assert find_stop("Fruit, e.g", (".",), "sentence") is None  # the "g" came: "e." was no sentence end


def test_a_stop_after_a_digit_waits_for_the_next_token():
    from lvlm_studio.models.base import StopCheck

    words = {1: "It", 2: " is", 3: " 3", 4: ".", 5: "5", 6: " m", 7: " There"}
    check = StopCheck((".",), "sentence", lambda ids: "".join(words[i] for i in ids))

    def lps(ids):
        return [-float(i) for i in ids]  # a log-prob per token, to see which ones are kept

    def stop(seq):
        return None if seq is None else (seq.text, len(seq.token_ids), seq.token_logprobs == lps(seq.token_ids),
                                         seq.finish_reason)

    ids = [1, 2, 3, 4, 5, 6, 4]
    assert check.check(0, ids[:4], lps(ids[:4])) is None and check.waiting(0)  # "It is 3." : 3.5 or the end?
    assert check.check(0, ids[:5], lps(ids[:5])) is None and not check.waiting(0)  # "3.5": no stop there
    assert stop(check.check(0, ids, lps(ids))) == ("It is 3.5 m.", 7, True, "stop")
    assert check.check(1, [1, 2, 3, 4], lps([1, 2, 3, 4])) is None
    # the stop holds; " There" is dropped
    assert stop(check.check(1, [1, 2, 3, 4, 7], lps([1, 2, 3, 4, 7]))) == ("It is 3.", 4, True, "stop")
    assert check.check(2, [1, 2, 3, 4], lps([1, 2, 3, 4])) is None
    assert stop(check.at_end(2, [1, 2, 3, 4], lps([1, 2, 3, 4]))) == ("It is 3.", 4, True, "stop")
    assert stop(check.at_end(3, [1, 2], lps([1, 2]))) == ("It is", 2, True, "length")  # nothing held
    assert check.check(4, [1, 2, 3, 4], lps([1, 2, 3, 4])) is None
    check.ended(4)  # "... 3." then the end of the answer: nothing held any more
    assert not check.waiting(4)
    plain = StopCheck((".",), "any", lambda ids: "".join(words[i] for i in ids))
    # the reference: every period, at once
    assert stop(plain.check(0, [1, 2, 3, 4], lps([1, 2, 3, 4]))) == ("It is 3.", 4, True, "stop")
    with pytest.raises(ValueError, match="stop_rule"):
        GP(stop_rule="never")


def test_decode_loop_stops_where_the_stop_rule_says(be, images, monkeypatch):
    # The decode loop with scripted picks and a tokenizer that can write "1.": under "sentence" a
    # numbered-list marker does not end the sentence; under "any" it does (the CSR reference).
    from lvlm_studio.models.tiny import GENERIC_WORDS, build_word_tokenizer

    lister = copy.copy(be)
    lister.tokenizer, lister._stop_cache = build_word_tokenizer([*GENERIC_WORDS, "1", "car"]), {}
    script = lister.encode_text("1. A red car. It is")
    assert max(script) < be.model.config.get_text_config().vocab_size
    for rule, expected in (("any", "1."), ("sentence", "1. A red car.")):
        step = iter(script)
        monkeypatch.setattr(HFBackend, "_choose",
                            lambda self, logprobs, *a, step=step: torch.tensor([next(step)] * len(logprobs)))
        out = lister.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=12, stop=(".",), stop_rule=rule))[0][0]
        assert (out.text, out.finish_reason) == (expected, "stop")
        assert out.token_ids == script[: len(out.token_ids)] and len(out.token_logprobs) == len(out.token_ids)


def test_decode_loop_holds_a_stop_after_a_digit_for_one_token(be, images, monkeypatch):
    # "It is 3." may go on as "3.5": under "sentence" the next token decides, and is dropped when the
    # stop holds. Scripted picks; the texts are mapped onto ids of the tiny vocabulary (real "." id).
    dot = be.encode_text(".")[0]
    others = [i for i in range(5, 60) if "." not in be.decode([i]) and i != dot][:6]
    words = dict(zip(others, ["It", " is", " 3", "5", " m", " There"], strict=True)) | {dot: "."}
    it, is_, three, five, m, there = others
    mapped = copy.copy(be)
    mapped.decode = lambda ids: "".join(words[i] for i in ids)

    def run(script, rule, max_new_tokens=12):
        step = iter(script)
        monkeypatch.setattr(HFBackend, "_choose",
                            lambda self, logprobs, *a: torch.tensor([next(step)] * len(logprobs)))
        params = GP(max_new_tokens=max_new_tokens, stop=(".",), stop_rule=rule)
        out = mapped.sample(images[:1], PROMPTS[:1], params=params)[0][0]
        return out.text, out.finish_reason, out.token_ids

    decimal = [it, is_, three, dot, five, m, dot, there]
    assert run(decimal, "sentence") == ("It is 3.5 m.", "stop", decimal[:7])
    assert run(decimal, "any") == ("It is 3.", "stop", decimal[:4])
    ended = [it, is_, three, dot, there, is_]
    assert run(ended, "sentence") == ("It is 3.", "stop", ended[:4])  # " There" decided it, and is dropped
    assert run(ended, "sentence", max_new_tokens=4) == ("It is 3.", "stop", ended[:4])  # out of tokens: it holds


def test_held_stops_follow_their_rows_through_compaction(be, images, monkeypatch):
    # Six rows of one request, each with its own script: one ends at once (so the batch is compacted,
    # COMPACT_SHARE), the others hold a stop after a digit across later compactions.
    dot, eos = be.encode_text(".")[0], be.eos_ids[0]
    others = [i for i in range(5, 60) if "." not in be.decode([i]) and i not in (dot, *be.eos_ids)][:6]
    it, is_, three, five, m, there = others
    words = dict(zip(others, ["It", " is", " 3", "5", " m", " There"], strict=True)) | {dot: "."}
    mapped = copy.copy(be)
    mapped.decode = lambda ids: "".join(words.get(i, "") for i in ids)
    scripts = [[eos], [it, three, dot, five, m, dot, there, there], [it, is_, three, dot, there, is_, is_],
               [it, is_, is_, three, dot, five, dot, there], [three, dot, eos], [it, is_, is_, is_, is_, three, dot]]
    picked = [0] * len(scripts)

    def choose(self, logprobs, groups, *a):
        out = []
        for g in groups.tolist():
            out.append(scripts[g][picked[g]])
            picked[g] += 1
        return torch.tensor(out)

    monkeypatch.setattr(HFBackend, "_choose", choose)
    params = GP(max_new_tokens=7, temperature=1.0, seed=0, stop=(".",), stop_rule="sentence")
    rows = mapped.sample(images[:1], PROMPTS[:1], n=len(scripts), params=params)[0]
    assert [(r.text, r.finish_reason) for r in rows] == [
        ("", "eos"), ("It 3.5 m.", "stop"), ("It is 3.", "stop"), ("It is is 3.5.", "stop"), (" 3.", "eos"),
        ("It is is is is 3.", "stop")]
    assert [r.token_ids for r in rows] == [scripts[0], scripts[1][:6], scripts[2][:4], scripts[3][:7], scripts[4],
                                           scripts[5]]
    assert all(len(r.token_logprobs) == len(r.token_ids) for r in rows)


def test_chat_text_and_a_single_bos(be, images):
    text = be.chat_text("what is it?")
    assert text.index(be.processor.image_token) < text.index("what is it?")  # the image comes first
    assert text.endswith("ASSISTANT:")  # the assistant turn is opened for the answer
    ids = be._inputs(images[:1], [text])["input_ids"][0].tolist()
    assert ids.count(be.tokenizer.bos_token_id) == 1  # the template writes BOS: none added on top


def test_inputs_add_no_second_bos_when_the_template_writes_one():
    """Tokenizers that add BOS themselves (Llama's) must not add one in front of a chat template
    that already starts with it; templates without BOS (Qwen's) keep the tokenizer's specials."""
    from types import SimpleNamespace as NS

    seen = []

    def processor(**kwargs):
        seen.append(kwargs["add_special_tokens"])
        return {}

    fake = NS(tokenizer=NS(bos_token="<s>"), processor=processor, device=torch.device("cpu"), dtype=torch.float32)
    image = Image.new("RGB", (4, 4))
    HFBackend._inputs(fake, [image], ["<s>USER: <image>\nhi ASSISTANT:"])
    HFBackend._inputs(fake, [image], ["<|im_start|>user\nhi<|im_end|>"])
    fake.tokenizer.bos_token = None
    HFBackend._inputs(fake, [image], ["USER: hi"])
    assert seen == [False, True, True]


def test_sample_from_text_puts_the_templates_answer_opening_back():
    """decode() drops an answer's leading space: the slow path puts back what the template writes
    between the opened assistant turn and the answer (llava's " " after "ASSISTANT:": word-start
    tokenizers read "ASSISTANT:There" differently), nothing after Qwen's "assistant\n", and nothing
    before an empty partial."""
    from types import SimpleNamespace as NS

    texts = []
    fake = NS(_rows_per_input=lambda n, params: n, _generator=lambda params: None,
              _prefill=lambda ims, ts: texts.extend(ts), _decode=lambda state, k, params, gen: [["seq"]],
              processor=NS(chat_template="template"))
    for chat, answer_opening in (("USER: <image>\nhi ASSISTANT:", " "), ("<|im_start|>assistant\n", "")):
        fake.chat_text = lambda prompt, chat=chat: chat
        fake._answer_opening = ("template", answer_opening)  # what base.answer_opening read off the template
        for partial in ("There is", " There is", ""):
            HFBackend.sample_from_text(fake, None, "hi", partial, params=GP())
    assert texts == ["USER: <image>\nhi ASSISTANT: There is"] * 2 + ["USER: <image>\nhi ASSISTANT:"] + [
        "<|im_start|>assistant\nThere is", "<|im_start|>assistant\n There is", "<|im_start|>assistant\n"]


def test_stop_prefilter_keeps_tokens_that_may_complete_a_stop_with_earlier_bytes():
    from types import SimpleNamespace as NS

    pieces = ["", "\ufffd", "end.", "dot", "x"]  # special/empty, a partial character, holds ".", neither

    class Tok:
        def __len__(self):
            return 4

        def batch_decode(self, rows, skip_special_tokens):
            return [pieces[r[0]] for r in rows]

    fake = NS(_stop_cache={}, tokenizer=Tok(), model=NS(config=NS(get_text_config=lambda: NS(vocab_size=5))))
    assert HFBackend._stop_candidates(fake, ("a.", "")) == [True, True, True, False, False]


def test_argmax_tokens_never_picks_an_image_placeholder(be, images):
    model = copy.deepcopy(be.model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[be.banned_ids] = 100.0  # the placeholder would win every position
    model.lm_head = head
    biased = HFBackend(model, be.processor, "image-biased", "cpu")
    cont = be.encode_text("there is a red circle")
    picked = biased.argmax_tokens(images[:1], PROMPTS[:1], [cont])[0]
    assert len(picked) == len(cont) and not set(picked) & set(be.banned_ids)
    sampled = biased.sample(images[:1], PROMPTS[:1], params=GP(max_new_tokens=4))[0][0].token_ids
    assert not set(sampled) & set(be.banned_ids)


def test_bad_sizes_are_refused(be, images):
    for kwargs in ({"max_batch": 0}, {"max_rows": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            HFBackend(be.model, be.processor, be.model_id, "cpu", **kwargs)
    with pytest.raises(ValueError, match="n must be >= 1"):
        be.sample(images[:1], PROMPTS[:1], n=0)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        be.sample(images[:2], PROMPTS[:1])


def test_kv_budget_counts_keys_and_values_at_the_final_length(be):
    cfg = be.model.config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert be._kv_bytes_per_token == 2 * cfg.num_hidden_layers * heads * head_dim * 4  # K and V, float32
    # a budget for 3 rows of 100 tokens: prefix 40 + partial 10 + 50 new tokens = 100 per row
    tight = HFBackend(be.model, be.processor, be.model_id, "cpu", kv_budget_bytes=be._kv_bytes_per_token * 300)
    partials = [[1] * 10] * 7
    unknown = HFBackend(be.model, be.processor, be.model_id, "cpu", max_batch=5)
    unknown._kv_bytes_per_token = 0  # a config without the sizes: the row limit falls back to max_batch
    assert unknown._rows_per_chunk(100) == 5
    assert [len(c) for c in tight._chunks(partials, 40, 1, GP(max_new_tokens=50))] == [3, 3, 1]
    assert [len(c) for c in tight._chunks(partials, 40, 3, GP(max_new_tokens=50))] == [1] * 7


def test_a_dynamic_resolution_models_image_tokens_are_capped_everywhere_it_loads(tmp_path, monkeypatch):
    """LVLM_STUDIO_MODEL_IMAGE_PIXELS caps what a Qwen2-VL-family processor keeps of an image (its
    Hub config allows 12.8 MP, ~16k tokens): generation and training load the same cap, so a
    round trains on the image tokens it generates with. A fixed-resolution LLaVA is left alone."""
    from transformers import AutoProcessor

    from lvlm_studio.models.hf import cap_image_pixels
    from lvlm_studio.models.tiny import build_tiny
    from lvlm_studio.training import load_base_model

    path = build_tiny("qwen2_vl", tmp_path / "qwen")
    saved = AutoProcessor.from_pretrained(path)
    saved.image_processor.size = {"shortest_edge": 64, "longest_edge": 256 * 256}  # dynamic, up to 256²
    saved.save_pretrained(path)
    image = Image.new("RGB", (256, 256), (200, 30, 30))

    def prompt_tokens(processor) -> int:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return int(processor(images=[[image]], text=[text], return_tensors="pt")["input_ids"].shape[1])

    uncapped = prompt_tokens(HFBackend.from_pretrained(str(path), device="cpu", dtype="float32").processor)
    monkeypatch.setenv("LVLM_STUDIO_MODEL_IMAGE_PIXELS", str(64 * 64))
    generated = prompt_tokens(HFBackend.from_pretrained(str(path), device="cpu", dtype="float32").processor)
    trained = prompt_tokens(load_base_model(str(path))[1])
    assert uncapped > generated + 200 and generated == trained  # 1024 image tokens -> 64
    # A merged parent saved for generation keeps the base's own size (the cap applies on loading),
    # so unsetting or raising the cap later is not undone by an old folder.
    from lvlm_studio.training import materialize_round_model

    _, processor = materialize_round_model(str(path), [], out_dir=tmp_path / "merged")
    assert prompt_tokens(processor) == generated
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor.size["longest_edge"] == 256 * 256
    llava = AutoProcessor.from_pretrained(build_tiny("llava", tmp_path / "llava"))
    assert cap_image_pixels(llava) is None
    monkeypatch.setenv("LVLM_STUDIO_MODEL_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="LVLM_STUDIO_MODEL_IMAGE_PIXELS must be a positive whole number"):
        cap_image_pixels(saved)
