import math

import numpy as np
import pytest
from PIL import Image

from lvlm_studio.methods.povid import (
    HallucinationInjector,
    POVIDConfig,
    POVIDItem,
    PromptedInjector,
    Vocabulary,
    add_diffusion_noise,
    build_povid_pairs,
    cooccurrence_from_objects,
    diff_spans,
    diffusion_coefficients,
    noisy_rejected,
    plural,
)
from lvlm_studio.models.base import Sequence


class EchoBackend:
    """Test double: answers with a fixed text per prompt and records the images it saw."""

    model_id = "echo"

    def __init__(self, reply=lambda image, prompt: f"mean {np.asarray(image).mean():.1f}"):
        self.reply = reply
        self.seen: list[tuple[Image.Image, str]] = []
        self.params = []

    def sample(self, images, prompts, n=1, params=None):
        self.params.append(params)
        out = []
        for img, p in zip(images, prompts, strict=True):
            self.seen.append((img, p))
            text = self.reply(img, p)
            out.append([Sequence(text, [1, 2], [-0.1, -0.1], "eos")] * n)
        return out


def test_noise_coefficients_at_step_500():
    a, b = diffusion_coefficients(500)
    assert a == pytest.approx(0.8630, abs=5e-4) and b == pytest.approx(0.5052, abs=5e-4)
    assert a * a + b * b == pytest.approx(1.0)
    # t = 0 by hand: beta_0 = sigmoid(-6) * (5e-3 - 1e-5) + 1e-5
    beta0 = 1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5
    assert diffusion_coefficients(0)[0] == pytest.approx(math.sqrt(1 - beta0))
    with pytest.raises(ValueError):
        diffusion_coefficients(1000)


def test_noise_is_clamped_not_wrapped_and_seeded():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    noisy = np.asarray(add_diffusion_noise(white, 500, seed=3)).astype(float)
    a, b = diffusion_coefficients(500)
    eps = np.random.default_rng(3).standard_normal((64, 64, 3))
    expected = np.round(np.clip(a + b * eps, 0, 1) * 255)
    assert np.array_equal(noisy, expected)
    # clamping: every pixel whose noise pushes it above 1 stays white (a wrap would make it dark)
    over = a + b * eps > 1
    assert np.all(noisy[over] == 255)
    assert over.mean() == pytest.approx(0.393, abs=0.03)  # P(eps > (1 - a) / b = 0.271)
    black = np.asarray(add_diffusion_noise(Image.new("RGB", (64, 64)), 500, seed=3))
    assert np.all(black[eps < 0] == 0)
    assert np.array_equal(np.asarray(add_diffusion_noise(white, seed=3)), noisy)
    assert not np.array_equal(np.asarray(add_diffusion_noise(white, seed=4)), noisy)


def test_cooccurrence_counts_pairs_once_per_image():
    c = cooccurrence_from_objects([{"dog", "frisbee", "person"}, ["dog", "person", "dog"], {"cat"}])
    assert c["dog"] == {"frisbee": 1, "person": 2}
    assert c["person"]["dog"] == 2 and c["frisbee"] == {"dog": 1, "person": 1}
    assert c["cat"] == {}


SMALL = Vocabulary(objects=["cat", "dog", "couch", "frisbee", "apple"], colours=["red", "blue"], sizes=[],
                   counts=["two", "three"], relations=["to the left of", "to the right of"],
                   cooccurrence=cooccurrence_from_objects([{"dog", "frisbee"}] * 5 + [{"cat", "couch"}] * 3))


def one(category: str, text: str, seed: int = 0, present=None):
    return HallucinationInjector(SMALL, n_injections=1, categories=[category], cooccur_top_k=1).inject(
        text, present, seed=seed)


