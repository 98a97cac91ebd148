"""A DPO round: reviewed preference pairs → a new LoRA adapter (TRL ``DPOTrainer`` + PEFT).

Round lineage (CSR's iterations): round t starts from the model of round t−1 (the base with
every earlier round's adapter added in order) and trains a fresh LoRA on top. With PEFT, TRL's
reference model is the policy with the adapter disabled, which is exactly that parent, so the
reference of round t is the model of round t−1, as the CSR reference does it. The parents are
merged into float32 weights (exact) and stacked beside bf16, fp16 or quantized ones
(``DPORoundConfig.parent_lineage``, ``models.lora.stack_loras``), where merging would round small
updates into noise. An adapter is only meaningful on top of its parents: each adapter directory
carries ``lineage.json`` (base model + the parent adapter chain), and
``materialize_round_model(base, chain)`` rebuilds a round's model by merging the chain in order.

Losses (``DPORoundConfig``):
  * plain DPO: TRL ``loss_type=["sigmoid"]``, β = 0.1 (all three papers).
  * STIC's DPO + SFT on the chosen answer: ``sft_weight`` > 0 → ``loss_type=["sigmoid", "sft"]``,
    ``loss_weights=[1, sft_weight]``. TRL's SFT term is the *mean* token NLL of the chosen answers
    in the batch; STIC's reference uses the *summed* NLL / 1024. TRL's mean is the default
    (length-independent, so one weight fits short demo answers and long COCO descriptions alike);
    ``sft_normalization="sum_1024"`` trains with the reference's, through the weighted subclass.
    Where a method marked some chosen answers unfit to imitate (pair meta ``"sft": false``, CSR
    below ``CSRConfig.sft_min_reward``), those rows get DPO only: ``weighted_dpo_trainer_class``
    adds the same token-mean term over the other rows, from the policy forward TRL runs anyway.
  * POVID's two-term loss 0.5·DPO(chosen vs text-hallucinated) + 0.5·DPO(chosen vs noisy-image
    answer) (``povid_two_term``): ``weighted_dpo_trainer_class``, a small ``DPOTrainer`` subclass,
    weights each row's sigmoid DPO loss; POVID rows of each term get 0.5·N_povid / N_term
    (``povid_row_weights``), so over an epoch each term carries exactly half of the POVID loss mass
    without repeating rows (the reference sums both terms per item in one batch; here that holds
    in expectation over batches).
  * POVID's two stages (``povid_stage1_epochs`` > 0): stage 1 trains a LoRA on the text-hallucinated
    pairs alone; it is merged and stage 2 trains a new LoRA on every pair with the two-term loss,
    the stage-1 model as its reference. The round saves the two LoRAs concatenated into one
    (``concatenate_loras``: rank r1 + r2, exactly the sum of both updates), so a round is still
    one adapter on its parent chain.

Hardware: on CUDA the config's None picks bf16 and gradient checkpointing, on CPU fp32 and neither;
what a round actually ran with is read off the trained model into ``lineage["hardware"]``. bf16,
gradient checkpointing (tests/test_gpu_recipe.py) and 4/8-bit QLoRA (tests/test_quantized.py) are
tested on CPU; the CUDA device itself is not (the development machines have no GPU). With
quantization, round t's parent chain is stacked on the quantized base ("auto"; merging it would
re-quantize the weights, so the reference would carry that rounding).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lvlm_studio.config import QUANTIZATIONS, counted, remove_dead_scratch
from lvlm_studio.models.base import (
    after_opening,
    answer_frame,
    chat_messages,
    chat_prompt,
    system_prompt,
    system_turn_rendered,
)
from lvlm_studio.models.lora import as_chain

# Log keys streamed to on_log (TRL's names), plus step/epoch/learning_rate when present.
CURVE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
_EXTRA_KEYS = ("learning_rate", "grad_norm", "logps/chosen", "logps/rejected", "epoch", "sft_loss")
LINEAGE_FILE = "lineage.json"
MAX_EPOCHS = 1000  # DPO papers train 1-3 epochs; the tests' deliberately long round uses 400
# Adam steps of lr 1 already wreck a model (the papers use 1e-7 to 1e-6; the demo 2e-4); 1e9 trained
# a model that answered nothing and became the current round.
MAX_LEARNING_RATE = 1.0
MAX_STEPS = 1_000_000  # optimizer steps in one round (a 7B DPO epoch on 20k pairs is ~600 at batch 32)
MAX_LORA_R = 4096  # the papers use 128 on 7B models; a rank above a layer's width adds nothing
# The loss types TRL 1.16's DPOTrainer knows (it refuses others only once training has started).
# exo_pair and robust are left out: they need label_smoothing > 0 (TRL refuses exo_pair without it,
# robust without it is sigmoid), which a round does not expose.
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# transformers' schedulers that need no lr_scheduler_kwargs (cosine_with_min_lr needs min_lr,
# warmup_stable_decay its phase lengths, reduce_lr_on_plateau an evaluation metric).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
MAX_SEED = 2**32 - 1  # transformers' set_seed refuses more (and negative seeds)
MAX_PROCESSES = 64  # data-parallel workers of one round (torchrun --nproc_per_node): one per GPU


SFT_NORMALIZATIONS = ("token_mean", "sum_1024")  # DPORoundConfig.sft_normalization
PARENT_LINEAGES = ("auto", "merged", "stacked")  # DPORoundConfig.parent_lineage
SFT_SUM_SCALE = 1024.0  # STIC's reference divides each answer's summed NLL by this

DPO_LEARNING_RATE = 2e-4  # the demo's DPO lr (DPORoundConfig.learning_rate says why)
# STIC's stage 2 (arXiv 2405.19716) fine-tunes at 2e-5. On the demo the DPO lr, 2e-4, makes plain
# captions worse (CHAIR_s 0.250 -> 0.444 against 0.260 at 2e-5; docs/EXPERIMENTS.md, "STIC's stage 2").
STIC_INFUSION_LEARNING_RATE = 2e-5


@dataclass
class DPORoundConfig:
    """One DPO round. Defaults are the published recipes *scaled for the demo model* (a ~1 M
    parameter LLaVA trained on ~100 pairs on 2 CPU cores); the paper values are cited beside each.
    For a 7B model use the paper values (r=128, α=256, β=0.1, lr 1e-7 (CSR/STIC stage 1), 1 epoch)."""

    # LoRA. CSR and STIC reference: r=128, α=256, dropout 0.05 on all LM linear layers. Demo: r=16,
    # α=32 (same α/r = 2), as in the first ShapesWorld experiment (docs/EXPERIMENTS.md).
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05  # STIC stage-2 (SFT) rounds; DPO rounds only with disable_dropout=False
    # TRL's DPO default: every dropout, LoRA's included, is off in DPO rounds, so the policy's and
    # the reference's log-probs of a pair are the same model's at step 0 (margin exactly 0). The
    # demo's measured rounds trained so. False applies lora_dropout (and the model's own dropout).
    disable_dropout: bool = True
    # "all-linear" = every linear layer of the *language model* (not the vision tower, projector or
    # lm_head), as the CSR reference's find_all_linear_names. A list is passed to PEFT verbatim.
    target_modules: str | list[str] = "all-linear"
    # DPO. β = 0.1 in CSR, POVID and STIC; sigmoid loss on summed log-probs. Demo: 0.3 keeps each
    # round closer to its parent (an ablation with benchmarks/demo_loop.py and CSR's yes/no pairs,
    # seed 0, docs/EXPERIMENTS.md: CHAIR_s over 3 rounds -58 / -90 / -85% at 0.3 vs -90 / -83 / -69%
    # at 0.1: at 0.1 rounds 2-3 undo part of round 1). With today's other defaults 0.3 gives
    # -77 / -90 / -91% on seed 0 (README).
    beta: float = 0.3
    loss_type: str = "sigmoid"
    # Reference lr 1e-7 for 7B (CSR), POVID 1e-7, STIC 1e-7; the demo model needs far more
    # (docs/EXPERIMENTS.md, first ShapesWorld experiment: 5e-4 cut CHAIR_s 83% on oracle pairs, recall 0.88).
    # 2e-4: benchmarks/demo_loop.py, 3 CSR rounds: 5e-4 lost 5 recall points and 0.04 POPE F1 in
    # round 1 (yes/no answers drift: the CSR prompts are captions only); 2e-4 kept both in round 1
    # (later rounds: docs/EXPERIMENTS.md). None: that, or for a STIC stage-2 round
    # (objective "stic_infusion") the paper's stage-2 lr, STIC_INFUSION_LEARNING_RATE.
    learning_rate: float | None = None
    # Reference: 1 epoch over ~13k (CSR) / 6k (STIC) pairs; the demo has ~100 pairs: 3 epochs.
    num_epochs: float = 3.0
    # Pairs per optimiser step (TRL's per-device default). Neither paper's effective batch is
    # reproduced on the demo; for a 7B model on one GPU use batch 1-4 and accumulate to 8-16.
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # Tokens per prompt + answer. The prompt holds the image's tokens: 16-64 for the demo, 576 for
    # LLaVA-1.5 (336 px / 14 px patches), up to 2880 for LLaVA-1.6's any-res; TRL cuts longer rows
    # and refuses rows whose image tokens were cut. train_round checks the prompt fits before it
    # trains (check_sequence_lengths) and records how many answers were cut. None: no cut. 2048 is
    # LLaVA-1.5's own training length (model_max_length): 576 image tokens + CSR's 512-token answers fit.
    max_length: int | None = 2048
    lr_scheduler_type: str = "cosine"  # CSR reference: cosine with warmup 0.03
    warmup_ratio: float = 0.03
    max_steps: int = -1  # > 0 overrides num_epochs
    logging_steps: int = 1
    seed: int = 0
    # DPO + SFT on the chosen answer (TRL's token-mean SFT term, see module docstring), as STIC
    # trains, though STIC's weight 1 is on sum/1024, a weaker pull (sft_normalization). Default 1
    # for every method: DPO alone lowers the
    # chosen answer's likelihood too (demo, yes/no pairs: agreement with the training labels fell
    # 0.60 -> 0.54 and some answers came out empty); with it, oracle pairs kept recall (docs/EXPERIMENTS.md). 0 = the
    # CSR/POVID papers' pure DPO. A pair whose method marked its chosen answer unfit to imitate
    # (meta "sft": false; CSR does so below CSRConfig.sft_min_reward) gets DPO only, unless a
    # person accepted, swapped or edited it (pair_sft_weight, weighted_dpo_trainer_class).
    sft_weight: float = 1.0
    # How the SFT term is normalised. "token_mean" (default): TRL's, the mean token NLL of the
    # batch's chosen answers, length-independent, so one weight fits short demo answers and long
    # COCO descriptions. "sum_1024": STIC's reference code, each chosen answer's summed NLL / 1024,
    # averaged over the batch: T/1024 of token_mean's pull at the same weight for a T-token answer
    # (a 300-token description ~3.4x less, a 50-token answer ~20x less). token_mean averages over
    # one micro-batch (batch_size rows on one device), and accumulation then averages micro-batches:
    # batch 8 weighs every token alike, batch 1 x accumulation 8 every answer alike (a yes/no
    # answer pulls as hard as a long description). The DPO term and sum_1024 do not depend on it.
    sft_normalization: str = "token_mean"
    # POVID's two-term loss (the paper's 0.5·DPO(text-hallucinated) + 0.5·DPO(noisy-image)):
    # each term's pairs weigh half of the POVID loss (povid_row_weights; module docstring). POVID's
    # generator makes one pair of each kind per item, so the weights are all 1 (plain DPO, TRL's own
    # loss) until review rejects more of one kind. Needs loss_type "sigmoid"; False: a plain mean.
    povid_two_term: bool = True
    # POVID's schedule (arXiv 2402.11411): stage 1 trains on the text-hallucinated POVID pairs
    # alone for this many epochs (paper: 3), is merged, and stage 2 trains a new LoRA on every pair
    # for num_epochs (paper: 1) with the two-term loss above, the stage-1 model as its reference.
    # 0 = one stage (every pair, num_epochs). max_steps > 0 caps each stage.
    povid_stage1_epochs: float = 0.0
    # Pairs that ask the same question with the same two answers and prefer each answer at least
    # once (yes/no probes, CSR's existence pairs) are cut to as many of one orientation as of the
    # other (balance_answer_prior). Otherwise the label is partly predictable from the text alone
    # and DPO learns that prior instead of looking: CSR's self-derived "No" questions are mostly the
    # prior partners it hallucinates (demo, seed 1: "Is there a green triangle" No 119 / Yes 19),
    # and training on them unbalanced lowered POPE F1 0.783 -> 0.729 in round 1 (balanced: 0.771).
    balance_answers: bool = True
    # Hardware: None = auto (bf16 and gradient checkpointing on CUDA, fp32 and off on CPU).
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    quantization: str | None = None  # "4bit" | "8bit" (QLoRA; bitsandbytes; tested on CPU, not on CUDA)
    # How round t holds its parent rounds while it trains (the model it starts from and its DPO
    # reference). "merged": added into the weights, exact in float32. "stacked": kept beside the
    # weights as frozen low-rank updates each adapted layer adds to its output (models/lora.py), as
    # the parent trained them. Merged into bf16 or 4/8-bit weights, an update below their resolution
    # turns into rounding noise larger than itself; stacked adds no noise, though in bf16 the part
    # below the layer output's resolution is still lost (benchmarks/lineage_precision.py: a 7B at the
    # papers' lr 1e-7 changes a weight by ~1e-6, lost either way: train such rounds in float32).
    # "auto": stacked when the weights are not float32 (bf16, fp16, quantized), else merged (the demo).
    parent_lineage: str = "auto"
    device: str = "auto"
    # Data-parallel training: > 1 starts the round job under torchrun (the launcher `accelerate
    # launch --multi_gpu` runs underneath) with one worker per device; each worker trains on its
    # shard, rank 0 alone saves, writes the store and evaluates. Tested with 2 CPU workers (gloo).
    num_processes: int = 1
    # What the round trains. "dpo": preference pairs (the fields below). "stic_infusion": STIC's
    # stage 2, description-infused fine-tuning (arXiv 2405.19716): the parent model describes each
    # image of a slice of instruction data (items with a reference answer; STIC: 5k), the
    # description is prepended to the question ("Image description:\n{d}\n\n{q}") and the round
    # fine-tunes (SFT, LoRA) on the original answers; it is evaluated describing then responding.
    objective: str = "dpo"
    infusion_dataset: str | None = None  # None = eval_dataset's dataset
    infusion_split: str = "train"
    infusion_limit: int | None = 500  # the demo's slice (measured in docs/EXPERIMENTS.md); STIC: 5k
    describe_prompt: str = "Describe the image."  # the description step, in training and at inference
    eval_describe_first: bool | None = None  # None: for stic_infusion rounds
    # Data selection (jobs.py): which pairs train this round.
    methods: list[str] | None = None
    include_auto: bool = False
    pair_round: int | None = None
    # Evaluation after training (jobs.py).
    eval_dataset: str | None = None  # None = any dataset
    eval_split: str = "test"  # ShapesWorld's unbiased test split
    # The Train tab's evaluation budget: 200 test items keep a demo round's evaluation short; the
    # README's table (benchmarks/demo_loop.py) evaluates 500 scenes, CHAIR's usual 500 images. Whole
    # images only (jobs.eval_items_for): 200 takes 66 demo scenes, a caption and 2 probes each.
    eval_limit: int | None = 200
    eval_kinds: list[str] = field(default_factory=lambda: ["describe", "pope"])
    # Greedy answer length: the world's reference captions are at most 44 demo tokens (500 test
    # scenes); set it higher for real models (CHAIR evaluations commonly allow 512).
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 16  # items decoded together (memory and speed)
    eval_parent: bool = True  # also evaluate the parent round unless it is evaluated on these items (jobs.parent_evaluated_on)
    extractor: str = "auto"  # "shapesworld" | "coco" | "auto" (world if its vocabulary parses the GT)

    def __post_init__(self) -> None:
        if self.learning_rate is None:
            self.learning_rate = STIC_INFUSION_LEARNING_RATE if self.objective == "stic_infusion" else DPO_LEARNING_RATE
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', not {self.quantization!r}")
        if self.sft_weight < 0:
            raise ValueError("sft_weight must be >= 0")
        if self.sft_normalization not in SFT_NORMALIZATIONS:
            raise ValueError(f"sft_normalization must be one of {', '.join(SFT_NORMALIZATIONS)}, "
                             f"not {self.sft_normalization!r}")
        if not (self.batch_size >= 1 and self.lora_r >= 1):  # NaN too
            raise ValueError("batch_size and lora_r must be >= 1")
        if self.lora_r > MAX_LORA_R:  # r = 1e9 failed only in the job, allocating 512 GB
            raise ValueError(f"lora_r must be at most {MAX_LORA_R}, not {self.lora_r}")
        # Refused here, before a round row exists: a round with no step ended "done" as its parent's
        # copy, and a bad lr or β failed only after the job had started.
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(f"learning_rate must be a number > 0 and at most {MAX_LEARNING_RATE:g}, "
                             f"not {self.learning_rate}")
        for name in ("num_epochs", "beta", "sft_weight", "lora_dropout", "warmup_ratio", "lora_alpha"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, not {getattr(self, name)}")
        if self.eval_batch_size < 1 or self.eval_max_new_tokens < 1:
            raise ValueError("eval_batch_size and eval_max_new_tokens must be >= 1 (a round must be evaluated)")
        for name in ("num_epochs", "povid_stage1_epochs"):  # 1e9 started a round that never ended
            if not getattr(self, name) <= MAX_EPOCHS:
                raise ValueError(f"{name} must be at most {MAX_EPOCHS}, not {getattr(self, name):g}")
        if not self.max_steps <= MAX_STEPS:  # NaN too
            raise ValueError(f"max_steps must be at most {MAX_STEPS}, not {self.max_steps}")
        if self.max_steps <= 0 and not self.num_epochs > 0:
            raise ValueError(f"num_epochs must be > 0 (or max_steps > 0), not {self.num_epochs}: the round would train nothing")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, not {self.beta}")
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_alpha must be > 0 and lora_dropout in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.gradient_accumulation_steps < 1 or self.logging_steps < 1:
            raise ValueError("gradient_accumulation_steps and logging_steps must be >= 1")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("max_length must be >= 1 (or None: no cut)")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError("eval_limit must be >= 1 (or None: the whole evaluation split)")
        if not 1 <= self.num_processes <= MAX_PROCESSES:
            raise ValueError(f"num_processes must be between 1 and {MAX_PROCESSES} (one per GPU), not {self.num_processes}")
        if self.infusion_limit is not None and not self.infusion_limit >= 1:
            raise ValueError(f"infusion_limit must be >= 1 (or None: every instruction item), not {self.infusion_limit}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, not {self.seed}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler_type!r}")
        if self.loss_type not in TRL_DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of TRL's {', '.join(TRL_DPO_LOSS_TYPES)}; not {self.loss_type!r}")
        if self.extractor not in ("auto", "shapesworld", "coco"):
            raise ValueError(f"extractor must be 'auto', 'shapesworld' or 'coco', not {self.extractor!r}")
        if self.parent_lineage not in PARENT_LINEAGES:
            raise ValueError(f"parent_lineage must be one of {', '.join(PARENT_LINEAGES)}, not {self.parent_lineage!r}")
        if self.objective not in ("dpo", "stic_infusion"):
            raise ValueError(f"objective must be 'dpo' or 'stic_infusion', not {self.objective!r}")
        if self.povid_stage1_epochs and self.loss_type != "sigmoid":
            raise ValueError(f"POVID's two-term loss weights the sigmoid DPO loss per row; loss_type is {self.loss_type!r}")
        if self.povid_stage1_epochs < 0:
            raise ValueError("povid_stage1_epochs must be >= 0 (0 = one stage)")
        if self.povid_stage1_epochs and self.objective != "dpo":
            raise ValueError("POVID's two-stage schedule is a DPO round (objective 'dpo')")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DPORoundConfig:
        """Unknown keys raise (a typo must not silently fall back to a default)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DPO round option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def describes_first(self) -> bool:
        """Whether evaluation describes the image before answering a question (STIC's inference)."""
        return self.objective == "stic_infusion" if self.eval_describe_first is None else self.eval_describe_first

    @property
    def evaluation_describe_prompt(self) -> str | None:
        """The prompt evaluation describes the image with before each question, or None (``describes_first``)."""
        return self.describe_prompt if self.describes_first else None

    @classmethod
    def describe_prompt_of(cls, config: dict | None) -> str | None:
        """The prompt a round with stored ``config`` describes the image with before each question
        when evaluated, or None (round 0, the base model: plain answers). Read leniently: a config
        stored by an older version that today's checks refuse still says how its round answers."""
        if not config:
            return None
        try:
            return cls.from_dict(config).evaluation_describe_prompt
        except (TypeError, ValueError):
            first = config.get("eval_describe_first")
            first = config.get("objective") == "stic_infusion" if first is None else bool(first)
            prompt = config.get("describe_prompt")
            return (prompt if isinstance(prompt, str) and prompt.strip() else cls().describe_prompt) if first else None

    def loss_types(self) -> tuple[list[str], list[float]]:
        """TRL's loss_type / loss_weights when every row has the same weights (otherwise
        ``train_round`` weights rows with ``weighted_dpo_trainer_class``)."""
        if self.sft_weight > 0:
            return [self.loss_type, "sft"], [1.0, float(self.sft_weight)]
        return [self.loss_type], [1.0]


