from lvlm_studio.methods.sentences import (
    clean_reason,
    is_clean_sentence,
    period_may_end_sentence,
    segment_sentences,
    sentence_records,
)


def texts(s: str) -> list[str]:
    return [span.text for span in segment_sentences(s)]


def test_offsets_point_into_the_original_string():
    s = "  A cat sits on a mat.  Two dogs run!\nIs it sunny?  "
    spans = segment_sentences(s)
    assert [x.text for x in spans] == ["A cat sits on a mat.", "Two dogs run!", "Is it sunny?"]
    for span in spans:
        assert s[span.start: span.end] == span.text
    assert spans[0].start == 2 and spans[1].start == 24


def test_abbreviations_do_not_split():
    assert texts("Mr. Smith met Dr. Jones. They talked.") == ["Mr. Smith met Dr. Jones.", "They talked."]
    assert texts("Fruit, e.g. apples, i.e. food. Done.") == ["Fruit, e.g. apples, i.e. food.", "Done."]
    assert texts("The U.S. Army is big. He lives in the U.S. It is nice.") == [
        "The U.S. Army is big.", "He lives in the U.S.", "It is nice."
    ]
    assert texts("Apples, pears, etc. are fruit. Apples etc. The end") == [
        "Apples, pears, etc. are fruit.", "Apples etc.", "The end"
    ]
    assert texts("Ask J. Smith today. Ok.") == ["Ask J. Smith today.", "Ok."]
    # "No." is an abbreviation before a number only; an answer's "No." ends its sentence
    assert texts("See No. 5 and Fig. 3 there. No. There is no cat.") == ["See No. 5 and Fig. 3 there.", "No.",
                                                                         "There is no cat."]
    assert texts("The answer is no. There is a cat.") == ["The answer is no.", "There is a cat."]


def test_decimals_ellipses_and_unterminated_text():
    assert texts("It costs 3.5 dollars. Really") == ["It costs 3.5 dollars.", "Really"]
    assert texts("I think... maybe not.") == ["I think... maybe not."]
    assert texts("Wait... What? Yes!") == ["Wait...", "What?", "Yes!"]
    assert texts("There is a cat") == ["There is a cat"]
    assert texts('He said "Hi." Then left.') == ['He said "Hi."', "Then left."]
    assert texts("1. The dog.\n2. The cat") == ["1. The dog.", "2. The cat"]
    assert texts("") == [] and texts("   \n ") == []


def test_sentence_records_have_offsets_and_empty_scores():
    s = "A dog. A cat"
    recs = sentence_records(s)
    assert [(r["start"], r["end"]) for r in recs] == [(0, 6), (7, 12)]
    assert all(r["clip_score"] is None and r["reward"] is None for r in recs)


def test_cleaning_filter_follows_the_reference():
    assert clean_reason("Hi.") == "too_short"  # 3 characters < 4
    assert clean_reason("Yes.") is None  # 4 characters is kept
    assert clean_reason("the dog dog dog dog dog dog runs") == "repetition"  # 6 in a row
    assert clean_reason("the dog dog dog dog dog runs") is None  # 5 in a row is kept
    assert clean_reason("a , , , , , , , , , , , , b") == "repetition"
    assert clean_reason("A cat Привет sits.") == "foreign_script"
    assert clean_reason("A cat 猫 sits.") == "foreign_script"
    assert clean_reason("A cat \U0001F600 sits.") == "foreign_script"
    assert clean_reason("a\nb\nc\nd\ne\nf\ng") == "too_many_newlines"
    assert is_clean_sentence("The café has 3.5 tables, 50% full.")


# Tests from a mutation audit: each fails on a mutant the suite above let through.
def test_line_break_ends_a_sentence_and_dotted_abbreviations_do_not():  # T07, T14
    s = "A red car\nA blue bus"
    spans = segment_sentences(s)
    assert [x.text for x in spans] == ["A red car", "A blue bus"] and spans[1].start == 10
    assert [x.text for x in segment_sentences("Bob, a.k.a. the boss, came. He sat.")] == [
        "Bob, a.k.a. the boss, came.", "He sat."]


def test_cleaning_filter_thresholds_and_scripts():  # T10, T11, T12, T15, T18
    assert clean_reason("Wow" + "!" * 11) == "repetition"  # one character 11 times
    assert clean_reason("Wow" + "!" * 10) is None
    assert clean_reason("a\nb\nc\nd\ne\nf") is None  # 5 line breaks are kept
    assert clean_reason("A cat 안녕 sits.") == "foreign_script"  # Hangul
    assert clean_reason("A cat ねこ sits.") == "foreign_script"  # hiragana
    assert clean_reason("A cat&nbsp;&nbsp;sits.") == "foreign_script"
    assert clean_reason("A cat&nbsp;sits.") is None


def test_generation_may_stop_only_where_a_period_may_end_a_sentence():
    # What a model has written when a period arrives; what follows is not written yet.
    for written in ["1.", "Objects:\n2.", "\n 3.", "Fruit, e.g.", "i.e.", "Mr.", "Ask Dr.", "J."]:
        assert not period_may_end_sentence(written), written
    for written in ["There is a.", "There are 3.", "It is big.", "Apples etc.", "No.", "The U.S.", "Wait...",
                    "In 1.", "no period at all", "1. A red car.", "Take vitamin e."]:
        assert period_may_end_sentence(written), written
    # Where segment_sentences cuts after a period, generation may stop there too.
    for text in ["Mr. Smith met Dr. Jones. They talked.", "1. The dog.\n2. The cat. It ran.",
                 "See No. 5 and Fig. 3 there. No. There is no cat.", "He lives in the U.S. It is nice.",
                 "Take vitamin e. The cat sits. It costs 3. Then 4.5 more.", "Fruit, e.g. a pear, i.e. food. Done."]:
        for span in segment_sentences(text):
            if span.text.endswith("."):
                assert period_may_end_sentence(text[: span.end]), span.text
