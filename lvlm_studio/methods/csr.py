"""CSR: Calibrated Self-Rewarding (Zhou et al. 2024, arXiv 2405.14622), sentence-level beam search.

Per item the answer grows one sentence at a time. Every kept partial answer is continued
``num_candidates`` times (diverse group beam search by default, as the reference code runs it);
each new sentence gets a text score (the model's mean token log-prob), a CLIP image score
(100·cos of the image and that sentence alone) and a calibrated reward; among the non-final
children at a depth the top ``keep_top`` and bottom ``keep_bottom`` by cumulative text score
survive (good *and* bad paths on purpose, so both ends of the pair come from one search).
Complete answers are scored (``CSRConfig.answer_score``: the paper's mean sentence reward, the
reference's sum/(n+1), or the default centred sum); chosen = best, rejected = worst.

Two implementations share the node arithmetic:
  * ``run_csr``: the image + prompt are encoded once per item (``backend.open_prefix``), nodes carry
    token ids (never decode→re-tokenise), all live nodes of an item are continued in one
    ``backend.extend`` call (of all ``item_batch`` items at once when the backend offers the
    optional ``extend_many`` and the expansion is greedy), and the CLIP scorer sees every new
    sentence of a depth in one batch (of all items when it exposes ``embed_texts``/``embed_image``)
    with the image embedding cached under ``image_key``.
  * ``run_csr_reference``: what the reference code does: batch 1, every expansion re-encodes the
    image and re-tokenises the full text prefix, CLIP re-encodes the image for every sentence.
    Kept for the benchmark; on a deterministic backend it yields the same sentences and scores.

Reward modes (``CSRConfig.reward_mode``) and how each tames the scales (a probability product
in [0, 1] vs 100·cos in [-100, 100]):
  * ``"paper"`` (default: the published formulation, and its rewards are absolute, so answers from
    different branches compare directly and the pair margin means something):
    R(s) = λ·max(100·cos, 0) + (1−λ)·Π p(token), λ = 0.9. No normalisation: the raw scales are
    mixed as the paper writes them, so the text term adds at most 1−λ = 0.1 while the image term
    spans 0..90; in practice the CLIP score decides, and the text likelihood acts as a tie-break.
  * ``"reference"`` (the reference code, construct.py/utils.py): the children of one node are
    ranked by text score and by raw CLIP score, rank = (index+1)/n with the best at 1/n, and
    mixed as α·clip_rank + (1−α)·text_rank with α = 0.9. Ranks are scale-free in [1/n, 1], which
    removes the scale problem but makes a reward only comparable among siblings. The reference's
    "smaller is better" is negated here so that a higher reward is better in every mode (the
    negation keeps the reference's ordering, also under its sum/(n+1) answer score).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from collections.abc import Sequence as SeqType
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from lvlm_studio.methods.sentences import clean_reason
from lvlm_studio.models.base import (
    STOP_RULES,
    GenerationParams,
    Sequence,
    VLMBackend,
    backend_answer_ids,
    check_temperature,
)


@runtime_checkable
class ImageTextScorer(Protocol):
    def score(self, image: Image.Image, texts: list[str], image_key: str | None = None) -> list[float]:
        """100·cos(image, text) per text. ``image_key`` names the image for an embedding cache;
        ``None`` disables the cache (the image is encoded again). Texts longer than the text
        encoder's context are truncated by the scorer."""
        ...


ANSWER_SCORES = ("mean", "reference_mean", "centered_sum")


