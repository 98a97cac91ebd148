"""The benchmark scripts run end to end on tiny locally built models and report well-formed figures.

The models are random (a tiny LLaVA from `build_tiny_llava`, a tiny open_clip CLIP), so the figures
themselves mean nothing here; what is checked is that each ``main()`` runs with tiny arguments,
returns the record it prints as its last line, and that the figures are consistent (counts add
up, shares are fractions, the engine really uses its caches).
"""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import safetensors.torch
import torch

from benchmarks import csr_search, pair_quality
from lvlm_studio.models.registry import clear_cache
from lvlm_studio.models.tiny import build_tiny_llava

CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    vlm = build_tiny_llava(root / "vlm")
    torch.manual_seed(0)
    clip = root / "clip"
    clip.mkdir()
    safetensors.torch.save_file(open_clip.model.CLIP(**CLIP_CFG).state_dict(), clip / "open_clip_model.safetensors")
    (clip / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    yield str(vlm), str(clip)
    clear_cache()


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_csr_search_benchmark(models, home, capsys):
    vlm, clip = models
    n = 2
    record = csr_search.main(["--n", str(n), "--model", vlm, "--clip", clip, "--threads", "1",
                              "--max-new-tokens", "5", "--max-sentences", "2"])
    out = capsys.readouterr().out
    assert last_json(out)["speed_ratio"] == pytest.approx(record["speed_ratio"])
    assert "speed ratio reference/engine" in out and "tokens/s" in out
    ref, eng = record["reference"], record["engine"]
    for s in (ref, eng):
        assert s["seconds"] > 0 and s["tokens"] > 0
        assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["seconds"])
        assert s["candidates"] >= s["pairs"] >= 0
    assert record["speed_ratio"] == pytest.approx(ref["seconds"] / eng["seconds"])
    assert math.isfinite(record["speed_ratio"]) and record["meets_goal"] == (record["speed_ratio"] >= 5.0)
    # The engine opens one prefix per item and encodes each image once for CLIP; the reference
    # re-encodes the image for every sentence it scores.
    assert eng["clip_image_encodes"] == n
    assert ref["clip_image_encodes"] == ref["clip_calls"] > eng["clip_calls"]
    assert ref["backend_calls"] > eng["backend_calls"]
    assert record["config"]["num_candidates"] == 5 and record["config"]["diversity_penalty"] == 3.0
    # the engine writes the reference loop's sentences with the same scores (within float noise)
    assert record["match"] is True and record["n_mismatches"] == 0
    assert record["max_abs_diff"]["text_logprob"] < 1e-4
    assert ("same sentences and scores: yes" in out) == record["match"]


def test_pair_quality_benchmark(models, home, capsys):
    vlm, clip = models
    n = 3
    record = pair_quality.main(["--n", str(n), "--model", vlm, "--clip", clip, "--threads", "1",
                                "--max-new-tokens", "5", "--max-sentences", "2", "--gen-max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert last_json(out)["rows"] == json.loads(json.dumps(record["rows"]))
    rows = {r["method"]: r for r in record["rows"]}
    expected = {"csr", "povid", "povid_inject", "povid_noise", "stic", "stic_paper_mix",
                "stic_paper_mix:misleading", "stic_paper_mix:corrupted",
                "stic_app", "stic_app:misleading", "stic_app:corrupted"}
    assert set(rows) == expected
    for r in rows.values():
        assert r["items"] == n
        assert r["differing"] == r["chosen_fewer"] + r["chosen_more"] <= r["pairs"]
        assert r["share"] is None if r["differing"] == 0 else 0.0 <= r["share"] <= 1.0
        assert r["seconds_per_item"] > 0 and r["hall_per_chosen"] >= 0 and r["hall_per_rejected"] >= 0
        assert r["method"] in out
    assert rows["csr"]["pairs"] <= n
    # POVID's chosen answer is the ground truth: never a hallucination, so it wins every differing pair.
    assert rows["povid"]["hall_per_chosen"] == 0 and rows["povid"]["chosen_more"] == 0
    assert rows["povid"]["pairs"] == rows["povid_inject"]["pairs"] + rows["povid_noise"]["pairs"]
    assert rows["povid_inject"]["pairs"] >= 1 and rows["povid_inject"]["differing"] >= 1
    # The demo STIC setting never uses the misleading branch; the paper mix splits into both.
    for mix in ("stic_paper_mix", "stic_app"):  # the app's setting is the 50/50 mix with world prompts
        assert rows[mix]["pairs"] == rows[f"{mix}:misleading"]["pairs"] + rows[f"{mix}:corrupted"]["pairs"]
    assert set(record["meets_goal"]) == {"csr", "povid", "stic", "stic_app"}
    base = record["greedy_baseline"]
    assert base["answers"] == n and base["hall_per_answer"] >= 0 and 0 <= base["recall"] <= 1
    assert "context: the model's own greedy answer" in out