def test_injected_span_offsets_exact():
    r = one("relation", "The cat is to the left of the dog.")
    assert r.text == "The cat is to the right of the dog."
    assert r.spans == [{"start": 11, "end": 26, "category": "relation", "original": "to the left of",
                        "injected": "to the right of"}]
    r = one("count", "I see two dogs.")
    assert r.text == "I see three dogs." and r.spans[0]["start"] == 6 and r.spans[0]["end"] == 11
    r = one("attribute", "A red ball.")
    assert r.text == "A blue ball."
    assert (r.spans[0]["start"], r.spans[0]["end"], r.spans[0]["original"]) == (2, 6, "red")


def test_object_injection_uses_absent_cooccurring_objects():
    texts = {one("object", "A dog sits.", seed=s, present={"dog"}).text for s in range(20)}
    # the only absent co-occurring object of "dog" is the frisbee: replaced or added
    assert texts == {"A frisbee sits.", "A dog sits. There is also a frisbee next to the dog."}
    added = one("object", "A dog sits.", seed=next(s for s in range(20) if "also" in one(
        "object", "A dog sits.", seed=s, present={"dog"}).text), present={"dog"})
    span = added.spans[0]
    assert added.text[span["start"]: span["end"]] == "There is also a frisbee next to the dog."
    assert span["start"] == 12 and span["original"] == ""
    # the article follows the new word: "A dog" -> "An apple" when only apple is available
    vocab = Vocabulary(objects=["dog", "apple"], colours=[], sizes=[], counts=[], relations=[])
    inj = HallucinationInjector(vocab, n_injections=1, categories=["object"])
    outs = {inj.inject("A dog sits.", seed=s).text for s in range(10)}
    assert "An apple sits." in outs
    r = next(inj.inject("A dog sits.", seed=s) for s in range(10) if inj.inject("A dog sits.", seed=s).text == "An apple sits.")
    assert r.spans[0]["injected"] == "An apple" and (r.spans[0]["start"], r.spans[0]["end"]) == (0, 8)


def test_many_injections_keep_consistent_offsets_and_never_use_present_objects():
    inj = HallucinationInjector(n_injections=3)  # the COCO default vocabulary
    text = "Two dogs play with a red frisbee to the left of a large tree. A person watches."
    for seed in range(40):
        r = inj.inject(text, present_objects={"dog", "frisbee", "person", "cup"}, seed=seed)
        assert 1 <= len(r.spans) <= 3 and r.text != text
        ends = [(s["start"], s["end"]) for s in sorted(r.spans, key=lambda s: s["start"])]
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(ends, ends[1:], strict=False))  # no overlap
        for s in r.spans:
            assert r.text[s["start"]: s["end"]] == s["injected"]
            assert s["category"] in {"object", "attribute", "count", "relation"}
            if s["category"] == "object":
                assert "cup" not in s["injected"]
        assert inj.inject(text, present_objects={"dog", "frisbee", "person", "cup"}, seed=seed).text == r.text


def test_injector_finds_objects_by_their_coco_synonyms():
    """On COCO-style answers an object is often named by a synonym ("man", "motorbike", "sofa"):
    the default vocabulary reads CHAIR's synonym table, so those are objects to replace."""
    inj = HallucinationInjector(categories=["object"])
    text = "A man rides a motorbike past two kids. Bikes lean on a sofa."
    assert [(text[s:e], obj, pl) for s, e, obj, pl in inj.mentioned_objects(text)] == [
        ("man", "person", False), ("motorbike", "motorcycle", False), ("kids", "person", True),
        ("Bikes", "bicycle", True), ("sofa", "couch", False)]
    # "orange" before a noun is the colour; on its own or before a function word it is the fruit.
    assert [obj for *_, obj, _ in inj.mentioned_objects("An orange umbrella and an orange.")] == ["umbrella", "orange"]
    assert [obj for *_, obj, _ in inj.mentioned_objects("An orange on the table.")] == ["orange", "dining table"]
    # Plural-only and irregular synonyms are plural: the replacement agrees ("Horses graze").
    assert [(obj, pl) for _, _, obj, pl in inj.mentioned_objects("Oxen and cattle graze.")] == [("cow", True)] * 2
    # Replacing a synonym mention: the horse (the one absent object) takes the man's or the motorbike's place.
    vocab = Vocabulary(objects=["person", "motorcycle", "horse"])
    inj = HallucinationInjector(vocab, n_injections=1, categories=["object"])
    outs = {inj.inject("A man rides a motorbike.", present_objects={"person", "motorcycle"}, seed=s).text
            for s in range(20)}
    assert outs == {"A horse rides a motorbike.", "A man rides a horse.",
                    "A man rides a motorbike. There is also a horse next to the man."}
    # A vocabulary without synonyms (the world's) does not read "man" as anything.
    bare = HallucinationInjector(Vocabulary(objects=["person"], synonyms={}), categories=["object"])
    assert bare.mentioned_objects("A man and a person.") == [(12, 18, "person", False)]