@dataclass
class CSRConfig:
    """CSR search settings. Defaults follow the reference code (inference_csr/sample.py and
    construct.py) unless noted."""

    # "diverse_beam": num_beams = num_beam_groups = 5, diversity_penalty 3.0, greedy (reference).
    # "sample": temperature sampling, a reasonable alternative (METHODS.md).
    expansion: Literal["diverse_beam", "sample"] = "diverse_beam"
    num_candidates: int = 5  # children per node (reference num_token_beams = 5)
    diversity_penalty: float = 3.0  # reference
    temperature: float = 0.7  # "sample" only; the project's choice (the paper gives none), not tuned
    top_p: float = 1.0  # "sample" only
    max_new_tokens: int = 70  # per sentence (reference)
    stop: tuple[str, ...] = (".",)  # the reference stops a sentence at the period token
    # "sentence" (default, a project fix): not at a period that cannot end a sentence ("1."
    # opening a numbered list, "e.g.", "Mr.", an initial; models.base.find_stop), and after a digit
    # or a lone "e"/"i" only once the next token shows no letter or digit follows ("3.5", "e.g.").
    # "any": at every period, as the reference does; it cuts "1." off as a sentence of its own,
    # which the cleaning filter then drops as too short, so a model that answers in numbered lists
    # never gets past its first item. ShapesWorld's phrasing has none of these, so the demo's
    # searches are the same.
    stop_rule: Literal["any", "sentence"] = "sentence"
    # Caps that make a node final. The reference caps the decoded text at 1024 characters and
    # has no depth cap; we cap sentences (depth) and answer tokens, so a model that never ends an
    # answer cannot grow the tree without bound. 8 sentences: twice the demo's longest caption (4
    # objects, one sentence each); 512 tokens: more than the reference's 1024 characters (~250 LLaMA tokens).
    # An answer cut at a cap is still a candidate (DPO may prefer or reject it) but, as a chosen
    # side, gets no SFT term (fit_for_sft); its finish_reason is stored with the candidate.
    max_sentences: int = 8
    max_answer_tokens: int = 512
    # "reference": the reference's rewards (α·CLIP rank + (1−α)·text rank among siblings). Its text
    # score is the sentence's mean log-prob; the reference's is HF's group-beam score, which also
    # carries the diversity penalty (3.0 per token a later group shares with an earlier one), so
    # sibling ranks and pruning can differ. The reference's pair selection needs, with it,
    # answer_score="reference_mean" and stop_rule="any" (pruning still differs as noted below).
    reward_mode: Literal["paper", "reference"] = "paper"
    lam: float = 0.9  # paper λ on the image reward (ablation 0.1/0.5/0.9 -> CHAIR_S 40.8/28.2/21.0)
    clip_alpha: float = 0.9  # reference α on the CLIP rank (construct.py --clip_alpha 0.9)
    # Pruning among the non-final children of a depth (reference: beam of 3 = top 1 + bottom 2).
    # The reference prunes only when there are >= 5 of them and keeps all 4 when there are 4; we
    # prune whenever there are more than keep_top + keep_bottom.
    keep_top: int = 1
    keep_bottom: int = 2
    prune_by: Literal["text", "reward"] = "text"  # cumulative text score (reference) or reward
    # Answer score (how complete answers rank into chosen / rejected):
    #   "mean": mean sentence reward (paper); "reference_mean": sum / (n + 1), the reference's
    #   division by the path length including the root;
    #   "centered_sum" (default, a project choice): sum over sentences of (reward − the item's mean
    #   sentence reward), so a sentence above the item's typical reward adds to the answer and one
    #   below subtracts. Why not the paper's mean: a mean rewards dropping true sentences whose
    #   reward is merely lower (a small object's CLIP score), so the chosen side is the shorter
    #   answer and DPO learns to say less. Measured on the demo (benchmarks/pair_quality.py, 200
    #   test scenes): chosen recall 77.9% (mean) / 93.0% (reference_mean) / 92.4% (centered_sum),
    #   chosen-wins share 99.3% / 87.4% / 97.3%.
    answer_score: Literal["mean", "reference_mean", "centered_sum"] = "centered_sum"
    # "centered_sum" only: a ceiling on the centring point, in reward units (None = the item mean,
    # the general default). As the model improves, most sentences of its own search tree are right,
    # the item mean rises, and right sentences that score below it (a small object's lower CLIP
    # score) start to subtract: the chosen side names fewer objects round after round and DPO
    # teaches the model to say less. A ceiling is a property of the CLIP's score scale, so it is
    # set per CLIP: the studio uses 27.5 with the demo CLIP (service.WORLD_CSR_PARAMS; measured
    # on TRAIN trees of the demo loop's rounds 0/1/2, chosen recall 92.5/92.9/85.8% -> 93.7/94.9/
    # 92.8%, chosen hallucinations per answer 0.23/0.15/0.05 -> 0.28/0.19/0.09).
    baseline_cap: float | None = None
    # Existence pairs (a project extension, off by default; on for world items with the demo CLIP,
    # service.WORLD_CSR_PARAMS): from each CSR pair derive yes/no
    # questions "Is there a {object} in the image?": objects the chosen answer names → chosen
    # "Yes", objects only the rejected answer names → chosen "No"; balanced per item. The CSR
    # paper's prompts are mixed instruction data; a captions-only prompt set otherwise leaves
    # yes/no answering to drift (demo, lr 5e-4, pure DPO: POPE F1 0.785 → 0.726 after one round).
    existence_pairs: bool = False
    existence_template: str = "Is there a {object} in the image?"  # POPE's question
    existence_answers: tuple[str, str] = ("Yes.", "No.")
    # "Absent" only when every sentence of the loser that names the object has a reward below this
    # share of the item's mean sentence reward (paper-mode rewards are >= 0; with the reference's
    # negative rank rewards the mean itself is the bar). Measured against the world's truth on the
    # TRAIN scenes' derived labels (not the test split), rounds 0/1/2 of the demo loop: share 1.0 ->
    # 93.9/94.9/84.0% right, 0.5 -> 99.3/99.1/98.0% (fewer pairs: 286/226/100 instead of 394/334/244).
    existence_absent_share: float = 0.5
    # Also ask about objects the winner never names (from the extractor's vocabulary), to fill the
    # "no" side up to as many questions as "yes" ones. Sound only where the prompt asks for every
    # object (the world's describe prompt): a COCO caption leaves most present objects unnamed.
    existence_unnamed: bool = False
    # Mark a pair's chosen answer unfit for the SFT term of a DPO round (pair meta "sft": false;
    # the round then trains that pair with DPO alone, training.pair_sft_weight) when one of its
    # sentences has a calibrated reward below this. A project extension (the paper trains pure
    # DPO): as the model improves, the chosen answer of its own search tree hallucinates more
    # than its greedy answer (demo loop, seed 0, the 200 TRAIN scenes of round 2: 13% of chosen
    # captions, 0.5% of the round-2 model's greedy ones; round 0: 20% vs 31%), and imitating it
    # made round 3 rise on seeds 0 and 2. Chosen captions with every sentence >= 33: 2% in round 2
    # (96 of 196), 4% in round 0 (102 of 196). In reward units, per CLIP like baseline_cap: the
    # studio uses 33 with the demo CLIP (service.WORLD_CSR_PARAMS); None = no mark.
    sft_min_reward: float | None = None
    clean: bool = True  # reference cleaning filter on each new sentence
    min_sentence_chars: int = 4
    max_repeated_words: int = 6
    seed: int = 0  # "sample" only; per item and depth a derived seed is passed to the backend
    item_batch: int = 8  # items searched together (prefixes held at once): memory and speed

    def __post_init__(self) -> None:
        if self.expansion not in ("diverse_beam", "sample"):
            raise ValueError(f"expansion must be 'diverse_beam' or 'sample', not {self.expansion!r}")
        if self.reward_mode not in ("paper", "reference"):
            raise ValueError(f"reward_mode must be 'paper' or 'reference', not {self.reward_mode!r}")
        if self.answer_score not in ANSWER_SCORES:
            raise ValueError(f"answer_score must be one of {ANSWER_SCORES}, not {self.answer_score!r}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, not {self.stop_rule!r}")
        if self.prune_by not in ("text", "reward"):
            raise ValueError(f"prune_by must be 'text' or 'reward', not {self.prune_by!r}")
        if self.num_candidates < 1 or self.max_sentences < 1:
            raise ValueError("num_candidates and max_sentences must be >= 1")
        check_temperature(self.temperature)
        if self.keep_top < 0 or self.keep_bottom < 0 or self.keep_top + self.keep_bottom < 1:
            raise ValueError("keep_top + keep_bottom must be >= 1")
        self.stop = tuple(self.stop)
        self.existence_answers = tuple(self.existence_answers)
        if not 0 < self.existence_absent_share <= 1:
            raise ValueError("existence_absent_share must be in (0, 1]")
        if len(self.existence_answers) != 2 or "{object}" not in self.existence_template:
            raise ValueError("existence_answers must be (yes, no) and existence_template must hold '{object}'")
        self.generation_params()  # its checks (stop strings, lengths) at construction, not mid-run

    def generation_params(self, seed: int | None = None) -> GenerationParams:
        if self.expansion == "diverse_beam":
            return GenerationParams(
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
                num_beam_groups=self.num_candidates,
                diversity_penalty=self.diversity_penalty,
                stop=self.stop,
                stop_rule=self.stop_rule,
            )
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            stop_rule=self.stop_rule,
            seed=seed,
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["existence_answers"] = list(self.existence_answers)
        return d


