"""Build the shipped ShapesWorld demo: a tiny LLaVA (SFT) and a tiny open_clip CLIP (contrastive).

    python -m lvlm_studio.world.build --out lvlm_studio/world/artifacts

Writes ``vlm/`` (transformers ``save_pretrained``: model + processor), ``clip/`` (open_clip
"local-dir:" layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``) and
``recipe.json`` (seed, steps, specs, world config, vocabulary hash, losses, timings, measured
figures). Deterministic for a seed at a fixed thread count. About 15 minutes on 2 CPU cores.

The VLM learns the TRAIN split's noisy captions (the prior); the CLIP learns only from what is
drawn, so its image score can expose the prior's hallucinations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .scenes import WorldConfig, sample_scene
from .text import scene_items, sentence
from .vocab import (
    CATEGORIES,
    DESCRIBE_PROMPT,
    POSITIONS,
    PRIOR_PARTNERS,
    SIZES,
    vocab_hash,
    world_words,
)

DEMO_DIR = Path(__file__).parent / "artifacts"


def demo_vlm_spec():
    from ..models.tiny import TinyLlavaSpec

    # The first ShapesWorld experiment (docs/EXPERIMENTS.md): patch 16 ignores the image; patch 8 with a 128-wide, 3-layer vision tower sees
    # colours, shapes and positions at 64 px.
    return TinyLlavaSpec(
        image_size=64,
        patch_size=8,
        vision_width=128,
        vision_layers=3,
        vision_heads=4,
        text_width=128,
        text_layers=2,
        text_heads=4,
        text_intermediate=256,
        max_positions=256,
        seed=0,
    )


def demo_clip_cfg() -> dict:
    """open_clip CLIP config. The BPE text embedding is 49408 x width: width 64 in fp16 is 6.3 MB."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 4.0},
    }


