import math

import pytest
from PIL import Image

from lvlm_studio.methods.csr import (
    CSRCandidate,
    CSRConfig,
    answer_score,
    existence_pairs,
    fit_for_sft,
    min_sentence_reward,
    paper_reward,
    prune,
    reference_rewards,
    run_csr,
    run_csr_reference,
    sibling_ranks,
)
from lvlm_studio.models.base import GenerationParams, Prefix, Sequence

EOS = "<eos>"


class TableBackend:
    """A deterministic test double of the model protocol: the continuations of an answer are read
    from a table keyed by the answer so far. Word-level tokens; id 0 is EOS (decode skips it)."""

    model_id = "table"

    def __init__(self, table: dict[str, list[tuple[str, float, bool]]]):
        self.table = table
        self.vocab: dict[str, int] = {EOS: 0}
        self.words: list[str] = [EOS]
        self.extend_calls: list[tuple[str, list[str], int, GenerationParams]] = []
        self.open_calls = 0

    def _id(self, w: str) -> int:
        if w not in self.vocab:
            self.vocab[w] = len(self.words)
            self.words.append(w)
        return self.vocab[w]

    def encode_text(self, text: str) -> list[int]:
        return [self._id(w) for w in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(self.words[i] for i in token_ids if i != 0)

    def open_prefix(self, image, prompt):
        self.open_calls += 1
        return Prefix(self.model_id, prompt, "k")

    def extend(self, prefix, partials, n=1, params=None):
        self.extend_calls.append((prefix.prompt, [self.decode(p) for p in partials], n, params))
        out = []
        for partial in partials:
            rows = self.table[self.decode(partial)][:n]
            seqs = []
            for sentence, logprob, eos in rows:
                ids = self.encode_text(sentence) + ([0] if eos else [])
                finish = "eos" if eos else "stop"
                seqs.append(Sequence(sentence, ids, [logprob] * len(ids), finish))
            out.append(seqs)
        return out

    def sample(self, images, prompts, n=1, params=None):  # pragma: no cover - unused by CSR
        raise NotImplementedError

    def score(self, images, prompts, continuations):  # pragma: no cover - unused by CSR
        raise NotImplementedError


class TextReplayBackend(TableBackend):
    """Same table, plus the optional slow-path helper of the reference execution model."""

    def __init__(self, table):
        super().__init__(table)
        self.from_text_calls = 0

    def sample_from_text(self, image, prompt, partial_text, n, params):
        self.from_text_calls += 1
        return self.extend(Prefix(self.model_id, prompt, "k"), [self.encode_text(partial_text)], n, params)[0]


class TableScorer:
    def __init__(self, scores: dict[str, float]):
        self.scores = scores
        self.calls: list[tuple[list[str], str | None]] = []

    def score(self, image, texts, image_key=None):
        self.calls.append((list(texts), image_key))
        return [self.scores[t] for t in texts]


# Root: four open sentences and one that ends the answer. Depth 2: every continuation ends it.
TABLE = {
    "": [
        ("A cat sits.", -0.1, False),
        ("A dog runs.", -0.2, False),
        ("A red ball.", -0.3, False),
        ("Two birds fly.", -0.4, False),
        ("It is sunny.", -0.5, True),
    ],
    "A cat sits.": [("It sleeps.", -0.1, True), ("It sleeps.", -0.1, True), ("It purrs.", -0.2, True)],
    "A red ball.": [("It bounces.", -0.3, True), ("Ok.", -0.3, True)],  # "Ok." fails the filter
    "Two birds fly.": [("", -0.05, True), ("It sleeps.", -0.6, True)],  # bare EOS completes the parent
    "A dog runs.": [("It barks.", -0.1, True)],
}
CLIP = {
    "A cat sits.": 30.0, "A dog runs.": 25.0, "A red ball.": 10.0, "Two birds fly.": -5.0,
    "It is sunny.": 20.0, "It sleeps.": 28.0, "It purrs.": 15.0, "It bounces.": 5.0, "It barks.": 1.0,
}
IMG = Image.new("RGB", (8, 8), "white")


def test_paper_reward_hand_computed():
    # 0.9 * max(30, 0) + 0.1 * exp(ln 0.5) = 27 + 0.05
    assert paper_reward(30.0, math.log(0.5), 0.9) == pytest.approx(27.05)
    # negative CLIP is clipped at 0: 0 + 0.1 * 0.25
    assert paper_reward(-12.0, math.log(0.25), 0.9) == pytest.approx(0.025)


def test_reference_rank_reward_hand_computed():
    assert sibling_ranks([0.1, 0.5, 0.3]) == pytest.approx([1.0, 1 / 3, 2 / 3])
    # text ranks: -0.5 best (1/3), -1 (2/3), -2 (1); clip ranks: 30 (1/3), 20 (2/3), 10 (1)
    r = reference_rewards([-1.0, -2.0, -0.5], [20.0, 10.0, 30.0], alpha=0.9)
    assert r == pytest.approx([-2 / 3, -1.0, -1 / 3])
    # alpha mixes: text best but CLIP worst -> -(0.9*1 + 0.1*0.5)
    assert reference_rewards([0.0, -1.0], [1.0, 2.0], alpha=0.9)[0] == pytest.approx(-0.95)


def test_answer_score_modes():
    assert answer_score([3.0, 6.0], "mean") == pytest.approx(4.5)
    assert answer_score([3.0, 6.0], "reference_mean") == pytest.approx(3.0)  # 9 / (2 + 1)
    # centred sum with the item's mean sentence reward 4: (3 - 4) + (6 - 4)
    assert answer_score([3.0, 6.0], "centered_sum", baseline=4.0) == pytest.approx(1.0)
    # the paper's mean prefers dropping a true but lower-reward sentence; the centred sum does not
    short, full = [40.0], [40.0, 30.0]
    assert answer_score(short, "mean") > answer_score(full, "mean")
    assert answer_score(full, "centered_sum", baseline=20.0) > answer_score(short, "centered_sum", baseline=20.0)
    with pytest.raises(ValueError):
        answer_score([1.0], "median")


def test_prune_keeps_top1_and_bottom2():
    kids = ["a", "b", "c", "d", "e", "f"]
    assert prune(kids, [5, 1, 3, 4, 2, 0], 1, 2) == ["a", "b", "f"]
    assert prune(kids[:3], [1, 2, 3], 1, 2) == ["a", "b", "c"]  # nothing to prune


def test_config_defaults_follow_the_reference():
    cfg = CSRConfig()
    p = cfg.generation_params()
    assert (p.num_beam_groups, p.diversity_penalty, p.temperature, p.max_new_tokens, p.stop) == (5, 3.0, 0.0, 70, (".",))
    # a project fix over the reference's stop at every period ("1." of a list is no sentence)
    assert p.stop_rule == cfg.stop_rule == "sentence" and p.as_dict()["stop_rule"] == "sentence"
    assert CSRConfig(stop_rule="any", expansion="sample").generation_params(seed=1).stop_rule == "any"
    assert (cfg.keep_top, cfg.keep_bottom, cfg.lam, cfg.clip_alpha) == (1, 2, 0.9, 0.9)
    assert (cfg.answer_score, cfg.existence_pairs) == ("centered_sum", False)  # project choices
    s = CSRConfig(expansion="sample", temperature=0.8).generation_params(seed=7)
    assert (s.temperature, s.num_beam_groups, s.seed) == (0.8, 1, 7)
    with pytest.raises(ValueError):
        CSRConfig(reward_mode="magic")
    with pytest.raises(ValueError, match="stop_rule"):
        CSRConfig(stop_rule="period")
    with pytest.raises(ValueError, match="non-empty"):
        CSRConfig(stop=("",))  # refused when the config is made, not when the search starts
    with pytest.raises(ValueError, match="max_new_tokens"):
        CSRConfig(max_new_tokens=0)


def test_search_tree_pruning_and_pair():
    backend, scorer = TableBackend(TABLE), TableScorer(CLIP)
    events = []
    [res] = run_csr(backend, scorer, [(IMG, "Describe.", "img1")], CSRConfig(answer_score="mean"),
                    progress=events.append)

    # depth 1 expands the root once; depth 2 expands the top-1 ("A cat sits.", -0.1) and the
    # bottom-2 ("A red ball.", "Two birds fly.") of the four open children; "A dog runs." is pruned
    assert [c[1] for c in backend.extend_calls] == [[""], ["A cat sits.", "A red ball.", "Two birds fly."]]
    assert all(c[2] == 5 for c in backend.extend_calls)
    assert backend.open_calls == 1
    texts = [c.text for c in res.candidates]
    assert texts == [
        "It is sunny.",
        "A cat sits. It sleeps.",  # the duplicate sibling "It sleeps." was merged
        "A cat sits. It purrs.",
        "A red ball. It bounces.",  # "Ok." was dropped by the cleaning filter
        "Two birds fly.",  # completed by a bare EOS
        "Two birds fly. It sleeps.",
    ]
    assert res.stats["dropped"] == {"too_short": 1}
    # one CLIP call per depth, with the image key for the cache
    assert [call[1] for call in scorer.calls] == ["img1", "img1"]
    # depth 2: sleeps, purrs, bounces, sleeps -> scored once each (the bare EOS has no sentence)
    assert scorer.calls[1][0] == ["It sleeps.", "It purrs.", "It bounces."]

    for cand in res.candidates:
        for s in cand.sentences:
            assert cand.text[s["start"]: s["end"]] == s["text"]
            assert s["reward"] == pytest.approx(paper_reward(CLIP[s["text"]], s["sum_logprob"], 0.9))
        assert cand.score == pytest.approx(sum(s["reward"] for s in cand.sentences) / len(cand.sentences))
    sleeps = res.candidates[1]
    # "It sleeps." + EOS: 3 tokens at -0.1
    assert sleeps.sentences[1]["sum_logprob"] == pytest.approx(-0.3)
    assert sleeps.sentences[1]["text_logprob"] == pytest.approx(-0.1)
    assert sleeps.text_score == pytest.approx(-0.2)
    assert sleeps.token_ids == backend.encode_text("A cat sits. It sleeps.")  # no EOS id
    # chosen: "A cat sits. It sleeps." (27.07, 25.27); rejected: "Two birds fly." (0.1*e^-1.2)
    assert texts[res.chosen] == "A cat sits. It sleeps."
    assert texts[res.rejected] == "Two birds fly."
    expected_margin = (paper_reward(30, -0.3) + paper_reward(28, -0.3)) / 2 - paper_reward(-5, -1.2)
    assert res.margin == pytest.approx(expected_margin)
    assert events[-1].done and events[-1].depth == 2 and events[0].depth == 1

    # the default centred sum on the same tree: each answer's sum of (reward - the item's mean
    # sentence reward over all complete answers)
    [res_c] = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "Describe.", "img1")], CSRConfig())
    rewards = [s["reward"] for c in res_c.candidates for s in c.sentences]
    base = sum(rewards) / len(rewards)
    expected = [sum(s["reward"] - base for s in c.sentences) for c in res_c.candidates]
    assert [c.score for c in res_c.candidates] == pytest.approx(expected)
    assert res_c.chosen == max(range(len(expected)), key=expected.__getitem__)
    assert res_c.rejected == min(range(len(expected)), key=expected.__getitem__)


