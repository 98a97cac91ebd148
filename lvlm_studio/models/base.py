"""The model protocol every method talks to, and the errors it raises.

A backend answers three questions:
  * ``sample``: generate ``n`` continuations per (image, prompt), with per-token log-probs;
  * ``score``: teacher-forced per-token log-probs of given continuations;
  * ``open_prefix`` / ``extend``: encode image + prompt once, then continue many partial answers
    (given as token ids, never re-tokenised text) from that cached prefix. The CSR search uses this.

Log-probs are always those of the model's own next-token distribution at temperature 1 (raw
logits, before temperature, top-p or a diversity penalty), so that ``sample`` and ``score`` agree
on the same text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


def system_prompt() -> str | None:
    """``LVLM_STUDIO_SYSTEM_PROMPT``: a system turn before every question, in generation, training
    and evaluation alike, as the model's chat template renders one. LLaVA-1.5 was fine-tuned with
    vicuna_v1's "A chat between a curious human and an artificial intelligence assistant. ..."
    before each conversation, and the CSR reference asks it so; llava-hf's template adds none
    unless given one. Unset or blank: no system turn."""
    text = os.environ.get("LVLM_STUDIO_SYSTEM_PROMPT", "").strip()
    if text:
        from lvlm_studio.io import refuse_image_token

        refuse_image_token(text, "LVLM_STUDIO_SYSTEM_PROMPT")  # every prompt would count a second image
    return text or None


def system_turn_rendered(processor: Any) -> bool | None:
    """Does the processor's chat template write the system turn (None: no system prompt set)? A
    template without a system branch (the demo model's) drops it without a word."""
    text = system_prompt()
    if text is None:
        return None
    return text in chat_prompt(processor, "x")


def chat_messages(prompt: str, image: bool = True) -> list[dict]:
    """One question as chat messages: the system turn when set (``system_prompt``), then the user
    turn, its image first."""
    user = {"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": prompt}]}
    system = system_prompt()
    return [{"role": "system", "content": [{"type": "text", "text": system}]}, user] if system else [user]


def chat_prompt(processor: Any, prompt: str) -> str:
    """One question's chat text as the model is asked it: ``chat_messages`` through the processor's
    template, the assistant turn opened."""
    return processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)


_ANSWER_MARK = "\u2063ANSWER\u2063"  # an answer text no template writes by itself


def answer_opening(processor: Any) -> str:
    """What the chat template writes between the opened assistant turn (``chat_prompt``) and an
    answer's text: " " for llava-hf's "ASSISTANT:" and SmolVLM's "Assistant:" (whose assistant
    turns render as "ASSISTANT: {answer}"), "" for Qwen's "assistant\n". A model asked with
    ``chat_prompt`` writes it before its answer. "" when the template renders no assistant turn
    around the opened one."""
    return answer_frame(processor)[0]


def answer_closing(processor: Any) -> str:
    """What ends an answer the model writes: the token the template writes after an assistant
    text to end the turn (Qwen's "<|im_end|>", SmolVLM's "<end_of_utterance>", the demo's "</s>"),
    without the whitespace around it, or the tokenizer's EOS where the template writes only
    whitespace there (llava-hf's LLaVA-1.5 template ends the turn with a bare " ", while the model
    was trained to stop with "</s>" and generation stops at it). "" when there is neither."""
    return answer_frame(processor)[1]


def answer_frame(processor: Any) -> tuple[str, str]:
    """(``answer_opening``, ``answer_closing``) from one rendering of the template."""
    around = _around_answer(processor)
    opening, closing = (around[0], around[1].strip()) if around else ("", "")
    return opening, closing or getattr(getattr(processor, "tokenizer", processor), "eos_token", None) or ""


def _around_answer(processor: Any) -> tuple[str, str] | None:
    """(opening, rest): what the chat template writes before and after an answer's text in the
    assistant turn that follows ``chat_prompt``; None when it renders no such turn."""
    msgs = chat_messages("x")
    try:
        opened = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(
            [*msgs, {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_MARK}]}], tokenize=False)
    except Exception:  # a template that refuses an assistant turn (a jinja error of any kind)
        return None
    if not full.startswith(opened) or _ANSWER_MARK not in full:
        return None
    at = full.index(_ANSWER_MARK)
    return full[len(opened) : at], full[at + len(_ANSWER_MARK) :]


def answer_token_ids(tokenize: Any, asked: str, opening: str, answer: str) -> list[int]:
    """The token ids of a text ``answer`` as the model would write them after the chat text
    ``asked`` (``chat_prompt``): ``asked + opening + answer`` tokenised together, less the ids of
    ``asked``. The first word then takes its in-context form: on a byte-level BPE vocabulary
    (SmolVLM's) "A" alone and " A" after "Assistant:" are different tokens, and a model scored on
    the first reads a word it never writes. The answer alone (with the opening) when the joint ids
    do not begin with the prompt's (a token across the boundary), or the stripped answer alone when
    that is shorter (a SentencePiece vocabulary writes " A" alone as "▁▁" "A", "A" as "▁A").
    ``tokenize``: text -> ids without special tokens added. An answer of nothing but whitespace
    has no tokens."""
    if not answer.strip():
        return []
    text = after_opening(opening, answer)
    head = tokenize(asked)
    joint = tokenize(asked + text)
    if joint[: len(head)] == head:
        return joint[len(head) :]
    with_opening, alone = tokenize(text), tokenize(answer.lstrip())
    return with_opening if len(with_opening) <= len(alone) else alone