def test_injected_plurals_are_read_back_by_chair_as_the_same_object():
    """A count injection writes "two <plural>": CHAIR must count it as that object, or the injected
    hallucination is invisible to the metric. Irregular plurals come from CHAIR's own table read
    backwards, so a custom vocabulary's "leaf" becomes "leaves", not "leafs"."""
    from lvlm_studio.evaluation import COCO_CATEGORIES, IRREGULAR_PLURALS, get_extractor, singularize

    coco = get_extractor("coco")
    assert [o for o in COCO_CATEGORIES if coco.extract(f"There are two {plural(o)} here.") != [o]] == []
    assert [plural(w) for w in ("leaf", "cactus", "fish", "wolf", "person", "box", "baby", "hot dog", "bench",
                                "bus", "toy", "puppy")] == [
        "leaves", "cacti", "fish", "wolves", "people", "boxes", "babies", "hot dogs", "benches", "buses", "toys",
        "puppies"]
    assert all(singularize(plural(s)) == s for s in IRREGULAR_PLURALS.values())


def test_reasoning_answers_get_a_wrong_step_or_a_wrong_final_answer():
    """POVID's reasoning category: a leading yes/no flipped, the last sentence's number changed, a
    step after a reasoning cue negated (or a negated one made positive); answers that do not
    reason never offer it, so they draw exactly as without it."""
    inj = HallucinationInjector(categories=["reasoning"], n_injections=3)
    r = inj.inject("Yes, he is likely a chef because he is wearing a white hat.", seed=0)
    assert r.text == "No, he is likely a chef because he is not wearing a white hat."
    assert [(x["original"], x["injected"], x["category"]) for x in r.spans] == [
        ("Yes", "No", "reasoning"), ("is", "is not", "reasoning")]
    r = inj.inject("The road is wet, so it isn't safe. In total there are 12 cars.", seed=0)
    assert r.text.startswith("The road is wet, so it is safe. In total there are ")
    assert int(r.text.split()[-2]) in {10, 11, 13, 14}
    assert all(r.text[x["start"]:x["end"]] == x["injected"] for x in r.spans)
    assert not inj.reasons("A dog sits on a couch.") and inj.inject("A dog sits on a couch.").spans == []
    # "No one ..." is no answer; contractions with either apostrophe and "can not" flip whole; a
    # number with separators is left alone (1,200 is not "1,198"), a decimal point ends no sentence.
    assert not inj.reasons("No one is here.")
    assert inj.inject("No, because he can\u2019t reach it.", seed=0).text == "Yes, because he can reach it."
    assert inj.inject("It sinks, so it can not swim.", seed=0).text == "It sinks, so it can swim."
    r = inj.inject("Yes. So there are 1,200 birds at 10:45, each 2.5 cm.", seed=0)
    assert r.text == "No. So there are not 1,200 birds at 10:45, each 2.5 cm."
    r = inj.inject("Yes. It is 2.5 m tall, so about 14.", seed=0)
    assert r.text.startswith("No. It is 2.5 m tall, so about ") and r.text.split()[-1].rstrip(".") in {"12", "13", "15", "16"}
    # a digit of a decimal is no count; an object sentence added to an open last sentence closes it first
    counts = HallucinationInjector(categories=["count"], n_injections=1)
    for seed in range(20):
        assert counts.inject("There are 3.5 apples and 2 pears.", seed=seed).text.startswith("There are 3.5 apples and ")
    added = [r for r in (HallucinationInjector(categories=["object"], n_injections=1).inject(
        "A dog sits under a tall tree", seed=seed) for seed in range(30)) if "There is also" in r.text]
    assert added and all(r.text.startswith("A dog sits under a tall tree. There is also") for r in added)
    assert all(r.text[x["start"]:x["end"]] == x["injected"] for r in added for x in r.spans)
    # the clause whose number changed is not negated too: "so the answer is not 3" would be true
    for seed in range(50):
        r = inj.inject("There are two rows of two, so the answer is 4.", seed=seed)
        assert "is not" not in r.text and r.text.split()[-1].rstrip(".") in {"2", "3", "5", "6"}, r.text
    text = "Two dogs play with a red frisbee to the left of a large tree."
    with_it, without = HallucinationInjector(n_injections=2), HallucinationInjector(
        n_injections=2, categories=("object", "attribute", "count", "relation"))
    assert all(with_it.inject(text, seed=s).text == without.inject(text, seed=s).text for s in range(20))


