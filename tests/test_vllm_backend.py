"""VLLMBackend's glue to vLLM's API, against a recording stand-in for the ``vllm`` package.

vLLM needs CUDA and is not installed on these machines, so its engine cannot run here. What these
tests check is what the backend *asks* vLLM for (the arguments of ``LLM``, ``SamplingParams``,
``LoRARequest`` and ``LLM.generate``) and what it makes of vLLM's documented output objects. The
stand-in enforces the one vLLM rule the backend used to break: ``SamplingParams`` refuses n > 1
at temperature 0 (``_verify_greedy_sampling``).
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field

import pytest
from PIL import Image

from lvlm_studio.models.base import GenerationParams
from lvlm_studio.models.tiny import build_tiny_llava
from lvlm_studio.models.vllm_backend import VLLMBackend, max_lora_rank


@dataclass
class Logprob:
    logprob: float


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str = "stop"
    stop_reason: object = None


@dataclass
class RequestOutput:
    outputs: list[Completion]
    prompt_logprobs: list | None = None


class SamplingParams:
    def __init__(self, n: int = 1, temperature: float = 1.0, **kwargs):
        if n > 1 and temperature < 1e-5:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
        self.n, self.temperature, self.kwargs = n, temperature, kwargs


@dataclass
class FakeLLM:
    """Records every call; answers each request with ``reply(request, sampling)``."""

    kwargs: dict
    calls: list = field(default_factory=list)
    reply: object = None

    def generate(self, requests, sampling, lora_request=None, use_tqdm=True):
        per_request = sampling if isinstance(sampling, list) else [sampling] * len(requests)
        self.calls.append((requests, per_request, lora_request))
        return [self.reply(r, s) for r, s in zip(requests, per_request, strict=True)]


@pytest.fixture
def fake_vllm(monkeypatch):
    made: list[FakeLLM] = []

    def make_llm(**kwargs):
        llm = FakeLLM(kwargs)
        llm.reply = lambda r, s: RequestOutput([Completion("A red circle.", [5, 6], [{5: Logprob(-0.1)},
                                                                                    {6: Logprob(-0.2)}])] * s.n)
        made.append(llm)
        return llm

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = make_llm, SamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: ("lora", name, int_id, path)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    return made


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("vllm") / "tiny")
    # A second end-of-answer id in the generation config, as Qwen's lists <|im_end|> and <|endoftext|>.
    config = json.loads((path / "generation_config.json").read_text()) if (path / "generation_config.json").is_file() else {}
    (path / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [7, 3]}))
    return str(path)


def _adapter(tmp_path, rank: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    return str(tmp_path)


def test_vllm_failing_without_a_gpu_says_so(fake_vllm, model_dir, monkeypatch):
    """vLLM installed on a machine without a GPU fails deep in its engine; the error names the
    model, vLLM's words and the missing GPU, with the way out."""
    import torch

    from lvlm_studio.models import registry
    from lvlm_studio.models.base import ModelLoadError

    def no_device(**kwargs):
        raise RuntimeError("Failed to infer device type")

    monkeypatch.setattr(sys.modules["vllm"], "LLM", no_device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    registry.clear_cache()
    with pytest.raises(ModelLoadError, match="Failed to infer device type.*CUDA GPU and torch sees none here.*"
                                             "LVLM_STUDIO_BACKEND=hf"):
        registry.load_backend(model_dir, backend="vllm")


def test_lora_rank_and_request(fake_vllm, model_dir, tmp_path):
    """vLLM loads LoRA ranks up to max_lora_rank (default 16): the GPU recipe's rank 128 needs it."""
    assert [max_lora_rank(_adapter(tmp_path / str(r), r)) for r in (8, 16, 20, 128, 500)] == [8, 16, 32, 128, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        max_lora_rank(_adapter(tmp_path / "big", 600))
    backend = VLLMBackend(model_dir, adapter=_adapter(tmp_path / "a", 128))
    kwargs = fake_vllm[-1].kwargs
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 128
    assert kwargs["limit_mm_per_prompt"] == {"image": 1} and kwargs["enable_prefix_caching"] is True
    backend.sample([Image.new("RGB", (32, 32))], ["Describe."])
    assert fake_vllm[-1].calls[-1][2] == ("lora", "adapter", 1, str(tmp_path / "a"))


def test_greedy_n_seeds_banned_tokens_and_end_ids(fake_vllm, model_dir):
    backend = VLLMBackend(model_dir)
    llm = fake_vllm[-1]
    image = Image.new("RGB", (32, 32))
    # Greedy with n = 3: asked once (vLLM refuses n > 1 at temperature 0), answered three times.
    out = backend.sample([image, image], ["Describe.", "Describe."], n=3, params=GenerationParams(temperature=0.0, seed=5))
    assert [len(o) for o in out] == [3, 3] and out[0][0].text == out[0][2].text == backend.decode([5, 6])
    _, sampling, _ = llm.calls[-1]
    assert [s.n for s in sampling] == [1, 1]
    # A seed per request, n apart (vLLM seeds a request's i-th sample seed + i): the same prompt
    # twice in a batch draws its own samples, and no two samples of the batch share a seed.
    assert [s.kwargs["seed"] for s in sampling] == [5, 8]
    # The image placeholder is never picked (logit bias), as HFBackend masks it.
    assert backend.banned_ids and all(sampling[0].kwargs["logit_bias"][t] == -100.0 for t in backend.banned_ids)
    sampled = backend.sample([image], ["Describe."], n=2, params=GenerationParams(temperature=0.7, seed=None))
    assert len(sampled[0]) == 2 and llm.calls[-1][1][0].n == 2 and llm.calls[-1][1][0].kwargs["seed"] is None
    backend.sample([image, image], ["Describe.", "Describe."], n=2, params=GenerationParams(temperature=0.7, seed=5))
    seeds = [s.kwargs["seed"] + i for s in llm.calls[-1][1] for i in range(s.n)]  # what vLLM gives each sample
    assert seeds == [5, 6, 7, 8]
    # below vLLM's greedy threshold a temperature is greedy: asked once, not refused for n > 1
    tiny_t = backend.sample([image], ["Describe."], n=2, params=GenerationParams(temperature=1e-6, seed=1))
    assert len(tiny_t[0]) == 2 and llm.calls[-1][1][0].n == 1 and llm.calls[-1][1][0].temperature == 0.0
    # The end-of-answer ids are HFBackend's: the generation config's and the tokenizer's.
    assert {7, 3} <= set(backend.eos_ids) and len(set(backend.eos_ids)) == len(backend.eos_ids)
    assert sampling[0].kwargs["stop_token_ids"] == backend.eos_ids  # vLLM ends answers where HFBackend does


def test_group_search_never_picks_an_image_placeholder(fake_vllm, model_dir):
    backend = VLLMBackend(model_dir)
    llm = fake_vllm[-1]
    placeholder = backend.banned_ids[0]
    end = backend.eos_ids[0]

    def reply(request, sampling):  # the placeholder is always the most likely next token
        step = len(request["prompt_token_ids"]) - len(prompt)
        top = {placeholder: Logprob(-0.01), 11 + step: Logprob(-0.5), 20 + step: Logprob(-0.9)}
        if step == 2:
            top = {placeholder: Logprob(-0.01), end: Logprob(-0.3), 30: Logprob(-0.9)}
        return RequestOutput([Completion("", [next(iter(top))], [top])])

    prompt = backend._prompt_ids("Describe.")
    llm.reply = reply
    groups = backend.sample([Image.new("RGB", (32, 32))], ["Describe."],
                            params=GenerationParams(temperature=0.0, num_beam_groups=2, max_new_tokens=5))[0]
    assert len(groups) == 2
    assert all(placeholder not in g.token_ids for g in groups)
    assert groups[0].token_ids == [11, 12, end] and groups[0].finish_reason == "eos"
    assert llm.calls[0][1][0].kwargs["logprobs"] == 2 + len(backend.banned_ids)


def test_the_image_pixel_cap_reaches_vllm_for_qwen_family_processors_only(fake_vllm, model_dir, tmp_path, monkeypatch):
    from lvlm_studio.models.tiny import build_tiny

    monkeypatch.setenv("LVLM_STUDIO_MODEL_IMAGE_PIXELS", "256")
    VLLMBackend(model_dir)  # a LLaVA: fixed resolution, nothing to pass
    assert "mm_processor_kwargs" not in fake_vllm[-1].kwargs
    VLLMBackend(str(build_tiny("qwen2_vl", tmp_path / "qwen")))
    assert fake_vllm[-1].kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 256, "longest_edge": 256}}
    monkeypatch.setenv("LVLM_STUDIO_MODEL_IMAGE_PIXELS", "4096")
    VLLMBackend(str(tmp_path / "qwen"))
    # a cap never raises the processor's own limit (1024 pixels for the tiny model)
    assert fake_vllm[-1].kwargs["mm_processor_kwargs"] == {"size": {"shortest_edge": 1024, "longest_edge": 1024}}