# ---- pure formulas (tested on hand-computed examples) -------------------------------------------


def paper_reward(clip_score: float, sum_logprob: float, lam: float = 0.9) -> float:
    """R(s) = λ·max(100·cos, 0) + (1−λ)·Π p(token); ``clip_score`` is already 100·cos."""
    import math

    return lam * max(clip_score, 0.0) + (1.0 - lam) * math.exp(sum_logprob)


def sibling_ranks(values: list[float]) -> list[float]:
    """Reference rank of each value among its siblings: sorted descending (stable), the item at
    index i gets (i+1)/n, so the best is 1/n and the worst 1."""
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i], reverse=True)
    ranks = [0.0] * n
    for index, i in enumerate(order):
        ranks[i] = (index + 1) / n
    return ranks


def reference_rewards(text_scores: list[float], clip_scores: list[float], alpha: float = 0.9) -> list[float]:
    """−(α·clip_rank + (1−α)·text_rank) per sibling (negated: higher is better)."""
    text_ranks = sibling_ranks(text_scores)
    clip_ranks = sibling_ranks(clip_scores)
    return [-(alpha * c + (1.0 - alpha) * t) for t, c in zip(text_ranks, clip_ranks, strict=True)]


def answer_score(rewards: list[float], mode: str = "mean", baseline: float = 0.0) -> float:
    """Mean sentence reward ("mean"), the reference's sum / (n + 1) ("reference_mean"), or
    "centered_sum": sum of (reward − baseline), baseline = the item's mean sentence reward."""
    if not rewards:
        return float("-inf")
    if mode == "mean":
        return sum(rewards) / len(rewards)
    if mode == "reference_mean":
        return sum(rewards) / (len(rewards) + 1)
    if mode == "centered_sum":
        return sum(r - baseline for r in rewards)
    raise ValueError(f"unknown answer score mode {mode!r}")