def test_baseline_cap_centres_on_the_lower_of_mean_and_cap():
    [free] = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "Describe.", "img1")], CSRConfig())
    mean = free.stats["reward_baseline"]
    # a ceiling above the item mean changes nothing
    [high] = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "Describe.", "img1")],
                     CSRConfig(baseline_cap=mean + 1.0))
    assert [c.score for c in high.candidates] == pytest.approx([c.score for c in free.candidates])
    # below it, every answer is centred on the ceiling: a sentence between the ceiling and the mean
    # now adds to its answer instead of subtracting, so longer true answers can win
    cap = mean - 10.0
    [low] = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "Describe.", "img1")], CSRConfig(baseline_cap=cap))
    assert low.stats["reward_baseline"] == pytest.approx(cap)
    expected = [sum(s["reward"] - cap for s in c.sentences) for c in low.candidates]
    assert [c.score for c in low.candidates] == pytest.approx(expected)
    assert low.chosen == max(range(len(expected)), key=expected.__getitem__)

    # "A cat sits." alone, or followed by a true sentence with a lower CLIP score ("It purrs.", 15):
    # rewards 27.07 and 13.58, item mean 22.57. Centred on the mean the second sentence subtracts,
    # so the shorter answer is chosen; centred on a ceiling of 10 it adds, so the longer one is.
    table = {"": [("A cat sits.", -0.1, False)], "A cat sits.": [("", -0.1, True), ("It purrs.", -0.1, True)]}
    texts = {}
    for cap in (None, 10.0):
        [res] = run_csr(TableBackend(table), TableScorer(CLIP), [(IMG, "p", "k")], CSRConfig(baseline_cap=cap))
        texts[cap] = (res.candidates[res.chosen].text, res.candidates[res.rejected].text)
    assert texts[None] == ("A cat sits.", "A cat sits. It purrs.")
    assert texts[10.0] == ("A cat sits. It purrs.", "A cat sits.")