@dataclass
class TrainResult:
    adapter_path: str | None  # None when stopped before the end (nothing saved) and on ranks > 0
    stopped: bool
    steps: int
    n_pairs: int
    n_rows: int
    curve: list[dict]
    seconds: float
    lineage: dict

    @property
    def diverged(self) -> bool:
        """Whether the last logged loss was NaN or infinite: the optimizer stepped on it, so the
        weights are wrecked (an earlier non-finite window that training recovered from is not)."""
        for rec in reversed(self.curve):
            if rec.get("loss_nonfinite"):
                return True
            if "loss" in rec:
                return False
        return False

    @property
    def final(self) -> dict:
        """The last logged record that has the curve keys."""
        for rec in reversed(self.curve):
            if "loss" in rec:
                return rec
        return {}


class TrainingStopped(RuntimeError):
    pass


def distributed_rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process as torchrun / accelerate launch set them
    (0, 0, 1 when not launched by one)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def povid_term(pair: dict) -> str | None:
    """'text' or 'noise' for a POVID pair (None for other methods). The noisy-image term is named
    by the method ("povid_noise") or the pair's meta: kind "image" (as service.py writes it), or
    rejected_source / term / variant naming noise ("povid_noise", "noisy_image")."""
    method = str(pair.get("method") or "")
    if not method.startswith("povid"):
        return None
    meta = pair.get("meta") or {}
    tags = [method] + [str(meta.get(k) or "") for k in ("rejected_source", "term", "kind", "variant", "source")]
    return "noise" if any("noise" in t or "noisy" in t or t == "image" for t in tags) else "text"


