"""Transformers backend for any `AutoModelForImageTextToText` + `AutoProcessor`.

The decode loop is our own (a step loop over the model's KV cache, not ``model.generate``) because
the methods need things ``generate`` does not give together:
  * per-token log-probs of the model's raw next-token distribution (temperature 1), whatever the
    decoding rule was, so that ``sample`` and ``score`` agree on the same text;
  * continuing many partial answers from one cached image + prompt prefix (``open_prefix`` /
    ``extend``: the image is encoded once per CSR search node, not once per expansion);
  * diverse group beam search with one beam per group, as the CSR reference runs it. transformers 5
    moved group beam search out of the library into a Hub "custom_generate" repository, which cannot
    be loaded offline, so it is implemented here (`_choose`).

Positions are tracked per row: text models use 1-D positions (cumsum of the attention mask, so left
padding is harmless); models with multimodal RoPE (Qwen2-VL family: the inner model has
``get_rope_index``) get their 3-D prefill positions from the image grid and continue every later text
token at ``max(prefill positions) + 1`` on all three axes, exactly as the model's own generation does
with ``rope_deltas``.

Continuations are batched as wide as memory allows: ``extend`` / ``extend_many`` decode up to
``max_rows`` rows at once, where the default caps the rows so that their KV cache fits a byte budget
(``kv_budget_bytes``; on a GPU a share of the memory free after loading, on CPU a fixed amount).
``extend_many`` stacks several items' prefix caches (left-padded to the longest) into one decode
loop, so a CSR depth over many items costs one step loop instead of one per item.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..config import QUANTIZATIONS, resolve_device
from .base import (
    GenerationParams,
    MissingDependencyError,
    ModelLoadError,
    Prefix,
    Sequence,
    StopCheck,
    after_opening,
    backend_answer_ids,
    backend_answer_opening,
    chat_prompt,
    system_turn_rendered,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_backend_counter = itertools.count()


def image_key(image: Image.Image) -> str:
    """sha256 of an image's pixels, mode and size (a cache key; not a file hash)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def cuda_has_native_bf16(device: str = "cuda") -> bool:
    """Whether the CUDA device computes bf16 natively (compute capability 8.0 on, Ampere and later).
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (a T4, a V100),
    where it runs far slower than float16."""
    if torch.version.hip:  # ROCm: torch's own answer
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that computes it natively, float16 on older GPUs, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, not {dtype!r}")
    return _DTYPES[dtype]


def cap_image_pixels(processor: Any, max_pixels: int | None = None) -> int | None:
    """Cap the pixels a Qwen2-VL-family image processor keeps of an image (its size's
    ``longest_edge`` is a pixel count there; ``temporal_patch_size`` and ``merge_size`` mark the
    family) at ``max_pixels``, default ``LVLM_STUDIO_MODEL_IMAGE_PIXELS``. Every loader of a model
    (generation, training, evaluation) applies it, so a round trains on the image tokens it
    generates with. Returns the cap applied, or None (no cap set, or not such a processor)."""
    from lvlm_studio.config import model_image_pixels

    cap = max_pixels if max_pixels is not None else model_image_pixels()
    image_processor = getattr(processor, "image_processor", None)
    if cap is None or not (hasattr(image_processor, "temporal_patch_size") and hasattr(image_processor, "merge_size")):
        return None
    size = image_processor.size
    longest, shortest = (size.get(k) if isinstance(size, dict) else getattr(size, k, None)
                         for k in ("longest_edge", "shortest_edge"))
    if not (longest and shortest):  # a family member that limits images otherwise (max_image_tokens)
        return None
    cap = min(cap, longest)
    image_processor.size = {"shortest_edge": min(shortest, cap), "longest_edge": cap}
    return cap