def test_vllm_asks_with_the_system_turn_hfbackend_asks_with(fake_vllm, model_dir, monkeypatch):
    from lvlm_studio.models.hf import HFBackend

    llava_hf_style = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                      "{{ message['content'][0]['text'] }} {% else %}USER: {% for part in message['content'] %}"
                      "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
                      "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", "a red circle .")
    backend, hf = VLLMBackend(model_dir), HFBackend.from_pretrained(model_dir, device="cpu", dtype="float32")
    backend.processor.chat_template = hf.processor.chat_template = llava_hf_style
    ids = backend._prompt_ids("describe the image")
    assert backend.tokenizer.decode(ids).startswith("a red circle .")
    assert ids == backend.tokenizer(hf.chat_text("describe the image"), add_special_tokens=False)["input_ids"]


def _list_tokenizer_backend(model_dir):
    """A backend whose tokenizer also knows "1" and "car", to write a numbered list."""
    from lvlm_studio.models.tiny import GENERIC_WORDS, build_word_tokenizer

    backend = VLLMBackend(model_dir)
    backend.tokenizer = build_word_tokenizer([*GENERIC_WORDS, "1", "car"])
    return backend


def test_sampling_goes_on_past_a_period_that_ends_no_sentence(fake_vllm, model_dir):
    # vLLM stops at every "."; under stop_rule="sentence" the backend asks again from "1." on.
    backend = _list_tokenizer_backend(model_dir)
    llm = fake_vllm[-1]
    prompt = backend._prompt_ids("Describe.")
    first, rest = backend.encode_text("1."), backend.encode_text(" A red car.")

    def reply(request, sampling):
        ids = first if request["prompt_token_ids"] == prompt else rest
        return RequestOutput([Completion(backend.decode(ids), ids, [{t: Logprob(-0.5)} for t in ids],
                                         finish_reason="stop", stop_reason=".")])

    llm.reply = reply
    image = Image.new("RGB", (32, 32))
    params = GenerationParams(max_new_tokens=10, stop=(".",), stop_rule="sentence", temperature=0.7, seed=4)
    out = backend.sample([image], ["Describe."], params=params)[0][0]
    assert out.text == "1. A red car." and out.finish_reason == "stop"
    assert out.token_ids == first + rest and out.token_logprobs == [-0.5] * len(first + rest)
    assert len(llm.calls) == 2
    (again,), (sampling,), _ = llm.calls[1]
    assert again["prompt_token_ids"] == prompt + first  # continued from the ids, never re-tokenised
    assert sampling.kwargs["max_tokens"] == 10 - len(first) and sampling.kwargs["seed"] != 4
    llm.calls.clear()
    plain = backend.sample([image], ["Describe."], params=GenerationParams(max_new_tokens=10, stop=(".",), seed=4))
    assert plain[0][0].text == "1." and len(llm.calls) == 1  # "any": vLLM's own stop, as before


