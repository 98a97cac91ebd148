"""STIC: Self-Training on Image Comprehension (Deng et al. 2024, arXiv 2405.19716).

Stage 1 (preference data from unlabeled images):
  * chosen = the model's description of the clean image under a step-by-step prompt;
  * rejected, with probability 0.5 each:
    (a) "misleading": the clean image with one of 8 prompts that invite imagined elements, stated
        affirmatively;
    (b) "corrupted": a plain description prompt on a corrupted image: resize so the shorter side is
        20 px (and back to the original size, so the processor gets a normal image) and/or
        ColorJitter(brightness=0.5, hue=0.3), each with probability 0.5.
    The reference forgets to apply the corruption (and drops the image token from its DPO prompt);
    here the corruption is applied and every draw is recorded.
Stage 2 (description-infused fine-tuning): "Image description:\\n{description}\\n\\n{question}".

Prompts are configurable per model (a small demo model only understands "Describe the image."-style
prompts); the defaults paraphrase the paper's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as SeqType
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lvlm_studio.methods.sentences import sentence_records
from lvlm_studio.models.base import GenerationParams, VLMBackend, check_temperature

GOOD_PROMPT = (
    "Describe the image step by step. First, name the main subjects and what they are doing. "
    "Second, describe the setting. Third, describe the mood of the scene and what creates it, such "
    "as the light, the weather or the expressions. Fourth, describe the dominant colours and the "
    "composition. Fifth, point out the details that matter. Finally, give your interpretation of "
    "what the image conveys."
)
PLAIN_PROMPT = "Provide a detailed description of the image."
# One per kind the paper lists, each stated affirmatively so the model asserts what it imagines.
MISLEADING_PROMPTS = (
    "Describe the image, and add imagined objects and details that make it more interesting, "
    "describing them as if they are really there.",
    "Describe the image, including hypothetical elements that could be part of the scene, and state "
    "them as facts.",
    "Describe the image and the objects that would logically be present in such a scene, as if you "
    "can see all of them.",
    "Describe the image, including items that are not in the picture but would fit the setting "
    "well, as part of what is shown.",
    "Describe the image together with what lies just outside the frame, as if it were visible.",
    "Describe the image and an event that plausibly happens in this scene, as if it is happening "
    "in the picture.",
    "Describe the image, adding a weather condition and an animal that fit the scene, as if both "
    "are shown in it.",
    "Describe the image, adding a tool, a vehicle or a gadget that would suit the scene, as if it "
    "were in the picture.",
)
SFT_TEMPLATE = "Image description:\n{description}\n\n{question}"


@dataclass
class STICConfig:
    """STIC settings; defaults from the paper (arXiv 2405.19716) and its reference code."""

    good_prompt: str = GOOD_PROMPT
    plain_prompt: str = PLAIN_PROMPT
    misleading_prompts: tuple[str, ...] = MISLEADING_PROMPTS
    # The prompt stored with the pair for DPO. None = the good prompt (the chosen answer answers it).
    pair_prompt: str | None = None
    p_misleading: float = 0.5  # branch (a) vs (b)
    p_resize: float = 0.5
    p_jitter: float = 0.5
    low_res_side: int = 20  # shorter side after the downscale
    brightness: float = 0.5  # ColorJitter(brightness=0.5): factor ~ U[0.5, 1.5]
    hue: float = 0.3  # ColorJitter(hue=0.3): shift ~ U[-0.3, 0.3]
    # With independent draws a quarter of branch-(b) images would be left clean, and a plain
    # description of a clean image is not a dispreferred answer; True redraws one corruption
    # uniformly in that case. False reproduces the independent RandomApply draws.
    require_corruption: bool = True
    # Project choices (the paper gives no decoding settings): room for a full step-by-step
    # description, and greedy answers. With temperature > 0 a batch samples under one seed (its
    # first item's), so a sampled answer depends on the batch it fell in; each item's rejection
    # draw (branch, prompt, corruption) is its own whatever the batch.
    max_new_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 8
    description_prompt: str | None = None  # stage 2; None = the good prompt
    sft_template: str = SFT_TEMPLATE

    def __post_init__(self) -> None:
        self.misleading_prompts = tuple(self.misleading_prompts)
        if not self.misleading_prompts:
            raise ValueError("STICConfig needs at least one misleading prompt")
        for name in ("p_misleading", "p_resize", "p_jitter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")
        check_temperature(self.temperature)
        if "{description}" not in self.sft_template or "{question}" not in self.sft_template:
            raise ValueError("sft_template must contain {description} and {question}")
        self.generation_params()  # its checks (max_new_tokens >= 1) at construction, not mid-run

    def generation_params(self, seed: int | None = None) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)


# ---- corruptions --------------------------------------------------------------------------------


def low_resolution(image: Image.Image, side: int = 20) -> Image.Image:
    """Downscale so the shorter side is ``side`` px, then back up to the original size."""
    w, h = image.size
    scale = side / min(w, h)
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


def color_jitter(image: Image.Image, brightness_factor: float, hue_factor: float,
                 order: SeqType[str] = ("brightness", "hue")) -> Image.Image:
    """ColorJitter with explicit factors (torchvision v2 functional ops), so it is reproducible
    from the recorded draw without touching torch's global RNG."""
    from torchvision.transforms.v2 import functional as F

    out = image.convert("RGB")
    for op in order:
        if op == "brightness":
            out = F.adjust_brightness(out, brightness_factor)
        elif op == "hue":
            out = F.adjust_hue(out, hue_factor)
        else:
            raise ValueError(f"unknown jitter op {op!r}")
    return out