def prepare_processor(processor: Any, model_name: str) -> int | None:
    """What every generation backend does to a model's processor once loaded: the image cap
    (``cap_image_pixels``, returned) and a warning when the template would drop the system turn."""
    cap = cap_image_pixels(processor)
    if system_turn_rendered(processor) is False:
        warnings.warn(f"LVLM_STUDIO_SYSTEM_PROMPT is set, but the chat template of {model_name} writes no "
                      "system turn: the model is asked without it", stacklevel=3)
    return cap


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for "4bit" (QLoRA's NF4, computing in ``compute_dtype``)
    or "8bit". bitsandbytes >= 0.50 runs both on CPU too (tests/test_quantized.py); its CPU
    inference kernels need layer widths that are multiples of 64."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None, '4bit' or '8bit', not {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "quantization needs the 'bitsandbytes' package: pip install 'bitsandbytes>=0.50.2,<0.51'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def _cache_kwarg() -> str:
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes
    in 5.40); use whichever this install reads."""
    from transformers.utils import generic

    return "cache" if hasattr(getattr(generic, "ModelOutput", object), "_replace_old_cache_name") else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _out_cache(out: Any) -> Any:
    return out["cache"] if _CACHE_KWARG == "cache" else out.past_key_values


@dataclass
class _State:
    """A batch of rows in the middle of decoding: KV cache, 2-D attention mask over everything in
    the cache, each row's next position, and each row's logits for its next token."""

    cache: Any
    mask: torch.Tensor  # (B, L) long
    next_pos: torch.Tensor  # (B,) long
    last_logits: torch.Tensor  # (B, V) float32

    def repeat(self, k: int) -> _State:
        """Each row ``k`` times in a row (row r → rows r*k … r*k+k-1), on a copy of the cache."""
        out = _State(copy.deepcopy(self.cache), self.mask, self.next_pos, self.last_logits)
        out.repeat_(k)
        return out

    def repeat_(self, k: int) -> None:
        """``repeat`` in place (no copy of the cache first): for a state nobody else holds."""
        if k == 1:
            return
        idx = torch.arange(self.mask.shape[0], device=self.mask.device).repeat_interleave(k)
        if _plain_cache(self):  # index_select: several times faster than repeat_interleave on CPU
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
        else:
            self.cache.batch_repeat_interleave(k)
        self.mask = self.mask.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        self.last_logits = self.last_logits.index_select(0, idx)

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.next_pos = self.next_pos[keep]
        self.last_logits = self.last_logits[keep]


def _plain_cache(state: _State) -> bool:
    """True when every cache layer is a plain full-length `DynamicLayer` holding (B, H, L, D) tensors
    (not sliding-window, quantized, offloaded or linear-attention layers), so rows can be stacked."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(state.cache, "layers", None)
    return bool(layers) and all(
        type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4
        for layer in layers
    )


def _stack_states(states: list[_State], config) -> _State:
    """One batch from single-row prefix states (repeats allowed), each left-padded to the longest.

    The pads sit before a row's first real position and are masked out (mask 0), so no real token
    attends to them; positions are per row (``next_pos``) and were baked into the cached keys at
    prefill, so this holds for 1-D and M-RoPE models alike.
    """
    from transformers import DynamicCache

    width = max(s.mask.shape[1] for s in states)
    n_layers = len(states[0].cache.layers)
    if any(len(s.cache.layers) != n_layers for s in states):
        raise ValueError("prefix caches have different numbers of layers")

    def padded(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
        pad = width - t.shape[seq_dim]
        if not pad:
            return t
        shape = list(t.shape)
        shape[seq_dim] = pad
        return torch.cat([t.new_zeros(shape), t], dim=seq_dim)

    cache = DynamicCache(config=config)
    if len(cache.layers) != n_layers:
        raise ValueError(f"the model config gives {len(cache.layers)} cache layers, the prefix {n_layers}")
    for j, layer in enumerate(cache.layers):
        keys = torch.cat([padded(s.cache.layers[j].keys, -2) for s in states])
        values = torch.cat([padded(s.cache.layers[j].values, -2) for s in states])
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return _State(
        cache,
        torch.cat([padded(s.mask, 1) for s in states]),
        torch.cat([s.next_pos for s in states]),
        torch.cat([s.last_logits for s in states]),
    )


def eos_token_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer, once each: the generation config's EOS ids in its order
    (Qwen lists <|im_end|>, the end of an assistant turn, before <|endoftext|>), then the
    tokenizer's. The first is the one ``score(add_eos=True)`` appends."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_list = eos if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None:
        eos_list = [*eos_list, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(e) for e in eos_list if e is not None))


