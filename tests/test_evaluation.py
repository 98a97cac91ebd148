"""Hand-built cases for object extraction, CHAIR, recall and POPE (pure, fast)."""

from __future__ import annotations

import pytest

from lvlm_studio.evaluation import (
    COCO_CATEGORIES,
    CocoExtractor,
    ObjectExtractor,
    ShapesWorldExtractor,
    build_pope_questions,
    chair_from_texts,
    evaluate_backend,
    paired_chair_s,
    paired_chair_s_summary,
    paired_pope_f1,
    paired_pope_f1_summary,
    parse_yes_no,
    pope_label,
    pope_metrics,
    score_caption,
    singularize,
)
from lvlm_studio.models.base import GenerationParams, Sequence


@pytest.fixture(scope="module")
def coco() -> CocoExtractor:
    return CocoExtractor()


@pytest.fixture(scope="module")
def world() -> ShapesWorldExtractor:
    return ShapesWorldExtractor()


def test_extractors_follow_protocol(coco, world):
    assert isinstance(coco, ObjectExtractor) and isinstance(world, ObjectExtractor)
    assert len(COCO_CATEGORIES) == 80 and len(set(coco.vocabulary)) == 80


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A puppy chases a kitten.", ["dog", "cat"]),  # synonyms
        ("Two dogs, three horses and some sheep.", ["dog", "horse", "sheep"]),  # plurals
        ("The men and women hold knives.", ["person", "person", "knife"]),  # irregular plurals
        ("Hot dogs near a traffic light and a teddy bear.", ["hot dog", "traffic light", "teddy bear"]),
        ("A girl holds a cell phone; a boy a mobile phone.", ["person", "cell phone", "person", "cell phone"]),
        ("A baby elephant follows an adult giraffe.", ["elephant", "giraffe"]),  # not 'person'
        ("A man wearing a bow tie.", ["person", "tie"]),
        ("A cat sits on the toilet seat.", ["cat", "toilet"]),  # seat is not a chair here
        ("A passenger jet over the train tracks.", ["airplane"]),  # neither a person nor a train
        ("A sofa, a couch and a SOFA.", ["couch", "couch", "couch"]),  # every occurrence counts
        ("Wine glasses and tennis rackets on a dining table.", ["wine glass", "tennis racket", "dining table"]),
        ("The bus passes a bench.", ["bus", "bench"]),  # 'bus' is not singularised to 'bu'
        # Plurals the rules alone got wrong; the known singular decides.
        ("Policemen and grandchildren near taxis.", ["person", "person", "car"]),
        ("Two motor bikes and two bikes.", ["motorcycle", "bicycle"]),  # not a bicycle
        ("A skier under cloudy skies.", ["person"]),  # skies are not skis
        ("Minibuses, magpies, collies, corgis and tvs.", ["bus", "bird", "dog", "dog", "tv"]),
        ("", []),
        ("A beautiful sunny day.", []),
        # Two-word names join across spaces or a hyphen only, never across punctuation (chair.py's
        # tokens): a baby, then a dog; a baby, then elephants.
        ("A woman holds a baby, dog at her feet.", ["person", "person", "dog"]),
        ("The mother has a baby. Elephants walk by.", ["person", "person", "elephant"]),
        ("A hot-dog stand, a hot_dog and a hot \u2013 dog.", ["hot dog", "hot dog", "hot dog"]),
        ("Water buffaloes, flamingoes and pocketknives.", ["cow", "bird", "knife"]),  # -oes, -ives
    ],
)
def test_coco_extraction(coco, text, expected):
    assert coco.extract(text) == expected


def test_coco_mentions_have_offsets(coco):
    text = "Two Hot Dogs and a dog."
    mentions = coco.mentions(text)
    assert [(m.text, m.object) for m in mentions] == [("Hot Dogs", "hot dog"), ("dog", "dog")]
    assert all(text[m.start : m.end] == m.text for m in mentions)