def prune(children: list[Any], scores: list[float], keep_top: int = 1, keep_bottom: int = 2) -> list[Any]:
    """Keep the ``keep_top`` best and ``keep_bottom`` worst by score (stable order on ties);
    everything when there are no more than keep_top + keep_bottom."""
    if len(children) <= keep_top + keep_bottom:
        return list(children)
    order = sorted(range(len(children)), key=lambda i: scores[i], reverse=True)
    kept = order[:keep_top] + (order[-keep_bottom:] if keep_bottom else [])
    return [children[i] for i in kept]


# ---- results -------------------------------------------------------------------------------------


@dataclass
class CSRCandidate:
    """A complete answer. ``sentences``: ``[{start, end, text, text_logprob, sum_logprob,
    clip_score, reward}]`` with offsets into ``text``; ``token_ids`` exclude the EOS token."""

    text: str
    token_ids: list[int]
    sentences: list[dict[str, Any]]
    score: float
    text_score: float  # cumulative mean log-prob (the pruning score)
    finish_reason: str  # "eos", "max_sentences" or "max_tokens"


@dataclass
class CSRResult:
    prompt: str
    image_key: str
    candidates: list[CSRCandidate]
    chosen: int | None
    rejected: int | None
    margin: float | None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pair(self) -> bool:
        # A tie (every answer scored the same, as rank-based rewards can) says nothing about which
        # answer is better: no pair, rather than an arbitrary one with margin 0.
        return self.chosen is not None and self.rejected is not None and bool(self.margin)


@dataclass
class CSRProgress:
    item_index: int
    depth: int
    live: int
    complete: int
    done: bool


ProgressFn = Callable[[CSRProgress], None]
Item = tuple[Image.Image, str, "str | None"]


# ---- the search ---------------------------------------------------------------------------------


@dataclass
class _Node:
    ids: list[int]
    text: str
    score: float  # cumulative text score
    reward_sum: float
    sentences: list[dict[str, Any]]
    depth: int
    finish_reason: str | None = None