def test_group_search_stops_by_the_sentence_rule(fake_vllm, model_dir):
    backend = _list_tokenizer_backend(model_dir)
    script = backend.encode_text("1. A red car. It is")
    prompt = backend._prompt_ids("Describe.")

    def reply(request, sampling):
        step = len(request["prompt_token_ids"]) - len(prompt)
        top = {script[step]: Logprob(-0.1), 99: Logprob(-5.0)}
        return RequestOutput([Completion("", [script[step]], [top])])

    fake_vllm[-1].reply = reply
    for rule, expected in (("any", "1."), ("sentence", "1. A red car.")):
        params = GenerationParams(temperature=0.0, num_beam_groups=2, diversity_penalty=0.0, max_new_tokens=8,
                                  stop=(".",), stop_rule=rule)
        groups = backend.sample([Image.new("RGB", (32, 32))], ["Describe."], params=params)[0]
        assert [g.text for g in groups] == [expected] * 2 and groups[0].finish_reason == "stop"


def _mapped_backend(model_dir, words: dict[int, str]):
    backend = VLLMBackend(model_dir)
    assert not set(words) & {*backend.eos_ids, *backend.banned_ids}
    backend.decode = lambda ids: "".join(words[i] for i in ids)
    return backend


def test_sampling_after_a_digit_and_a_period_lets_the_next_token_decide(fake_vllm, model_dir):
    words = {41: "It", 42: " is", 43: " 3", 44: ".", 45: "5", 46: " m", 47: " There", 48: " is"}
    backend = _mapped_backend(model_dir, words)
    llm = fake_vllm[-1]
    prompt = backend._prompt_ids("Describe.")
    image = Image.new("RGB", (32, 32))
    params = GenerationParams(max_new_tokens=10, stop=(".",), stop_rule="sentence", temperature=0.7, seed=1)

    def scripted(first, rest):
        def reply(request, sampling):
            ids = first if request["prompt_token_ids"] == prompt else rest
            return RequestOutput([Completion(backend.decode(ids), ids, [{t: Logprob(-0.5)} for t in ids],
                                             finish_reason="stop", stop_reason=".")])
        return reply

    llm.reply = scripted([41, 42, 43, 44], [45, 46, 44])  # "It is 3." then "5 m.": a decimal point
    out = backend.sample([image], ["Describe."], params=params)[0][0]
    assert (out.text, out.token_ids, out.finish_reason) == ("It is 3.5 m.", [41, 42, 43, 44, 45, 46, 44], "stop")
    llm.reply = scripted([41, 42, 43, 44], [47, 48, 44])  # "It is 3." then " There is.": the stop held
    llm.calls.clear()
    out = backend.sample([image], ["Describe."], params=params)[0][0]
    assert (out.text, out.token_ids, out.token_logprobs) == ("It is 3.", [41, 42, 43, 44], [-0.5] * 4)
    assert len(llm.calls) == 2  # asked once more, and not again once the stop held