def draw_corruption(rng: random.Random, config: STICConfig) -> dict[str, Any]:
    """The random part of branch (b), as a record: which corruptions and their factors."""
    resize = rng.random() < config.p_resize
    jitter = rng.random() < config.p_jitter
    if config.require_corruption and not (resize or jitter):
        resize = rng.random() < 0.5
        jitter = not resize
    record: dict[str, Any] = {"resize": resize, "jitter": jitter}
    if resize:
        record["low_res_side"] = config.low_res_side
    if jitter:
        order = ["brightness", "hue"]
        rng.shuffle(order)  # ColorJitter applies its ops in a random order
        record.update(
            brightness_factor=rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness),
            hue_factor=rng.uniform(-config.hue, config.hue),
            jitter_order=order,
        )
    return record


def apply_corruption(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    out = image.convert("RGB")
    if record.get("resize"):
        out = low_resolution(out, record["low_res_side"])
    if record.get("jitter"):
        out = color_jitter(out, record["brightness_factor"], record["hue_factor"], record["jitter_order"])
    return out


def draw_rejection(rng: random.Random, config: STICConfig) -> dict[str, Any]:
    """Branch (a) "misleading" or (b) "corrupted", with everything drawn."""
    if rng.random() < config.p_misleading:
        index = rng.randrange(len(config.misleading_prompts))
        return {"branch": "misleading", "prompt_index": index, "prompt": config.misleading_prompts[index]}
    return {"branch": "corrupted", "prompt": config.plain_prompt, "corruption": draw_corruption(rng, config)}


# ---- pairs --------------------------------------------------------------------------------------


@dataclass
class STICCandidate:
    text: str
    source: str  # "stic_good" / "stic_bad"
    sentences: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int | None


@dataclass
class STICResult:
    image_key: str | None
    prompt: str  # the prompt stored with the pair
    chosen: STICCandidate | None
    rejected: STICCandidate | None
    draw: dict[str, Any]
    rejected_image: Image.Image | None = field(default=None, repr=False)

    @property
    def has_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None and self.chosen.text != self.rejected.text


def _as_image_item(item: Any) -> tuple[Image.Image, str | None, int | None]:
    if isinstance(item, Image.Image):
        return item, None, None
    if isinstance(item, dict):
        return item["image"], item.get("image_key"), item.get("seed")
    image, *rest = item
    return image, (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


def build_stic_pairs(backend: VLMBackend, items: SeqType[Any], config: STICConfig | None = None) -> list[STICResult]:
    """Stage-1 preference pairs for images (``Image``, ``(image, image_key[, seed])`` or
    ``{"image", "image_key", "seed"}``).

    Each item's draw uses ``random.Random(seed)``: the item's own seed when given (the service
    gives one per stored item, so an item draws the same in whatever run and chunk it falls), else
    ``config.seed * 1_000_003 + index``. Generation is batched by ``batch_size``.
    """
    cfg = config or STICConfig()
    its = [_as_image_item(i) for i in items]
    model_id = getattr(backend, "model_id", None)
    results: list[STICResult] = []
    for lo in range(0, len(its), cfg.batch_size):
        chunk = its[lo: lo + cfg.batch_size]
        seeds = [own if own is not None else cfg.seed * 1_000_003 + lo + j for j, (_, _, own) in enumerate(chunk)]
        draws = [draw_rejection(random.Random(s), cfg) for s in seeds]
        bad_images = [apply_corruption(img, d["corruption"]) if d["branch"] == "corrupted" else img
                      for (img, _, _), d in zip(chunk, draws, strict=True)]
        gen = cfg.generation_params(seeds[0] if chunk[0][2] is not None else cfg.seed + lo)
        good = backend.sample([img for img, _, _ in chunk], [cfg.good_prompt] * len(chunk), n=1, params=gen)
        bad = backend.sample(bad_images, [d["prompt"] for d in draws], n=1, params=gen)
        for j, ((_img, key, _seed), draw) in enumerate(zip(chunk, draws, strict=True)):
            common = {"method": "stic", "model": model_id, "generation": gen.as_dict()}
            good_text = good[j][0].text.strip() if good[j] else ""
            bad_text = bad[j][0].text.strip() if bad[j] else ""
            chosen = STICCandidate(good_text, "stic_good", sentence_records(good_text),
                                   {**common, "prompt": cfg.good_prompt}, seeds[j]) if good_text else None
            rejected = STICCandidate(bad_text, "stic_bad", sentence_records(bad_text),
                                     {**common, **draw}, seeds[j]) if bad_text else None
            results.append(STICResult(key, cfg.pair_prompt or cfg.good_prompt, chosen, rejected, draw,
                                      bad_images[j] if draw["branch"] == "corrupted" else None))
    return results


# ---- stage 2 ------------------------------------------------------------------------------------


def infuse_description(description: str, question: str, template: str = SFT_TEMPLATE) -> str:
    """The stage-2 prompt (also used at inference for "describe then respond")."""
    return template.format(description=description.strip(), question=question.strip())


def build_description_sft_data(backend: VLMBackend, items: SeqType[Any], config: STICConfig | None = None
                               ) -> list[dict[str, Any]]:
    """Stage-2 SFT rows from ``(image, question, answer[, image_key])`` items: the model describes
    the image, and the description is prepended to the question; the target is the original answer.
    An item the model describes with nothing gives no row: its prompt would infuse no description."""
    cfg = config or STICConfig()
    prompt = cfg.description_prompt or cfg.good_prompt
    rows: list[dict[str, Any]] = []
    for lo in range(0, len(items), cfg.batch_size):
        chunk = list(items[lo: lo + cfg.batch_size])
        gen = cfg.generation_params(cfg.seed + lo)
        outs = backend.sample([it[0] for it in chunk], [prompt] * len(chunk), n=1, params=gen)
        for it, seqs in zip(chunk, outs, strict=True):
            image, question, answer = it[0], it[1], it[2]
            description = seqs[0].text.strip() if seqs else ""
            if not description:
                continue
            rows.append({
                "image": image,
                "image_key": it[3] if len(it) > 3 else None,
                "question": question,
                "prompt": infuse_description(description, question, cfg.sft_template),
                "answer": answer,
                "description": description,
                "params": {"method": "stic_sft", "model": getattr(backend, "model_id", None),
                           "description_prompt": prompt, "generation": gen.as_dict()},
            })
    return rows
