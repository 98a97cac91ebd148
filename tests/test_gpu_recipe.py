"""The README's GPU recipe for llava-hf/llava-1.5-7b-hf, run verbatim on CPU.

The fenced block under "Real models on a GPU" is read from README.md and each line is run as
written, with three stand-ins: a tiny random LLaVA and a tiny open_clip for the two Hub ids, and a
6-image COCO-layout folder for /data/coco. The round adds bf16 + gradient checkpointing (what it picks
by itself on CUDA) and nothing else, so the README cannot drift from what is tested."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT, write_image
from test_cli_commands import ok_json
from test_clip import save_tiny_clip

from lvlm_studio.config import Settings
from lvlm_studio.store import Store

HUB_IDS = {"LVLM_STUDIO_MODEL": "llava-hf/llava-1.5-7b-hf", "LVLM_STUDIO_CLIP": "ViT-L-14-336:openai"}
CATEGORIES = {18: "dog", 17: "cat", 63: "couch", 44: "bottle"}
# (caption, category ids) per image; 4 train images give the pairs, 2 val images the evaluation.
SCENES = {
    "train": [("A dog on a couch.", [18, 63]), ("A cat next to a bottle.", [17, 44]),
              ("A dog and a cat.", [18, 17]), ("A bottle on a couch.", [44, 63])],
    "val": [("A cat on a couch.", [17, 63, 44]), ("A dog with a bottle.", [18, 44, 63])],  # 3 objects: POPE's floor
}


def readme_recipe() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Real models on a GPU\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [line for line in block.strip().splitlines() if line.strip()]


def coco_folder(root: Path) -> Path:
    """COCO 2017's layout: annotations/{captions,instances}_{split}2017.json + {split}2017/ images."""
    (root / "annotations").mkdir(parents=True)
    image_id = 0
    for split, scenes in SCENES.items():
        images, captions, instances = [], [], []
        for caption, cats in scenes:
            image_id += 1
            name = f"{image_id:012d}.jpg"
            write_image(root / f"{split}2017" / name, seed=image_id, size=(40, 32))
            images.append({"id": image_id, "file_name": name, "width": 40, "height": 32})
            captions.append({"id": image_id, "image_id": image_id, "caption": caption})
            instances += [{"id": 100 * image_id + k, "image_id": image_id, "category_id": c}
                          for k, c in enumerate(cats)]
        categories = [{"id": i, "name": n} for i, n in CATEGORIES.items()]
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": captions}))
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": instances, "categories": categories}))
    return root


@pytest.fixture
def stand_ins(tmp_path_factory):
    from lvlm_studio.models.tiny import TinyLlavaSpec, build_tiny_llava

    root = tmp_path_factory.mktemp("recipe")
    words = {w.strip(".").lower() for caption, _ in sum(SCENES.values(), []) for w in caption.split()}
    # llava-1.5-7b's image geometry (336 px, 14 px patches: 576 image tokens per prompt), so the
    # recipe's sequence lengths are the real model's; only the widths are tiny.
    spec = TinyLlavaSpec(image_size=336, patch_size=14, max_positions=2048)
    vlm = build_tiny_llava(root / "llava", words=sorted(words), spec=spec)
    return {"LVLM_STUDIO_MODEL": str(vlm), "LVLM_STUDIO_CLIP": str(save_tiny_clip(root / "clip")),
            "/data/coco": str(coco_folder(root / "coco"))}


