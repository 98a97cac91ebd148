"""Optional vLLM backend (CUDA machines): same protocol as `HFBackend`, faster batched decoding.

vllm is imported only when a `VLLMBackend` is constructed, so importing this module is free and
works without vllm installed. Prefix caching is on: ``open_prefix`` only records the prompt's token
ids and image; every ``extend`` resubmits prefix + partial as a token-id prompt and vLLM reuses the
cached KV blocks of the shared prefix (image included: its blocks are keyed by the image hash).

Log-probs: vLLM's default ``logprobs_mode="raw_logprobs"`` returns log-probs of the raw model
distribution (before temperature, top-p or penalties), the same quantity `HFBackend` returns.
Diverse group search has no vLLM sampler; it runs as a greedy step loop (one token per call, top-G
log-probs, prefix caching keeps it cheap): with G groups at most G−1 tokens are penalised, so the
penalised argmax always lies among the G most likely tokens.

The engine has not run here (no GPU, no vllm); the code is written against vLLM's documented
``LLM`` / ``SamplingParams`` / ``TokensPrompt`` / ``LoRARequest`` API, and what it asks of them is
tested against a recording stand-in (tests/test_vllm_backend.py): the adapter's rank as
``max_lora_rank``, greedy decoding asked once and repeated (vLLM refuses n > 1 at temperature 0),
a seed per request, image placeholders never picked (``logit_bias``), HFBackend's end-of-answer ids.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

from PIL import Image

from .base import (
    GenerationParams,
    MissingDependencyError,
    Prefix,
    Sequence,
    StopCheck,
    backend_answer_ids,
    chat_prompt,
    find_stop,
    stop_awaits_next_token,
)
from .lora import lora_rank

INSTALL_HINT = "pip install -r requirements-gpu.txt && pip install --no-deps -e . (on a CUDA machine)"
_counter = itertools.count()
# The LoRA ranks vLLM's engine accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks; default 16).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(adapter_dir: str | Path) -> int:
    """The smallest rank vLLM accepts that holds the adapter's: a rank-128 adapter (the GPU recipe)
    fails to load under vLLM's default 16."""
    return vllm_lora_rank(lora_rank(adapter_dir))


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank`` (ValueError above its largest)."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"the adapter's LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return fits[0]


# vLLM samples greedily below this temperature and then refuses n > 1 (its _MAX_TEMP / greedy
# check); HFBackend samples at any temperature > 0, where 1e-5 is argmax in all but ties.
GREEDY_BELOW = 1e-5


def _greedy(params: GenerationParams) -> bool:
    return params.temperature < GREEDY_BELOW


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise MissingDependencyError(
            f"The vLLM backend needs the 'vllm' package (CUDA only), which is not installed: "
            f"{INSTALL_HINT}. Or use the default backend='hf'."
        ) from exc
    return vllm