def test_diff_spans_recover_inserted_and_replaced_words():
    orig = "A dog sits on a mat."
    new = "A black dog sits on a red mat near a cat."
    spans = diff_spans(orig, new)
    assert [(s["injected"], s["original"]) for s in spans] == [("black", ""), ("red", ""), ("near a cat.", "")]
    for s in spans:
        assert new[s["start"]: s["end"]] == s["injected"]
    spans = diff_spans("Two cats sleep.", "Three cats sleep.")
    assert spans == [{"start": 0, "end": 5, "category": "prompted", "original": "Two", "injected": "Three"}]


def test_prompted_injector_asks_the_backend_and_labels_spans():
    backend = EchoBackend(lambda img, p: " A dog sits on a red couch. ")
    inj = PromptedInjector(backend, vocabulary=SMALL)
    r = inj.inject(Image.new("RGB", (8, 8)), "A dog sits on a mat.")
    assert r.text == "A dog sits on a red couch."
    assert [(s["injected"], s["category"]) for s in r.spans] == [("red couch.", "object")]
    assert "A dog sits on a mat." in backend.seen[0][1]
    with pytest.raises(ValueError):
        PromptedInjector(backend, prompt_template="no placeholder")
    # an echo that changes no word (a dropped period, capitals, spacing) hallucinates nothing: it is
    # no rejected side, not a near-copy of the chosen answer
    for echo in ("A dog sits on a mat", "a DOG sits on a mat.", "A dog  sits on a mat."):
        r = PromptedInjector(EchoBackend(lambda img, p, e=echo: e), vocabulary=SMALL).inject(
            Image.new("RGB", (8, 8)), "A dog sits on a mat.")
        assert r.text == r.original and r.spans == []
    items = [POVIDItem(Image.new("RGB", (8, 8)), "Describe.", "A dog sits on a mat.")]
    cfg = POVIDConfig(injector="prompted", make_image_rejected=False)
    [res] = build_povid_pairs(EchoBackend(lambda img, p: "A dog sits on a mat"), items, cfg)
    assert res.rejected_text is None