def image_key_of(image: Image.Image) -> str:
    """A content hash for the CLIP cache when the caller gave no key."""
    h = hashlib.sha256()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _ItemSearch:
    """The search state of one item; the expansion and the CLIP call are injected so that the fast
    and the reference path share every score, filter and pruning decision."""

    def __init__(self, index: int, image: Image.Image, prompt: str, image_key: str, config: CSRConfig,
                 item_seed: int | None = None):
        self.index = index
        self.item_seed = item_seed
        self.image = image
        self.prompt = prompt
        self.image_key = image_key
        self.config = config
        self.live: list[_Node] = [_Node([], "", 0.0, 0.0, [], 0)]
        self.complete: list[_Node] = []
        self.depth = 0
        self.stats: dict[str, Any] = {"expansions": 0, "backend_calls": 0, "clip_calls": 0, "dropped": {}}

    @property
    def active(self) -> bool:
        return bool(self.live)

    def seed(self) -> int:
        """Sampling's seed at this depth: from the item's own seed when the caller gave one (the
        service keys it by item id, so chunking or resuming a run does not change an item's
        draws), else from the run's seed and the item's position in this call."""
        if self.item_seed is not None:
            return (self.item_seed * 1009 + self.depth) % 2**63  # torch's and vLLM's seed range
        return self.config.seed * 1_000_003 + self.index * 1009 + self.depth

    def absorb(
        self,
        expansions: list[list[Sequence]],
        base_ids: list[list[int]],
        decode: Callable[[list[int]], str],
        clip: Callable[[list[str]], list[float]],
    ) -> None:
        """Turn the continuations of ``self.live`` into children, score, filter and prune them."""
        groups = self.children(expansions, base_ids, decode)
        texts = self.new_sentences(groups)
        self.settle(groups, clip(texts) if texts else [])

    def children(
        self,
        expansions: list[list[Sequence]],
        base_ids: list[list[int]],
        decode: Callable[[list[int]], str],
    ) -> list[list[tuple[_Node, bool]]]:
        """Phase 1 of ``absorb``: the children of every live node (filtered, deduplicated)."""
        # (child, has a new sentence): a bare EOS after a sentence completes the parent unchanged.
        groups: list[list[tuple[_Node, bool]]] = []
        self.stats["expansions"] += len(self.live)
        if len(expansions) != len(self.live):
            raise RuntimeError(f"backend returned {len(expansions)} expansions for {len(self.live)} partial answers")
        for parent, seqs, base in zip(self.live, expansions, base_ids, strict=True):
            group: list[tuple[_Node, bool]] = []
            seen: set[str] = set()
            for seq in seqs:
                child = self._child(parent, seq, base, decode)
                if child is None or child.text in seen:
                    continue
                seen.add(child.text)
                group.append((child, child.depth > parent.depth))
            groups.append(group)
        return groups

    @staticmethod
    def new_sentences(groups: list[list[tuple[_Node, bool]]]) -> list[str]:
        """Phase 2: the new sentences of this depth, to be CLIP-scored in one batch."""
        return [c.sentences[-1]["text"] for g in groups for c, new in g if new]

    def settle(self, groups: list[list[tuple[_Node, bool]]], clip_scores: list[float]) -> None:
        """Phase 3: rewards from the CLIP scores, completion caps, pruning."""
        cfg = self.config
        new_sentences = self.new_sentences(groups)
        if len(clip_scores) != len(new_sentences):
            raise RuntimeError(f"CLIP scorer returned {len(clip_scores)} scores for {len(new_sentences)} texts")
        k = 0
        for group in groups:
            scored = [c for c, new in group if new]
            for c in scored:
                c.sentences[-1]["clip_score"] = float(clip_scores[k])
                k += 1
            if cfg.reward_mode == "paper":
                rewards = [paper_reward(c.sentences[-1]["clip_score"], c.sentences[-1]["sum_logprob"], cfg.lam)
                           for c in scored]
            else:
                rewards = reference_rewards(
                    [c.sentences[-1]["text_logprob"] for c in scored],
                    [c.sentences[-1]["clip_score"] for c in scored],
                    cfg.clip_alpha,
                )
            for c, r in zip(scored, rewards, strict=True):
                c.sentences[-1]["reward"] = float(r)
                c.reward_sum += float(r)

        self.depth += 1
        open_children: list[_Node] = []
        for group in groups:
            for child, _ in group:
                if child.finish_reason is None and self.depth >= cfg.max_sentences:
                    child.finish_reason = "max_sentences"
                if child.finish_reason is None and len(child.ids) >= cfg.max_answer_tokens:
                    child.finish_reason = "max_tokens"
                (self.complete if child.finish_reason else open_children).append(child)
        key = (lambda n: n.score) if cfg.prune_by == "text" else (lambda n: n.reward_sum)
        self.live = prune(open_children, [key(n) for n in open_children], cfg.keep_top, cfg.keep_bottom)

    def _child(self, parent: _Node, seq: Sequence, base: list[int], decode) -> _Node | None:
        eos = seq.finish_reason == "eos"
        new_ids = list(seq.token_ids[:-1] if eos and seq.token_ids else seq.token_ids)
        ids = list(base) + new_ids
        text = decode(ids) if ids else ""
        cut = _common_prefix_len(parent.text, text)
        segment = text[cut:]
        stripped = segment.strip()
        if not stripped:
            if eos and parent.sentences:
                # The model ended the answer right after the parent's last sentence.
                done = _Node(parent.ids, parent.text, parent.score, parent.reward_sum,
                             [dict(s) for s in parent.sentences], parent.depth, "eos")
                return done
            self._drop("empty")
            return None
        if self.config.clean:
            reason = clean_reason(stripped, self.config.min_sentence_chars, self.config.max_repeated_words)
            if reason:
                self._drop(reason)
                return None
        start = cut + (len(segment) - len(segment.lstrip()))
        record = {
            "start": start,
            "end": start + len(stripped),
            "text": stripped,
            "text_logprob": seq.mean_logprob,
            "sum_logprob": seq.sum_logprob,
            "clip_score": None,
            "reward": None,
        }
        return _Node(ids, text, parent.score + seq.mean_logprob, parent.reward_sum,
                     [dict(s) for s in parent.sentences] + [record], parent.depth + 1, "eos" if eos else None)

    def _drop(self, reason: str) -> None:
        self.stats["dropped"][reason] = self.stats["dropped"].get(reason, 0) + 1

    def result(self) -> CSRResult:
        cfg = self.config
        candidates: list[CSRCandidate] = []
        unique: dict[str, _Node] = {}
        for node in self.complete:
            if node.sentences and node.text not in unique:
                unique[node.text] = node
        # the item's mean sentence reward over its distinct complete answers ("centered_sum")
        all_rewards = [s["reward"] for node in unique.values() for s in node.sentences]
        baseline = sum(all_rewards) / len(all_rewards) if all_rewards else 0.0
        if cfg.baseline_cap is not None:
            baseline = min(baseline, cfg.baseline_cap)
        self.stats["reward_baseline"] = baseline
        for node in unique.values():
            rewards = [s["reward"] for s in node.sentences]
            candidates.append(CSRCandidate(node.text, node.ids, node.sentences,
                                           answer_score(rewards, cfg.answer_score, baseline),
                                           node.score, node.finish_reason or "eos"))
        chosen = rejected = margin = None
        if len(candidates) >= 2:
            scores = [c.score for c in candidates]
            chosen = max(range(len(scores)), key=lambda i: scores[i])
            rejected = min((i for i in range(len(scores)) if i != chosen), key=lambda i: scores[i])
            margin = scores[chosen] - scores[rejected]
        elif candidates:
            chosen = 0
        return CSRResult(self.prompt, self.image_key, candidates, chosen, rejected, margin, self.stats)