def after_opening(opening: str, answer: str) -> str:
    """``answer`` behind the template's answer opening, its own leading whitespace dropped where the
    opening ends in whitespace (a stored answer may keep the space a decode left)."""
    return opening + (answer.lstrip() if opening[-1:].isspace() else answer)


def backend_answer_ids(backend: Any, prompt: str, answer: str) -> list[int]:
    """``answer_token_ids`` for a backend with ``processor`` and ``encode_text`` (HFBackend, vLLM):
    the ids its teacher-forced scoring of a text answer reads. The template's opening is read once
    per backend and template."""
    return answer_token_ids(backend.encode_text, chat_prompt(backend.processor, prompt), backend_answer_opening(backend),
                            answer)


def backend_answer_opening(backend: Any) -> str:
    """``answer_opening`` of ``backend.processor``, cached on the backend per chat template."""
    template = getattr(backend.processor, "chat_template", None)
    cached = getattr(backend, "_answer_opening", None)
    if cached is None or cached[0] != template:
        cached = backend._answer_opening = (template, answer_opening(backend.processor))
    return cached[1]


class ModelLoadError(RuntimeError):
    """A model reference that cannot be resolved or loaded (unknown id, offline, corrupt files)."""


def out_of_memory(exc: BaseException) -> str | None:
    """A one-line account when ``exc`` is the machine running out of memory (a size a user asked
    for: candidates, batch, items), else None. torch's CPU allocator raises a plain RuntimeError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    oom_types = tuple(t for t in (MemoryError, getattr(_torch_module(), "OutOfMemoryError", None)) if t)
    if isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text.lower())):
        return (f"out of memory: {text[:300]}. Ask for less at once (fewer candidates, a smaller batch "
                "or fewer items) or use a machine with more memory.")
    return None


def _torch_module():
    import sys

    return sys.modules.get("torch")  # only if already imported: an OOM from torch means it is


class MissingDependencyError(ImportError):
    """An optional backend whose package is not installed (e.g. vllm)."""


def check_temperature(value: float) -> None:
    """A method config's sampling temperature: 0 (greedy) or more, and finite (-1 sampled nothing
    and made no pair, silently)."""
    if not 0 <= value < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, not {value}")


STOP_RULES = ("any", "sentence")


def find_stop(text: str, stops: tuple[str, ...] | list[str], rule: str = "any") -> int | None:
    """Where ``text`` ends at its earliest stop: the index just past that stop string, or None.

    Under ``rule="sentence"`` an occurrence that ends in a period counts only where that period may
    end a sentence: not when a letter or digit follows it at once ("3.5", "e.g", "www.a.com", as
    ``segment_sentences`` reads them), nor where ``sentences.period_may_end_sentence`` says no
    whatever follows ("1." opening a line, "e.g.", "Mr.", an initial). A period at the very end of
    the text that the next character decides waits for it: ``stop_awaits_next_token``. HFBackend
    and vLLM's group search stop through this function; vLLM's sampling applies vLLM's own stop
    strings and, under "sentence", this function after them."""
    best = None
    for s in stops:
        i = text.find(s)
        while i >= 0 and (best is None or i + len(s) < best):
            end = i + len(s)
            if rule != "sentence" or not s.endswith(".") or (
                    not _glued(text, end) and _period_may_end_sentence(text[:end])):
                best = end
                break
            i = text.find(s, i + 1)
    return best


def _glued(text: str, end: int) -> bool:
    """Is a letter or digit written right after the period before ``end`` ("3.5", "e.g")?"""
    return end < len(text) and text[end].isalnum()


_LONE_E_OR_I = re.compile(r"(?:^|[^A-Za-z])[ei]$")  # "e." of "e.g.", "i." of "i.e."


def stop_awaits_next_token(text: str, end: int | None, rule: str = "any") -> bool:
    """Does the stop that ``find_stop`` found at ``end`` wait for the next token? Under the sentence
    rule, a period at the very end of the text right after a digit ("3." of "3.5") or a lone "e" or
    "i" ("e." of "e.g.") is decided by what follows: a letter or digit right after it means no stop
    there; anything else, or nothing (the end, the token cap), and the stop holds."""
    if not (rule == "sentence" and end is not None and end == len(text) and end >= 2 and text[end - 1] == "."):
        return False
    before = text[: end - 1]
    return before[-1].isdigit() or _LONE_E_OR_I.search(before) is not None


@dataclass
class StopCheck:
    """Where each row of a decode loop stops, by ``find_stop`` under ``rule``, holding back a stop
    that waits for the next token (``stop_awaits_next_token``). HFBackend's loop and vLLM's group
    search share it. ``check`` gives the row's finished ``Sequence`` once it stops (cut after the
    stop; the token after a held stop is dropped when the stop holds), None while it goes on."""

    stops: tuple[str, ...]
    rule: str
    decode: Any  # token ids -> text
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # row -> (tokens kept, text end)

    def waiting(self, row: int) -> bool:
        return row in self.held

    def check(self, row: int, ids: list[int], logprobs: list[float]) -> Sequence | None:
        text = self.decode(ids)
        end = find_stop(text, self.stops, self.rule)
        held = self.held.pop(row, None)
        if held is not None and end == held[1]:
            return self._stopped(text, end, ids, logprobs, held[0])  # "3." then no digit: the stop holds
        if end is None:
            return None
        if stop_awaits_next_token(text, end, self.rule):
            self.held[row] = (len(ids), end)
            return None
        return self._stopped(text, end, ids, logprobs, len(ids))

    def ended(self, row: int) -> None:
        """The row wrote its end-of-answer token: a stop it held ("... 3." then the end) no longer
        waits, the answer ended there."""
        self.held.pop(row, None)

    def at_end(self, row: int, ids: list[int], logprobs: list[float]) -> Sequence:
        """The row ran out of tokens: its ``Sequence``, stopped when a stop was still held, else cut
        by length."""
        held = self.held.pop(row, None)
        if held is None:
            return Sequence(self.decode(ids), ids, logprobs, "length")
        return self._stopped(self.decode(ids[: held[0]]), held[1], ids, logprobs, held[0])

    @staticmethod
    def _stopped(text: str, end: int, ids: list[int], logprobs: list[float], kept: int) -> Sequence:
        return Sequence(text[:end], ids[:kept], logprobs[:kept], "stop")


def _period_may_end_sentence(text: str) -> bool:
    # Pure text; imported here, not at the top: lvlm_studio.methods imports this module.
    from lvlm_studio.methods.sentences import period_may_end_sentence

    return period_may_end_sentence(text)


@dataclass
class GenerationParams:
    """Decoding parameters. temperature 0 means greedy.

    ``num_beam_groups`` > 1 with ``diversity_penalty`` > 0 is diverse (group) beam search with one
    beam per group, as the CSR reference code runs it (num_beams=5, num_beam_groups=5,
    diversity_penalty=3.0): group g picks its token after subtracting ``diversity_penalty`` times
    the number of earlier groups that picked that token at the same step (Hamming diversity).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Which occurrences of a stop string end the text: "any" (every one, as HF's and vLLM's stop
    # strings do) or "sentence" (a stop ending in "." counts only where that period may end a
    # sentence: not after "1." opening a line, "e.g.", "Mr.", an initial; see find_stop).
    stop_rule: str = "any"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beam_groups < 1:
            raise ValueError(f"max_new_tokens and num_beam_groups must be >= 1 (got {self.max_new_tokens}, "
                             f"{self.num_beam_groups}): an answer needs at least one token")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.diversity_penalty >= 0):
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and diversity_penalty >= 0")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, not {self.stop_rule!r}")
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, not {self.stop!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "num_beam_groups": self.num_beam_groups,
            "diversity_penalty": self.diversity_penalty,
            "stop": list(self.stop),
            "stop_rule": self.stop_rule,
            "seed": self.seed,
        }