def test_build_povid_pairs_provenance_and_noisy_side():
    backend = EchoBackend()
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    items = [POVIDItem(img, "Describe.", "The cat is to the left of the dog.", "k1", ["cat", "dog"]),
             (img, "What is here?", "Two dogs play.")]
    res = build_povid_pairs(backend, items, POVIDConfig(n_injections=1))
    assert len(res) == 2
    r = res[0]
    assert r.chosen.text == "The cat is to the left of the dog." and r.chosen.source == "reference"
    assert r.rejected_text.source == "povid_inject" and r.rejected_text.text != r.chosen.text
    for s in r.rejected_text.spans:
        assert r.rejected_text.text[s["start"]: s["end"]] == s["injected"]
    assert r.rejected_text.params["injector"] == "rules" and r.rejected_text.seed == 0
    assert all(rec["text"] == r.rejected_text.text[rec["start"]: rec["end"]] for rec in r.rejected_text.sentences)
    # the image-side answer was produced on the noisy image, not the clean one
    clean_mean = np.asarray(img).mean()
    assert r.rejected_image.source == "povid_noise"
    assert r.rejected_image.text != f"mean {clean_mean:.1f}"
    assert np.asarray(backend.seen[0][0]).std() > 10
    assert r.rejected_image.params["noise_step"] == 500
    assert r.rejected_image.params["sqrt_alpha_bar"] == pytest.approx(0.863, abs=1e-3)
    assert r.rejected_image.params["model"] == "echo"
    assert [res[0].rejected_image.seed, res[1].rejected_image.seed] == [0, 1]
    # an item's own seed (the service gives each stored item one) decides its injection and its noise
    own = build_povid_pairs(EchoBackend(), [POVIDItem(img, "Describe.", "Two dogs play.", "k2", None, 4242)],
                            POVIDConfig(n_injections=1))
    assert own[0].rejected_text.seed == own[0].rejected_image.seed == 4242
    # seeded: same config -> same output
    again = build_povid_pairs(EchoBackend(), items, POVIDConfig(n_injections=1))
    assert [x.rejected_text.text for x in again] == [x.rejected_text.text for x in res]
    assert [x.rejected_image.text for x in again] == [x.rejected_image.text for x in res]


def test_noisy_rejected_and_the_reference_variant_needs_argmax():
    backend = EchoBackend()
    text, noisy = noisy_rejected(backend, Image.new("RGB", (8, 8), "white"), "Describe.")
    assert text.startswith("mean ") and np.asarray(noisy).mean() < 255
    with pytest.raises(ValueError, match="chosen answer"):
        noisy_rejected(backend, Image.new("RGB", (8, 8)), "x", config=POVIDConfig(noise_answer="teacher_forced_argmax"))
    # a backend without per-position argmax gets a clear error, not a silent fallback
    items = [POVIDItem(Image.new("RGB", (8, 8)), "Describe.", "A red circle.", "k", ["circle"])]
    with pytest.raises(ValueError, match="argmax_tokens"):
        build_povid_pairs(backend, items, POVIDConfig(noise_answer="teacher_forced_argmax", make_text_rejected=False))


# Tests from a mutation audit: each fails on a mutant the suite above let through.
COOC = Vocabulary(objects=["dog", "frisbee", "couch"], colours=[], sizes=[], counts=[], relations=[], synonyms={},
                  cooccurrence=cooccurrence_from_objects([{"dog", "frisbee"}] * 5 + [{"dog", "couch"}]))


def test_absent_candidates_rank_by_cooccurrence_and_skip_present_objects():  # P06, P08
    inj = HallucinationInjector(COOC)
    assert inj.absent_candidates({"dog"}, set()) == ["frisbee", "couch"]  # 5 before 1
    assert inj.absent_candidates({"dog"}, {"frisbee"}) == ["couch"]  # ground truth is never "absent"


def test_cooccur_top_k_limits_and_weights_the_pick():  # P20, P21
    top1 = HallucinationInjector(COOC, n_injections=1, categories=["object"], cooccur_top_k=1)
    texts = [top1.inject("A dog sits.", seed=s).text for s in range(30)]
    assert all("frisbee" in t and "couch" not in t for t in texts)
    top2 = HallucinationInjector(COOC, n_injections=1, categories=["object"], cooccur_top_k=2)
    texts = [top2.inject("A dog sits.", seed=s).text for s in range(60)]
    frisbee, couch = sum("frisbee" in t for t in texts), sum("couch" in t for t in texts)
    assert couch > 0 and frisbee > 2 * couch  # weighted 5 : 1 by co-occurrence