def povid_stage1_pairs(pairs: Sequence[dict]) -> list[dict]:
    """The pairs POVID's stage 1 trains on, the text-hallucinated ones; ValueError when there are
    none (the round job checks this before it starts a process)."""
    text_pairs = [p for p in pairs if povid_term(p) == "text"]
    if not text_pairs:
        raise ValueError("POVID's stage 1 trains on text-hallucinated POVID pairs, and none of this round's "
                         f"{len(pairs)} pairs is one: generate with POVID, or set povid_stage1_epochs to 0")
    return text_pairs


def describe_povid_stages(stages: Sequence[Any]) -> str:
    """One line on a two-stage POVID round's stages (``metrics["povid_stages"]``), "" for others."""
    parts = [f"{s.get('stage')}: {counted(s.get('n_pairs'), 'pair')}, {counted(s.get('steps'), 'step')}"
             for s in stages or [] if isinstance(s, dict)]
    return "POVID stages: " + "; ".join(parts) if parts else ""


def povid_row_weights(pairs: Sequence[dict]) -> list[float]:
    """Per-row DPO weights for POVID's two-term loss: where both terms are present, each term's
    rows share half of the POVID rows' total weight (0.5·N_povid / N_term each); every other row,
    and every row when only one term is present, weighs 1. The mean weight stays 1."""
    terms = [povid_term(p) for p in pairs]
    n_text, n_noise = terms.count("text"), terms.count("noise")
    if not n_text or not n_noise:
        return [1.0] * len(pairs)
    per_term = {"text": 0.5 * (n_text + n_noise) / n_text, "noise": 0.5 * (n_text + n_noise) / n_noise}
    return [per_term.get(t, 1.0) if t else 1.0 for t in terms]


def balance_answer_prior(pairs: Sequence[dict], seed: int = 0) -> tuple[list[dict], int]:
    """Pairs grouped by (prompt, {chosen, rejected}): where a group prefers each answer at least
    once, it keeps as many pairs of one orientation as of the other (a seeded sample, original order
    kept), so within the group the preferred answer cannot be told from the text. Groups that always
    prefer the same answer (the same caption pair on two images) are left alone. Returns (pairs,
    number dropped)."""
    import random

    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        key = (str(p.get("prompt")), frozenset((str(p.get("chosen")), str(p.get("rejected")))))
        groups.setdefault(key, []).append(i)
    drop: set[int] = set()
    rng = random.Random(seed)
    for (_, answers), idx in groups.items():
        first = min(answers)
        sides = ([i for i in idx if str(pairs[i].get("chosen")) == first],
                 [i for i in idx if str(pairs[i].get("chosen")) != first])
        k = min(len(side) for side in sides)
        if k == 0:
            continue
        for side in sides:
            keep = set(rng.sample(side, k))
            drop.update(i for i in side if i not in keep)
    return [p for i, p in enumerate(pairs) if i not in drop], len(drop)