def test_vllm_sampling_ends_as_hfbackend_after_a_held_stop(fake_vllm, model_dir):
    end = 7  # an end-of-answer id of the fixture's generation config
    words = {41: "It", 42: " is", 43: " 3", 44: ".", 47: " There", 48: " is", 49: ".\n", end: ""}
    backend = _mapped_backend(model_dir, {k: v for k, v in words.items() if k != end})
    backend.decode = lambda ids: "".join(words[i] for i in ids)
    llm = fake_vllm[-1]
    prompt = backend._prompt_ids("Describe.")
    image = Image.new("RGB", (32, 32))
    params = GenerationParams(max_new_tokens=10, stop=(".",), stop_rule="sentence", temperature=0.7, seed=1)

    def answer(first, rest, rest_reason, first_text=None):
        def reply(request, sampling):
            is_first = request["prompt_token_ids"] == prompt
            ids = first if is_first else rest
            reason = "stop" if is_first else rest_reason
            text = first_text if is_first and first_text else backend.decode(ids)
            return RequestOutput([Completion(text, ids, [{t: Logprob(-0.5)} for t in ids], finish_reason="stop",
                                             stop_reason="." if reason == "stop" else end)])
        llm.reply = reply
        llm.calls.clear()
        out = backend.sample([image], ["Describe."], params=params)[0][0]
        return out.text, out.token_ids, out.finish_reason, len(llm.calls)

    # "3." then words and the end: the words decided the stop, as in HFBackend, and are dropped
    assert answer([41, 42, 43, 44], [47, 48, end], "eos") == ("It is 3.", [41, 42, 43, 44], "stop", 2)
    # "3." then the end at once: the answer ended there (HFBackend: "eos", the end token kept)
    assert answer([41, 42, 43, 44], [end], "eos") == ("It is 3.", [41, 42, 43, 44, end], "eos", 2)
    # vLLM cuts its text at the stop inside ".\n"; the token already shows the newline: asked once
    assert answer([41, 42, 43, 49], [47], "stop", first_text="It is 3.")[2:] == ("stop", 1)