def test_reference_reward_mode_ranks_siblings():
    [res] = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "Describe.", "k")],
                    CSRConfig(reward_mode="reference", answer_score="reference_mean"))
    first = {c.text: c.sentences[0]["reward"] for c in res.candidates if len(c.sentences) == 1}
    # root siblings (5): "It is sunny." has text rank 5/5 and clip rank 3/5 ->-(0.9*0.6+0.1*1)
    assert first["It is sunny."] == pytest.approx(-0.64)
    cand = next(c for c in res.candidates if c.text == "A cat sits. It purrs.")
    # "A cat sits.": text rank 1/5, clip rank 1/5 -> -0.2; "It purrs." among 2 siblings: 2/2, 2/2 -> -1
    assert [s["reward"] for s in cand.sentences] == pytest.approx([-0.2, -1.0])
    assert cand.score == pytest.approx(-1.2 / 3)


def test_depth_cap_makes_answers_final():
    table = {"": [("A cat sits.", -0.1, False), ("A dog runs.", -0.2, False)]}
    [res] = run_csr(TableBackend(table), TableScorer(CLIP), [(IMG, "p", None)], CSRConfig(max_sentences=1))
    assert sorted(c.finish_reason for c in res.candidates) == ["max_sentences", "max_sentences"]
    assert res.has_pair and res.margin == pytest.approx(paper_reward(30, -0.3) - paper_reward(25, -0.6))  # 3 tokens each