def pair_sft_weight(pair: dict, config: DPORoundConfig) -> float:
    """The SFT weight of ``pair``'s chosen answer: ``config.sft_weight``, or 0 when the method
    marked that answer unfit to imitate (meta ``"sft": false``, CSRConfig.sft_min_reward) and no
    person has accepted, swapped or edited the pair since."""
    if (pair.get("meta") or {}).get("sft") is False and (pair.get("status") or "auto") == "auto":
        return 0.0
    return float(config.sft_weight)


def _prompt_turns(prompt: str) -> list[dict]:
    """A row's prompt in TRL's conversational format (string contents; TRL puts the image before
    the user text): the system turn the backends ask with (``system_prompt``), then the user's."""
    return [{"role": m["role"], "content": m["content"][-1]["text"]} for m in chat_messages(prompt, image=False)]


def build_dpo_dataset(pairs: Sequence[dict], sft_weights: Sequence[float] | None = None,
                      dpo_weights: Sequence[float] | None = None):
    """TRL's conversational vision preference format (the same as the TRL export):
    ``images`` [image], ``prompt`` [user turn], ``chosen`` / ``rejected`` [assistant turn], plus
    ``sft_weight`` / ``dpo_weight`` per row when given (``weighted_dpo_trainer_class``).
    A pair gives its image as ``image`` (PIL) or ``image_path``."""
    from datasets import Dataset, Features, Image, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    features = Features({"images": List(Image()), "prompt": turn, "chosen": turn, "rejected": turn})
    rows: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for column, weights in (("sft_weight", sft_weights), ("dpo_weight", dpo_weights)):
        if weights is not None:
            if len(weights) != len(pairs):
                raise ValueError(f"{column} needs one weight per pair")
            features[column] = Value("float32")
            rows[column] = [float(w) for w in weights]
    for p in pairs:
        image = p.get("image")
        if image is None:
            path = p.get("image_path")
            if not path or not Path(path).is_file():
                raise FileNotFoundError(f"pair {p.get('pair_id')}: image file {path!r} is missing")
            image = str(path)
        if not str(p.get("chosen") or "").strip() or not str(p.get("rejected") or "").strip():
            raise ValueError(f"pair {p.get('pair_id')}: chosen and rejected must be non-empty")
        rows["images"].append([image])
        rows["prompt"].append(_prompt_turns(p["prompt"]))
        rows["chosen"].append([{"role": "assistant", "content": p["chosen"]}])
        rows["rejected"].append([{"role": "assistant", "content": p["rejected"]}])
    return Dataset.from_dict(rows, features=features)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def read_lineage(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def adapter_chain(adapter_dir: str | os.PathLike) -> list[str]:
    """The full chain ending at ``adapter_dir`` (parents first), from its lineage file."""
    lineage = read_lineage(adapter_dir)
    return [*lineage.get("parents", []), str(adapter_dir)]


def resolve_device(device: str = "auto") -> str:
    from lvlm_studio.config import resolve_device as _resolve

    return _resolve(device)


def load_base_model(base_model_path: str, device: str = "cpu", bf16: bool = False, quantization: str | None = None,
                    cap_pixels: bool = True):
    """(model, processor) of the base model, in the training dtype; the processor with the image
    cap generation uses (``cap_image_pixels``) unless ``cap_pixels`` is False."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if quantization is not None:
        from lvlm_studio.models.hf import quantization_config

        kwargs["quantization_config"] = quantization_config(quantization, kwargs["dtype"])
        kwargs["device_map"] = {"": device}
    from lvlm_studio.models.hf import cap_image_pixels

    model = AutoModelForImageTextToText.from_pretrained(str(base_model_path), **kwargs)
    processor = AutoProcessor.from_pretrained(str(base_model_path))
    if cap_pixels:
        cap_image_pixels(processor)  # the image tokens generation uses (LVLM_STUDIO_MODEL_IMAGE_PIXELS)
    return model, processor


def merge_chain(model, chain: Sequence[str], errors: list | None = None):
    """Merge each adapter of ``chain`` into ``model`` in order (``models.lora.merge_loras``). With
    ``errors``, each adapter's ``merge_rounding_error`` is appended to it."""
    from lvlm_studio.models.lora import merge_loras

    return merge_loras(model, chain, None if errors is None else lambda peft: errors.append(merge_rounding_error(peft)))


# Above this, rounding noise outweighs half of an adapter's update once merged (merge_rounding_error).
MERGE_ERROR_WARN = 0.5


def merge_rounding_error(peft_model, max_layers: int = 8, seed: int = 0) -> float | None:
    """How far merging the adapter into the model's low-precision weights lands from its exact
    update: over up to ``max_layers`` of its LoRA layers and random inputs x,
    ‖(round(W + ΔW) − W)·x − ΔW·x‖ / ‖ΔW·x‖ with ΔW in float32. bfloat16 keeps 8 bits of a
    weight: an update far below that resolution (a 7B at the papers' lr 1e-7 changes a weight by
    ~1e-6, against a resolution of ~1e-4 at |W| ~ 0.02) is lost (error 1) or survives only as
    noise (error > 1). None for float32 (exact) or quantized weights."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    generator = torch.Generator().manual_seed(seed)
    num = den = 0.0
    measured = 0
    for module in peft_model.modules():
        if measured >= max_layers:
            break
        if not isinstance(module, LoraLinear) or "default" not in module.lora_A:
            continue
        weight = module.base_layer.weight
        if weight.dtype == torch.float32 or not weight.dtype.is_floating_point:
            return None
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        delta = (b @ a) * module.scaling["default"]
        if module.fan_in_fan_out:
            delta = delta.T
        exact = weight.float()
        x = torch.randn(exact.shape[1], 16, generator=generator).to(exact.device)
        rounded = (exact + delta).to(weight.dtype).float() - exact
        num += float(((rounded - delta) @ x).square().sum())
        den += float((delta @ x).square().sum())
        measured += 1
    return (num / den) ** 0.5 if den > 0 else None


def materialize_round_model(
    base_model_path: str,
    adapter_chain: str | Sequence[str] | None,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
):
    """The model of a round = base + its adapter chain merged in order. Returns (model, processor);
    with ``out_dir`` also saves both there (atomically) so any loader can open the merged model."""
    from lvlm_studio.models.hf import cap_image_pixels

    # The saved folder keeps the base processor's own image size: a cap written into it would
    # outlive a later change of LVLM_STUDIO_MODEL_IMAGE_PIXELS (a cap can lower a limit, not raise it).
    model, processor = load_base_model(base_model_path, device=device, cap_pixels=False)
    model = merge_chain(model, as_chain(adapter_chain))
    if out_dir is not None:
        out = Path(out_dir)
        tmp = _fresh_tmp_sibling(out)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _publish_folder(tmp, out, "config.json")
    cap_image_pixels(processor)
    return model.to(device), processor


def chain_adapter(adapter_chain: Sequence[str], out_dir: str | os.PathLike) -> Path:
    """A round's whole adapter chain as one adapter (``concatenate_loras``: exactly the sum of the
    updates), for a server that applies one LoRA adapter (vLLM); saved once at ``out_dir``."""
    from lvlm_studio.models.lora import ADAPTER_CONFIG

    out = Path(out_dir)
    if not (out / ADAPTER_CONFIG).is_file():
        tmp = _fresh_tmp_sibling(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        concatenate_loras(adapter_chain, tmp)
        _publish_folder(tmp, out, ADAPTER_CONFIG)
    return out


def _fresh_tmp_sibling(out: Path) -> Path:
    """An empty-to-be temporary sibling of ``out`` to write into before renaming it into place; its
    name carries the process and thread, so two writers of the same folder never share one. The
    scratch of writers whose process is gone (killed mid-save; a merged 7B model is GBs) goes too."""
    prefix = f".{out.name}.tmp-"
    tmp = out.parent / f"{prefix}{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed attempt of this process id
    remove_dead_scratch(out.parent, prefix)
    return tmp


def _publish_folder(tmp: Path, out: Path, marker: str) -> None:
    """Move a saved folder (a merged model, a chain adapter) into place; ``marker`` is the file a
    complete one holds. Two processes (the app generating with a round, the CLI evaluating it) may
    build the same one at once: the first complete save stays (a reader may be loading it) and a
    later one is dropped; only a partial folder is replaced. The check and the move hold a lock, so
    one writer cannot take another's complete folder for a partial one and delete it."""
    import fcntl

    with open(out.parent / ".publish.lock", "a+") as lock:  # one per folder (merged/, chains/), kept
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / marker).is_file():
            if out.exists():
                shutil.rmtree(out)
            try:
                os.replace(tmp, out)
                return
            except OSError:  # a writer that took no lock (an older version) landed in between
                if not (out / marker).is_file():
                    raise
    shutil.rmtree(tmp, ignore_errors=True)