def test_an_end_token_on_the_last_allowed_token_ends_the_answer_as_in_hfbackend(fake_vllm, model_dir):
    """vLLM versions that check the length cap before the end token report "length" for an answer
    whose last allowed token is its end; HFBackend says "eos" (CSR would otherwise continue past
    the end token). A plain cut by the cap stays "length"."""
    backend = VLLMBackend(model_dir)
    end = 7  # an end-of-answer id of the fixture's generation config
    params = GenerationParams(max_new_tokens=2, temperature=0.7, seed=1)
    image = Image.new("RGB", (32, 32))
    for ids, expected in (([5, end], "eos"), ([5, 6], "length")):
        fake_vllm[-1].reply = lambda r, s, ids=ids: RequestOutput(
            [Completion("A", ids, [{t: Logprob(-0.1)} for t in ids], finish_reason="length")])
        out = backend.sample([image], ["Describe."], params=params)[0][0]
        assert (out.token_ids, out.finish_reason) == (ids, expected)


def test_an_answer_text_is_decoded_from_its_ids_as_hfbackend_decodes_it(fake_vllm, model_dir):
    """vLLM's own text is detokenised with the prompt before it (" The" after "ASSISTANT:" on a
    SentencePiece vocabulary), HFBackend decodes the new ids alone: the text is the ids decoded,
    cut after the stop string vLLM stopped at (its token may hold more)."""
    backend = _list_tokenizer_backend(model_dir)
    ids = backend.encode_text("A red circle. There")
    image = Image.new("RGB", (32, 32))
    for completion, expected in (
            (Completion(" A red circle", ids[:3], [{t: Logprob(-0.1)} for t in ids[:3]], finish_reason="length"),
             backend.decode(ids[:3])),
            (Completion(" A red circle.", ids, [{t: Logprob(-0.1)} for t in ids], stop_reason="."),
             "A red circle.")):
        fake_vllm[-1].reply = lambda r, s, c=completion: RequestOutput([c])
        out = backend.sample([image], ["Describe."], params=GenerationParams(temperature=0.7, seed=1))[0][0]
        assert out.text == expected and out.token_ids == list(completion.token_ids)


def test_vllm_false_stop_at_the_token_cap_ends_by_length(fake_vllm, model_dir):
    backend = _list_tokenizer_backend(model_dir)
    first = backend.encode_text("1.")

    def reply(request, sampling):
        return RequestOutput([Completion("1.", first, [{t: Logprob(-0.5)} for t in first], stop_reason=".")])

    fake_vllm[-1].reply = reply
    params = GenerationParams(max_new_tokens=len(first), stop=(".",), stop_rule="sentence", temperature=0.7)
    out = backend.sample([Image.new("RGB", (32, 32))], ["Describe."], params=params)[0][0]
    assert (out.text, out.finish_reason, len(fake_vllm[-1].calls)) == ("1.", "length", 1)  # as HFBackend says


def test_group_search_holds_a_stop_after_a_digit_for_one_token(fake_vllm, model_dir):
    words = {41: "It", 42: " is", 43: " 3", 44: ".", 45: "5", 46: " m", 47: " There", 99: "x"}
    backend = _mapped_backend(model_dir, words)
    prompt = backend._prompt_ids("Describe.")

    def search(script, rule):
        def reply(request, sampling):
            t = script[len(request["prompt_token_ids"]) - len(prompt)]
            return RequestOutput([Completion("", [t], [{t: Logprob(-0.1), 99: Logprob(-5.0)}])])

        fake_vllm[-1].reply = reply
        params = GenerationParams(temperature=0.0, num_beam_groups=2, diversity_penalty=0.0, max_new_tokens=7,
                                  stop=(".",), stop_rule=rule)
        g = backend.sample([Image.new("RGB", (32, 32))], ["Describe."], params=params)[0][0]
        return g.text, g.token_ids, g.finish_reason

    assert search([41, 42, 43, 44, 45, 46, 44, 47], "sentence") == ("It is 3.5 m.", [41, 42, 43, 44, 45, 46, 44], "stop")
    assert search([41, 42, 43, 44, 45, 46, 44, 47], "any") == ("It is 3.", [41, 42, 43, 44], "stop")
    assert search([41, 42, 43, 44, 47, 42, 42, 42], "sentence") == ("It is 3.", [41, 42, 43, 44], "stop")
    capped = [41, 42, 41, 42, 41, 43, 44, 47]  # "3." is the 7th token, the last one allowed: the stop holds
    assert search(capped, "sentence") == ("It isIt isIt 3.", capped[:7], "stop")