def test_plural_mentions_are_found_as_their_objects():  # P09, P24
    inj = HallucinationInjector(categories=["object"])
    assert [(o, pl) for *_, o, pl in inj.mentioned_objects("Two benches and three ponies.")] == [
        ("bench", True), ("horse", True)]


def test_count_and_attribute_injections_always_change_the_word():  # P10, P17
    small = Vocabulary(objects=["ball"], colours=["red", "blue"], sizes=[], counts=["two", "three"], relations=[],
                       synonyms={})
    count = HallucinationInjector(small, n_injections=1, categories=["count"])
    colour = HallucinationInjector(small, n_injections=1, categories=["attribute"])
    for s in range(30):
        r = count.inject("I see 3 balls.", seed=s)
        assert r.text != "I see 3 balls." and r.spans[0]["injected"] != r.spans[0]["original"]
        assert colour.inject("A red ball.", seed=s).text == "A blue ball."


def test_relation_injection_uses_the_opposite_with_the_default_vocabulary():  # P11
    inj = HallucinationInjector(n_injections=1, categories=["relation"])
    assert {inj.inject("The cat is behind the car.", seed=s).text for s in range(20)} == {
        "The cat is in front of the car."}
    assert {inj.inject("A cup on top of a table.", seed=s).text for s in range(20)} == {"A cup under a table."}


def test_no_rejected_side_when_nothing_changed():  # P16, P19
    img = Image.new("RGB", (8, 8), (90, 90, 90))
    # the injector finds nothing to edit (no relation phrase): no text-side pair
    [r] = build_povid_pairs(None, [POVIDItem(img, "p", "A dog sits.")],
                            POVIDConfig(categories=("relation",), make_image_rejected=False))
    assert r.rejected_text is None
    # the model says the reference answer on the noisy image too: no image-side pair
    [r] = build_povid_pairs(EchoBackend(lambda im, p: "A dog sits."), [POVIDItem(img, "p", "A dog sits.")],
                            POVIDConfig(make_text_rejected=False))
    assert r.rejected_image is None and r.noisy_image is not None


def test_noise_seed_is_per_item_across_chunks():  # P23
    img = Image.new("RGB", (8, 8), (90, 90, 90))
    items = [POVIDItem(img, "p", "A dog sits."), POVIDItem(img, "p", "A cat sits.")]
    one_chunk = build_povid_pairs(EchoBackend(), items, POVIDConfig(make_text_rejected=False))
    per_item = build_povid_pairs(EchoBackend(), items, POVIDConfig(make_text_rejected=False, batch_size=1))
    assert [r.rejected_image.seed for r in per_item] == [0, 1]
    for a, b in zip(one_chunk, per_item, strict=True):
        assert np.array_equal(np.asarray(a.noisy_image), np.asarray(b.noisy_image))
    assert not np.array_equal(np.asarray(per_item[0].noisy_image), np.asarray(per_item[1].noisy_image))


@pytest.mark.parametrize("bad", [
    dict(noise_step=1000), dict(noise_step=-1), dict(categories=("objects",)), dict(categories=()),
    dict(n_injections=0), dict(cooccur_top_k=0), dict(batch_size=0), dict(max_new_tokens=0),
    dict(beta_start=0.01, beta_end=0.001), dict(temperature=-1.0), dict(temperature=float("inf")),
    dict(make_text_rejected=False, make_image_rejected=False),
])
def test_config_refuses_what_would_fail_mid_run(bad):
    """Checked when the config is made, before a model loads (the CLI's --param makes it exit 2)."""
    with pytest.raises(ValueError):
        POVIDConfig(**bad)


def test_config_edges_it_means():
    cfg = POVIDConfig(noise_step=0, categories=["relation"], make_image_rejected=False)
    assert cfg.categories == ("relation",) and POVIDConfig(noise_step=999).noise_step == 999