def test_ground_truth_names_with_underscores(coco, world):
    assert coco.ground_truth(["hot_dog", "teddy_bear"]) == {"hot dog", "teddy bear"}
    assert world.ground_truth(["red_circle"]) == {"red circle"}


def test_coco_ground_truth_from_instances_and_captions(coco):
    gt = coco.image_ground_truth(["person", "dog"], ["A woman walks her puppy past a bicycle."])
    assert gt == {"person", "dog", "bicycle"}
    with pytest.raises(ValueError, match="not a COCO category"):
        coco.ground_truth(["unicorn"])


def test_singularize():
    assert [singularize(w) for w in ["circles", "benches", "puppies", "buses", "glasses", "bus", "boxes"]] == [
        "circle", "bench", "puppy", "bus", "glass", "bus", "box",
    ]


def test_world_extraction_sizes_plurals_repeats(world):
    text = "There is a small red circle at the top left. Two blue squares. A red large circle. Red circles!"
    assert world.extract(text) == ["red circle", "blue square", "red circle", "red circle"]
    # Colour without a shape, shape without a colour: no mention.
    assert world.extract("Something red. A circle. A green thing.") == []
    # Colour and shape bind across spaces only, not across punctuation or a sentence end.
    assert world.extract("The square is red. Circles fill the rest.") == [] == world.extract("red, circle")
    assert world.extract("") == []


def test_world_ground_truth_formats(world):
    gt = world.ground_truth(["small red circle", {"colour": "Blue", "shape": "star", "size": "large"}])
    assert gt == {"red circle", "blue star"}
    with pytest.raises(ValueError):
        world.ground_truth(["a dog"])
    # the object form is read as the text form is: a plural shape is singular, an unknown word refused
    assert world.ground_truth([{"color": "red", "shape": "circles"}]) == {"red circle"}
    with pytest.raises(ValueError, match="not a ShapesWorld"):
        world.ground_truth([{"colour": "purple", "shape": "hexagon"}])


def test_chair_counts_every_occurrence_and_recall(world):
    texts = [
        "A red circle and a green triangle. A green triangle.",  # 1 true + 2 hallucinated mentions
        "A blue star.",  # correct
        "",  # empty caption: no mentions, misses its object
    ]
    gts = [["red circle"], ["blue star", "yellow square"], ["purple circle"]]
    m = chair_from_texts(texts, gts, world)
    assert m["n_mentions"] == 4 and m["n_hallucinated"] == 2
    assert m["chair_i"] == pytest.approx(2 / 4)
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(2 / 4)  # red circle, blue star of 4 GT objects
    # the empty caption is clean for CHAIR but silent: it names nothing of an image that has an object
    assert m["n_silent"] == 1 and m["silent"] == pytest.approx(1 / 3)


def test_chair_empty_inputs_are_zero_not_nan(world):
    m = chair_from_texts([""], [[]], world)
    assert m["chair_i"] == 0.0 and m["chair_s"] == 0.0 and m["recall"] == 0.0 and m["n_mentions"] == 0
    assert m["n_silent"] == 0  # nothing to name: not silent


def test_score_caption_coco(coco):
    s = score_caption("A dog and two cats on a couch next to a dog.", ["dog", "couch"], coco)
    assert s.objects == ["dog", "cat", "couch", "dog"]
    assert s.hallucinated == ["cat"]
    assert s.recalled == {"dog", "couch"}