def test_single_answer_gives_no_pair():
    table = {"": [("It is sunny.", -0.5, True)]}
    [res] = run_csr(TableBackend(table), TableScorer(CLIP), [(IMG, "p", "k")])
    assert res.chosen == 0 and res.rejected is None and res.margin is None and not res.has_pair


def test_a_tie_gives_no_pair():
    """Every answer scored the same (rank-based rewards make ties likely): which is better is not
    known, so no pair with margin 0 is made from the first two."""
    table = {"": [("A cat sits.", -0.5, True), ("A dog runs.", -0.5, True)]}
    [res] = run_csr(TableBackend(table), TableScorer({"A cat sits.": 30, "A dog runs.": 30}), [(IMG, "p", "k")])
    assert len(res.candidates) == 2 and res.margin == 0 and not res.has_pair


def test_several_items_are_searched_together():
    backend, scorer = TableBackend(TABLE), TableScorer(CLIP)
    results = run_csr(backend, scorer, [(IMG, "first", "a"), (IMG, "second", "b")], CSRConfig(item_batch=2))
    assert backend.open_calls == 2
    # depth by depth, interleaved: one extend per item per depth
    assert [c[0] for c in backend.extend_calls] == ["first", "second", "first", "second"]
    assert [r.prompt for r in results] == ["first", "second"]
    assert results[0].candidates[results[0].chosen].text == results[1].candidates[results[1].chosen].text


