"""How much of a parent round's update survives in bf16: merged into the weights vs stacked beside them.

One ``--width``-wide linear layer with weights ~ N(0, 0.02) (a 7B's typical scale) in bfloat16, and
a random rank-``--rank`` PEFT LoRA adapter rescaled so its update ΔW has the given mean size
(``--sizes``; lr 1e-7 on a 7B moves a weight by ~1e-6, bf16's resolution there is ~1e-4). For each
size, the layer's output moves from the bf16 base's by d; the figure is ‖d − ΔW·x‖ / ‖ΔW·x‖ over
random inputs x (0 = the update exactly; 1 = the update lost; above 1 = noise larger than it):
  * merged: ``models.lora.merge_loras`` (PEFT merges ΔW into the bf16 weights),
  * stacked: ``models.lora.stack_loras`` (the weights stay; the layer adds x·Aᵀ·Bᵀ in bf16, as PEFT
    computes an unmerged adapter).

Usage: python benchmarks/lineage_precision.py [--width 2048] [--rank 8] [--sizes 1e-6 3e-6 2e-5 2e-4] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lvlm_studio.models.lora import merge_loras, stack_loras  # noqa: E402


class OneLayer(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.proj(x)


def layer_errors(width: int, size: float, rank: int = 8, seed: int = 0, n_inputs: int = 64) -> dict[str, float]:
    """{"merged": error, "stacked": error} for one layer and an update of mean size ``size``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    layer = OneLayer(width)
    torch.nn.init.normal_(layer.proj.weight, std=0.02)
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    peft = get_peft_model(layer, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"],
                                            init_lora_weights=False))
    lora = peft.base_model.model.proj
    with torch.no_grad():
        a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        b.mul_(size / (2 * b @ a).abs().mean())
        update = 2 * b @ a  # scaling α/r = 2
    x = torch.randn(n_inputs, width)
    exact = x @ update.T

    def bf16_layer() -> OneLayer:
        fresh = OneLayer(width)
        fresh.load_state_dict(weights)
        return fresh.to(torch.bfloat16)

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        peft.save_pretrained(folder)
        base = bf16_layer()(x.bfloat16()).float()
        stacked = bf16_layer()
        stack_loras(stacked, [folder])
        layers = {"merged": merge_loras(bf16_layer(), [folder]), "stacked": stacked}
        return {name: float(((model(x.bfloat16()).float() - base) - exact).norm() / exact.norm())
                for name, model in layers.items()}


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e-6, 3e-6, 2e-5, 2e-4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"bf16 layer {args.width}x{args.width}, LoRA rank {args.rank}: error of the output's move "
          "against the exact update (0 exact, 1 lost, >1 noise)")
    print(f"{'mean |dW|':>10} {'merged':>8} {'stacked':>8}")
    results = {}
    for size in args.sizes:
        results[size] = layer_errors(args.width, size, args.rank, args.seed)
        print(f"{size:>10.1e} {results[size]['merged']:>8.2f} {results[size]['stacked']:>8.2f}")
    return results


if __name__ == "__main__":
    main()
