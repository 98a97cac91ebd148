"""QLoRA on CPU: DPO rounds on a 4-bit (NF4) and an 8-bit base through the same train_round, and
generation from a 4-bit base with a round's adapter (bitsandbytes >= 0.50 has CPU kernels).

The tiny LLaVA here is 64 wide, not the usual 32: bitsandbytes' CPU inference kernels pack 4-bit
weights in blocks of 64 input features."""

from __future__ import annotations

import pytest
import torch
from test_training import _mean_margin, _pairs

from lvlm_studio.models.base import GenerationParams, MissingDependencyError
from lvlm_studio.models.hf import HFBackend, quantization_config
from lvlm_studio.models.lora import stack_loras
from lvlm_studio.models.tiny import TinyLlavaSpec, build_tiny_llava
from lvlm_studio.training import (
    DPORoundConfig,
    adapter_chain,
    load_base_model,
    merge_chain,
    train_round,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> str:
    spec = TinyLlavaSpec(vision_width=64, text_width=64, text_intermediate=128)
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny64") / "llava", spec=spec))


def _config(quantization: str, **kw) -> DPORoundConfig:
    settings = {"learning_rate": 5e-3, "num_epochs": 3, "batch_size": 4, "max_length": None, "sft_weight": 0.0,
                "beta": 0.1, "quantization": quantization, "device": "cpu"}
    return DPORoundConfig(**{**settings, **kw})


def _linear_kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


def test_qlora_rounds_on_a_4bit_base_train_chain_and_generate(tiny64, tmp_path):
    pairs = _pairs()
    base_q, processor = load_base_model(tiny64, "cpu", quantization="4bit")
    assert "Linear4bit" in _linear_kinds(base_q)
    assert base_q.get_memory_footprint() < load_base_model(tiny64)[0].get_memory_footprint()
    del base_q

    r1 = train_round(pairs, tiny64, None, tmp_path / "r1", _config("4bit"))
    steps = [c for c in r1.curve if "loss" in c]
    assert r1.steps == 12 and steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0.05
    assert r1.lineage["hardware"] == {"device": "cpu", "dtype": "float32", "adapter_dtype": "float32", "quantization": "4bit",
                                      "gradient_checkpointing": False}
    # TRL casts a quantized model's LoRA factors to bf16; the round trains (and saves) them in float32,
    # where an update the size of a low lr is not rounded away.
    from safetensors.torch import load_file

    saved = load_file(f"{r1.adapter_path}/adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    # The adapter trained on the 4-bit base also moves the full-precision base the right way.
    base, _ = load_base_model(tiny64)
    before = _mean_margin(base, processor, pairs)
    assert _mean_margin(merge_chain(base, [r1.adapter_path]), processor, pairs) > before + 1.0

    # Round 2 starts from round 1 stacked on the 4-bit base (parent_lineage "auto": merging would
    # re-quantize round 1's update into the 4-bit weights), which is also its reference: its first
    # step (one batch = all pairs) sees round 1's chosen-minus-rejected margin, not the base's.
    r2 = train_round(pairs, tiny64, [r1.adapter_path], tmp_path / "r2", _config("4bit", num_epochs=1, batch_size=16))
    first = next(c for c in r2.curve if "loss" in c)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert r2.lineage["parent_lineage"] == "stacked"
    base_q, _ = load_base_model(tiny64, "cpu", quantization="4bit")
    base_margin = _mean_margin(base_q, processor, pairs)
    stack_loras(base_q, [r1.adapter_path])
    stacked_margin = _mean_margin(base_q, processor, pairs)
    assert stacked_margin > base_margin + 1.0
    assert first["logps/chosen"] - first["logps/rejected"] == pytest.approx(stacked_margin, abs=0.01)
    assert adapter_chain(r2.adapter_path) == [r1.adapter_path, r2.adapter_path]
    assert r2.lineage["hardware"]["quantization"] == "4bit"

    # Generation (the service's backend) from the 4-bit base with round 1's adapter.
    backend = HFBackend.from_pretrained(tiny64, device="cpu", quantization="4bit", adapter=r1.adapter_path)
    assert "Linear4bit" in _linear_kinds(backend.model)
    out = backend.sample([pairs[0]["image"]], ["Describe the image."], 2,
                         GenerationParams(max_new_tokens=5, temperature=0.0))
    assert len(out[0]) == 2 and out[0][0].token_ids == out[0][1].token_ids and len(out[0][0].token_ids) > 0


def test_an_8bit_round_trains(tiny64, tmp_path):
    r = train_round(_pairs(8), tiny64, None, tmp_path / "r8", _config("8bit", num_epochs=2))
    assert r.steps == 4 and r.adapter_path is not None
    assert r.lineage["hardware"]["quantization"] == "8bit"
    assert [c for c in r.curve if "loss" in c][-1]["rewards/margins"] > 0.0


def test_quantization_config_and_the_missing_package(monkeypatch):
    four = quantization_config("4bit", torch.bfloat16)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantization_config("8bit", torch.float32)
    assert eight.load_in_8bit and not eight.load_in_4bit
    with pytest.raises(ValueError, match="not '2bit'"):
        quantization_config("2bit", torch.float32)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="needs the 'bitsandbytes' package"):
        quantization_config("4bit", torch.float32)
    with pytest.raises(ValueError):
        DPORoundConfig(quantization="3bit")


def test_a_qlora_round_job_trains_evaluates_and_becomes_current(tiny64, tmp_path, monkeypatch):
    """The round subprocess with quantization="4bit": it trains, evaluates the 4-bit model it just
    trained, records the hardware, and its adapter becomes current."""
    from test_jobs import FAST, _populate

    from lvlm_studio import jobs
    from lvlm_studio.config import Settings
    from lvlm_studio.store import Store

    monkeypatch.setenv("LVLM_STUDIO_THREADS", "1")
    settings = Settings(home=tmp_path / "home", model=tiny64, device="cpu").ensure_dirs()
    populated = _populate(settings)
    round_id = jobs.start_round(settings, {**FAST, "quantization": "4bit"})
    row = jobs.wait(round_id, timeout=240, settings=settings)
    assert row["status"] == "done", row.get("error")
    metrics = row["metrics"]
    assert metrics["hardware"]["quantization"] == "4bit" and metrics["n_pairs"] == populated["n_pairs"]
    assert metrics["eval"]["n_items"] == populated["n_eval"]
    store = Store.open(settings)
    try:
        assert store.current_round()["id"] == round_id
        assert len(store.eval_outputs(round_id)) == populated["n_eval"]
    finally:
        store.close()


def test_importing_peft_prints_no_kernel_download_warning():
    """bitsandbytes' CPU backend warns on stderr that it could not fetch a Hub kernel whenever peft
    is imported (every CLI command that loads a model); the package quiets those loggers."""
    import os
    import subprocess
    import sys

    for offline in ("1", ""):  # CI runs offline (HF_HUB_OFFLINE=1): a second line comes from `kernels`
        env = {**os.environ, "HF_HUB_OFFLINE": offline}
        proc = subprocess.run([sys.executable, "-c", "import lvlm_studio.training, peft, bitsandbytes"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "kernels-community" not in proc.stderr and "gemm_4bit" not in proc.stderr, (offline, proc.stderr)


def test_the_checkpointing_rename_warnings_of_trl_and_peft_are_not_printed():
    """transformers 5 warns when TRL/PEFT use the old gradient-checkpointing names; the package
    filters exactly those two messages (other FutureWarnings still show)."""
    import subprocess
    import sys

    code = ("import warnings, lvlm_studio\n"
            "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
            "warnings.warn('`gradient_checkpointing_enable` is deprecated and will be removed in v6.', FutureWarning)\n"
            "warnings.warn('`other_thing` is deprecated', FutureWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "checkpointing" not in proc.stderr and "`other_thing` is deprecated" in proc.stderr, proc.stderr