def test_a_sampled_search_seeds_by_the_item_seed_not_by_its_place_in_the_call():
    """The service calls run_csr once per chunk of items: seeded by position, items k and k+8
    sampled alike and a resumed run drew differently. Given an item seed, an item's sampling seeds
    are its own wherever it falls; without one, its position's (library callers)."""
    cfg = CSRConfig(expansion="sample", temperature=1.0, item_batch=2)

    def seeds(items) -> dict[str, list[int]]:
        backend = TableBackend(TABLE)
        run_csr(backend, TableScorer(CLIP), items, cfg)
        out: dict[str, list[int]] = {}
        for prompt, _, _, params in backend.extend_calls:
            out.setdefault(prompt, []).append(params.seed)
        return out

    alone = seeds([(IMG, "x", "a", 42)])
    second = seeds([(IMG, "y", "b", 7), (IMG, "x", "a", 42)])
    assert alone["x"] == second["x"] and second["y"] != second["x"]
    by_place = seeds([(IMG, "x", "a"), (IMG, "y", "b")])
    assert by_place["x"] != by_place["y"] and by_place["x"] == seeds([(IMG, "x", "a")])["x"]
    with pytest.raises(ValueError, match="expected \\(image, prompt"):
        run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "x", "a", 1, "extra")], cfg)


@pytest.mark.parametrize("backend_cls", [TableBackend, TextReplayBackend])
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_reference_path_agrees_with_fast_path(backend_cls, mode):
    cfg = CSRConfig(reward_mode=mode)
    fast = run_csr(TableBackend(TABLE), TableScorer(CLIP), [(IMG, "p", "k")], cfg)[0]
    slow_backend, slow_scorer = backend_cls(TABLE), TableScorer(CLIP)
    slow = run_csr_reference(slow_backend, slow_scorer, [(IMG, "p", "k")], cfg)[0]
    assert [c.text for c in slow.candidates] == [c.text for c in fast.candidates]
    for a, b in zip(slow.candidates, fast.candidates, strict=True):
        assert a.sentences == b.sentences and a.score == pytest.approx(b.score)
    assert (slow.chosen, slow.rejected) == (fast.chosen, fast.rejected)
    # the reference execution model: one expansion per node, CLIP without the image cache
    assert all(key is None and len(texts) == 1 for texts, key in slow_scorer.calls)
    assert len(slow_scorer.calls) == 9
    if backend_cls is TextReplayBackend:
        assert slow_backend.from_text_calls == 4
    else:
        assert slow_backend.open_calls == 4