def _items(items: SeqType) -> list[tuple[Image.Image, str, str, int | None]]:
    """Items as (image, prompt, image_key, item_seed): an item is (image, prompt), (image, prompt,
    key) or (image, prompt, key, seed); a missing key is the image's content hash."""
    out = []
    for i, item in enumerate(items):
        if not 2 <= len(item) <= 4:
            raise ValueError(f"item {i}: expected (image, prompt[, key[, seed]]), got {len(item)} values")
        image, prompt, key, seed = (*item, None, None)[:4]
        if not isinstance(image, Image.Image):
            raise TypeError(f"item {i}: expected a PIL image, got {type(image).__name__}")
        out.append((image, prompt, key or image_key_of(image), seed))
    return out


_TEXT_CACHE_MAX = 50_000  # sentence embeddings kept by one run_csr call (a few KB each at most)


def _clip_scores(scorer: ImageTextScorer, requests: list[tuple[Image.Image, str, list[str]]],
                 text_cache: dict[str, Any] | None = None) -> list[list[float]]:
    """100·cos for several items' sentences at once: ``requests`` = (image, image_key, texts).

    A sentence repeated among one item's siblings is scored once. When the scorer exposes unit-norm
    embeddings (``embed_image(image, image_key)`` cached per key, ``embed_texts(texts)``, as
    `ClipScorer` does), the sentences not yet in ``text_cache`` go through the text encoder in one
    batch, and each is dotted with its own image's embedding: 100·(t·i) is what ``score`` computes.
    (A sentence's embedding depends on the text alone; searches repeat sentences across branches,
    depths and items.) Otherwise one ``score`` call per item.
    """
    uniques = [list(dict.fromkeys(texts)) for _, _, texts in requests]
    embed_image = getattr(scorer, "embed_image", None)
    embed_texts = getattr(scorer, "embed_texts", None)
    if callable(embed_image) and callable(embed_texts) and (len(requests) > 1 or text_cache is not None):
        cache = {} if text_cache is None else text_cache
        missing = [t for t in dict.fromkeys(t for u in uniques for t in u) if t not in cache]
        if missing:
            if len(cache) + len(missing) > _TEXT_CACHE_MAX:
                cache.clear()
            cache.update(zip(missing, embed_texts(missing), strict=True))
        tables = []
        for (image, key, _), u in zip(requests, uniques, strict=True):
            img = embed_image(image, key)
            emb = cache[u[0]].new_empty((len(u), img.shape[-1])) if u else None
            for i, t in enumerate(u):
                emb[i] = cache[t]
            sims = (100.0 * (emb @ img)).tolist() if u else []
            tables.append(dict(zip(u, sims, strict=True)))
    else:
        tables = [dict(zip(u, scorer.score(image, u, key), strict=True)) if u else {}
                  for (image, key, _), u in zip(requests, uniques, strict=True)]
    return [[float(table[t]) for t in texts] for table, (_, _, texts) in zip(tables, requests, strict=True)]