@pytest.mark.parametrize(
    "answer, parsed",
    [
        ("No, there is not.", "no"),
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("There is not a dog in the image.", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("Nothing like that", "yes"),  # 'nothing' is not the word 'no'
        ("", "yes"),
        # beyond POPE's script, which read these as yes
        ("There isn't a red circle in the image.", "no"),
        ("I don’t see one.", "no"),
        ("None.", "no"),
        ("Nope", "no"),
        ("I cannot see a dog.", "no"),
        ("Yes, it's a tent.", "yes"),  # "nt" inside a word is not a contraction
    ],
)
def test_pope_parsing(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_metrics():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    # tp=2 fp=1 tn=2 fn=1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_question_strategies():
    vocab = ["a", "b", "c", "d", "e", "f"]
    images = {1: {"a", "b"}, 2: {"a", "c"}, 3: {"a", "c"}, 4: {"d", "c"}, 5: {"e", "b"}}
    for strategy in ("random", "popular", "adversarial"):
        qs = build_pope_questions(images, vocab, strategy=strategy, n=2, seed=1)
        for q in qs:
            present = q["object"] in images[q["image_id"]]
            assert (q["label"] == "yes") == present
            assert q["question"] == f"Is there a {q['object']} in the image?"
    pop = [q["object"] for q in build_pope_questions({1: {"a", "b"}}, vocab, "popular", n=1, statistics=images)
           if q["label"] == "no"]
    assert pop == ["c"]  # most frequent object absent from image 1
    adv = [q["object"] for q in build_pope_questions({9: {"d"}}, vocab, "adversarial", n=1, statistics=images)
           if q["label"] == "no"]
    assert adv == ["c"]  # d co-occurs only with c
    with pytest.raises(ValueError):
        build_pope_questions(images, vocab, strategy="nope")


class _CannedBackend:
    """A backend whose answers are fixed per prompt (the model is not under test here)."""

    model_id = "canned"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.calls = 0

    def sample(self, images, prompts, n=1, params=None):
        self.calls += 1
        return [[Sequence(self.answers[p], [], [], "eos")] for p in prompts]


def test_evaluate_backend_captions_and_pope(world):
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    items = [
        {"item_id": 1, "image": img, "prompt": "describe1", "objects": ["red circle"]},
        {"item_id": 2, "image": img, "prompt": "describe2", "objects": ["blue star"]},
        {"item_id": 3, "image": img, "prompt": "Is there a red circle?", "meta": {"kind": "pope"}, "reference": "yes"},
        {"item_id": 4, "image": img, "prompt": "Is there a blue star?", "label": "no"},
    ]
    backend = _CannedBackend(
        {
            "describe1": "A red circle. A green triangle.",
            "describe2": "A blue star.",
            "Is there a red circle?": "Yes, there is.",
            "Is there a blue star?": "Yes.",
        }
    )
    seen = []
    metrics, rows = evaluate_backend(backend, items, world, GenerationParams(), batch_size=3,
                                     progress=lambda d, t: seen.append((d, t)))
    assert seen == [(3, 4), (4, 4)] and backend.calls == 2
    assert metrics["chair_i"] == pytest.approx(1 / 3) and metrics["chair_s"] == pytest.approx(0.5)
    assert metrics["recall"] == 1.0
    assert metrics["pope_accuracy"] == 0.5 and metrics["pope_yes_ratio"] == 1.0
    assert metrics["pope_n_empty"] == 0
    assert [r["item_id"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["hallucinated"] == ["green triangle"]
    spans = rows[0]["meta"]["spans"]
    assert [(s["object"], s["hallucinated"]) for s in spans] == [("red circle", False), ("green triangle", True)]


def test_evaluate_backend_stops(world):
    from lvlm_studio.evaluation import EvaluationCancelled

    items = [{"item_id": 1, "image": None, "image_path": "/nonexistent", "prompt": "p", "objects": []}]
    with pytest.raises(EvaluationCancelled):
        evaluate_backend(_CannedBackend({}), items, world, should_stop=lambda: True)


def test_paired_chair_s_counts_disagreements_and_gives_mcnemars_exact_p():
    # 9 captions only A hallucinates in, 1 only B, 2 both, 8 neither: P(X <= 1 | n=10) = 11/1024.
    a = [True] * 9 + [False] + [True] * 2 + [False] * 8
    b = [False] * 9 + [True] + [True] * 2 + [False] * 8
    res = paired_chair_s(a, b)
    assert (res["n"], res["only_a"], res["only_b"], res["both"]) == (20, 9, 1, 2)
    assert res["chair_s_a"] == pytest.approx(11 / 20) and res["chair_s_b"] == pytest.approx(3 / 20)
    assert res["p_value"] == pytest.approx(22 / 1024)
    # Symmetric in A and B; 6-0 is significant at 0.05, 5-0 is not (2/64 vs 2/32).
    assert paired_chair_s(b, a)["p_value"] == pytest.approx(22 / 1024)
    assert paired_chair_s([True] * 6, [False] * 6)["p_value"] == pytest.approx(2 / 64)
    assert paired_chair_s([True] * 5, [False] * 5)["p_value"] == pytest.approx(2 / 32)
    # Equal disagreement, or none, is p = 1; a 7-7 split with different captions is no change.
    assert paired_chair_s([True] * 7 + [False] * 7, [False] * 7 + [True] * 7)["p_value"] == 1.0
    assert paired_chair_s([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="3 captions for A but 2"):
        paired_chair_s([True] * 3, [True] * 2)

    line = paired_chair_s_summary(res, "round 0", "round 1")
    assert "0.550 (round 0) -> 0.150 (round 1)" in line and "only round 0 hallucinates in 9" in line
    assert "p = 0.0215: a real change at p < 0.05" in line
    same = paired_chair_s_summary(paired_chair_s([True] * 5, [False] * 5), "A", "B")
    assert "p = 0.0625: within noise at p < 0.05" in same
    assert "nothing to compare" in paired_chair_s_summary(None, "A", "B")


def test_coco_chair_counts_objects_the_human_captions_name(coco):
    """CHAIR's ground truth on COCO is the instance categories ∪ the categories the reference
    captions name (an import keeps the captions in the item's meta): a table the captions mention
    is no hallucination although no instance annotates it."""
    from PIL import Image

    answer = "A man sits at a table with a cup of coffee."
    item = {"item_id": 1, "image": Image.new("RGB", (8, 8)), "prompt": "describe", "objects": ["person", "cup"]}
    backend = _CannedBackend({"describe": answer})
    _, [bare] = evaluate_backend(backend, [item], coco, GenerationParams())
    assert bare["hallucinated"] == ["dining table"]
    with_captions = {**item, "meta": {"coco_id": 1, "captions": ["A man at a dining table drinks coffee."]}}
    metrics, [row] = evaluate_backend(backend, [with_captions], coco, GenerationParams())
    assert row["hallucinated"] == [] and metrics["chair_s"] == 0.0
    assert sorted(row["meta"]["gt"]) == ["cup", "dining table", "person"]
    assert score_caption(answer, ["person", "cup"], coco, captions=["A table."]).hallucinated == []


def test_pope_adversarial_negatives_follow_each_positive():
    """POPE's reference takes, for each sampled ground-truth object, its own most co-occurring absent
    object. Summing co-occurrence over all present objects instead lets an object that goes with
    everything a little (z) push out c's partner (y)."""
    pool: dict[int, set[str]] = {}
    counts = [({"a", "x"}, 10), ({"a", "w"}, 9), ({"b", "w"}, 8), ({"b", "x"}, 7), ({"c", "y"}, 5),
              ({"a", "z"}, 4), ({"b", "z"}, 4), ({"c", "z"}, 4)]
    for objs, k in counts:
        for _ in range(k):
            pool[len(pool)] = objs
    vocab = ["a", "b", "c", "w", "x", "y", "z"]
    qs = build_pope_questions({"img": {"a", "b", "c"}}, vocab, "adversarial", n=3, statistics=pool)
    assert sorted(q["object"] for q in qs if q["label"] == "no") == ["w", "x", "y"]


def test_describe_then_respond_infuses_the_description_into_questions_only(world):
    """STIC's inference: a question is asked with the model's own description prepended, in the
    stage-2 format; a caption item is answered as it is."""
    from PIL import Image

    from lvlm_studio.methods.stic import infuse_description

    img = Image.new("RGB", (8, 8))
    question = "Is there a red circle in the image?"
    items = [{"item_id": 1, "image": img, "prompt": "describe1", "objects": ["red circle"]},
             {"item_id": 2, "image": img, "prompt": question, "meta": {"kind": "pope"}, "reference": "yes"}]
    backend = _CannedBackend({"Describe the image.": "There is a red circle.", "describe1": "A red circle.",
                              infuse_description("There is a red circle.", question): "Yes."})
    metrics, rows = evaluate_backend(backend, items, world, GenerationParams(), describe_prompt="Describe the image.")
    assert rows[1]["answer"] == "Yes." and rows[1]["meta"]["description"] == "There is a red circle."
    assert "description" not in rows[0]["meta"] and metrics["pope_accuracy"] == 1.0
    _, plain = evaluate_backend(_CannedBackend({"describe1": "A red circle.", question: "No."}), items, world,
                                GenerationParams())
    assert plain[1]["answer"] == "No." and "description" not in plain[1]["meta"]


# Tests from a mutation audit: each fails on a mutant the suite above let through.
def test_pope_parsing_ignores_case_and_punctuation():  # E06
    assert [parse_yes_no(a) for a in ["NO", "No!", "Not really.", "YES"]] == ["no", "no", "no", "yes"]


def test_pope_counts_only_parsed_yes_no_answers():
    """A missing prediction on a "yes" probe would fall out of FN while staying in the total
    (recall 1.0 instead of 2/3), a "Yes" label out of the yes-ratio: both are refused, in the
    metrics and in the paired bootstrap, whose resampled F1 would read them as "no"."""
    from lvlm_studio.evaluation import paired_pope_f1

    with pytest.raises(ValueError, match="prediction must be 'yes' or 'no'.*None"):
        pope_metrics(["yes", "yes", None, "no"], ["yes", "yes", "yes", "no"])
    with pytest.raises(ValueError, match="label must be 'yes' or 'no'.*'Yes'"):
        pope_metrics(["yes", "no", "no"], ["Yes", "no", "yes"])
    with pytest.raises(ValueError, match="prediction must be"):
        paired_pope_f1(["yes", None], ["yes", "no"], ["yes", "yes"], resamples=10)
    assert pope_metrics(["yes", "no", "no"], ["yes", "no", "yes"])["recall"] == 0.5


def test_pope_metrics_asymmetric():  # E07, E08
    # tp=1 fp=3 tn=1 fn=0
    m = pope_metrics(["yes", "yes", "yes", "yes", "no"], ["yes", "no", "no", "no", "no"])
    assert m["precision"] == pytest.approx(0.25) and m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.4) and m["accuracy"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(0.8)


def test_coco_toilet_seat_and_three_word_names():  # E12, E27
    coco = CocoExtractor()
    assert coco.extract("A toilet with the seat up.") == ["toilet"]  # chair.py drops "seat" beside a toilet
    assert coco.extract("A seat by the window.") == ["chair"]
    assert coco.extract("A stove top oven and a stove.") == ["oven", "oven"]


def test_pope_asks_n_present_and_n_absent_per_image():  # E23
    vocab = list("abcdefgh")
    images = {1: {"a", "b", "c", "d"}, 2: {"e", "f", "g"}}
    for strategy in ("random", "popular", "adversarial"):
        qs = build_pope_questions(images, vocab, strategy, n=3, seed=0)
        for image_id in images:
            labels = [q["label"] for q in qs if q["image_id"] == image_id]
            assert labels.count("yes") == 3 and labels.count("no") == 3, strategy
    # An image with fewer objects than n gets as many "no" as it has "yes" (it got n "no": 2 + 3).
    for strategy in ("random", "popular", "adversarial"):
        labels = [q["label"] for q in build_pope_questions({3: {"a", "b"}}, vocab, strategy, n=3, seed=0,
                                                           statistics=images)]
        assert labels.count("yes") == labels.count("no") == 2, strategy


def test_pope_label_recognises_probe_kinds():  # E25
    assert pope_label({"meta": {"kind": "probe", "label": "no"}}) == "no"
    assert pope_label({"meta": {"kind": "existence"}, "reference": " Yes "}) == "yes"
    assert pope_label({"meta": {"kind": "pope"}, "reference": "No."}) == "no"  # answers end with a period
    assert pope_label({"meta": {"kind": "describe"}, "reference": "yes"}) is None


def test_an_empty_pope_answer_reads_as_yes_and_is_counted(world):
    from PIL import Image

    img = Image.new("RGB", (8, 8))
    answers = {"q1": "", "q2": "  ", "q3": ". No", "q4": "No.", "q5": "Yes."}
    items = [{"item_id": i, "image": img, "prompt": p, "label": "no"} for i, p in enumerate(answers)]
    metrics, rows = evaluate_backend(_CannedBackend(answers), items, world, GenerationParams())
    # POPE's parser, as the reference: the first sentence of ". No" is empty, so it says yes too
    assert [r["meta"]["prediction"] for r in rows] == ["yes", "yes", "yes", "no", "yes"]
    assert metrics["pope_n_empty"] == 3 and metrics["pope_yes_ratio"] == pytest.approx(4 / 5)


def test_paired_pope_f1_tells_a_real_change_from_noise():
    """The same 400 probes: B fixes 40 of A's false "yes" answers (F1 up beyond noise); C differs from
    A by one probe (noise); the figures are the F1 pope_metrics gives, and the draw is seeded."""
    labels = ["yes", "no"] * 200
    a = ["yes"] * 400  # says yes to everything: F1 2/3
    b = [("no" if i % 2 and i < 80 else p) for i, p in enumerate(a)]
    c = ["no"] + a[1:]
    res = paired_pope_f1(a, b, labels)
    assert (res["n"], res["f1_a"], res["f1_b"]) == (400, pytest.approx(pope_metrics(a, labels)["f1"]),
                                                    pytest.approx(pope_metrics(b, labels)["f1"]))
    assert res["f1_b"] > res["f1_a"] and res["p_value"] < 0.001
    assert paired_pope_f1(b, a, labels)["p_value"] == res["p_value"]  # two-sided
    assert paired_pope_f1(a, c, labels)["p_value"] > 0.3
    assert paired_pope_f1(a, a, labels)["p_value"] == 1.0
    assert paired_pope_f1(a, c, labels, seed=3) == paired_pope_f1(a, c, labels, seed=3)
    assert "a real change at p < 0.05" in paired_pope_f1_summary(res, "round 0", "round 1")
    assert "within noise" in paired_pope_f1_summary(paired_pope_f1(a, c, labels), "A", "B")


def test_paired_pope_f1_resamples_an_images_probes_together():
    """POPE asks a yes and a no probe of each image: with ``groups`` the bootstrap draws images, not
    probes. A change confined to one of 10 images (40 probes each) looks certain probe by probe and
    is noise image by image; one group per probe is the probe bootstrap, draw for draw."""
    labels = ["yes", "no"] * 200
    a = ["yes"] * 400
    b = [("no" if i < 40 and i % 2 else p) for i, p in enumerate(a)]  # 20 fixes, all in image 0
    images = [f"img-{i // 40}" for i in range(400)]
    probe_level = paired_pope_f1(a, b, labels)
    image_level = paired_pope_f1(a, b, labels, groups=images)
    assert probe_level["p_value"] < 0.01 and image_level["p_value"] > 0.2
    assert image_level["units"] == 10 and probe_level["units"] == 400
    assert (image_level["f1_a"], image_level["f1_b"]) == (probe_level["f1_a"], probe_level["f1_b"])
    assert paired_pope_f1(a, b, labels, groups=list(range(400))) == probe_level
    assert "bootstrap over 10 images" in paired_pope_f1_summary(image_level, "A", "B")
    with pytest.raises(ValueError, match="3 groups for 400 probes"):
        paired_pope_f1(a, b, labels, groups=[1, 2, 3])
    # One image: every resample is the sample itself, so no difference can be tested (it used to
    # come out as p = 1/(resamples+1), "a real change").
    one = paired_pope_f1(["yes", "yes"], ["yes", "no"], ["yes", "no"], groups=["img", "img"])
    assert one["units"] == 1 and one["p_value"] == 1.0 and one["f1_b"] > one["f1_a"]
    assert "too few images (1) to test the change" in paired_pope_f1_summary(one, "A", "B")
    assert "nothing to compare" in paired_pope_f1_summary(None, "A", "B")
    with pytest.raises(ValueError, match="predictions for"):
        paired_pope_f1(a, b[:-1], labels)


def test_a_rounds_evaluations_are_kept_by_set_and_older_records_are_read():
    """``with_evaluation`` keeps one evaluation per set, the latest last and as ``eval``; metrics
    stored before sets were recorded are read under the dataset and split the CLI's eval kept, or
    under a label that says the set was not recorded."""
    from lvlm_studio.evaluation import (
        UNRECORDED_SET,
        evaluation_set_label,
        evaluation_set_of,
        round_evaluations,
        with_evaluation,
    )

    items = [{"dataset": "shapesworld", "split": "test"}, {"dataset": "coco", "split": "val"},
             {"dataset": "coco", "split": "val"}, {"dataset": None, "split": "val"}]
    assert evaluation_set_of(items) == [["coco", "val"], ["shapesworld", "test"]]
    assert evaluation_set_label(evaluation_set_of(items)) == "coco/val + shapesworld/test"
    assert evaluation_set_label([]) == UNRECORDED_SET
    # Names that hold a slash or " + " are quoted: two sets never share a label (a Hub dataset
    # "lmms-lab/POPE" split "test" and a dataset "lmms-lab" split "POPE/test" did).
    labels = {evaluation_set_label([pair]) for pair in (("lmms-lab/POPE", "test"), ("lmms-lab", "POPE/test"),
                                                         ("a + b/c", "d"), ("a", "b/c + d"))}
    assert len(labels) == 4 and '"lmms-lab/POPE"/test' in labels
    assert evaluation_set_label([("coco", "val"), ("x", "test")]) != evaluation_set_label([("coco/val + x", "test")])
    assert evaluation_set_label([("+ a", "b"), ("+ c", "d")]) != evaluation_set_label([("+ a", "b +"), ("c", "d")])
    assert evaluation_set_label([(" coco", "val")]) == '" coco"/val'
    # Evaluations filed under a label made before names were quoted are read under today's label
    # (from their eval_set), so a new evaluation on that set replaces them rather than sitting beside.
    old = {"chair_s": 0.4, "set": "lmms-lab/POPE/test", "eval_set": [["lmms-lab/POPE", "test"]]}
    new = {"chair_s": 0.2, "set": '"lmms-lab/POPE"/test', "eval_set": [["lmms-lab/POPE", "test"]]}
    metrics = {"eval": old, "evals": {"lmms-lab/POPE/test": old}}
    assert list(round_evaluations(metrics)) == ['"lmms-lab/POPE"/test']
    assert round_evaluations(with_evaluation(metrics, new)) == {'"lmms-lab/POPE"/test': new}
    world = {"chair_s": 0.2, "set": "shapesworld/test"}
    coco = {"chair_s": 0.4, "set": "coco/val"}
    metrics = with_evaluation(with_evaluation({"n_pairs": 3, "eval": None}, world), coco)
    assert metrics["n_pairs"] == 3 and metrics["eval"] == coco
    assert round_evaluations(metrics) == {"shapesworld/test": world, "coco/val": coco}
    again = {"chair_s": 0.1, "set": "shapesworld/test"}
    assert list(round_evaluations(with_evaluation(metrics, again)).items()) == [("coco/val", coco),
                                                                                 ("shapesworld/test", again)]
    # Older records: one evaluation under "eval" (with the CLI's dataset and split, or without).
    assert round_evaluations({"eval": {"chair_s": 0.3, "dataset": "coco", "split": "val"}}) == {
        "coco/val": {"chair_s": 0.3, "dataset": "coco", "split": "val"}}
    assert list(round_evaluations({"eval": {"chair_s": 0.3}})) == [UNRECORDED_SET]
    assert round_evaluations({"eval": None}) == round_evaluations(None) == {}
