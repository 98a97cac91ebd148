"""CSR, POVID and STIC on a real (random, tiny) LLaVA through the transformers backend.

Not skipped: if `lvlm_studio.models.hf` or `lvlm_studio.models.tiny` is missing, collection fails.
The CLIP side is a deterministic in-test scorer (the CLIP model is not under test here).
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_studio.methods.csr import CSRConfig, run_csr, run_csr_reference
from lvlm_studio.methods.povid import POVIDConfig, POVIDItem, Vocabulary, build_povid_pairs
from lvlm_studio.methods.stic import STICConfig, build_stic_pairs
from lvlm_studio.models.hf import HFBackend
from lvlm_studio.models.tiny import build_tiny_llava

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava")
    backend = HFBackend.from_pretrained(str(path), device="cpu", dtype="float32")
    # A random model emits <pad>/<unk>/<image> mid-answer, which no trained model does and which
    # decode() drops, so the reference path's decode -> re-tokenise could never reproduce them.
    # Mask them in the model's output layer (a logits processor at the model level).
    banned = sorted(set(backend.tokenizer.all_special_ids) - set(backend.eos_ids))

    def mask_specials(module, args, output):
        output = output.clone()
        output[..., banned] = -1e4
        return output

    backend.model.get_output_embeddings().register_forward_hook(mask_specials)
    return backend


class LengthScorer:
    """Deterministic stand-in for CLIP: depends on the text and the image's red channel."""

    def __init__(self):
        self.keys = []

    def score(self, image, texts, image_key=None):
        self.keys.append(image_key)
        red = float(np.asarray(image.convert("RGB"))[..., 0].mean()) / 255
        return [float((len(t) * 7) % 23) - 5 + red for t in texts]


class Spy:
    """Transparent wrapper that records every sequence the real backend returns from ``extend``."""

    def __init__(self, inner):
        self.inner = inner
        self.model_id = inner.model_id
        self.seen = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def extend(self, prefix, partials, n=1, params=None):
        out = self.inner.extend(prefix, partials, n, params)
        self.seen.extend(s for row in out for s in row)
        return out


IMAGES = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]


def test_csr_fast_and_reference_paths_agree(backend):
    cfg = CSRConfig(max_new_tokens=6, max_sentences=2)
    spy = Spy(backend)
    scorer = LengthScorer()
    items = [(im, "Describe the image.", None) for im in IMAGES]
    fast = run_csr(spy, scorer, items, cfg)
    slow = run_csr_reference(backend, LengthScorer(), items, cfg)
    assert scorer.keys and all(k is not None for k in scorer.keys)

    specials = set(backend.tokenizer.all_special_ids)
    for res in fast:
        assert res.candidates, "the search produced no complete answer"
        for cand in res.candidates:
            assert backend.decode(cand.token_ids) == cand.text
            for s in cand.sentences:
                assert cand.text[s["start"]: s["end"]] == s["text"]
                assert s["clip_score"] is not None and s["reward"] is not None
        if res.has_pair:
            assert res.candidates[res.chosen].text != res.candidates[res.rejected].text
            assert res.margin >= 0

    # Decode -> re-tokenise (the reference path) can only reproduce the fast path when the model
    # emitted no special token in the middle of an answer (decode drops it). Then both must agree.
    clean = not any(t in specials for s in spy.seen for t in (s.token_ids[:-1] if s.finished else s.token_ids))
    assert clean, "the tiny model emitted special tokens; choose another config for this comparison"
    for f, s in zip(fast, slow, strict=True):
        assert [c.text for c in s.candidates] == [c.text for c in f.candidates], (
            "run_csr_reference diverged from run_csr: the backend's sample_from_text must continue the "
            "partial text exactly where its tokens would follow the assistant-turn opening"
        )
        for a, b in zip(f.candidates, s.candidates, strict=True):
            assert [x["text"] for x in a.sentences] == [x["text"] for x in b.sentences]
            for x, y in zip(a.sentences, b.sentences, strict=True):
                assert x["text_logprob"] == pytest.approx(y["text_logprob"], abs=1e-4)
                assert x["clip_score"] == pytest.approx(y["clip_score"], abs=1e-6)
            assert a.score == pytest.approx(b.score, abs=1e-4)
        assert (f.chosen, f.rejected) == (s.chosen, s.rejected)


def test_csr_gets_past_a_numbered_list_marker_under_the_sentence_rule(backend, monkeypatch):
    # A model that answers "1. There is a red circle." (scripted picks, one script per beam group):
    # the reference's stop at every period cuts "1." off, the cleaning filter drops it as too short
    # and the search ends with nothing; stop_rule="sentence" keeps the item whole.
    from lvlm_studio.models.tiny import GENERIC_WORDS, build_word_tokenizer

    lister = copy.copy(backend)
    lister.tokenizer, lister._stop_cache = build_word_tokenizer([*GENERIC_WORDS, "1"]), {}
    scripts = [lister.encode_text(t) for t in ("1. There is a red circle.", "1. There is a blue square.")]
    assert max(max(s) for s in scripts) < backend.model.config.get_text_config().vocab_size
    step = {"n": 0}
    decode_loop = HFBackend._decode

    def decode(self, *args, **kwargs):  # a new sentence: the scripts start over
        step["n"] = 0
        return decode_loop(self, *args, **kwargs)

    def choose(self, logprobs, groups, *args):
        picks = torch.tensor([scripts[g][min(step["n"], len(scripts[g]) - 1)] for g in groups.tolist()])
        step["n"] += 1
        return picks

    monkeypatch.setattr(HFBackend, "_decode", decode)
    monkeypatch.setattr(HFBackend, "_choose", choose)
    items = [(IMAGES[0], "Describe the image.", None)]
    found = {}
    for rule in ("any", "sentence"):
        cfg = CSRConfig(num_candidates=2, max_sentences=1, max_new_tokens=12, stop_rule=rule)
        found[rule] = run_csr(lister, LengthScorer(), items, cfg)[0]
    assert found["any"].candidates == [] and found["any"].stats["dropped"] == {"too_short": 2}
    result = found["sentence"]
    assert sorted(c.text.strip() for c in result.candidates) == ["1. There is a blue square.",
                                                                 "1. There is a red circle."]
    assert result.has_pair and all(len(c.sentences) == 1 for c in result.candidates)


