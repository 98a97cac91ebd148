"""LoRA adapters as low-rank factors: read a PEFT adapter folder, and stack a chain of adapters on a
model without merging them.

Merging an adapter adds its update ΔW = s·B·A into the weights, which is exact in float32 but rounds
the update to the weights' resolution in bfloat16 (8 bits of a weight) or 4/8-bit weights: an update
far below it turns into rounding noise, larger than the update itself
(``training.merge_rounding_error``, ``benchmarks/lineage_precision.py``). Stacking keeps the weights
as they are and adds the chain's update to each adapted layer's output instead (x·Wᵀ + x·Aᵀ·Bᵀ, the
form PEFT computes an unmerged adapter in, and the one each round trained in), so no rounding noise
is added; what stays lost in bf16 is the part of the update below the bf16 output's own resolution.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
# torch is imported where it is used: vllm_backend reads ranks here, and importing it must stay light.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's saved keys: "base_model.model.<module path>.lora_A.weight" (and lora_B).
_KEY_PREFIX = "base_model.model."
# adapter_config.json options whose update is not s·B·A on a plain linear layer's output (PEFT 0.21's
# LoraConfig; initialisation methods such as PiSSA, EVA or CorDA still train a plain B·A).
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "lora_bias",
                "layer_replication", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
                "use_qalora", "use_bdlora", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
                "megatron_config")
# Buffer names on a stacked layer (not saved with the model: persistent=False).
STACKED_A, STACKED_B = "stacked_lora_A", "stacked_lora_B"


def as_chain(adapters: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    """One adapter folder, a chain of them (oldest first) or None, as a list of folder names."""
    if adapters is None:
        return []
    if isinstance(adapters, str | os.PathLike):
        return [str(adapters)]
    return [str(a) for a in adapters]


def lora_rank(adapter_dir: str | os.PathLike) -> int:
    """The adapter's LoRA rank r, from its adapter_config.json."""
    return int(json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["r"])


def read_lora(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], float]:
    """(adapter_config, weights, scaling) of a plain-LoRA PEFT adapter folder; scaling is PEFT's
    α/r (α/√r with rsLoRA). Anything else (DoRA, per-module ranks, extra trained modules, LoRA
    biases) is refused: its update is not the one this module computes."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter directory {str(adapter_dir)!r} is missing or holds no "
                                f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    unsupported = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"LoRA adapter {str(adapter_dir)!r} is not plain LoRA "
                         f"({', '.join(unsupported) or config.get('peft_type')})")
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    for key in weights:
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise ValueError(f"LoRA adapter {str(adapter_dir)!r}: unexpected tensor {key!r}")
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    return config, weights, scaling


def lora_factors(adapter_dirs: Sequence[str | os.PathLike]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module path, float32 factors (A, B) of the chain's summed update: A = [s1·A1; s2·A2; …],
    B = [B1, B2, …], so B·A = Σ sᵢ·Bᵢ·Aᵢ. The adapters may adapt different modules."""
    import torch

    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter_dir in adapter_dirs:
        _, weights, scaling = read_lora(adapter_dir)
        for key, a in weights.items():
            if not key.endswith(".lora_A.weight"):
                continue
            stem = key[: -len(".lora_A.weight")]
            b = weights.get(f"{stem}.lora_B.weight")
            if b is None:
                raise ValueError(f"LoRA adapter {str(adapter_dir)!r}: {key!r} has no lora_B")
            path = stem[len(_KEY_PREFIX):] if stem.startswith(_KEY_PREFIX) else stem
            parts.setdefault(path, []).append((scaling * a.float(), b.float()))
    return {path: (torch.cat([a for a, _ in ab], dim=0), torch.cat([b for _, b in ab], dim=1))
            for path, ab in parts.items()}


def _add_stacked_update(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    a, b = getattr(module, STACKED_A).to(x.dtype), getattr(module, STACKED_B).to(x.dtype)
    return output + ((x @ a.mT) @ b.mT).to(output.dtype)


def stack_loras(model: torch.nn.Module, adapter_dirs: Sequence[str | os.PathLike]) -> int:
    """Add the chain's update to ``model`` without merging it: each adapted layer keeps its weights
    and gets the chain's factors as buffers (in the weights' dtype, float32 beside quantized ones;
    they follow ``.to(device)`` and are not saved) and a forward hook adding x·Aᵀ·Bᵀ to its output,
    computed in the input's dtype (PEFT computes an unmerged adapter in float32 and rounds the sum
    once; here bf16 rounds the update too, by about 2^-8 of itself, below the bf16 output's own
    resolution, and the factors take half the memory). A PEFT adapter trained on top
    wraps these layers and calls them, so its "adapter disabled" model (TRL's reference) is base +
    chain. Returns the number of layers stacked."""
    import torch

    factors = lora_factors(adapter_dirs)
    modules = dict(model.named_modules())
    for path, (a, b) in factors.items():
        module = modules.get(path)
        if module is None:
            raise ValueError(f"the LoRA chain adapts {path!r}, which this model does not have: an adapter for "
                             "another base model, or one saved under other module names (an older transformers "
                             "version; load it with PEFT and save it again)")
        if hasattr(module, STACKED_A):
            raise ValueError(f"{path!r} already holds a stacked LoRA chain")
        weight = getattr(module, "weight", None)
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if weight is None or (in_features, out_features) != (a.shape[1], b.shape[0]):
            raise ValueError(f"the LoRA chain's update for {path!r} is {b.shape[0]}×{a.shape[1]}, "
                             f"the layer is {out_features}×{in_features}")
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        module.register_buffer(STACKED_A, a.to(weight.device, dtype), persistent=False)
        module.register_buffer(STACKED_B, b.to(weight.device, dtype), persistent=False)
        module.register_forward_hook(_add_stacked_update, with_kwargs=True)
    return len(factors)


def merge_loras(model: torch.nn.Module, adapter_dirs: Sequence[str | os.PathLike], on_each=None) -> torch.nn.Module:
    """Merge each adapter of the chain into ``model`` in order (each was trained on the previous
    ones, so sequential merging rebuilds that round's model); exact in float32. ``on_each(peft_model)``
    is called with each adapter loaded, before its merge."""
    from peft import PeftModel

    for adapter in adapter_dirs:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory {str(adapter)!r} is missing")
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        if on_each is not None:
            on_each(peft_model)
        model = peft_model.merge_and_unload()
    return model


def merges_exactly(model: torch.nn.Module) -> bool:
    """Whether merging an adapter into ``model``'s linear layers keeps its update: every one holds
    float32 weights (bf16 keeps 8 bits of a weight; 4/8-bit weights, which bitsandbytes' layers
    hold as integers, are re-quantized)."""
    import torch

    return all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.Linear))


def add_loras(model: torch.nn.Module, adapter_dirs: Sequence[str | os.PathLike]) -> tuple[torch.nn.Module, str]:
    """``model`` with the chain added the way its weights keep it: merged into float32 weights
    (exact), stacked beside bf16, fp16 or quantized ones. Returns (model, "merged" | "stacked")."""
    if merges_exactly(model):
        return merge_loras(model, adapter_dirs), "merged"
    stack_loras(model, adapter_dirs)
    return model, "stacked"