def test_existence_pairs_are_balanced_and_follow_the_search_verdict():
    extract = lambda text: [w for w in text.replace(".", "").split() if w in {"cat", "dog", "cow", "hen"}]  # noqa: E731

    cfg = CSRConfig(existence_pairs=True)
    chosen = _cand(("A cat and a dog.", 30.0), ("A cat.", 28.0))
    rejected = _cand(("A cat and a cow.", 25.0), ("A hen.", 2.0))
    pairs = existence_pairs(chosen, rejected, extract, cfg, seed=0)
    yes = [p for p in pairs if p.chosen == "Yes."]
    no = [p for p in pairs if p.chosen == "No."]
    # no threshold: named by the chosen answer -> present; named only by the rejected one -> absent
    assert len(yes) == len(no) == 2
    assert {p.object for p in yes} == {"cat", "dog"} and {p.object for p in no} == {"cow", "hen"}
    assert all(p.rejected == ("No." if p.chosen == "Yes." else "Yes.") for p in pairs)
    assert pairs[0].question == f"Is there a {pairs[0].object} in the image?"
    # threshold 20 (the item's mean sentence reward): "cow" sits in a well-rewarded sentence of the
    # loser, so it is not taken as absent; only "hen" (reward 2) is: one yes, one no
    calibrated = existence_pairs(chosen, rejected, extract, cfg, seed=0, threshold=20.0)
    assert sorted((p.object, p.chosen) for p in calibrated)[-1] == ("hen", "No.")
    assert len(calibrated) == 2 and {p.chosen for p in calibrated} == {"Yes.", "No."}
    # "absent" needs a reward below existence_absent_share x threshold: at share 0.05 (bar 1.0)
    # "hen" (reward 2) is not clearly absent, so nothing is left to contrast
    strict = CSRConfig(existence_pairs=True, existence_absent_share=0.05)
    assert existence_pairs(chosen, rejected, extract, strict, seed=0, threshold=20.0) == []
    with pytest.raises(ValueError):
        CSRConfig(existence_absent_share=0.0)
    # a chosen sentence below the threshold does not vouch for its objects
    weak = _cand(("A dog.", 5.0), ("A cat.", 30.0))
    assert {p.object for p in existence_pairs(weak, rejected, extract, cfg, threshold=20.0)
            if p.chosen == "Yes."} == {"cat"}
    # unbalanced sides are cut to the smaller one; no absent object -> nothing to contrast
    assert len(existence_pairs(_cand(("A cat. A dog. A hen.", 9.0)), _cand(("A cow.", 1.0)), extract, cfg)) == 2
    assert existence_pairs(_cand(("A cat.", 9.0)), _cand(("A cat.", 1.0)), extract, cfg) == []
    with pytest.raises(ValueError):
        CSRConfig(existence_template="Is there one?")
    # existence_unnamed: the "no" side is filled up to the "yes" side with objects neither answer
    # names (from the vocabulary), after the loser's low-reward objects
    vocab = ["cat", "dog", "cow", "hen", "pig", "owl"]
    fill = CSRConfig(existence_pairs=True, existence_unnamed=True)
    three = _cand(("A cat. A dog. A hen.", 30.0))
    filled = existence_pairs(three, _cand(("A cow.", 1.0)), extract, fill, seed=0, vocabulary=vocab)
    no_side = {p.object for p in filled if p.chosen == "No."}
    assert {p.object for p in filled if p.chosen == "Yes."} == {"cat", "dog", "hen"}
    assert len(no_side) == 3 and "cow" in no_side and no_side - {"cow"} <= {"pig", "owl"}
    # the loser named nothing absent: the whole "no" side comes from unnamed objects
    only_unnamed = existence_pairs(_cand(("A cat.", 9.0)), _cand(("A cat.", 1.0)), extract, fill, vocabulary=vocab)
    assert [(p.object, p.chosen) for p in only_unnamed if p.chosen == "No."][0][0] in {"dog", "cow", "hen", "pig", "owl"}
    assert len(only_unnamed) == 2
    # off, or no vocabulary: as before
    assert existence_pairs(three, _cand(("A cow.", 1.0)), extract, cfg, vocabulary=vocab) == \
        existence_pairs(three, _cand(("A cow.", 1.0)), extract, cfg)
    assert len(existence_pairs(three, _cand(("A cow.", 1.0)), extract, fill)) == 2


def test_a_chosen_answer_is_fit_to_imitate_only_when_every_sentence_clears_the_bar():
    def answer(*rewards):
        return CSRCandidate("x", [], [{"text": "s.", "reward": r} for r in rewards], 0.0, 0.0, "eos")

    good, one_low = answer(35.0, 40.0), answer(41.0, 32.9, 38.0)
    assert min_sentence_reward(one_low) == 32.9 and min_sentence_reward(answer()) is None
    bar = CSRConfig(sft_min_reward=33.0)
    assert fit_for_sft(good, bar) is True and fit_for_sft(one_low, bar) is False
    assert fit_for_sft(answer(33.0), bar) is True  # at the bar counts
    assert fit_for_sft(good, CSRConfig()) is None and fit_for_sft(answer(), bar) is None  # no bar / no rewards
    # an answer cut at a cap would teach stopping mid-answer: never imitated, bar or no bar
    for cap in ("max_sentences", "max_tokens"):
        cut = CSRCandidate("x", [], [{"text": "s.", "reward": 40.0}], 0.0, 0.0, cap)
        assert fit_for_sft(cut, bar) is False and fit_for_sft(cut, CSRConfig()) is False


