"""Behaviour of models/tiny.py pinned by a mutation audit: the tiny builders' vocabulary, chat
scaffold, processor and config (the demo VLM must be rebuildable exactly). The audit's models/clip.py
tests are in test_clip.py, beside its fixtures."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)


# -------------------------------------------------------------------------------------------- tiny
@pytest.fixture(scope="module")
def demo_build():
    """What `lvlm-studio demo build` starts from: a fresh LLaVA with the demo spec (random weights)."""
    from lvlm_studio.models.tiny import build_llava
    from lvlm_studio.world import world_words
    from lvlm_studio.world.build import demo_vlm_spec

    return build_llava(world_words(), demo_vlm_spec())


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from lvlm_studio.world import DEMO_DIR

    path = DEMO_DIR / "vlm"
    return AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path), GenerationConfig.from_pretrained(path)


def test_demo_builder_reproduces_the_shipped_architecture(demo_build, shipped):
    """The shipped demo VLM can be rebuilt: build_llava with the demo spec gives its exact config,
    vocabulary (token ids), image preprocessing and generation ids."""
    from lvlm_studio.world import DEMO_DIR

    model, processor = demo_build
    config, shipped_processor, generation = shipped
    volatile = {"_name_or_path", "architectures", "dtype", "transformers_version"}

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in volatile}

    assert clean(model.config.to_dict()) == clean(config.to_dict())
    assert processor.tokenizer.get_vocab() == shipped_processor.tokenizer.get_vocab()
    assert processor.image_processor.to_dict() == shipped_processor.image_processor.to_dict()
    got = model.generation_config
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id) == (
        generation.bos_token_id, generation.eos_token_id, generation.pad_token_id)
    recipe = json.loads((DEMO_DIR / "recipe.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == recipe["vlm_parameters"]


def test_chat_scaffold_encodes_like_the_shipped_processor(demo_build, shipped):
    """The generation prompt is a prefix of the full chat, the answer is closed by the end token,
    and a rebuilt tokenizer encodes the chat (image placeholder and newline included) to the
    shipped ids, with no <unk>."""
    from lvlm_studio.world.build import _chat_full, chat_prompt

    processor, shipped_processor = demo_build[1], shipped[1]
    prompt, answer = "Describe the image.", "There is a small red circle at the top."
    for proc in (processor, shipped_processor):
        assert _chat_full(proc, prompt, answer).startswith(chat_prompt(proc, prompt))
    full = _chat_full(processor, prompt, answer)
    assert chat_prompt(processor, prompt) == chat_prompt(shipped_processor, prompt)
    assert full == _chat_full(shipped_processor, prompt, answer)
    tok = processor.tokenizer
    assert full.endswith(answer + tok.eos_token) and full.count("<image>") == 1
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids == shipped_processor.tokenizer(full, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True).endswith(answer)


def test_word_tokenizer_pads_on_the_left(demo_build):
    """Batched generation needs the prompts right-aligned."""
    tok = demo_build[1].tokenizer
    batch = tok(["Yes.", "Is there a red circle in the image?"], padding=True, add_special_tokens=False)
    short = batch["input_ids"][0]
    assert short[0] == tok.pad_token_id and short[-1] != tok.pad_token_id
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_words_from_texts_keeps_words_and_punctuation():
    from lvlm_studio.models.tiny import words_from_texts

    assert words_from_texts(["Is there a red circle?", "Yes. It's red."]) == sorted(
        ["Is", "there", "a", "red", "circle", "?", "Yes", ".", "It", "'", "s"]
    )


def test_tiny_llava_init_is_seeded():
    from lvlm_studio.models.tiny import TinyLlavaSpec, build_llava

    a = build_llava(["red"], TinyLlavaSpec(seed=5))[0].state_dict()
    b = build_llava(["red"], TinyLlavaSpec(seed=5))[0].state_dict()
    c = build_llava(["red"], TinyLlavaSpec(seed=6))[0].state_dict()
    assert all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)


def test_tiny_builders_use_the_given_words_and_record_their_spec(tmp_path):
    from dataclasses import asdict

    from transformers import AutoTokenizer, GenerationConfig

    from lvlm_studio.models.tiny import TinyLlavaSpec, build_idefics3, build_tiny, build_tiny_llava

    spec = TinyLlavaSpec(seed=3)
    llava = build_tiny_llava(tmp_path / "llava", words=["zebra"], spec=spec)
    vocab = AutoTokenizer.from_pretrained(llava).get_vocab()
    assert "▁zebra" in vocab and "▁circle" not in vocab
    assert json.loads((llava / "tiny_spec.json").read_text()) == asdict(spec)
    qwen = build_tiny("qwen2_vl", tmp_path / "qwen", words=["zebra"], spec=spec)
    tok = AutoTokenizer.from_pretrained(qwen)
    assert "▁zebra" in tok.get_vocab() and "▁circle" not in tok.get_vocab()
    assert json.loads((qwen / "tiny_spec.json").read_text()) == {"arch": "qwen2_vl", **asdict(spec)}
    # Generation stops where the chat template ends a turn.
    assert tok.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(qwen).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    idefics = build_idefics3(["zebra"], spec)[1].tokenizer
    assert idefics.eos_token == "<end_of_utterance>"
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        build_tiny("gpt2", tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()


def test_default_tiny_vocabulary_reads_sentence_case_prompts():
    """GENERIC_WORDS (tests' default vocabulary) also holds capitalised words, so ordinary
    sentence-case prompts and answers encode without <unk>."""
    from lvlm_studio.models.tiny import GENERIC_WORDS, build_word_tokenizer

    tok = build_word_tokenizer(GENERIC_WORDS)
    ids = tok("Describe the image. There is a red circle at the top left. Yes.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