CLIP_PREPROCESS = {
    "size": 64,
    "mode": "RGB",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


@dataclass
class BuildConfig:
    """Demo build recipe. Step counts: the first ShapesWorld experiment, docs/EXPERIMENTS.md (2500-3000 steps of 32 at lr 1e-3 learn the world)."""

    seed: int = 0
    threads: int = 2
    train_scenes: int = 6000
    vlm_steps: int = 4000
    vlm_batch: int = 32
    vlm_lr: float = 1e-3
    describe_share: float = 0.75  # the rest are POPE probes
    clip_steps: int = 600
    clip_batch: int = 64  # images per batch; every drawn object's sentence is a positive
    clip_lr: float = 1e-3
    eval_scenes: int = 500
    pope_eval_scenes: int = 200
    world: WorldConfig = field(default_factory=WorldConfig)


# ----------------------------------------------------------------------------------------- data
def _train_data(cfg: BuildConfig, progress: bool):
    from tqdm.auto import tqdm

    scenes = []
    describe: list[tuple[int, str, str]] = []  # (scene idx, prompt, target)
    pope: list[tuple[int, str, str]] = []
    modes = ("random", "popular", "adversarial")
    for i in tqdm(range(cfg.train_scenes), desc="world: train scenes", disable=not progress):
        scene = sample_scene("train", i, cfg.seed, cfg.world)
        scenes.append(scene)
        for item in scene_items(scene, ("describe", "pope"), modes[i % 3], 1, cfg.world.image_size):
            target = item["meta"]["target"]
            (describe if item["meta"]["kind"] == "describe" else pope).append((i, item["prompt"], target))
    return scenes, describe, pope


def _encode(tokenizer, prompt_text: str, full_text: str, image_token_id: int, n_image_tokens: int):
    """Token ids of a chat (image token expanded) and labels masking everything but the answer."""
    prefix = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix:
        raise RuntimeError("chat template: the generation prompt is not a prefix of the full chat")

    def expand(ids):
        out = []
        for t in ids:
            out.extend([t] * n_image_tokens if t == image_token_id else [t])
        return out

    n_prefix = len(expand(prefix))
    ids = expand(full)
    labels = [-100] * n_prefix + ids[n_prefix:]
    return ids, labels


def chat_prompt(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _chat_full(processor, prompt: str, answer: str) -> str:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return processor.apply_chat_template(messages)


def _pixel_values(image_processor, images, chunk: int = 512):
    import torch

    out = []
    for i in range(0, len(images), chunk):
        out.append(image_processor(images=images[i : i + chunk], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ VLM
def train_vlm(cfg: BuildConfig, scenes, describe, pope, progress: bool = True):
    import torch
    from tqdm.auto import tqdm

    from ..models.tiny import build_llava
    from .render import render

    spec = demo_vlm_spec()
    spec.seed = cfg.seed
    model, processor = build_llava(world_words(), spec)
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<image>")
    n_image_tokens = (spec.image_size // spec.patch_size) ** 2

    # Check once that our id-space expansion equals the processor's own.
    probe_img = render(scenes[0], spec.image_size)
    p_text = chat_prompt(processor, DESCRIBE_PROMPT)
    ref_ids = processor(text=p_text, images=probe_img, return_tensors="pt")["input_ids"][0].tolist()
    my_ids, _ = _encode(tok, p_text, p_text, image_token_id, n_image_tokens)
    if ref_ids != my_ids:
        raise RuntimeError("token expansion differs from LlavaProcessor's")

    pixels = _pixel_values(processor.image_processor, [render(s, spec.image_size) for s in scenes])
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(prompt: str, answer: str):
        key = (prompt, answer)
        if key not in cache:
            cache[key] = _encode(tok, chat_prompt(processor, prompt), _chat_full(processor, prompt, answer),
                                 image_token_id, n_image_tokens)
        return cache[key]

    rng = random.Random(f"vlm-batches/{cfg.seed}")
    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.vlm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vlm_lr, total_steps=max(cfg.vlm_steps, 20),
                                                pct_start=0.1, anneal_strategy="cos")
    losses: list[float] = []
    bar = tqdm(range(cfg.vlm_steps), desc="demo VLM (SFT)", disable=not progress)
    for _ in bar:
        batch = [rng.choice(describe) if rng.random() < cfg.describe_share else rng.choice(pope)
                 for _ in range(cfg.vlm_batch)]
        enc = [encode(p, a) for _, p, a in batch]
        width = max(len(ids) for ids, _ in enc)
        input_ids = torch.full((len(enc), width), tok.pad_token_id)
        labels = torch.full((len(enc), width), -100)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(enc):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        px = pixels[[i for i, _, _ in batch]]
        out = model(input_ids=input_ids, pixel_values=px, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return model, processor, spec, losses


def generate_answers(model, processor, images, prompt: str = DESCRIBE_PROMPT, batch: int = 50,
                     max_new_tokens: int = 64, progress: bool = False) -> list[str]:
    """Greedy answers of a transformers VLM to one prompt over many images."""
    import torch
    from tqdm.auto import tqdm

    text = chat_prompt(processor, prompt)
    answers: list[str] = []
    for i in tqdm(range(0, len(images), batch), desc="greedy eval", disable=not progress):
        chunk = images[i : i + batch]
        inputs = processor(text=[text] * len(chunk), images=chunk, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def describe_metrics(answers: list[str], truths: list[list[str]]) -> dict:
    """CHAIR_s, CHAIR_i, recall, and where the hallucinations come from (prior partner or not).
    Mentions are read by the evaluation's own extractor, so the recipe's figures are CHAIR as
    ``lvlm-studio eval`` computes it (a size between colour and shape, a hyphen)."""
    from lvlm_studio.evaluation import get_extractor

    extract = get_extractor("shapesworld").extract
    n_mentions = n_halluc = n_caps_h = gt_total = gt_hit = 0
    halluc: Counter = Counter()
    prior_driven = 0
    for answer, truth in zip(answers, truths, strict=True):
        mentions = extract(answer)
        present = set(truth)
        bad = [m for m in mentions if m not in present]
        n_mentions += len(mentions)
        n_halluc += len(bad)
        n_caps_h += bool(bad)
        gt_total += len(present)
        gt_hit += len(present & set(mentions))
        partners = {PRIOR_PARTNERS[t] for t in present if t in PRIOR_PARTNERS}
        for b in set(bad):
            halluc[b] += 1
            prior_driven += b in partners
    top = halluc.most_common(1)[0][0] if halluc else None
    return {
        "n": len(answers),
        "chair_s": n_caps_h / max(len(answers), 1),
        "chair_i": n_halluc / max(n_mentions, 1),
        "recall": gt_hit / max(gt_total, 1),
        "hallucinated_objects": dict(halluc.most_common()),
        "top_hallucination": top,
        "top_is_prior_partner": top in set(PRIOR_PARTNERS.values()) if top else None,
        "prior_driven_share": prior_driven / max(sum(halluc.values()), 1),
    }


def pope_metrics(model, processor, cfg: BuildConfig, mode: str, n: int) -> dict:
    """POPE on ``n`` test probes of ``mode``, answers read as the evaluation reads them."""
    from lvlm_studio import evaluation

    from .text import world_items

    items = world_items("test", n, cfg.seed, kinds=("pope",), pope_mode=mode, cfg=cfg.world, start=10_000)
    labels, preds = [], []
    for prompt in sorted({it["prompt"] for it in items}):
        group = [it for it in items if it["prompt"] == prompt]
        answers = generate_answers(model, processor, [it["image"] for it in group], prompt, max_new_tokens=4)
        labels.extend(it["meta"]["label"] for it in group)
        preds.extend(map(evaluation.parse_yes_no, answers))
    return evaluation.pope_metrics(preds, labels)


# ----------------------------------------------------------------------------------------- CLIP
def _clip_sentence_bank(scenes):
    """Per scene: the sentences of its drawn objects."""
    return [[sentence(o) for o in s.objects] for s in scenes]


def train_clip(cfg: BuildConfig, scenes, progress: bool = True):
    """Multi-positive contrastive training: each image's positives are all its drawn objects'
    sentences, duplicates merged across the batch (docs/EXPERIMENTS.md: the naive one-caption batch plateaus
    because identical sentences in a batch count as negatives)."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .render import render

    torch.manual_seed(cfg.seed)
    model = open_clip.model.CLIP(**demo_clip_cfg())
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=demo_clip_cfg()["text_cfg"]["context_length"])
    preprocess = open_clip.image_transform(CLIP_PREPROCESS["size"], is_train=False, mean=CLIP_PREPROCESS["mean"],
                                           std=CLIP_PREPROCESS["std"], interpolation="bicubic", resize_mode="shortest")
    pixels = torch.stack([preprocess(render(s, cfg.world.image_size)) for s in scenes])
    bank = _clip_sentence_bank(scenes)
    all_sentences = sorted({t for ts in bank for t in ts})
    token_of = dict(zip(all_sentences, tokenizer(all_sentences), strict=True))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.clip_lr, total_steps=max(cfg.clip_steps, 20),
                                                pct_start=0.1, anneal_strategy="cos")
    rng = random.Random(f"clip-batches/{cfg.seed}")
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.clip_steps), desc="demo CLIP (contrastive)", disable=not progress)
    for _ in bar:
        idx = rng.sample(range(len(scenes)), cfg.clip_batch)
        texts = sorted({t for i in idx for t in bank[i]})
        col = {t: j for j, t in enumerate(texts)}
        pos = torch.zeros(len(idx), len(texts))
        for r, i in enumerate(idx):
            for t in bank[i]:
                pos[r, col[t]] = 1.0
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(model.encode_text(torch.stack([token_of[t] for t in texts])), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(pos / pos.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.4f}")
    model.eval()
    return model, losses


def clip_sanity(model, tokenizer, preprocess, cfg: BuildConfig, n: int = 500) -> dict:
    """100*cos of a drawn object's sentence vs an absent prior partner's sentence on TEST images.

    Scenes with a trigger drawn and its partner absent; the partner sentence gets a free cell and a
    random size. AUC = P(drawn sentence scores higher than the partner's) over all such pairs.
    """
    import torch
    import torch.nn.functional as F

    from .render import render

    drawn_scores, partner_scores, random_absent = [], [], []
    i = 20_000
    rng = random.Random(f"clip-sanity/{cfg.seed}")
    pairs = []
    while len(pairs) < n:
        scene = sample_scene("test", i, cfg.seed, cfg.world)
        i += 1
        present = set(scene.categories)
        triggers = [t for t in PRIOR_PARTNERS if t in present and PRIOR_PARTNERS[t] not in present]
        if not triggers:
            continue
        free = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
        colour, shape = PRIOR_PARTNERS[triggers[0]].split(" ")
        absent_other = rng.choice([c for c in CATEGORIES if c not in present])
        ac, ash = absent_other.split(" ")
        pos = rng.choice(free)
        size = rng.choice(list(SIZES))
        # the drawn sentence is the trigger whose partner is absent (a scene may hold both triggers)
        trigger = next(o for o in scene.objects if o.category == triggers[0])
        pairs.append((scene, sentence(trigger), f"There is a {size} {colour} {shape} at the {pos}.",
                      f"There is a {size} {ac} {ash} at the {pos}."))
    with torch.no_grad():
        for k in range(0, len(pairs), 100):
            chunk = pairs[k : k + 100]
            img = F.normalize(model.encode_image(torch.stack([preprocess(render(s)) for s, *_ in chunk])), dim=-1)
            drawn_t, partner_t, other_t = ([row[k] for row in chunk] for k in (1, 2, 3))
            for texts, sink in ((drawn_t, drawn_scores), (partner_t, partner_scores), (other_t, random_absent)):
                t = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
                sink.extend((100 * (img * t).sum(-1)).tolist())
    auc = sum((d > p) + 0.5 * (d == p) for d in drawn_scores for p in partner_scores) / (len(drawn_scores) * len(partner_scores))
    paired = sum(d > p for d, p in zip(drawn_scores, partner_scores, strict=True)) / len(drawn_scores)
    return {
        "n": len(pairs),
        "mean_cos100_drawn_trigger": sum(drawn_scores) / len(drawn_scores),
        "mean_cos100_absent_partner": sum(partner_scores) / len(partner_scores),
        "mean_cos100_absent_random": sum(random_absent) / len(random_absent),
        "auc_drawn_vs_absent_partner": auc,
        "paired_win_rate_drawn_over_partner": paired,
    }


def save_clip(model, path: Path, dtype: str = "float16") -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, dtype)
    state = {k: v.detach().to(cast).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    config = {"model_cfg": demo_clip_cfg(), "preprocess_cfg": CLIP_PREPROCESS}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2))


def load_clip(path: str | Path):
    """(model, preprocess, tokenizer) of a local-dir open_clip model, as any consumer loads it."""
    import open_clip

    ref = f"local-dir:{Path(path)}"
    model, _, preprocess = open_clip.create_model_and_transforms(ref)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(ref)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- build
def build_demo(
    out_dir: str | Path = DEMO_DIR,
    seed: int | None = None,
    vlm_steps: int | None = None,
    clip_steps: int | None = None,
    progress: bool = True,
    evaluate: bool = True,
    config: BuildConfig | None = None,
) -> dict:
    """Train and save the demo VLM and CLIP into ``out_dir``; return the recipe (also recipe.json).
    ``seed`` (and the step counts) override ``config``'s, which is not changed; neither given: 0."""
    cfg = replace(config) if config is not None else BuildConfig()
    if seed is not None:
        cfg.seed = seed
    if vlm_steps is not None:
        cfg.vlm_steps = vlm_steps
    if clip_steps is not None:
        cfg.clip_steps = clip_steps
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Everything is written into a staging folder and swapped in at the end: a build stopped after
    # its VLM (minutes before its CLIP) left a new VLM beside the old CLIP and recipe.
    stage = _fresh_stage(out)
    try:
        recipe = _build_into(stage, cfg, evaluate, progress)
        _install(stage, out, ARTIFACT_PARTS)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return recipe


# What a build writes into its folder; ``_install`` swaps these in together.
ARTIFACT_PARTS = ("vlm", "clip", "recipe.json")
_STAGE_PREFIX = ".build-"


def _fresh_stage(out: Path) -> Path:
    """This build's staging folder, inside ``out`` (on its file system, whatever is mounted where,
    so the swap is a rename); a killed build's (its process gone) is removed."""
    from lvlm_studio.config import remove_dead_scratch

    remove_dead_scratch(out, _STAGE_PREFIX)
    stage = out / f"{_STAGE_PREFIX}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _install(stage: Path, out: Path, parts: tuple[str, ...]) -> None:
    """Move ``parts`` from ``stage`` into ``out``, the old ones set aside first (removed with the
    stage after): stopped half-way, the swap is undone, so ``out`` holds the old set or the new."""
    aside = stage / ".old"
    aside.mkdir()
    moved: list[str] = []
    try:
        for name in parts:
            if (out / name).exists():
                os.replace(out / name, aside / name)
                moved.append(name)
        for name in parts:
            os.replace(stage / name, out / name)
    except BaseException:
        for name in parts:  # a new part already in place (its stage copy gone) goes back to the stage
            if (out / name).exists() and not (stage / name).exists():
                os.replace(out / name, stage / name)
        for name in moved:
            if (aside / name).exists():
                os.replace(aside / name, out / name)
        raise


def _build_into(out: Path, cfg: BuildConfig, evaluate: bool, progress: bool) -> dict:
    import open_clip
    import torch
    import transformers

    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    scenes, describe, pope = _train_data(cfg, progress)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    model, processor, spec, vlm_losses = train_vlm(cfg, scenes, describe, pope, progress)
    timings["vlm_train_s"] = time.perf_counter() - t
    model.save_pretrained(out / "vlm")
    processor.save_pretrained(out / "vlm")

    t = time.perf_counter()
    clip_model, clip_losses = train_clip(cfg, scenes, progress)
    timings["clip_train_s"] = time.perf_counter() - t
    save_clip(clip_model, out / "clip")

    figures: dict = {}
    if evaluate:
        from .text import world_items

        t = time.perf_counter()
        items = world_items("test", cfg.eval_scenes, cfg.seed, kinds=("describe",), cfg=cfg.world)
        answers = generate_answers(model, processor, [it["image"] for it in items], progress=progress)
        figures["describe_test"] = describe_metrics(answers, [it["objects"] for it in items])
        figures["describe_examples"] = [
            {"reference": it["reference"], "answer": a} for it, a in list(zip(items, answers, strict=True))[:8]
        ]
        train_items = world_items("train", 200, cfg.seed, kinds=("describe",), cfg=cfg.world)
        train_answers = generate_answers(model, processor, [it["image"] for it in train_items])
        figures["describe_train_vs_truth"] = describe_metrics(train_answers, [it["objects"] for it in train_items])
        for mode in ("random", "adversarial"):
            figures[f"pope_{mode}"] = pope_metrics(model, processor, cfg, mode, cfg.pope_eval_scenes)
        timings["vlm_eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        loaded, preprocess, tokenizer = load_clip(out / "clip")  # evaluate what ships (fp16 weights)
        figures["clip_sanity"] = clip_sanity(loaded, tokenizer, preprocess, cfg)
        timings["clip_eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    def curve(losses: list[float], every: int = 50) -> list[list[float]]:
        return [[i + 1, round(sum(losses[max(0, i + 1 - every) : i + 1]) / len(losses[max(0, i + 1 - every) : i + 1]), 5)]
                for i in range(every - 1, len(losses), every)] or [[len(losses), round(losses[-1], 5)]] if losses else []

    words = world_words()
    recipe = {
        "seed": cfg.seed,
        "build": {k: v for k, v in asdict(cfg).items() if k != "world"},
        "world": cfg.world.to_dict(),
        "prior_partners": PRIOR_PARTNERS,
        "vlm_spec": asdict(spec),
        "vlm_parameters": sum(p.numel() for p in model.parameters()),
        "clip_cfg": demo_clip_cfg(),
        "clip_preprocess": CLIP_PREPROCESS,
        "clip_parameters": sum(p.numel() for p in clip_model.parameters()),
        "clip_weights_dtype": "float16",
        "vocab_hash": vocab_hash(words),
        "vocab_size": len(processor.tokenizer),
        "vlm_loss_curve": curve(vlm_losses),
        "vlm_final_loss": sum(vlm_losses[-50:]) / max(len(vlm_losses[-50:]), 1),
        "clip_loss_curve": curve(clip_losses),
        "clip_final_loss": sum(clip_losses[-50:]) / max(len(clip_losses[-50:]), 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "figures": figures,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            "threads": cfg.threads,
        },
        "artifact_bytes": _dir_bytes(out / "vlm") + _dir_bytes(out / "clip"),
    }
    write_recipe(out / "recipe.json", recipe)
    return recipe


def write_recipe(path: Path, recipe: dict) -> None:
    """recipe.json as strict JSON: a diverged run's NaN/inf losses are written as null (json.dumps
    would write the bare token NaN, which JSON parsers other than Python's reject)."""
    path.write_text(json.dumps(_strict_json(recipe), indent=2, allow_nan=False))


def _strict_json(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    return o


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the ShapesWorld demo VLM + CLIP.")
    parser.add_argument("--out", default=str(DEMO_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vlm-steps", type=int, default=None)
    parser.add_argument("--clip-steps", type=int, default=None)
    parser.add_argument("--train-scenes", type=int, default=None)
    parser.add_argument("--eval-scenes", type=int, default=None)
    parser.add_argument("--partner-adds-sentence", choices=["yes", "no"], default=None,
                        help="override WorldConfig.partner_adds_sentence")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = BuildConfig()
    if args.train_scenes:
        cfg.train_scenes = args.train_scenes
    if args.eval_scenes:
        cfg.eval_scenes = args.eval_scenes
    if args.partner_adds_sentence is not None:
        cfg.world = replace(cfg.world, partner_adds_sentence=args.partner_adds_sentence == "yes")
    recipe = build_demo(args.out, args.seed, args.vlm_steps, args.clip_steps, progress=not args.quiet,
                        evaluate=not args.no_eval, config=cfg)
    summary = {k: recipe[k] for k in ("vlm_final_loss", "clip_final_loss", "timings", "artifact_bytes")}
    summary["figures"] = {k: v for k, v in recipe["figures"].items() if k != "describe_examples"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