# Tests from a mutation audit: each fails on a mutant the suite above let through.
def test_csr_answer_token_cap_makes_a_node_final():  # C18
    table = {"": [("A cat sits on a mat.", -0.1, False), ("A dog.", -0.2, False)],
             "A cat sits on a mat.": [("It purrs.", -0.1, True)],
             "A dog.": [("It runs.", -0.1, True)]}
    clip = {"A cat sits on a mat.": 30.0, "A dog.": 20.0, "It purrs.": 10.0, "It runs.": 5.0}
    backend = TableBackend(table)
    [res] = run_csr(backend, TableScorer(clip), [(IMG, "p", "k")], CSRConfig(max_answer_tokens=4))
    # 6 tokens >= 4: final at depth 1 with "max_tokens", never expanded; the 2-token answer goes on
    assert {c.text: c.finish_reason for c in res.candidates} == {
        "A cat sits on a mat.": "max_tokens", "A dog. It runs.": "eos"}
    assert [c[1] for c in backend.extend_calls] == [[""], ["A dog."]]


def _cand(*sentences: tuple[str, float]) -> CSRCandidate:
    """A complete CSR answer from (sentence, calibrated reward) pairs, with its sentence offsets."""
    text, records = "", []
    for sent, reward in sentences:
        start = len(text) + (1 if text else 0)
        text = f"{text} {sent}" if text else sent
        records.append({"start": start, "end": len(text), "text": sent, "reward": reward})
    return CSRCandidate(text, [], records, 0.0, 0.0, "eos")


def test_existence_absent_needs_every_loser_mention_below_the_bar():  # C26
    extract = lambda text: [w for w in text.replace(".", "").split() if w in {"cat", "dog"}]  # noqa: E731
    chosen = _cand(("A cat.", 30.0))
    # the loser names "dog" in a low sentence (2 < 0.5 * 20) but also in a well-rewarded one (25)
    rejected = _cand(("A dog.", 2.0), ("A dog and a cat.", 25.0))
    assert existence_pairs(chosen, rejected, extract, CSRConfig(existence_pairs=True), threshold=20.0) == []
    # without the well-rewarded mention, "dog" is absent
    pairs = existence_pairs(chosen, _cand(("A dog.", 2.0)), extract, CSRConfig(existence_pairs=True), threshold=20.0)
    assert sorted((p.object, p.chosen) for p in pairs) == [("cat", "Yes."), ("dog", "No.")]


def test_pruning_uses_the_cumulative_text_score_by_default():  # C15
    # text order A > B > C > D, CLIP (reward) order B > C > D > A
    table = {"": [("Aa aa.", -0.1, False), ("Bb bb.", -0.2, False), ("Cc cc.", -0.3, False), ("Dd dd.", -0.4, False)],
             **{s: [("End.", -0.1, True)] for s in ("Aa aa.", "Bb bb.", "Cc cc.", "Dd dd.")}}
    clip = {"Aa aa.": 0.0, "Bb bb.": 30.0, "Cc cc.": 20.0, "Dd dd.": 10.0, "End.": 5.0}
    by_text = TableBackend(table)
    run_csr(by_text, TableScorer(clip), [(IMG, "p", "k")], CSRConfig())
    assert by_text.extend_calls[1][1] == ["Aa aa.", "Cc cc.", "Dd dd."]  # top 1 + bottom 2 by text
    by_reward = TableBackend(table)
    run_csr(by_reward, TableScorer(clip), [(IMG, "p", "k")], CSRConfig(prune_by="reward"))
    assert by_reward.extend_calls[1][1] == ["Bb bb.", "Dd dd.", "Aa aa."]  # top 1 + bottom 2 by reward