def run_csr(
    backend: VLMBackend,
    scorer: ImageTextScorer,
    items: SeqType,
    config: CSRConfig | None = None,
    progress: ProgressFn | None = None,
) -> list[CSRResult]:
    """Sentence-level beam search for each ``(image, prompt, image_key[, item_seed])`` item (key may
    be None; ``item_seed``, when given, seeds the item's sampling instead of its position here).

    Up to ``config.item_batch`` items are searched together, depth by depth: per item one
    ``open_prefix``; per depth the live nodes of all items are continued together when the backend
    offers ``extend_many(prefixes, partials_per_prefix, n, params)`` and the expansion is greedy
    (diverse beam), else one ``extend`` call per item; then the new sentences of all items are
    CLIP-scored in one batch (image embeddings cached per ``image_key``). ``progress`` is called
    after every depth of every item and once per finished item (``done=True``). Stats count real
    calls: a call shared by several items is counted on the first of them.
    """
    cfg = config or CSRConfig()
    prepared = _items(items)
    results: list[CSRResult] = []
    # Greedy (diverse-beam) expansion is deterministic, so the live nodes of every item can share one
    # decode loop (a small model's per-step cost is mostly fixed overhead, paid once per depth
    # instead of once per item). Sampling keeps one call per item: its seed is per item and depth,
    # so an item's search does not depend on which items were batched with it (nor, given an
    # item seed, on where it falls in the run).
    extend_many = getattr(backend, "extend_many", None) if cfg.expansion == "diverse_beam" else None
    text_cache: dict[str, Any] = {}
    for lo in range(0, len(prepared), max(cfg.item_batch, 1)):
        chunk = prepared[lo: lo + max(cfg.item_batch, 1)]
        searches = [_ItemSearch(lo + j, img, prompt, key, cfg, seed) for j, (img, prompt, key, seed) in enumerate(chunk)]
        t0 = time.perf_counter()
        prefixes = [backend.open_prefix(s.image, s.prompt) for s in searches]
        while any(s.active for s in searches):
            active = [(s, p) for s, p in zip(searches, prefixes, strict=True) if s.active]
            partials = [[list(n.ids) for n in s.live] for s, _ in active]
            if extend_many is not None and len(active) > 1:
                expansions = extend_many([p for _, p in active], partials, n=cfg.num_candidates,
                                         params=cfg.generation_params())
                if len(expansions) != len(active):
                    raise RuntimeError(f"backend returned expansions for {len(expansions)} of {len(active)} items")
                active[0][0].stats["backend_calls"] += 1
            else:
                expansions = []
                for (search, prefix), parts in zip(active, partials, strict=True):
                    params = cfg.generation_params(search.seed())
                    expansions.append(backend.extend(prefix, parts, n=cfg.num_candidates, params=params))
                    search.stats["backend_calls"] += 1
            groups = [s.children(e, parts, backend.decode)
                      for (s, _), e, parts in zip(active, expansions, partials, strict=True)]
            texts = [s.new_sentences(g) for (s, _), g in zip(active, groups, strict=True)]
            wanted = [(s, t) for (s, _), t in zip(active, texts, strict=True) if t]
            if wanted:
                scored = _clip_scores(scorer, [(s.image, s.image_key, t) for s, t in wanted], text_cache)
                if callable(getattr(scorer, "embed_texts", None)):
                    wanted[0][0].stats["clip_calls"] += 1  # one shared (or cached) batch
                else:
                    for s, _ in wanted:
                        s.stats["clip_calls"] += 1
                by_search = {id(s): sc for (s, _), sc in zip(wanted, scored, strict=True)}
            else:
                by_search = {}
            for (search, _), g in zip(active, groups, strict=True):
                search.settle(g, by_search.get(id(search), []))
                if progress:
                    progress(CSRProgress(search.index, search.depth, len(search.live), len(search.complete),
                                         not search.active))
        del prefixes
        elapsed = time.perf_counter() - t0
        for search in searches:
            search.stats["seconds_chunk"] = elapsed
            results.append(search.result())
    return results


def _expand_from_text(backend: Any, image: Image.Image, prompt: str, partial_text: str, n: int,
                      params: GenerationParams) -> list[Sequence]:
    """Continue ``partial_text`` from scratch: the reference's cost model (no cache, batch 1).

    Uses the backend's optional ``sample_from_text(image, prompt, partial_text, n, params)``;
    without it, a fresh ``open_prefix`` (re-encodes the image) + ``extend`` of the re-tokenised text.
    """
    if hasattr(backend, "sample_from_text"):
        return list(backend.sample_from_text(image, prompt, partial_text, n, params))
    prefix = backend.open_prefix(image, prompt)
    return backend.extend(prefix, [_partial_ids(backend, prompt, partial_text)], n=n, params=params)[0]


def _partial_ids(backend: Any, prompt: str, text: str) -> list[int]:
    """A partial answer's text re-tokenised as the reference does, with the prompt before it
    (``models.base.backend_answer_ids``) when the backend has a chat processor; else alone."""
    if not text:
        return []
    return backend_answer_ids(backend, prompt, text) if hasattr(backend, "processor") else backend.encode_text(text)


def run_csr_reference(
    backend: VLMBackend,
    scorer: ImageTextScorer,
    items: SeqType,
    config: CSRConfig | None = None,
    progress: ProgressFn | None = None,
) -> list[CSRResult]:
    """The reference code's execution model, for the benchmark: items one at a time, every live
    node expanded alone from its *text* (decode→re-tokenise, image re-encoded each time), and
    CLIP called once per sentence with ``image_key=None`` (no image-embedding cache)."""
    cfg = config or CSRConfig()
    results: list[CSRResult] = []
    for index, (image, prompt, key, seed) in enumerate(_items(items)):
        search = _ItemSearch(index, image, prompt, key, cfg, seed)
        t0 = time.perf_counter()
        while search.active:
            params = cfg.generation_params(search.seed())
            expansions, bases = [], []
            for node in search.live:
                expansions.append(_expand_from_text(backend, image, prompt, node.text, cfg.num_candidates, params))
                bases.append(_partial_ids(backend, prompt, node.text))
                search.stats["backend_calls"] += 1

            def clip(texts: list[str], s: _ItemSearch = search) -> list[float]:
                out = []
                for t in texts:
                    s.stats["clip_calls"] += 1
                    out.extend(scorer.score(s.image, [t], None))
                return out

            search.absorb(expansions, bases, backend.decode, clip)
            if progress:
                progress(CSRProgress(index, search.depth, len(search.live), len(search.complete), not search.active))
        search.stats["seconds_chunk"] = time.perf_counter() - t0
        results.append(search.result())
    return results


