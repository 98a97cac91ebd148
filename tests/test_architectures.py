"""The backend is not LLaVA-specific: tiny random LLaVA, Qwen2-VL (M-RoPE), Idefics3 and SmolVLM,
each built locally with its own processor and chat template, saved, loaded through
`HFBackend.from_pretrained`, and checked against the model's own full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_studio.models.base import GenerationParams as GP
from lvlm_studio.models.hf import HFBackend
from lvlm_studio.models.tiny import build_tiny

torch.set_num_threads(1)
TOL = 1e-4
PROMPTS = ["describe the image", "what colour is the small circle at the top ?"]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "idefics3", "smolvlm"])
def be(request, tmp_path_factory):
    path = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    backend = HFBackend.from_pretrained(str(path), device="cpu", dtype="float32")
    # Random tiny weights attend almost uniformly, so wrong positions would change log-probs by
    # only ~1e-4; sharpening q/k makes a position bug (e.g. Qwen2-VL continuing on 1-D positions
    # instead of M-RoPE's max+1) show as ~5e-3, well above TOL.
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if "language_model" in name and (".q_proj." in name or ".k_proj." in name):
                param.mul_(8)
    return backend


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    # different sizes: Qwen2-VL resizes each to its own grid
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in [(32, 32), (40, 28)]]


def close(a, b, tol=TOL):
    assert len(a) == len(b)
    assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < tol


def reference_logprobs(be, image, prompt, ids):
    """Per-token log-probs of ``ids`` after the prompt from ONE plain forward of the model (its own
    position handling: M-RoPE via get_rope_index for Qwen2-VL), no cache, no padding."""
    inputs = be._inputs([image], [be.chat_text(prompt)])
    n_prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([ids], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    with torch.no_grad():
        logits = be.model(**inputs, use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits[n_prompt - 1 : -1], -1)
    return lp.gather(-1, extra[0][:, None]).flatten().tolist()


def test_sample_score_and_reference_agree(be, images):
    out = be.sample(images, PROMPTS, n=2, params=GP(max_new_tokens=8, temperature=1.0, seed=2))
    flat = [(i, s) for i, row in enumerate(out) for s in row]
    scored = be.score([images[i] for i, _ in flat], [PROMPTS[i] for i, _ in flat], [s.token_ids for _, s in flat])
    for (i, s), lp in zip(flat, scored, strict=True):
        assert s.token_ids
        close(s.token_logprobs, lp)
        close(s.token_logprobs, reference_logprobs(be, images[i], PROMPTS[i], s.token_ids))


def test_a_text_answer_is_read_as_the_model_writes_it_after_each_template(be, images):
    from lvlm_studio.models.base import answer_opening, backend_answer_ids

    # llava's " ASSISTANT:" and SmolVLM's "Assistant:" are followed by " " in an assistant turn; Qwen's
    # "assistant\n" by the answer itself.
    assert answer_opening(be.processor) == ("" if "qwen" in type(be.processor).__name__.lower() else " ")
    answer = "There is a red circle at the top left ."
    ids = backend_answer_ids(be, PROMPTS[0], answer)
    # the word vocabulary writes every word with its space mark, so in context = alone: the answer's
    # own tokens under every template (image tokens, BOS, system turn); for the tiny Qwen, whose
    # prompt ends in a "▁" that the answer's first word absorbs, by the fallback to the answer alone
    assert ids == be.encode_text(answer) and be.decode(ids).strip() == answer
    close(be.score(images[:1], PROMPTS[:1], [answer])[0], reference_logprobs(be, images[0], PROMPTS[0], ids))


def test_extend_from_cached_prefix(be, images):
    greedy = be.sample(images[1:], PROMPTS[1:], params=GP(max_new_tokens=8))[0][0]
    prefix = be.open_prefix(images[1], PROMPTS[1])
    partials = [greedy.token_ids[:4], [], greedy.token_ids[:1]]
    out = be.extend(prefix, partials, n=2, params=GP(max_new_tokens=5, temperature=1.0, seed=4))
    for part, row in zip(partials, out, strict=True):
        for s in row:
            full = reference_logprobs(be, images[1], PROMPTS[1], part + s.token_ids)
            close(s.token_logprobs, full[len(part):])
    g = be.extend(prefix, [[], greedy.token_ids[:4]], params=GP(max_new_tokens=8))
    assert g[0][0].token_ids == greedy.token_ids
    assert g[1][0].token_ids[:4] == greedy.token_ids[4:]


def test_batched_equals_single(be, images):
    p = GP(max_new_tokens=6)
    batch = be.sample(images, PROMPTS, params=p)
    for im, pr, row in zip(images, PROMPTS, batch, strict=True):
        single = be.sample([im], [pr], params=p)[0][0]
        assert row[0].token_ids == single.token_ids
        close(row[0].token_logprobs, single.token_logprobs)


def test_a_round_trains_the_ids_the_model_is_asked_with_and_scored_on(be, images):
    """TRL's vision collators tokenise the prompt and each completion apart. Under every template,
    through ``AnswersAsWritten``, the ids a round trains on are the generation's prompt ids and, for
    each answer, the ids CSR's teacher-forced scoring reads (``backend_answer_ids``) and then the
    token that ends the turn."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from lvlm_studio.models.base import answer_closing, backend_answer_ids
    from lvlm_studio.training import (
        AnswersAsWritten,
        build_dpo_dataset,
        build_sft_dataset,
        match_generation_bos,
    )

    match_generation_bos(be.processor)
    closing = answer_closing(be.processor)
    assert closing == {"llava": "</s>", "qwen2_vl": "<|im_end|>"}.get(be.model.config.model_type, "<end_of_utterance>")
    closing_ids = be.encode_text(closing)
    assert len(closing_ids) == 1
    chosen, rejected = "There is a red circle at the top left .", "There is a blue square ."
    pair = {"image": images[1], "prompt": PROMPTS[1], "chosen": chosen, "rejected": rejected}
    asked = be._inputs([images[1]], [be.chat_text(PROMPTS[1])])["input_ids"][0].tolist()
    dpo = AnswersAsWritten(DataCollatorForVisionPreference(be.processor), be.processor)
    sft = AnswersAsWritten(DataCollatorForVisionLanguageModeling(be.processor, completion_only_loss=True),
                           be.processor)
    dpo_batch = dpo([build_dpo_dataset([pair])[0]])
    sft_batch = sft([build_sft_dataset([{**pair, "answer": chosen}])[0]])
    sft_batch["completion_mask"] = (sft_batch["labels"] != -100).long()  # the tokens the SFT loss covers
    for batch, row, answer in ((dpo_batch, 0, chosen), (dpo_batch, 1, rejected), (sft_batch, 0, chosen)):
        ids, live = batch["input_ids"][row], batch["attention_mask"][row] == 1
        prompt, completion = live & (batch["completion_mask"][row] == 0), batch["completion_mask"][row] == 1
        assert ids[prompt].tolist() == asked
        assert ids[completion].tolist() == backend_answer_ids(be, PROMPTS[1], answer) + closing_ids