@dataclass
class Sequence:
    """One generated continuation.

    ``token_ids``/``token_logprobs`` cover only the new tokens (the EOS token included when the
    model emitted it). ``finish_reason`` is "eos", "stop" (a stop string was produced; the text
    ends with it) or "length".
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str

    @property
    def finished(self) -> bool:
        return self.finish_reason == "eos"

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return float(sum(self.token_logprobs) / max(len(self.token_logprobs), 1))


@dataclass
class Prefix:
    """An encoded image + prompt, owned by the backend that made it (opaque to callers)."""

    backend_id: str
    prompt: str
    image_key: str
    state: Any = field(repr=False, default=None)


@runtime_checkable
class VLMBackend(Protocol):
    model_id: str

    def sample(
        self,
        images: list[Image.Image],
        prompts: list[str],
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[list[Sequence]]:
        """For each (image, user prompt) return ``n`` sequences. Prompts are plain user text;
        the backend applies the model's chat template and inserts the image token."""
        ...

    def score(
        self,
        images: list[Image.Image],
        prompts: list[str],
        continuations: list[str],
    ) -> list[list[float]]:
        """Teacher-forced per-token log-probs of each assistant continuation."""
        ...

    def open_prefix(self, image: Image.Image, prompt: str) -> Prefix:
        """Encode image + chat prompt once; later ``extend`` calls reuse it."""
        ...

    def extend(
        self,
        prefix: Prefix,
        partials: list[list[int]],
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[list[Sequence]]:
        """Continue each partial answer (token ids after the assistant turn start) ``n`` times."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Token ids of assistant text (no special tokens)."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        ...


@dataclass
class GenerationRecord:
    """Provenance written beside every generated candidate."""

    model: str
    round: int | None
    method: str
    params: dict[str, Any]
    seed: int | None