def min_sentence_reward(candidate: CSRCandidate) -> float | None:
    """The lowest calibrated sentence reward of an answer (None without sentence rewards)."""
    rewards = [float(s["reward"]) for s in candidate.sentences or [] if s.get("reward") is not None]
    return min(rewards) if rewards else None


def fit_for_sft(candidate: CSRCandidate, config: CSRConfig) -> bool | None:
    """Whether a chosen answer may be imitated by a DPO round's SFT term: False for an answer cut
    at a cap (``max_sentences``, ``max_answer_tokens``: a round trains it ending with the model's
    stop token, so the term would teach stopping mid-answer); else every sentence's reward at least
    ``config.sft_min_reward`` (None when that is unset or there are no rewards)."""
    if candidate.finish_reason not in (None, "eos"):
        return False
    low = min_sentence_reward(candidate)
    if config.sft_min_reward is None or low is None:
        return None
    return low >= config.sft_min_reward


def csr_generation_record(config: CSRConfig) -> dict[str, Any]:
    """Parameters to store as provenance beside CSR candidates."""
    return {"method": "csr", **config.as_dict(), "generation": config.generation_params().as_dict()}


@dataclass(frozen=True)
class ExistencePair:
    """A yes/no question derived from one CSR pair (``CSRConfig.existence_pairs``)."""

    object: str
    question: str
    chosen: str
    rejected: str


def existence_pairs(chosen: CSRCandidate, rejected: CSRCandidate, extract: Callable[[str], list[str]],
                    config: CSRConfig, seed: int = 0, threshold: float | None = None,
                    vocabulary: SeqType[str] | None = None) -> list[ExistencePair]:
    """Yes/no pairs implied by a CSR pair, balanced: as many "yes" as "no" questions.

    ``extract`` maps text to canonical object names (an evaluation ``ObjectExtractor.extract``).
    Present ("yes" chosen): objects the calibrated winner names in a sentence whose calibrated
    reward is at least ``threshold``; absent ("no" chosen): objects the winner never names and the
    loser names only in sentences below ``config.existence_absent_share`` × ``threshold``.
    ``threshold`` is the item's mean sentence reward (``CSRResult.stats["reward_baseline"]``);
    None, or answers without sentence records, use every mention. With
    ``config.existence_unnamed`` and a ``vocabulary``, objects neither answer names fill the
    absent side up to the present side (a seeded sample). No ground truth is used: the
    labels are the search's own verdict (calibrated by CLIP), so they inherit its errors.
    """
    import random

    def objects(cand: CSRCandidate, keep: Callable[[float], bool]) -> list[str]:
        if threshold is None or not cand.sentences:
            return list(dict.fromkeys(extract(cand.text)))
        found: list[str] = []
        for sent in cand.sentences:
            if sent.get("reward") is not None and keep(float(sent["reward"])):
                found += extract(sent["text"])
        return list(dict.fromkeys(found))

    in_chosen = set(extract(chosen.text))
    named = objects(chosen, lambda r: r >= threshold)
    bar = threshold
    if threshold is not None and threshold > 0:
        bar = config.existence_absent_share * threshold
    only_rejected = [o for o in objects(rejected, lambda r: r < bar) if o not in in_chosen]
    if threshold is not None and rejected.sentences:
        # an object the loser also names in a sentence at or above the bar is not clearly absent
        trusted = set(objects(rejected, lambda r: r >= bar))
        only_rejected = [o for o in only_rejected if o not in trusted]
    rng = random.Random(seed)
    k = min(len(named), len(only_rejected))
    absent = sorted(rng.sample(only_rejected, k))
    if config.existence_unnamed and vocabulary and len(named) > k:
        mentioned = in_chosen | set(extract(rejected.text))
        unnamed = sorted(o for o in vocabulary if o not in mentioned)
        fill = rng.sample(unnamed, min(len(named) - k, len(unnamed)))
        absent = sorted(absent + fill)
        k += len(fill)
    if k == 0:
        return []
    yes, no = config.existence_answers
    present = sorted(rng.sample(named, k))
    q = config.existence_template.format
    return ([ExistencePair(o, q(object=o), yes, no) for o in present]
            + [ExistencePair(o, q(object=o), no, yes) for o in absent])