class VLLMBackend:
    """`VLMBackend` over ``vllm.LLM`` with prefix caching."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        adapter: str | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ):
        vllm = _import_vllm()
        from transformers import AutoProcessor

        self._vllm = vllm
        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "enable_prefix_caching": True,
            "limit_mm_per_prompt": {"image": 1},
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_logprobs": 20,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.processor = AutoProcessor.from_pretrained(model)
        from .hf import prepare_processor

        if prepare_processor(self.processor, model) is not None:  # a Qwen2-VL-family processor: the same size
            kwargs["mm_processor_kwargs"] = {"size": dict(self.processor.image_processor.size)}
        self._lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            kwargs["enable_lora"] = True
            kwargs["max_lora_rank"] = max_lora_rank(adapter)
            self._lora = LoRARequest("adapter", 1, str(adapter))
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.model_id = model if adapter is None else f"{model}+{adapter}"
        self.backend_id = f"vllm:{self.model_id}:{next(_counter)}"
        # The same end and never-picked tokens as HFBackend (one definition for both).
        from transformers import AutoConfig, GenerationConfig

        from .hf import banned_token_ids, eos_token_ids

        try:
            generation_config = GenerationConfig.from_pretrained(model)
        except OSError:  # a model without generation_config.json
            generation_config = None
        self.eos_ids = eos_token_ids(generation_config, self.tokenizer)
        self.banned_ids = banned_token_ids(AutoConfig.from_pretrained(model), self.processor, self.tokenizer)

    # --- text -------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Chat prompt as token ids with ONE (unexpanded) image placeholder: vLLM's multimodal
        processor expands it in token space."""
        text = chat_prompt(self.processor, prompt)
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _request(self, ids: list[int], image: Image.Image) -> dict:
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": image.convert("RGB")}}

    def _sampling(self, params: GenerationParams, n: int, seed: int | None = None):
        """One request's SamplingParams. Greedy decoding is asked for once (vLLM refuses n > 1
        when greedy; ``_run`` repeats the answer n times, as HFBackend returns it)."""
        greedy = _greedy(params)
        return self._vllm.SamplingParams(
            n=1 if greedy else n,
            temperature=0.0 if greedy else params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed,
            stop=list(params.stop) or None,
            # HFBackend's end-of-answer ids (the generation config's and the tokenizer's), not
            # only what vLLM reads from the model's config
            stop_token_ids=list(self.eos_ids) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-prob
            # never pick an image placeholder (HFBackend masks them); log-probs stay raw
            logit_bias={t: -100.0 for t in self.banned_ids} or None,
        )

    def _generate(self, requests: list[dict], sampling) -> list:
        return self.llm.generate(requests, sampling, lora_request=self._lora, use_tqdm=False)

    def _to_sequence(self, comp) -> Sequence:
        """A vLLM completion as HFBackend writes it. Its text is decoded from its ids, as HFBackend
        decodes the new ids alone (vLLM's detokenizer is primed with the prompt and keeps the first
        word's leading space: "ASSISTANT:" "▁The" gives " The"), and cut after the stop string it
        stopped at. An end-of-answer id as the last token is "eos" even when the length cap came at
        the same token (some vLLM versions check the cap first)."""
        ids = list(comp.token_ids)
        lps = [float(d[t].logprob) for t, d in zip(ids, comp.logprobs or [], strict=False)]
        text = self.decode(ids)
        if ids and ids[-1] in self.eos_ids:
            reason = "eos"
        elif comp.finish_reason == "length":
            reason = "length"
        elif isinstance(comp.stop_reason, str):
            reason = "stop"
            end = find_stop(text, [comp.stop_reason]) if comp.stop_reason else None
            text = text if end is None else text[:end]
        else:
            reason = "eos"
        return Sequence(text, ids, lps, reason)

    # --- protocol ---------------------------------------------------------------------------
    def _run(self, prompt_ids: list[list[int]], images: list[Image.Image], n: int, params) -> list[list[Sequence]]:
        if params.num_beam_groups > 1:
            return [self._group_search(ids, im, params) for ids, im in zip(prompt_ids, images, strict=True)]
        requests = [self._request(i, im) for i, im in zip(prompt_ids, images, strict=True)]
        # A seed per request, n apart: vLLM seeds a request's i-th sample seed + i, so seed + k
        # would give request k's first sample request k-1's second one's draws.
        sampling = [self._sampling(params, n, None if params.seed is None else params.seed + k * n)
                    for k in range(len(requests))]
        outs = self._generate(requests, sampling)
        repeat = n if _greedy(params) else 1
        seqs = [[self._to_sequence(c) for c in o.outputs] for o in outs]
        if params.stop and params.stop_rule != "any":
            seqs = self._past_false_stops(prompt_ids, images, seqs, params)
        return [row * repeat for row in seqs]

    def _past_false_stops(self, prompt_ids, images, seqs: list[list[Sequence]], params) -> list[list[Sequence]]:
        """vLLM stops at every occurrence of a stop string. A sequence it stopped where
        ``params.stop_rule`` says no stop is (the "1." of a list) is continued, one request per
        sequence, until it stops for real, ends or runs out of ``max_new_tokens`` (then it ended by
        length, as HFBackend reports it). One stopped where the next token decides ("3.") is
        continued too, and kept as it was when what follows shows the period ended the sentence
        (not "3.5"); what followed is dropped then, as HFBackend drops it."""
        settled: set[tuple[int, int]] = set()

        def stop_in(ids: list[int]) -> int | None:
            return find_stop(self.decode(list(ids)), params.stop, params.stop_rule)

        def undecided(key, s: Sequence) -> tuple[bool, int | None]:
            """(needs another request, where its tokens stop now)."""
            if s.finish_reason != "stop" or key in settled or len(s.token_ids) >= params.max_new_tokens:
                return False, None
            text = self.decode(list(s.token_ids))  # vLLM's text ends at the stop; the token may hold more
            end = find_stop(text, params.stop, params.stop_rule)
            return end is None or stop_awaits_next_token(text, end, params.stop_rule), end

        for _round in range(params.max_new_tokens):
            todo = []  # (row, sequence, where its tokens stop now)
            for r, row in enumerate(seqs):
                for k, s in enumerate(row):
                    more_needed, held = undecided((r, k), s)
                    if more_needed:
                        todo.append((r, k, held))
            if not todo:
                break
            requests, sampling = [], []
            for j, (r, k, _held) in enumerate(todo):
                s = seqs[r][k]
                requests.append(self._request(prompt_ids[r] + list(s.token_ids), images[r]))
                left = params.max_new_tokens - len(s.token_ids)
                seed = None if params.seed is None else params.seed + 7919 * (_round + 1) + j
                sampling.append(self._sampling(GenerationParams(
                    max_new_tokens=left, temperature=params.temperature, top_p=params.top_p,
                    stop=params.stop, stop_rule=params.stop_rule), 1, seed))
            for (r, k, held), out in zip(todo, self._generate(requests, sampling), strict=True):
                s, more = seqs[r][k], self._to_sequence(out.outputs[0])
                ids = list(s.token_ids) + list(more.token_ids)
                text = self.decode(ids)
                end = find_stop(text, params.stop, params.stop_rule)
                ended_at_once = more.finish_reason == "eos" and all(t in self.eos_ids for t in more.token_ids)
                if held is not None and end == held and not ended_at_once:
                    settled.add((r, k))  # "3." then no digit: the stop held
                    continue
                if more.finish_reason == "stop" and end is not None:
                    text = text[:end]
                seqs[r][k] = Sequence(text, ids, list(s.token_logprobs) + list(more.token_logprobs), more.finish_reason)
        for row in seqs:
            for k, s in enumerate(row):
                if s.finish_reason == "stop" and stop_in(s.token_ids) is None:  # a false stop at the cap
                    row[k] = Sequence(self.decode(list(s.token_ids)), s.token_ids, s.token_logprobs, "length")
        return seqs

    def sample(self, images, prompts, n: int = 1, params: GenerationParams | None = None):
        params = params or GenerationParams()
        return self._run([self._prompt_ids(p) for p in prompts], list(images), n, params)

    def score(self, images, prompts, continuations, add_eos: bool = False) -> list[list[float]]:
        conts = [c if isinstance(c, list) else backend_answer_ids(self, p, c)
                 for c, p in zip(continuations, prompts, strict=True)]
        if add_eos:
            conts = [[*c, self.eos_ids[0]] for c in conts]
        reqs = [self._request(self._prompt_ids(p) + c, im) for im, p, c in zip(images, prompts, conts, strict=True)]
        sp = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        results = []
        for out, c in zip(self._generate(reqs, sp), conts, strict=True):
            # prompt_logprobs follow the *expanded* prompt; the continuation is its tail.
            tail = out.prompt_logprobs[len(out.prompt_logprobs) - len(c) :] if c else []
            results.append([float(d[t].logprob) for d, t in zip(tail, c, strict=True)])
        return results

    def open_prefix(self, image: Image.Image, prompt: str) -> Prefix:
        key = hashlib.sha256(image.tobytes() + f"{image.mode}:{image.size}".encode()).hexdigest()
        ids = self._prompt_ids(prompt)
        return Prefix(backend_id=self.backend_id, prompt=prompt, image_key=key, state=(ids, image))

    def extend(self, prefix: Prefix, partials, n: int = 1, params: GenerationParams | None = None):
        params = params or GenerationParams()
        if prefix.backend_id != self.backend_id:
            raise ValueError("this prefix was opened by another backend")
        ids, image = prefix.state
        return self._run([ids + list(p) for p in partials], [image] * len(partials), n, params)

    def _group_search(self, ids: list[int], image: Image.Image, params: GenerationParams) -> list[Sequence]:
        """Greedy diverse group search, one beam per group (see module docstring)."""
        if not _greedy(params):
            raise ValueError("the vLLM backend runs diverse group search greedily only (temperature 0)")
        g_count = params.num_beam_groups
        toks: list[list[int]] = [[] for _ in range(g_count)]
        lps: list[list[float]] = [[] for _ in range(g_count)]
        done: dict[int, Sequence] = {}
        stops = StopCheck(tuple(params.stop), params.stop_rule, self.decode)
        # G + len(banned) candidates, so G remain after dropping image placeholders
        one = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=g_count + len(self.banned_ids))
        for _ in range(params.max_new_tokens):
            live = [g for g in range(g_count) if g not in done]
            if not live:
                break
            outs = self._generate([self._request(ids + toks[g], image) for g in live], one)
            picked: dict[int, int] = {}
            for g, out in zip(live, outs, strict=True):
                cands = out.outputs[0].logprobs[0]  # token id -> Logprob, top-G plus the greedy one
                penal = {t: lp.logprob - params.diversity_penalty * sum(p == t for p in picked.values())
                         for t, lp in cands.items() if t not in self.banned_ids}
                t = max(penal, key=penal.get)
                picked[g] = t
                toks[g].append(t)
                lps[g].append(float(cands[t].logprob))
                if t in self.eos_ids:
                    stops.ended(g)
                    done[g] = Sequence(self.decode(toks[g]), toks[g], lps[g], "eos")
                elif params.stop and (stopped := stops.check(g, toks[g], lps[g])) is not None:
                    done[g] = stopped
        return [done[g] if g in done else stops.at_end(g, toks[g], lps[g]) for g in range(g_count)]