def test_the_readme_gpu_recipe_runs_as_written_with_tiny_stand_ins(home, stand_ins, monkeypatch):
    lines = readme_recipe()
    exports = [line for line in lines if line.startswith("export ")]
    commands = lines[len(exports):]
    env = dict(kv.split("=", 1) for line in exports for kv in shlex.split(line)[1:])
    system = env.pop("LVLM_STUDIO_SYSTEM_PROMPT")
    assert env == HUB_IDS and system.startswith("A chat between a curious human and an artificial intelligence")
    monkeypatch.setenv("LVLM_STUDIO_SYSTEM_PROMPT", system)  # LLaVA-1.5's vicuna_v1 system line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LVLM_STUDIO_THREADS", "1")
    for var in HUB_IDS:
        monkeypatch.setenv(var, stand_ins[var])
    argvs = [shlex.split(line.replace("/data/coco", stand_ins["/data/coco"])) for line in commands]
    assert [argv[:2] for argv in argvs] == [["lvlm-studio", "import"], ["lvlm-studio", "import"],
                                            ["lvlm-studio", "pope"], ["lvlm-studio", "generate"],
                                            ["lvlm-studio", "train"]]
    generate, train = argvs[3], argvs[4]

    imported = [ok_json(*argv[1:]) for argv in argvs[:2]]
    assert [r["imported"] for r in imported] == [4, 2] and not any(r["errors"] for r in imported)
    probes = ok_json(*argvs[2][1:])  # each val image has 3 objects: 3 asked present, 3 of COCO's 80 absent
    assert (probes["images"], probes["probes"], probes["yes"], probes["strategy"]) == (2, 12, 6, "adversarial")
    generated = ok_json(*generate[1:])
    assert generated["method"] == "csr" and generated["items"] == 4 and generated["pairs"] >= 1
    assert generated["model"] == stand_ins["LVLM_STUDIO_MODEL"]

    # What CUDA would pick by itself (DPORoundConfig's None = auto), forced on here.
    done = ok_json(*train[1:], "--config", "bf16=true", "--config", "gradient_checkpointing=true")
    assert done["status"] == "done", done

    store = Store(Settings(home=home).db_path)
    try:
        rnd = store.get_round(done["round"])
        config, metrics = rnd["config"], rnd["metrics"]
        # The paper's recipe reached the trainer unchanged ...
        assert (config["lora_r"], config["lora_alpha"], config["beta"], config["learning_rate"],
                config["num_epochs"], config["sft_weight"]) == (128, 256, 0.1, 1e-7, 1, 0)
        assert config["eval_max_new_tokens"] == 512  # LLaVA's captions are not cut at the demo's 64
        assert config["eval_limit"] is None  # the whole val set: its 500 captions and their POPE probes
        adapter = Path(rnd["adapter_path"])
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 128
        lineage = json.loads((adapter / "lineage.json").read_text())
        # the stand-in's template has no system branch (llava-hf's has): the round says so
        assert lineage["base_model"] == stand_ins["LVLM_STUDIO_MODEL"]
        assert lineage["system_prompt"] is None and lineage["system_prompt_dropped_by_template"] == system
        # ... with room for the 576 image tokens and every answer (none cut),
        assert lineage["lengths"]["prompt_tokens"] > 576 and lineage["lengths"]["answers_cut"] == 0
        # ... trained in bf16 with gradient checkpointing, as read off the trained model,
        hardware = {"device": "cpu", "dtype": "bfloat16", "adapter_dtype": "float32", "quantization": None, "gradient_checkpointing": True}
        assert metrics["hardware"] == lineage["hardware"] == hardware
        assert metrics["n_sft_rows"] == 0 and metrics["n_pairs"] == done["pairs"] >= 1
        # ... on pairs from train images only, evaluated on the val images only.
        pair_items = {store.get_pair(pid)["item_id"] for pid in store.pair_ids()}
        eval_items = {row["item_id"] for row in store.eval_outputs(done["round"])}
        assert {store.get_item(i)["split"] for i in pair_items} == {"train"}
        assert {store.get_item(i)["split"] for i in eval_items} == {"val"} and len(eval_items) == 2 + 12
        assert metrics["eval"]["n_captions"] == 2 and metrics["eval"]["chair_s"] is not None
        assert metrics["eval"]["pope_n"] == 12 and metrics["eval"]["pope_f1"] is not None  # POPE on COCO too
        pair_params = store.get_candidate(store.get_pair(store.pair_ids()[0])["chosen_id"])["params"]
        assert pair_params["max_sentences"] == 20
    finally:
        store.close()

    # The next CSR iteration, as the README words it: round 1's model writes the pairs, round 2
    # trains on those only, from round 1.
    again = ok_json(*generate[1:], "--round", "1")
    assert again["round"] == 1 and again["items"] == 4 and again["pairs"] >= 1
    second = ok_json(*train[1:], "--config", "pair_round=1", "--config", "bf16=true",
                     "--config", "gradient_checkpointing=true")
    assert second["status"] == "done" and second["parent"] == done["round"], second
    store = Store(Settings(home=home).db_path)
    try:
        rnd2 = store.get_round(second["round"])
        assert rnd2["metrics"]["n_pairs"] == again["pairs"] == store.count_pairs(round=1)
        lineage2 = json.loads((Path(rnd2["adapter_path"]) / "lineage.json").read_text())
        assert lineage2["parents"] == [rnd["adapter_path"]]
    finally:
        store.close()