def lora_target_modules(model, target: str | list[str]) -> str | list[str]:
    """'all-linear' → a regex over the language model's linear layers (vision tower, projector and
    lm_head excluded); anything else is passed to PEFT unchanged."""
    import torch

    if target != "all-linear":
        return target
    for lm_attr in ("language_model", "text_model"):
        leaves = {
            name.split(".")[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and lm_attr in name.split(".")
        }
        if leaves:
            return rf".*\b{lm_attr}\b.*\.({'|'.join(sorted(leaves))})"
    return "all-linear"  # PEFT's own: every linear layer except the output layer


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _callback(on_log: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None, curve: list):
    from transformers import TrainerCallback

    class _Stream(TrainerCallback):
        stopped = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return  # one curve per round, written by rank 0
            logs = logs or {}
            record = {"step": int(state.global_step), "max_steps": int(state.max_steps or 0)}
            for key in (*CURVE_KEYS, *_EXTRA_KEYS):
                if key in logs and isinstance(logs[key], (int, float)) and math.isfinite(logs[key]):
                    record[key] = float(logs[key])
            if isinstance(logs.get("loss"), (int, float)) and not math.isfinite(logs["loss"]):
                record["loss_nonfinite"] = True  # kept out of the curve (strict JSON), not forgotten
            for key in ("train_loss", "train_runtime"):
                if isinstance(logs.get(key), (int, float)) and math.isfinite(logs[key]):
                    record[key] = float(logs[key])
            curve.append(record)
            if on_log is not None:
                on_log(record)

        def on_step_end(self, args, state, control, **kwargs):
            stop = should_stop is not None and should_stop()
            if args.world_size > 1:
                # Every rank must leave the loop at the same step, or the others block in the next
                # gradient all-reduce: a stop seen by any rank stops all of them.
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1.0 if stop else 0.0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                _Stream.stopped = True
                control.should_training_stop = True
            return control

    return _Stream()


WEIGHT_COLUMNS = ("dpo_weight", "sft_weight")


@functools.cache
def weighted_dpo_trainer_class(sft_normalization: str = "token_mean"):
    """``DPOTrainer`` with per-row weights from the dataset's ``dpo_weight`` and ``sft_weight``
    columns (a missing column = 1 and 0 per row):

        loss = mean_i(d_i·l_i) + Σ_i d_i·s_i·NLL_i / Σ_{i: s_i > 0} d_i·T_i     ("token_mean")
        loss = mean_i(d_i·l_i) + mean_i(d_i·s_i·NLL_i / 1024)                  ("sum_1024", STIC's)

    l_i is row i's sigmoid DPO loss, NLL_i / T_i the summed token NLL / token count of its chosen
    answer. With every d_i = 1 and s_i = s this is TRL's own ``loss_type=["sigmoid", "sft"]``,
    ``loss_weights=[1, s]``; a weight d_i counts a row d_i times (POVID's two terms,
    ``povid_row_weights``), s_i = 0 gives a row DPO only (answers unfit to imitate). TRL computes
    the unweighted loss; the policy and reference outputs of its own forwards (forward hooks, no
    extra pass) give the per-row terms, and the difference is added."""
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    class WeightedDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner = self.data_collator

            def collate(examples):
                weights = {c: torch.tensor([float(ex.pop(c)) for ex in examples]) for c in WEIGHT_COLUMNS
                           if c in examples[0]}
                batch = inner(examples)
                batch.update(weights)
                return batch

            self.data_collator = collate

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns,
                                       *(c for c in WEIGHT_COLUMNS if c not in self._signature_columns)]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            dpo_w = inputs.pop("dpo_weight", None)
            sft_w = inputs.pop("sft_weight", None)
            outputs: dict[str, Any] = {}

            def keep_outputs(module, args, output):
                # TRL runs the policy with grad, then the reference (adapter off) under no_grad.
                outputs.setdefault("policy" if torch.is_grad_enabled() else "reference", output)

            # On the unwrapped model: under DDP ``model`` is the wrapper, but TRL runs the reference
            # pass through ``self.model``; both passes go through the wrapped module.
            handle = self.accelerator.unwrap_model(model).register_forward_hook(keep_outputs)
            try:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()
            loss = result[0] if return_outputs else result
            need_dpo = dpo_w is not None and bool((dpo_w != 1).any())
            need_sft = sft_w is not None and bool((sft_w > 0).any())
            if not (need_dpo or need_sft):
                return result
            if "policy" not in outputs or (need_dpo and "reference" not in outputs and not self.precompute_ref_logps):
                if torch.is_grad_enabled():  # training: a silently missing term would be a wrong loss
                    raise RuntimeError("weighted DPO: TRL's forward outputs were not seen (TRL internals changed?)")
                return result  # a no-grad evaluation pass: TRL's unweighted loss and metrics
            mask = inputs["completion_mask"][..., 1:]
            policy = outputs["policy"].log_probs[:, -mask.size(1):]
            chosen_tok, _ = policy.chunk(2, dim=0)
            d = torch.ones(chosen_tok.size(0), device=policy.device, dtype=policy.dtype) if dpo_w is None \
                else dpo_w.to(policy.device, policy.dtype)
            mode = "train" if self.model.training else "eval"
            if need_dpo:  # TRL's per-row sigmoid loss again, from the same outputs, weighted
                if self.loss_types != ["sigmoid"] or self.f_divergence_type != "reverse_kl" \
                        or self.ld_alpha is not None or self.use_weighting or self.label_smoothing:
                    raise ValueError("per-row DPO weights (povid_two_term) need TRL's plain sigmoid DPO loss")
                chosen, rejected = policy.sum(dim=1).chunk(2, dim=0)
                if self.precompute_ref_logps:
                    ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
                else:
                    ref = outputs["reference"].log_probs[:, -mask.size(1):]
                    ref_chosen, ref_rejected = ref.sum(dim=1).chunk(2, dim=0)
                per_row = -F.logsigmoid(self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
                loss = loss + (d * per_row).mean() - per_row.mean()
            if need_sft:
                chosen_mask, _ = mask.chunk(2, dim=0)
                chosen_mask = chosen_mask.to(policy.dtype)
                s_ = sft_w.to(policy.device, policy.dtype)
                nll = -(chosen_tok * chosen_mask).sum(dim=1)
                if sft_normalization == "sum_1024":
                    sft = (d * s_ * nll).mean() / SFT_SUM_SCALE
                else:
                    tokens = (d * chosen_mask.sum(dim=1) * (s_ > 0)).sum().clamp_min(1)
                    sft = (d * s_ * nll).sum() / tokens
                # This rank's value, not gathered: a collective here would be reached only by the
                # ranks whose batch has a weighted row and would desynchronise DDP.
                self._metrics[mode]["sft_loss"].append(sft.detach().item())
                loss = loss + sft
            return (loss, result[1]) if return_outputs else loss

    return WeightedDPOTrainer


def train_round(
    pairs: Sequence[dict],
    base_model_path: str | os.PathLike,
    parent_adapter: str | Sequence[str] | None,
    out_dir: str | os.PathLike,
    config: DPORoundConfig | None = None,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train one round's LoRA on ``pairs`` (dicts with prompt, chosen, rejected, image or
    image_path, method, meta) on top of ``base_model_path`` + the ``parent_adapter`` chain merged.

    The adapter is saved to ``out_dir`` atomically (a temp dir renamed when complete), with
    ``lineage.json``; a stop request (``should_stop()`` true, checked after every step and before
    the model loads) ends training cleanly and saves nothing (``adapter_path`` None).
    """
    from trl import DPOConfig, DPOTrainer

    config = config or DPORoundConfig()
    t0 = time.perf_counter()
    out = _new_adapter_dir(out_dir)
    if not pairs:
        raise ValueError("no training pairs: review some pairs (or allow automatic labels) first")
    if config.povid_stage1_epochs > 0:
        return _train_povid_stages(pairs, base_model_path, parent_adapter, out, config, on_log, should_stop)
    chain = as_chain(parent_adapter)
    dropped = 0
    if config.balance_answers:
        pairs, dropped = balance_answer_prior(pairs, config.seed)
    # One training row per pair (POVID's terms are weighted, not repeated): n_rows == n_pairs.
    row_sft = [pair_sft_weight(p, config) for p in pairs]
    row_dpo = povid_row_weights(pairs) if config.povid_two_term else [1.0] * len(pairs)
    if len(set(row_dpo)) > 1 and config.loss_type != "sigmoid":  # before any model is loaded
        raise ValueError(f"POVID's two-term loss weights the sigmoid DPO loss per row; loss_type is "
                         f"{config.loss_type!r} and the POVID pairs are unequal in kind: set povid_two_term=false")
    # Uniform weights with TRL's token-mean SFT term: TRL's own losses; else the weighted subclass.
    weighted = len(set(row_sft)) > 1 or len(set(row_dpo)) > 1 or (
        config.sft_normalization != "token_mean" and any(w > 0 for w in row_sft))
    dataset = build_dpo_dataset(pairs, row_sft if weighted else None, row_dpo if weighted else None)
    _, _, world_size = distributed_rank()
    lineage = {
        "base_model": str(base_model_path),
        "parents": chain,
        "config": config.to_dict(),
        "n_pairs": len(pairs),
        "n_rows": len(pairs),
        "n_dropped_by_balance": dropped,
        "n_sft_rows": sum(1 for w in row_sft if w > 0),
        "dpo_row_weights": sorted(set(row_dpo)),
        "pair_ids": [p.get("pair_id") for p in pairs],
        "world_size": world_size,
    }
    trl_sft = row_sft[0] > 0 and not weighted  # TRL's own term on every row
    types, weights = config.loss_types() if trl_sft else ([config.loss_type], [1.0])
    trainer_class = weighted_dpo_trainer_class(config.sft_normalization) if weighted else DPOTrainer
    lineage["lora_dropout_applied"] = 0.0 if config.disable_dropout else config.lora_dropout
    return _run_round(trainer_class, lambda common: DPOConfig(**common, beta=config.beta, loss_type=types,
                                                              loss_weights=weights,
                                                              disable_dropout=config.disable_dropout),
                      dataset, pairs, base_model_path, chain, out, config, lineage, t0, on_log, should_stop)


def _train_povid_stages(pairs: Sequence[dict], base_model_path, parent_adapter, out: Path, config: DPORoundConfig,
                        on_log, should_stop) -> TrainResult:
    """POVID's two stages as one round (``DPORoundConfig.povid_stage1_epochs``): stage 1 on the
    text-hallucinated pairs, stage 2 on every pair with the two-term loss on top of stage 1 merged;
    the saved adapter is both LoRAs concatenated. The curve's steps run on across the stages and
    each record names its ``stage``; a stop in either stage saves nothing."""
    from dataclasses import replace

    t0 = time.perf_counter()
    dropped = 0
    if config.balance_answers:  # once for both stages, so they see the same pairs
        pairs, dropped = balance_answer_prior(pairs, config.seed)
    text_pairs = povid_stage1_pairs(pairs)
    chain = as_chain(parent_adapter)
    one_stage = replace(config, povid_stage1_epochs=0.0, balance_answers=False)
    stages = [(text_pairs, replace(one_stage, num_epochs=config.povid_stage1_epochs)),
              (pairs, replace(one_stage, povid_two_term=True))]
    rank, _, world_size = distributed_rank()
    # Stage 1's progress needs the whole round's steps before stage 2 starts: stage 2's is
    # estimated as the Trainer counts it (each worker a 1/world_size shard of batches, an update
    # every gradient_accumulation_steps of them, a partial last one included); stage 2 then reports
    # its own exact count. max_steps > 0 caps each stage.
    batches = [math.ceil(len(rows) / (cfg.batch_size * world_size)) for rows, cfg in stages]
    per_epoch = [max(math.ceil(b / cfg.gradient_accumulation_steps), 1) for b, (_, cfg) in zip(batches, stages, strict=True)]
    planned = [cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * n)
               for (_, cfg), n in zip(stages, per_epoch, strict=True)]
    # One scratch folder for every worker: rank 0 saves each stage there, and all load stage 1 from it.
    scratch = out.parent / f".{out.name}.stages"
    stage_dirs = [scratch / "stage1", scratch / "stage2"]
    if rank == 0:
        for d in stage_dirs:
            shutil.rmtree(d, ignore_errors=True)  # left by a killed attempt
    scratch.mkdir(parents=True, exist_ok=True)
    results: list[TrainResult] = []
    curve: list[dict] = []
    try:
        for stage, (rows, cfg) in enumerate(stages, start=1):
            done = sum(r.steps for r in results)
            total = done + sum(planned[stage - 1:])

            def relay(rec: dict, stage: int = stage, done: int = done, total: int = total) -> None:
                exact = done + rec["max_steps"] if stage == len(stages) and rec.get("max_steps") else total
                rec = {**rec, "stage": stage, "step": done + rec["step"], "max_steps": exact}
                curve.append(rec)
                if on_log is not None:
                    on_log(rec)

            result = train_round(rows, base_model_path, [*chain, *map(str, stage_dirs[:stage - 1])],
                                 stage_dirs[stage - 1], cfg, relay, should_stop)
            results.append(result)
            steps = sum(r.steps for r in results)
            if result.stopped:  # every worker stops at the same step (_callback)
                return TrainResult(None, True, steps, len(pairs), len(pairs), curve, time.perf_counter() - t0,
                                   {"n_dropped_by_balance": dropped})
            _all_workers_here()  # rank 0 has saved the stage before anyone loads it
        lineage = {**results[1].lineage, "parents": chain, "config": config.to_dict(), "steps": steps,
                   "seconds": time.perf_counter() - t0, "n_dropped_by_balance": dropped,
                   "povid_stages": [{"stage": i, "n_pairs": r.n_pairs, "steps": r.steps,
                                     "epochs": cfg.num_epochs if cfg.max_steps <= 0 else None,
                                     "max_steps": cfg.max_steps if cfg.max_steps > 0 else None, "lora_r": cfg.lora_r}
                                    for i, (r, (_, cfg)) in enumerate(zip(results, stages, strict=True), start=1)]}
        if rank != 0:
            return TrainResult(None, False, steps, len(pairs), len(pairs), curve, time.perf_counter() - t0, lineage)
        _write_adapter(out, lambda folder: concatenate_loras([str(d) for d in stage_dirs], folder), lineage, curve)
    finally:
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(str(out), False, steps, len(pairs), len(pairs), curve, time.perf_counter() - t0, lineage)


def _all_workers_here() -> None:
    """A barrier across data-parallel workers (nothing in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def concatenate_loras(adapter_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """One LoRA adapter whose update is the sum of the given adapters' updates, each scaled as
    PEFT scales it: A = [s1·A1; s2·A2; …], B = [B1, B2, …], rank Σr, α = rank (scaling 1). Loading
    it on a base gives exactly what merging the adapters one after the other gives (merging adds
    each update to the same weights), so "merge stage 1, train a new LoRA" stays one adapter.
    The adapters must target the same modules with plain LoRA (no DoRA, rank or alpha patterns,
    modules_to_save)."""
    import torch
    from safetensors.torch import save_file

    from lvlm_studio.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora

    configs, weights, scales = zip(*(read_lora(d) for d in adapter_dirs), strict=True)
    for d, w in zip(adapter_dirs, weights, strict=True):
        if set(w) != set(weights[0]):
            raise ValueError(f"cannot concatenate LoRA adapter {d}: it adapts other modules than the first")
    merged: dict[str, torch.Tensor] = {}
    for key in weights[0]:
        if key.endswith(".lora_A.weight"):
            merged[key] = torch.cat([s * w[key].float() for s, w in zip(scales, weights, strict=True)], dim=0)
        else:  # lora_B (read_lora refuses any other tensor)
            merged[key] = torch.cat([w[key].float() for w in weights], dim=1)
        merged[key] = merged[key].to(weights[0][key].dtype).contiguous()
    rank = sum(int(c["r"]) for c in configs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    save_file(merged, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {**configs[0], "r": rank, "lora_alpha": rank, "use_rslora": False}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def build_sft_dataset(rows: Sequence[dict]):
    """TRL's conversational prompt-completion format with images, so the SFT loss covers the answer
    only: ``images`` [image], ``prompt`` [user turn], ``completion`` [assistant turn]. A row gives
    ``image`` (PIL) or ``image_path``, ``prompt`` and ``answer``."""
    from datasets import Dataset, Features, Image, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    data: dict[str, list] = {"images": [], "prompt": [], "completion": []}
    for r in rows:
        if not str(r.get("answer") or "").strip():
            raise ValueError(f"SFT row {r.get('item_id')}: empty answer")
        data["images"].append([r.get("image") if r.get("image") is not None else str(r["image_path"])])
        data["prompt"].append(_prompt_turns(r["prompt"]))
        data["completion"].append([{"role": "assistant", "content": r["answer"]}])
    return Dataset.from_dict(data, features=Features({"images": List(Image()), "prompt": turn, "completion": turn}))


def train_sft_round(
    rows: Sequence[dict],
    base_model_path: str | os.PathLike,
    parent_adapter: str | Sequence[str] | None,
    out_dir: str | os.PathLike,
    config: DPORoundConfig | None = None,
    on_log: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """STIC's stage 2: supervised fine-tuning (TRL ``SFTTrainer`` + a fresh LoRA on the parent chain
    merged) on description-infused rows (``methods.stic.build_description_sft_data``: the prompt is
    "Image description: ... + question", the target the original answer; loss on the answer only).
    Same adapter layout, lineage, curve, stop and atomic save as ``train_round``."""
    from trl import SFTConfig, SFTTrainer

    config = config or DPORoundConfig(objective="stic_infusion")
    t0 = time.perf_counter()
    out = _new_adapter_dir(out_dir)
    if not rows:
        raise ValueError("no instruction items to fine-tune on (items with a reference answer)")
    chain = as_chain(parent_adapter)
    dataset = build_sft_dataset(rows)
    lineage = {"base_model": str(base_model_path), "parents": chain, "config": config.to_dict(),
               "objective": "stic_infusion", "n_pairs": len(rows), "n_rows": len(rows), "n_sft_rows": len(rows),
               "item_ids": [r.get("item_id") for r in rows], "world_size": distributed_rank()[2]}
    return _run_round(SFTTrainer, lambda common: SFTConfig(**common), dataset, rows, base_model_path, chain, out,
                      config, lineage, t0, on_log, should_stop)


def _new_adapter_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"adapter directory {out} already exists; a round never overwrites one")
    return out


def _checkpointing_arg() -> str:
    from transformers import TrainingArguments

    fields_ = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields_ else "gradient_checkpointing"


def _trainer_args(config: DPORoundConfig, setup: dict, work: Path) -> dict[str, Any]:
    """The TrainingArguments a DPO and an SFT round share."""
    return dict(
        output_dir=str(work),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio in transformers 5
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not setup["cuda"],
        bf16=setup["bf16"],
        # transformers 5.25's name; older 5.x releases (allowed by requirements) know the other one
        **{_checkpointing_arg(): setup["grad_ckpt"]},
        # A NaN/inf step loss is logged as it is, not replaced by the window's mean (0.0 once every
        # step is NaN): TrainResult.diverged must see it.
        logging_nan_inf_filter=False,
        # A stacked parent chain's factors are module buffers, the same on every worker: DDP would
        # broadcast them all before every forward (~1 GB per rank-128 round of a 7B).
        ddp_broadcast_buffers=False if setup["stacked"] else None,
        max_length=config.max_length,
        seed=config.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _run_round(trainer_class, make_args: Callable[[dict], Any], dataset, rows: Sequence[dict], base_model_path,
               chain: list[str], out: Path, config: DPORoundConfig, lineage: dict, t0: float,
               on_log, should_stop) -> TrainResult:
    """What a DPO and an SFT round share once their data is built: load the model (a stop request is
    honoured before and after), make ``trainer_class``'s arguments (``make_args`` gets the common
    ones), train a fresh LoRA streaming the curve, and save it atomically on rank 0; a stop ends it
    cleanly with nothing saved. ``rows`` (pairs or SFT rows) are what the length check measures."""
    from peft import LoraConfig

    n, curve = len(rows), []

    def result(adapter: str | None, stopped: bool, steps: int) -> TrainResult:
        return TrainResult(adapter, stopped, steps, n, n, curve, time.perf_counter() - t0, lineage)

    if should_stop is not None and should_stop():
        return result(None, True, 0)
    model, processor, setup = _training_model(base_model_path, chain, config, rows, lineage)
    if should_stop is not None and should_stop():
        return result(None, True, 0)
    work = out.parent / f".{out.name}.run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    args = make_args(_trainer_args(config, setup, work))
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=lora_target_modules(model, config.target_modules), task_type="CAUSAL_LM")
    stream = _callback(on_log, should_stop, curve)
    trainer = _warmup_leaves_a_step(trainer_class)(model=model, args=args, train_dataset=dataset,
                                                   processing_class=processor, peft_config=peft_config,
                                                   callbacks=[stream])
    trainer.data_collator = AnswersAsWritten(trainer.data_collator, processor)
    lineage["answer_closing"] = trainer.data_collator.closing
    if config.quantization is not None or any(getattr(model, f"is_loaded_in_{b}bit", False) for b in (4, 8)):
        _adapter_in_float32(trainer.model)  # also a checkpoint saved quantized
    try:
        trainer.train()
        steps = int(trainer.state.global_step)
        if type(stream).stopped:
            return result(None, True, steps)
        if not trainer.is_world_process_zero():
            return result(None, False, steps)  # data-parallel workers hold the same weights; rank 0 saves them
        _save_adapter(trainer.model, out, lineage, curve, steps, t0, setup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result(str(out), False, steps)


def _adapter_in_float32(model) -> None:
    """Keep a QLoRA round's LoRA factors in float32, as PEFT keeps them on an unquantized base. TRL
    casts them to bf16 on a quantized model (the QLoRA paper's setting), where an Adam step of about
    the lr is lost below bf16's resolution (2^-8 of the value): at the papers' lr 1e-7, lora_A (~1e-2)
    never moved. The optimizer is built in ``train()``, so it steps these float32 tensors."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _warmup_leaves_a_step(trainer_class):
    """``trainer_class`` whose warmup ratio never takes every step. transformers rounds a ratio's
    warmup up (ceil(0.03 * 1) = 1), and the first warmup step runs at lr 0: a one-step round
    (a handful of reviewed pairs, one epoch) trained nothing yet ended "done" with a zero adapter.
    Such a round now trains its step at the full lr; longer rounds keep their warmup unchanged."""

    class WarmupLeavesAStep(trainer_class):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            ratio = self.args.warmup_steps
            if 0 < ratio < 1 and self.args.get_warmup_steps(num_training_steps) >= num_training_steps:
                self.args.warmup_steps = 0
            return super().create_scheduler(num_training_steps, optimizer)

    WarmupLeavesAStep.__name__ = WarmupLeavesAStep.__qualname__ = trainer_class.__name__
    return WarmupLeavesAStep


def _training_model(base_model_path, chain: list[str], config: DPORoundConfig, rows: Sequence[dict],
                    lineage: dict) -> tuple[Any, Any, dict[str, Any]]:
    """The model a round trains (base + parent chain merged or stacked, quantized and prepared when asked) on
    this worker's device, its processor, and the hardware it resolved. The rows' sequence lengths
    are checked first (``check_sequence_lengths``, into ``lineage["lengths"]``)."""
    import torch

    _, local_rank, world_size = distributed_rank()
    device = resolve_device(config.device)
    cuda = device.startswith("cuda")
    if cuda and world_size > 1:
        device = f"cuda:{local_rank}"  # one device per worker
    # bf16 on every CUDA GPU, emulated below sm 8.0 (a T4, a V100): slower there, but half of
    # float32's memory, and this path has no fp16 mixed precision (generation uses fp16 there).
    bf16 = cuda and torch.cuda.is_bf16_supported() if config.bf16 is None else config.bf16
    grad_ckpt = cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
    model, processor = load_base_model(str(base_model_path), device, bf16, config.quantization)
    lineage["bos_written_by_template"] = match_generation_bos(processor)
    # The system turn trained with (generation must ask alike); one the template drops is not.
    rendered = system_turn_rendered(processor)
    lineage["system_prompt"] = system_prompt() if rendered else None
    if rendered is False:
        lineage["system_prompt_dropped_by_template"] = system_prompt()
        warnings.warn("LVLM_STUDIO_SYSTEM_PROMPT is set, but this model's chat template writes no system turn: "
                      "the round trains without it", stacklevel=2)
    lineage["lengths"] = check_sequence_lengths(processor, rows, config.max_length)  # fails fast, clearly
    lineage["parent_lineage"] = parent_lineage(config, model) if chain else None
    if lineage["parent_lineage"] == "stacked":
        from lvlm_studio.models.lora import stack_loras

        stack_loras(model, chain)
    else:
        errors: list[float | None] = []
        model = merge_chain(model, chain, errors)
        lineage["parent_merge_error"] = errors
        worst = max((e for e in errors if e is not None), default=None)
        if worst is not None and worst > MERGE_ERROR_WARN:
            warnings.warn(
                f"merging the parent rounds into {model.dtype} weights kept their updates only up to a rounding "
                f"error of {worst:.2f} (0 = exact; 1 = the update lost): updates this small (a low learning "
                "rate) fall below the dtype's resolution, and this round trains from, and against, a noisy "
                "parent. --config parent_lineage=stacked adds them without that noise (the default for such "
                "weights); only float32 training (--config bf16=false) keeps updates this small", stacklevel=2)
    base_dtype = model.dtype
    if config.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    return model, processor, {"device": device, "cuda": cuda, "bf16": bf16, "grad_ckpt": grad_ckpt,
                              "base_dtype": base_dtype, "stacked": lineage["parent_lineage"] == "stacked"}


def parent_lineage(config: DPORoundConfig, model) -> str:
    """"merged" or "stacked": how ``model`` (the loaded base) takes the parent chain
    (``DPORoundConfig.parent_lineage``; "auto" stacks unless the weights are float32)."""
    from lvlm_studio.models.lora import merges_exactly

    if config.parent_lineage != "auto":
        return config.parent_lineage
    return "merged" if merges_exactly(model) else "stacked"


def _save_adapter(model, out: Path, lineage: dict, curve: list, steps: int, t0: float, setup: dict) -> None:
    """Write the trained adapter with its lineage (steps, time, hardware added) and curve."""
    lineage.update(steps=steps, seconds=time.perf_counter() - t0,
                   hardware=_hardware_record(model, setup["base_dtype"], setup["device"]))
    _write_adapter(out, lambda folder: model.save_pretrained(str(folder)), lineage, curve)


def _write_adapter(out: Path, write_weights: Callable[[Path], Any], lineage: dict, curve: list) -> None:
    """Write an adapter (``write_weights(folder)``) with its lineage and curve to ``out`` atomically:
    into a temporary sibling renamed when complete, so a reader sees no adapter or a whole one.
    The files and the rename reach the disk before this returns (the round is marked done after
    it): after a power loss a done round's adapter is whole, not truncated."""
    tmp = _fresh_tmp_sibling(out)
    write_weights(tmp)
    (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str))
    (tmp / "curve.json").write_text(json.dumps(curve))
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    _fsync(out.parent)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hardware_record(model, base_dtype, device: str) -> dict[str, Any]:
    """What the round ran with, read off the model rather than the config's request (on CUDA the
    config's None picks bf16 and gradient checkpointing): the dtype the base was loaded in (with
    quantization, its compute dtype), the dtype the adapter trained in, the quantized layer kind, and
    whether checkpointing was on."""
    kinds = {type(m).__name__ for m in model.modules()}
    trained = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    return {
        "device": device,
        "dtype": str(base_dtype).removeprefix("torch."),
        "adapter_dtype": "/".join(trained) or None,
        "quantization": "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else None,
        "gradient_checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
    }


def _encode_turns(processor, image, prompt_text: str, answer: str | None = None,
                  frame: tuple[str, str] | None = None):
    """The chat prompt with its image, encoded by the processor (image tokens expanded), and the
    answer's completion ids as a round trains on them (``AnswersAsWritten``). ``frame``: the
    processor's ``answer_frame``, when the caller has read it already."""
    prompt = chat_prompt(processor, prompt_text)
    enc = processor(images=[image], text=[prompt], return_tensors="pt", add_special_tokens=False)
    if answer is None:
        return enc, None
    completion = answer_as_written(answer, *(frame or answer_frame(processor)))
    comp = processor.tokenizer([completion], return_tensors="pt", add_special_tokens=False)["input_ids"]
    return enc, comp


def answer_as_written(answer: str, opening: str, closing: str) -> str:
    """A completion's text as the model writes it after the opened assistant turn: the
    template's opening, the answer without trailing whitespace, the end of turn."""
    return after_opening(opening, answer.rstrip()) + closing


class AnswersAsWritten:
    """Wraps TRL's vision collators (``DataCollatorForVisionPreference``,
    ``DataCollatorForVisionLanguageModeling``): each conversational row becomes a text row with
    the prompt as the model is asked it (the dataset's turns through the chat template, the
    assistant turn opened) and each answer as the model writes it (``answer_as_written``).

    TRL renders a completion as whatever the template puts after the prompt. llava-hf's LLaVA-1.5
    template ends an assistant turn with a bare " " and no EOS, so a round would train the model
    to end every answer with a space token and never to stop (the SFT term imitates it); here the
    answer ends with the EOS it was trained with. Templates that close the turn with a token
    (Qwen's "<|im_end|>\n", the demo's "</s>") train that token without the newline after it,
    which generation never writes. The demo model's rows tokenise exactly as under TRL's own
    rendering."""

    def __init__(self, inner, processor):
        self.inner, self.processor = inner, processor
        self.opening, self.closing = answer_frame(processor)

    def __call__(self, examples: list[dict]) -> dict:
        return self.inner([self.render(ex) for ex in examples])

    def render(self, example: dict) -> dict:
        from trl.data_utils import is_conversational, prepare_multimodal_messages

        if not is_conversational(example):
            return example
        images = example["images"] if "images" in example else [example["image"]]
        turns = prepare_multimodal_messages(copy.deepcopy(example["prompt"]), images=images)
        row = {**example, "prompt": self.processor.apply_chat_template(turns, add_generation_prompt=True,
                                                                       tokenize=False)}
        for key in ("chosen", "rejected", "completion"):
            if key in example:
                row[key] = answer_as_written(_turn_text(example[key]), self.opening, self.closing)
        return row


def _turn_text(turns: list[dict]) -> str:
    """The text of a one-turn assistant answer in TRL's conversational format (string content or
    typed parts)."""
    if len(turns) != 1 or turns[0].get("role") != "assistant":
        raise ValueError(f"a completion must be one assistant turn, got roles {[t.get('role') for t in turns]}")
    content = turns[0]["content"]
    return content if isinstance(content, str) else "".join(
        part.get("text") or "" for part in content if part.get("type") == "text")


def _pair_pixels(pair: dict) -> int:
    """The pair's image size in pixels, read from the file's header (no decoding)."""
    image = pair.get("image")
    if image is None:
        from PIL import Image

        with Image.open(pair["image_path"]) as opened:
            width, height = opened.size
    else:
        width, height = image.size
    return width * height


def _pair_image(pair: dict):
    from lvlm_studio.media import load_image

    return pair["image"] if pair.get("image") is not None else load_image(pair["image_path"])


def match_generation_bos(processor) -> bool:
    """Make a round train on the prompts the model is asked with. TRL tokenises the chat
    template's text without special tokens, while generation (``HFBackend._inputs``) lets the
    tokenizer add its BOS when the template does not write one: llava-hf's LLaVA-1.5 template
    writes none and its tokenizer adds <s>, so rounds trained on prompts without the BOS that
    every answer is generated and evaluated with. Such a template gets the BOS written in front.
    Returns whether it changed."""
    tok = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None)
    if tok.bos_token is None or tok.bos_token_id is None or not isinstance(template, str):
        return False
    if chat_prompt(processor, "x").startswith(tok.bos_token):
        return False
    ids = tok("x", add_special_tokens=True)["input_ids"]
    if not ids or ids[0] != tok.bos_token_id:
        return False  # the tokenizer adds no BOS either: generation has none
    processor.chat_template = tok.bos_token + template
    return True


def check_sequence_lengths(processor, pairs: Sequence[dict], max_length: int | None) -> dict[str, Any]:
    """Before training: does the prompt, image tokens included, fit in ``max_length``? A prompt that
    does not fit is a ValueError that says what to set (TRL would fail at the first step, or
    train on rows whose image was cut). Measured on the first pair, the one with the longest
    prompt text and the one with the largest image (models of dynamic resolution, Qwen2-VL's or
    LLaVA-1.6's, give a larger image more tokens); every answer's length is counted. Returns the
    figures for the lineage, with how many pairs will have an answer cut."""
    if not pairs:
        return {}
    longest_prompt = max(range(len(pairs)), key=lambda i: len(str(pairs[i]["prompt"])))
    largest_image = max(range(len(pairs)), key=lambda i: _pair_pixels(pairs[i]))
    prompt_tokens = max(int(_encode_turns(processor, _pair_image(pairs[i]), pairs[i]["prompt"])[0]["input_ids"].shape[1])
                        for i in {0, longest_prompt, largest_image})
    tok = processor.tokenizer
    answers = [max(len(tok(str(p[k]), add_special_tokens=False)["input_ids"])  # pairs, or SFT rows' "answer"
                   for k in ("chosen", "rejected", "answer") if p.get(k) is not None) for p in pairs]
    out = {"prompt_tokens": prompt_tokens, "longest_answer_tokens": max(answers), "max_length": max_length,
           "answers_cut": 0 if max_length is None else sum(prompt_tokens + a + 2 > max_length for a in answers)}
    if max_length is not None and prompt_tokens >= max_length:
        raise ValueError(
            f"max_length {max_length} is too short for this model: a prompt with its image is {prompt_tokens} "
            f"tokens, and the longest answer {max(answers)} more; set max_length to at least "
            f"{prompt_tokens + max(answers) + 2} (--config max_length=N, or None for no limit)")
    return out


def sequence_logprobs(model, processor, pairs: Sequence[dict], which: str) -> list[float]:
    """Summed log-prob of each pair's ``which`` ("chosen"/"rejected") answer under ``model``
    (teacher-forced, same chat format as training). For checks and the UI's margin display."""
    import torch

    out, frame = [], answer_frame(processor)
    model.eval()
    for p in pairs:
        enc, comp = _encode_turns(processor, _pair_image(p), p["prompt"], p[which], frame)
        ids = torch.cat([enc["input_ids"], comp], dim=1)
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(model.device),
                attention_mask=torch.ones_like(ids).to(model.device),
                pixel_values=enc["pixel_values"].to(model.device, model.dtype),
            ).logits.float()
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        targets = ids[0, 1:].to(logp.device)
        n = comp.shape[1]
        out.append(float(logp[-n:].gather(1, targets[-n:, None]).sum()))
    return out