def test_povid_pairs_on_a_real_model(backend):
    vocab = Vocabulary(objects=["circle", "square", "triangle", "star"], colours=["red", "green", "blue", "yellow"],
                       sizes=["small", "large"], counts=["two", "three", "four"],
                       relations=["at the top", "at the bottom", "on the left", "on the right"],
                       cooccurrence={"circle": {"triangle": 9, "star": 1}, "square": {"star": 4}})
    items = [POVIDItem(im, "Describe the image.", "There is a small red circle at the top left.", f"k{i}", ["circle"])
             for i, im in enumerate(IMAGES)]
    res = build_povid_pairs(backend, items, POVIDConfig(n_injections=2, max_new_tokens=12), vocabulary=vocab)
    for r in res:
        assert r.chosen.source == "reference" and r.chosen.text == items[0].reference
        inj = r.rejected_text
        assert inj.source == "povid_inject" and inj.text != r.chosen.text and inj.spans
        for s in inj.spans:
            assert inj.text[s["start"]: s["end"]] == s["injected"]
            if s["category"] == "object":  # an absent object is named; the present circle is never injected
                assert any(o in s["injected"] for o in ("triangle", "star", "square"))
                assert s["original"] == "" or "circle" not in s["injected"]
        assert r.noisy_image is not None and r.noisy_image.size == IMAGES[0].size
        if r.rejected_image is not None:
            assert r.rejected_image.params["model"] == backend.model_id
            assert r.rejected_image.params["noise_step"] == 500 and r.rejected_image.source == "povid_noise"
    assert sum(r.rejected_image is not None for r in res) >= 1


def test_povid_teacher_forced_argmax_variant_on_a_real_model(backend):
    from lvlm_studio.methods.povid import add_diffusion_noise

    ref = "There is a small red circle at the top left."
    items = [POVIDItem(im, "Describe the image.", ref, f"k{i}", ["circle"]) for i, im in enumerate(IMAGES)]
    cfg = POVIDConfig(noise_answer="teacher_forced_argmax", make_text_rejected=False)
    res = build_povid_pairs(backend, items, cfg)
    ids = backend.encode_text(ref)
    noisy = [add_diffusion_noise(im, cfg.noise_step, cfg.seed + k, **cfg.noise_schedule()) for k, im in enumerate(IMAGES)]
    argmax = backend.argmax_tokens(noisy, [it.prompt for it in items], [ids] * len(items))
    # per position, the argmax token is the most likely one: its teacher-forced log-prob is the max
    scores = backend.score(noisy, [it.prompt for it in items], argmax)
    assert all(len(a) == len(ids) for a in argmax)
    for k, r in enumerate(res):
        expected = backend.decode(argmax[k]).strip()
        if expected and expected != ref:
            assert r.rejected_image is not None and r.rejected_image.text == expected
            assert r.rejected_image.params["noise_answer"] == "teacher_forced_argmax"
        else:  # the noise changed nothing: no pair
            assert r.rejected_image is None
        assert r.noisy_image is not None and np.array_equal(np.asarray(r.noisy_image), np.asarray(noisy[k]))
    assert sum(r.rejected_image is not None for r in res) >= 1
    # the log-prob of the argmax token under teacher forcing on the *chosen* prefix is the row maximum:
    # check on position 0, where both prefixes are the prompt alone
    first_lp = backend.score(noisy[:1], [items[0].prompt], [[argmax[0][0]]])[0][0]
    for tok in ids[:1] + [ids[0] + 1]:
        assert first_lp >= backend.score(noisy[:1], [items[0].prompt], [[tok]])[0][0] - 1e-6
    assert all(len(s) == len(ids) for s in scores)


def test_stic_pairs_on_a_real_model(backend):
    cfg = STICConfig(good_prompt="Describe the image.", plain_prompt="Describe the image.",
                     misleading_prompts=("Describe the image and what is next to it.",), max_new_tokens=10)
    res = build_stic_pairs(backend, [(im, f"k{i}") for i, im in enumerate(IMAGES * 2)], cfg)
    assert len(res) == 6
    for r in res:
        assert r.draw["branch"] in ("misleading", "corrupted")
        assert r.chosen is not None and r.chosen.params["model"] == backend.model_id
        if r.rejected is not None:
            assert r.rejected.params["branch"] == r.draw["branch"]
        if r.draw["branch"] == "corrupted":
            assert r.rejected_image.size == (32, 32)
    assert sum(r.has_pair for r in res) >= 1