def banned_token_ids(config: Any, processor: Any, tokenizer: Any) -> list[int]:
    """Tokens a backend never *picks*: the image / video placeholders. A stray one in an answer
    breaks every later processor call on that text (token / feature count mismatch). Log-probs
    stay raw."""
    banned = {getattr(config, a, None) for a in ("image_token_id", "image_token_index", "video_token_id")}
    banned.add(tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", None) or "<image>"))
    return sorted(int(b) for b in banned if b is not None and b != tokenizer.unk_token_id and b >= 0)


class HFBackend:
    """`VLMBackend` over a transformers image-text-to-text model (LLaVA, Qwen2-VL, Idefics3, …)."""

    # Upper bound on decode rows per extend chunk (rows x vocabulary float32 logits stay small).
    MAX_ROWS_DEFAULT = 256
    # KV-cache budget for extend chunks: on CPU a fixed 2 GiB; on CUDA this share of the memory free
    # once the model is loaded (the rest: the prefixes held by the caller, the cache's growth by
    # concatenation, which briefly holds two copies of a layer, and activations).
    CPU_KV_BUDGET = 2 << 30
    CUDA_KV_SHARE = 0.3
    # _decode keeps finished rows in the batch (fed masked pads) until they are this share of it,
    # then drops them in one copy, instead of copying the whole cache each time one row finishes.
    COMPACT_SHARE = 0.25

    def __init__(
        self,
        model,
        processor,
        model_id: str,
        device: str = "cpu",
        max_batch: int = 16,
        max_rows: int | None = None,
        kv_budget_bytes: int | None = None,
    ):
        """``max_batch``: images per prefill (``sample``, ``score``). ``max_rows``: decode rows
        (partials x n) per ``extend``/``extend_many`` chunk; None = as many as fit
        ``kv_budget_bytes`` (None = the device default above), at most ``MAX_ROWS_DEFAULT``."""
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.device = torch.device(device)
        if max_batch < 1 or (max_rows is not None and max_rows < 1):
            raise ValueError(f"max_batch and max_rows must be >= 1, not {max_batch} and {max_rows}")
        self.max_batch = max_batch
        self.max_rows = max_rows
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else self._default_kv_budget()
        self.backend_id = f"hf:{model_id}:{next(_backend_counter)}"
        tok = getattr(processor, "tokenizer", processor)
        tok.padding_side = "left"  # batches are left-padded so every row's last token is real
        self.tokenizer = tok
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = eos_token_ids(getattr(model, "generation_config", None), tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.banned_ids = banned_token_ids(model.config, processor, tok)
        self._core = self._inner_model()
        self._mrope = hasattr(self._core, "get_rope_index")
        self._kv_bytes_per_token = self._kv_bytes()
        self._stop_cache: dict[tuple[str, ...], list[bool]] = {}  # _stop_candidates, per stop tuple

    def _default_kv_budget(self) -> int:
        if self.device.type == "cuda" and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * self.CUDA_KV_SHARE)
        return self.CPU_KV_BUDGET

    def _kv_bytes(self) -> int:
        """Bytes of K+V cache per token per row (all layers), from the text config; 0 if unknown."""
        try:
            cfg = self.model.config.get_text_config(decoder=True)
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            # quantized weights (int8/uint8) still keep the cache in the compute dtype, ~2 bytes
            item = self.dtype.itemsize if self.dtype.is_floating_point else 2
            return int(2 * cfg.num_hidden_layers * heads * head_dim * item)
        except (AttributeError, TypeError, ZeroDivisionError):
            return 0

    def _rows_per_chunk(self, tokens_per_row: int) -> int:
        """Decode rows that fit one chunk when each row ends up holding ``tokens_per_row`` tokens."""
        if self.max_rows is not None:
            return self.max_rows
        if self._kv_bytes_per_token <= 0:
            return self.max_batch
        fit = self.kv_budget_bytes // (self._kv_bytes_per_token * max(tokens_per_row, 1))
        return int(max(1, min(self.MAX_ROWS_DEFAULT, fit)))

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        device: str = "auto",
        dtype: str = "auto",
        adapter: str | list[str] | tuple[str, ...] | None = None,
        merge_adapter: bool = True,
        quantization: str | None = None,
        local_files_only: bool = False,
    ) -> HFBackend:
        """Load model + processor (+ an optional PEFT LoRA adapter, or a round's chain of them, oldest
        first, each trained on the ones before).

        The chain is merged into float32 weights and stacked beside bf16, fp16 or quantized ones
        (``models.lora.add_loras``: merged there, small updates would turn into rounding noise). ``merge_adapter=False``
        keeps one adapter as an unmerged ``PeftModel``. ``quantization`` "4bit"/"8bit" needs
        bitsandbytes (``quantization_config``).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype,
            "local_files_only": local_files_only,
            # transformers looks for an adapter_config.json on the Hub without honouring
            # local_files_only unless told here (otherwise ~20 s of retries offline).
            "adapter_kwargs": {"local_files_only": local_files_only},
        }
        if quantization is not None:
            kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
            kwargs["device_map"] = {"": device}
        # The processor first: it is small, and a missing file fails before gigabytes of weights load.
        processor = AutoProcessor.from_pretrained(path_or_id, local_files_only=local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, **kwargs)
        prepare_processor(processor, path_or_id)
        model_id = str(path_or_id)
        from .lora import as_chain

        chain = as_chain(adapter)
        if chain:
            from peft import PeftModel

            from .lora import add_loras

            if not merge_adapter and len(chain) > 1:
                raise ValueError("merge_adapter=False keeps one adapter unmerged; a chain is merged or stacked")
            try:
                model = add_loras(model, chain)[0] if merge_adapter else PeftModel.from_pretrained(model, chain[0])
            except Exception as exc:  # peft raises ValueError/OSError/KeyError depending on the fault
                raise ModelLoadError(
                    f"Could not load the LoRA adapter{'s' if len(chain) > 1 else ''} {', '.join(chain)} onto "
                    f"{path_or_id!r}: {exc}. Check that the adapter was trained on this base model."
                ) from exc
            model_id = "+".join([model_id, *chain])
        if quantization is None:
            model = model.to(device)
        return cls(model, processor, model_id, device)

    def _inner_model(self):
        m = self.model
        if hasattr(m, "get_base_model"):  # an unmerged PeftModel
            m = m.get_base_model()
        return getattr(m, "model", m)

    # --- text -------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat_text(self, prompt: str) -> str:
        """The system turn when set, the user turn (image first, then ``prompt``) and the assistant
        turn's opening."""
        return chat_prompt(self.processor, prompt)

    # --- model calls ------------------------------------------------------------------------
    def _inputs(self, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        bos = self.tokenizer.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_special = not (bos is not None and texts[0].startswith(bos))
        enc = self.processor(
            # One list per prompt: SmolVLM's processor reads a flat list as one prompt's images.
            images=[[im.convert("RGB")] for im in images],
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        )
        out = {}
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def _prefill_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        if self._mrope and inputs.get("mm_token_type_ids") is not None:
            fn = self._core.get_rope_index
            accepted = inspect.signature(fn).parameters
            kwargs = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
            positions, _ = fn(inputs["input_ids"], **kwargs)
            return positions  # (3, B, L)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions  # (B, L)

    @torch.no_grad()
    def _prefill(self, images: list[Image.Image], texts: list[str]) -> _State:
        from transformers import DynamicCache

        inputs = self._inputs(images, texts)
        positions = self._prefill_positions(inputs)
        cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, position_ids=positions, **{_CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        mask = inputs["attention_mask"].long()
        pos = positions if positions.dim() == 2 else positions.amax(0)
        next_pos = (pos * mask).amax(-1) + 1
        return _State(_out_cache(out), mask, next_pos, out.logits[:, -1].float())

    @torch.no_grad()
    def _step(self, state: _State, tokens: torch.Tensor, tok_mask: torch.Tensor, all_logits: bool = False):
        """Feed ``tokens`` (B, q) (pads where ``tok_mask`` is 0, anywhere) after each row's cache."""
        mask = torch.cat([state.mask, tok_mask], dim=1)
        pos = state.next_pos[:, None] + (tok_mask.cumsum(-1) - 1).clamp(min=0)
        if self._mrope:
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=pos,
            **{_CACHE_KWARG: state.cache},
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        state.cache = _out_cache(out)
        state.mask = mask
        state.next_pos = state.next_pos + tok_mask.sum(-1)
        state.last_logits = out.logits[:, -1].float()
        return out.logits

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    # --- decoding ---------------------------------------------------------------------------
    def _rows_per_input(self, n: int, params: GenerationParams) -> int:
        if params.num_beam_groups > 1:
            if n not in (1, params.num_beam_groups):
                raise ValueError(
                    f"diverse group search returns one sequence per group ({params.num_beam_groups}); "
                    f"n must be 1 or {params.num_beam_groups}, not {n}"
                )
            return params.num_beam_groups
        if n < 1:
            raise ValueError(f"n must be >= 1, not {n}")
        return n

    def _generator(self, params: GenerationParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(params.seed))
        return gen

    def _choose(self, logprobs: torch.Tensor, groups: torch.Tensor, requests: torch.Tensor, params, gen):
        """Pick one token per row. ``logprobs`` are the raw log-softmax; selection may differ.

        Diverse group search (one beam per group, CSR reference: 5 groups, penalty 3.0): groups are
        processed in order and group g's scores are lowered by ``diversity_penalty`` × the number of
        earlier groups of the same input that picked each token at this step (Hamming diversity,
        as transformers' HammingDiversityLogitsProcessor did).
        """
        scores = logprobs
        if self.banned_ids:
            scores = scores.clone()
            scores[:, self.banned_ids] = float("-inf")
        if params.num_beam_groups > 1 and params.diversity_penalty > 0:
            chosen = torch.empty(len(logprobs), dtype=torch.long, device=logprobs.device)
            # counts[r, t]: how many earlier groups of request r picked token t at this step
            _, req = torch.unique(requests, return_inverse=True)
            counts = torch.zeros((int(req.max()) + 1, scores.shape[-1]), device=scores.device)
            for g in range(params.num_beam_groups):
                rows = (groups == g).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                r = req[rows]
                picked = self._pick(scores[rows] - params.diversity_penalty * counts[r], params, gen)
                chosen[rows] = picked
                counts.index_put_((r, picked), torch.ones_like(picked, dtype=counts.dtype), accumulate=True)
            return chosen
        return self._pick(scores, params, gen)

    @staticmethod
    def _pick(scores: torch.Tensor, params: GenerationParams, gen) -> torch.Tensor:
        if params.temperature <= 0:
            return scores.argmax(-1)
        probs = torch.softmax(scores / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            # Drop a token when the tokens before it already cover top_p (the first always stays).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=gen).flatten()

    def _stop_candidates(self, stops: tuple[str, ...]) -> list[bool]:
        """Per vocabulary id: can this token complete a stop string? A new occurrence of a stop
        must end inside the newly decoded text, so the new token's own text holds the stop's last
        character; tokens that decode alone to nothing or to a partial character (U+FFFD, a byte
        piece) may complete one together with earlier bytes, so they count too. Only these tokens
        pay for a full decode of the row (``StopCheck``); cached per stop tuple."""
        if stops not in self._stop_cache:
            size = max(len(self.tokenizer), int(getattr(self.model.config.get_text_config(), "vocab_size", 0) or 0))
            last = {st[-1] for st in stops if st}
            texts = self.tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True)
            self._stop_cache[stops] = [(not t) or ("\ufffd" in t) or any(c in t for c in last) for t in texts]
        return self._stop_cache[stops]

    @torch.no_grad()
    def _decode(self, state: _State, k: int, params: GenerationParams, gen) -> list[list[Sequence]]:
        """Run the step loop on ``state``'s rows (request-major, ``k`` rows per request).

        A finished row stays in the batch (fed a masked pad; its logits are ignored and it takes no
        part in the choice) until finished rows reach ``COMPACT_SHARE`` of the batch: dropping rows
        copies the whole cache, so it is done once for many rows rather than once per row.
        """
        n_rows = state.mask.shape[0]
        requests = torch.arange(n_rows, device=self.device) // k
        groups = torch.arange(n_rows, device=self.device) % k
        present = list(range(n_rows))  # the original row held at each batch index of ``state``
        live = list(range(n_rows))  # batch indices of unfinished rows, ascending
        toks: list[list[int]] = [[] for _ in range(n_rows)]
        lps: list[list[float]] = [[] for _ in range(n_rows)]
        done: dict[int, Sequence] = {}
        eos = torch.tensor(self.eos_ids, device=self.device)
        may_stop = self._stop_candidates(tuple(params.stop)) if params.stop else None
        stops = StopCheck(tuple(params.stop), params.stop_rule, self.decode)
        for _step in range(params.max_new_tokens):
            all_live = len(live) == len(present)
            live_idx = None if all_live else torch.tensor(live, device=self.device)
            logits = state.last_logits if all_live else state.last_logits[live_idx]
            logprobs = torch.log_softmax(logits, dim=-1)
            rows = torch.tensor([present[b] for b in live], device=self.device)
            picked = self._choose(logprobs, groups[rows], requests[rows], params, gen)
            picked_lp = logprobs.gather(-1, picked[:, None]).flatten().tolist()
            is_eos = torch.isin(picked, eos).tolist()
            keep = []
            for j, (b, t) in enumerate(zip(live, picked.tolist(), strict=True)):
                row = present[b]
                toks[row].append(t)
                lps[row].append(picked_lp[j])
                if is_eos[j]:
                    stops.ended(row)
                    done[row] = Sequence(self.decode(toks[row]), toks[row], lps[row], "eos")
                    continue
                if may_stop is not None and (stops.waiting(row) or t >= len(may_stop) or may_stop[t]):
                    # Only tokens that may complete a stop pay for a decode of the row, and a row
                    # whose stop waits for this token (the "5" of "3.5").
                    stopped = stops.check(row, toks[row], lps[row])
                    if stopped is not None:
                        done[row] = stopped
                        continue
                keep.append(j)
            if not keep:
                live = []
                break
            if _step + 1 >= params.max_new_tokens:
                live = [live[j] for j in keep]
                break
            live = [live[j] for j in keep]
            picked = picked[keep] if len(keep) < len(picked) else picked
            if len(present) - len(live) >= self.COMPACT_SHARE * len(present):
                state.select(torch.tensor(live, device=self.device))
                present = [present[b] for b in live]
                live = list(range(len(present)))
            if len(live) == len(present):
                self._step(state, picked[:, None], torch.ones_like(picked)[:, None])
            else:
                idx = torch.tensor(live, device=self.device)
                tokens = torch.full((len(present), 1), self.pad_id, dtype=torch.long, device=self.device)
                tmask = torch.zeros((len(present), 1), dtype=torch.long, device=self.device)
                tokens[idx, 0] = picked
                tmask[idx, 0] = 1
                self._step(state, tokens, tmask)
        for b in live:
            row = present[b]
            done[row] = stops.at_end(row, toks[row], lps[row])
        return [[done[r * k + j] for j in range(k)] for r in range(n_rows // k)]

    # --- protocol ---------------------------------------------------------------------------
    def sample(
        self,
        images: list[Image.Image],
        prompts: list[str],
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[list[Sequence]]:
        params = params or GenerationParams()
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        k = self._rows_per_input(n, params)
        gen = self._generator(params)
        results: list[list[Sequence]] = []
        step = max(1, self.max_batch // k)
        for start in range(0, len(prompts), step):
            ims, prs = images[start : start + step], prompts[start : start + step]
            state = self._prefill(ims, [self.chat_text(p) for p in prs])
            results.extend(self._decode(state.repeat(k), k, params, gen))
        return results

    @torch.no_grad()
    def score(
        self,
        images: list[Image.Image],
        prompts: list[str],
        continuations: list[str] | list[list[int]],
        add_eos: bool = False,
    ) -> list[list[float]]:
        """Teacher-forced per-token log-probs of each continuation (token ids as given, or text,
        tokenised as the model writes it after the prompt: ``base.answer_token_ids``).

        ``add_eos`` appends the model's EOS token and scores it too.
        """
        return self._teacher_forced(images, prompts, continuations, add_eos, argmax=False)

    def argmax_tokens(self, images: list[Image.Image], prompts: list[str],
                      continuations: list[str] | list[list[int]]) -> list[list[int]]:
        """Per position of each teacher-forced continuation, the model's most likely token there
        (what it would have said at each step given the true prefix; POVID's reference variant)."""
        return self._teacher_forced(images, prompts, continuations, False, argmax=True)

    @torch.no_grad()
    def _teacher_forced(self, images, prompts, continuations, add_eos: bool, argmax: bool) -> list[list]:
        if not (len(images) == len(prompts) == len(continuations)):
            raise ValueError("images, prompts and continuations must have the same length")
        results: list[list] = []
        for start in range(0, len(prompts), self.max_batch):
            sl = slice(start, start + self.max_batch)
            conts = [c if isinstance(c, list) else backend_answer_ids(self, p, c)
                     for c, p in zip(continuations[sl], prompts[sl], strict=True)]
            if add_eos:
                conts = [[*c, self.eos_ids[0]] for c in conts]
            state = self._prefill(images[sl], [self.chat_text(p) for p in prompts[sl]])
            first = state.last_logits
            if max(len(c) for c in conts) == 0:
                results.extend([] for _ in conts)
                continue
            ids, tmask = self._pad(conts, left=False)
            logits = self._step(state, ids, tmask, all_logits=True)
            for b, c in enumerate(conts):
                if not c:
                    results.append([])
                    continue
                rows = torch.cat([first[b : b + 1], logits[b, : len(c) - 1].float()], dim=0)
                if argmax:
                    if self.banned_ids:  # never an image placeholder, as in decoding
                        rows[:, self.banned_ids] = float("-inf")
                    results.append(rows.argmax(-1).tolist())
                    continue
                lp = torch.log_softmax(rows, dim=-1).gather(-1, ids[b, : len(c), None]).flatten()
                results.append(lp.tolist())
        return results

    def open_prefix(self, image: Image.Image, prompt: str) -> Prefix:
        state = self._prefill([image], [self.chat_text(prompt)])
        return Prefix(backend_id=self.backend_id, prompt=prompt, image_key=image_key(image), state=state)

    def extend(
        self,
        prefix: Prefix,
        partials: list[list[int]],
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[list[Sequence]]:
        """Continue each partial answer from a copy of the cached prefix.

        Only the partial tokens are prefilled (left-padded within their own segment, so pads sit
        between the prefix and each partial, masked out); the image is never re-encoded.
        """
        params = params or GenerationParams()
        if prefix.backend_id != self.backend_id:
            raise ValueError("this prefix was opened by another backend")
        if not partials:
            return []
        k = self._rows_per_input(n, params)
        gen = self._generator(params)
        base: _State = prefix.state
        chunks = self._chunks([list(p) for p in partials], base.mask.shape[1], k, params)
        results: list[list[Sequence]] = []
        for chunk in chunks:
            state = base.repeat(len(chunk))
            results.extend(self._continue(state, chunk, k, params, gen))
        return results

    def extend_many(
        self,
        prefixes: list[Prefix],
        partials_per_prefix: list[list[list[int]]],
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[list[list[Sequence]]]:
        """``extend`` for several prefixes (e.g. different images/prompts) in shared decode loops.

        Result ``[i][j]`` is what ``extend(prefixes[i], partials_per_prefix[i], n, params)[j]`` gives:
        the prefix caches are stacked (left-padded to the longest, pads masked) and all partials of
        all prefixes are decoded together, in chunks of at most the row limit. Greedy and diverse
        group decoding give the same tokens (log-probs up to float rounding) as per-prefix calls;
        seeded sampling draws from one stream over all rows, so its samples differ from per-prefix
        calls. Caches that cannot be stacked (sliding-window, quantized, offloaded layers) fall back
        to one ``extend`` per prefix.
        """
        params = params or GenerationParams()
        if len(prefixes) != len(partials_per_prefix):
            raise ValueError(f"{len(prefixes)} prefixes but {len(partials_per_prefix)} partial lists")
        for p in prefixes:
            if p.backend_id != self.backend_id:
                raise ValueError("this prefix was opened by another backend")
        if len(prefixes) <= 1 or not all(_plain_cache(p.state) for p in prefixes):
            return [self.extend(p, ps, n, params) for p, ps in zip(prefixes, partials_per_prefix, strict=True)]
        k = self._rows_per_input(n, params)
        gen = self._generator(params)
        owners = [i for i, ps in enumerate(partials_per_prefix) for _ in ps]
        flat = [list(p) for ps in partials_per_prefix for p in ps]
        width = max(p.state.mask.shape[1] for p in prefixes)
        flat_out: list[list[Sequence]] = []
        pos = 0
        for chunk in self._chunks(flat, width, k, params):
            states = [prefixes[owners[pos + j]].state for j in range(len(chunk))]
            pos += len(chunk)
            flat_out.extend(self._continue(_stack_states(states, self.model.config), chunk, k, params, gen))
        out, pos = [], 0
        for ps in partials_per_prefix:
            out.append(flat_out[pos : pos + len(ps)])
            pos += len(ps)
        return out

    def _chunks(self, partials: list[list[int]], prefix_len: int, k: int, params) -> list[list[list[int]]]:
        """Split partials so a chunk's rows (partials x k) fit the row limit at their final length."""
        tokens = prefix_len + max((len(p) for p in partials), default=0) + params.max_new_tokens
        step = max(1, self._rows_per_chunk(tokens) // k)
        return [partials[i : i + step] for i in range(0, len(partials), step)]

    def _continue(self, state: _State, chunk: list[list[int]], k: int, params, gen) -> list[list[Sequence]]:
        """Prefill each row's partial after its prefix (``state`` has one row per partial), decode."""
        if max(len(p) for p in chunk) > 0:
            base_logits = state.last_logits
            ids, tmask = self._pad(chunk, left=True)
            self._step(state, ids, tmask)
            empty = torch.tensor([len(p) == 0 for p in chunk], device=self.device)
            # A row with no partial tokens continues straight from the prefix's own logits.
            state.last_logits = torch.where(empty[:, None], base_logits, state.last_logits)
        state.repeat_(k)
        return self._decode(state, k, params, gen)

    def sample_from_text(
        self,
        image: Image.Image,
        prompt: str,
        partial_text: str,
        n: int = 1,
        params: GenerationParams | None = None,
    ) -> list[Sequence]:
        """The slow reference path (as the CSR reference code runs): every call re-encodes the
        image and re-prefills the whole chat prompt + partial answer text, batch 1. With diverse
        groups, one call yields all groups (as one ``generate`` call with num_beams did); with
        sampling, each of the ``n`` sequences is its own call."""
        params = params or GenerationParams()
        k = self._rows_per_input(n, params)
        gen = self._generator(params)
        text = self.chat_text(prompt)
        if partial_text:
            # decode() drops the leading space of the first answer word ("ASSISTANT: There" decodes
            # the answer as "There"): the template's own answer opening puts it back, as it does for
            # a scored text answer (base.answer_token_ids).
            text += after_opening(backend_answer_opening(self), partial_text)
        if params.num_beam_groups > 1:
            return self._decode(self._prefill([image], [text]).repeat(k), k, params, gen)[0]
        return [self._decode(self._prefill([image], [text]), 1, params, gen)[0][0] for _ in range(k)]
