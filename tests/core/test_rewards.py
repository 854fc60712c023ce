"""core.rewards: registry, combination, WER/CER rewards."""

import pytest

from core import rewards as R
from core.rewards import compute_rewards, get_reward, normalize_text, register_reward


@pytest.fixture
def clean_registry():
    saved = dict(R._REGISTRY)
    yield
    R._REGISTRY.clear()
    R._REGISTRY.update(saved)


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ref_wer_reward(ref, hyp):
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    return 1.0 - min(1.0, levenshtein(r, h) / len(r))


def test_normalize_text():
    assert normalize_text("  Hello,   World!  It's\tfine. ") == "hello world it s fine"
    assert normalize_text("ÉCOLE—test") == "école test"


def test_wer_reward_against_edit_distance():
    refs = ["the cat sat on the mat", "Hello, world!", "a b c d", "one two three", "x y"]
    hyps = ["the cat sat on a mat", "hello world", "a c d e f", "", "p q r s t u v"]
    got = get_reward("wer")(hyps, text=refs)
    want = [ref_wer_reward(r, h) for r, h in zip(refs, hyps)]
    assert got == pytest.approx(want)
    assert got[1] == 1.0  # punctuation and case do not count
    assert got[3] == 0.0  # empty hypothesis
    assert got[4] == 0.0  # clamped at 0


def test_wer_reward_multiple_references_takes_best():
    got = get_reward("wer")(["a dog barks"], text=[["a cat meows", "a dog barks loudly"]])
    assert got == pytest.approx([max(ref_wer_reward("a cat meows", "a dog barks"),
                                     ref_wer_reward("a dog barks loudly", "a dog barks"))])


def test_wer_reward_empty_reference_names_sample():
    with pytest.raises(ValueError, match="sample 1"):
        get_reward("wer")(["a", "b"], text=["a", " ,. "])
    with pytest.raises(ValueError, match="text"):
        get_reward("wer")(["a"])


def test_cer_reward():
    got = get_reward("cer")(["abd", "今天天气好"], text=["abc", "今天天气很好"])
    assert got == pytest.approx([1 - 1 / 3, 1 - 1 / 6])


def test_unknown_reward_lists_registered():
    with pytest.raises(KeyError) as err:
        get_reward("bleu9")
    assert "bleu9" in str(err.value) and "wer" in str(err.value)


def test_compute_rewards_weights_and_components(clean_registry):
    @register_reward("length_test")
    def length(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    @register_reward("answer_match_test")
    def answer_match(completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

    comps = ["yes", "no thanks", "the cat sat"]
    total, parts = compute_rewards(
        {"length_test": 0.5, "answer_match_test": 2.0, "wer": 1.0},
        comps, answer=["yes", "no", "x"], text=["yes", "no thanks", "the cat sat down"], key=["a", "b", "c"],
    )
    assert parts["length_test"] == [1.0, 2.0, 3.0]
    assert parts["answer_match_test"] == [1.0, 0.0, 0.0]
    assert parts["wer"] == pytest.approx([1.0, 1.0, 0.75])
    want = [0.5 * a + 2.0 * b + c for a, b, c in zip(parts["length_test"], parts["answer_match_test"], parts["wer"])]
    assert total == pytest.approx(want)


def test_compute_rewards_errors(clean_registry):
    @register_reward("short_test")
    def short(completions, **kwargs):
        return [1.0]

    @register_reward("nan_test")
    def nan(completions, **kwargs):
        return [float("nan")] * len(completions)

    with pytest.raises(KeyError, match="nope"):
        compute_rewards({"nope": 1.0}, ["a"])
    with pytest.raises(ValueError, match="short_test"):
        compute_rewards({"short_test": 1.0}, ["a", "b"])
    with pytest.raises(ValueError, match="nan_test"):
        compute_rewards({"nan_test": 1.0}, ["a"])
    with pytest.raises(ValueError, match="text"):
        compute_rewards({"wer": 1.0}, ["a", "b"], text=["a"])


def test_register_conflict(clean_registry):
    @register_reward("dup_test")
    def first(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="dup_test"):
        @register_reward("dup_test")
        def second(completions, **kwargs):
            return [1.0] * len(completions)


# ----------------------------------------------------------------------------- multiple choice

from core.rewards import extract_answer, string_match  # noqa: E402


def mcq(preds, answer, choices, **kw):
    """mcq_accuracy on bare predictions (no tags: extract_answer returns them stripped)."""
    return get_reward("mcq_accuracy")(preds, answer=[answer] * len(preds),
                                      choices=[choices] * len(preds), **kw)


def test_mcq_rewards_registered():
    assert {"format", "mcq_accuracy", "exact_alnum"} <= set(R.registered_rewards())


@pytest.mark.parametrize("text, want", [
    ("<think>hm</think><answer> the cat </answer>", "the cat"),
    ("<answer>dog</answer> then <ANSWER>cat</Answer>", "cat"),          # last block, any case
    ("<answer>a\nb</answer>", "a\nb"),                                   # spans lines
    ("<think>hm</think><answer> cut off", "cut off"),                   # unclosed answer
    ("<answer>x</answer> <answer>y", "x"),                              # closed block wins
    ("  the cat  ", "the cat"),                                         # no tags
    ("<think>it is a dog</think> the cat", "the cat"),                  # think removed
    ("<think>it is a dog</think>", ""),                                 # reasoning only
    ("the cat <think>truncated reasoning", "the cat"),                  # unclosed think dropped
    ("reasoning</think>\nthe cat", "the cat"),                          # think opened in prompt
    ("", ""),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_string_match_mmau_rule():
    ch = ["the man speaks", "the woman speaks", "a child speaks"]
    # answer tokens {the, man, speaks}; incorrect tokens {woman, a, child}
    assert string_match("the man speaks", "the man speaks", ch)
    assert string_match("the man speaks", "I think THE MAN speaks!", ch)  # extra neutral words ok
    assert not string_match("the man speaks", "the woman speaks", ch)
    assert not string_match("the man speaks", "man", ch)              # must hold every answer token
    assert not string_match("the man speaks", "a man speaks", ch)     # "a" belongs to a wrong choice
    assert not string_match("the man speaks", "", ch)
    # a choice with the answer's token set is not a wrong choice
    assert string_match("Man", "man", ["Man", "man", "Woman"])


def test_mcq_accuracy_wrong_choice_shares_answer_words():
    ch = ["the man speaks", "the woman speaks"]
    assert mcq(["the man speaks", "the woman speaks", "the man speaks, not the woman",
                "<answer>The man speaks.</answer>"], "the man speaks", ch) == [1.0, 0.0, 0.0, 1.0]


def test_mcq_accuracy_numbers():
    ch = ["3", "13", "three"]
    assert mcq(["3", "13", "three", "there are 3 beeps", "3 or 13", "3.0"], "3", ch) == \
        [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # "3.0" -> tokens {3, 0}: holds 3, no wrong token
    assert mcq(["3", "13"], "13", ch) == [0.0, 1.0]


def test_mcq_accuracy_empty_and_two_choices():
    ch = ["dog", "cat", "bird"]
    assert mcq(["", "   ", "<answer></answer>", "<answer>?!</answer>", "<think>a cat</think>"],
               "cat", ch) == [0.0] * 5
    assert mcq(["dog or cat", "cat, not a bird", "it is a cat"], "cat", ch) == [0.0, 0.0, 1.0]


def test_mcq_accuracy_bare_letter():
    ch = ["dog", "cat", "bird"]
    preds = ["B", "B.", "(B)", "B)", "<answer> B </answer>", "A", "b", "D", "B cat"]
    assert mcq(preds, "cat", ch) == [1, 1, 1, 1, 1, 0, 0, 0, 1]
    # "b" (lowercase) is not a letter answer; "D" has no choice and is kept as text (wrong)
    assert mcq(["B", "(B)", "cat"], "cat", ch, letters=False) == [0.0, 0.0, 1.0]
    assert mcq(["E"], "e", ["a", "b", "c", "d", "e"]) == [1.0]


def test_mcq_accuracy_tags():
    ch = ["dog", "cat"]
    comps = ["<think>dog? no</think><answer>cat</answer>",   # reasoning mentions a wrong choice
             "<think>hmm</think><answer>cat",                 # unclosed answer
             "cat",                                           # no tags
             "<answer>dog</answer><answer>cat</answer>",      # last block counts
             "<think>it is a cat</think>"]                    # no answer at all
    assert mcq(comps, "cat", ch) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_mcq_accuracy_missing_fields():
    f = get_reward("mcq_accuracy")
    with pytest.raises(ValueError, match="'answer'"):
        f(["a"], choices=[["a", "b"]])
    with pytest.raises(ValueError, match="'choices'"):
        f(["a"], answer=["a"])
    with pytest.raises(ValueError, match="'answer'.*sample 1"):
        f(["a", "b"], answer=["a", None], choices=[["a", "b"]] * 2)
    with pytest.raises(ValueError, match="choices"):
        f(["a"], answer=["a"], choices=["a"])  # a flat list: one string per sample, not a list


@pytest.mark.parametrize("text, want", [
    ("<think>r</think><answer>a</answer>", 1.0),
    ("  <think>\nr\n</think>\n\n<answer> a b </answer>\n", 1.0),
    ("<think></think><answer>a</answer>", 1.0),                 # empty reasoning is fine
    ("<answer>a</answer>", 0.0),                                # no think
    ("<think>r</think>", 0.0),                                  # no answer
    ("<think>r</think><answer>  </answer>", 0.0),               # empty answer
    ("so <think>r</think><answer>a</answer>", 0.0),             # text before
    ("<think>r</think><answer>a</answer> ok", 0.0),             # text after
    ("<think>r</think> so <answer>a</answer>", 0.0),            # text between
    ("<think>r</think><answer>a</answer><answer>b</answer>", 0.0),
    ("<think>r<think>s</think><answer>a</answer>", 0.0),        # nested tag
    ("<answer>a</answer><think>r</think>", 0.0),                # wrong order
    ("<think>r</think><answer>a", 0.0),                         # unclosed
    ("<THINK>r</THINK><ANSWER>a</ANSWER>", 0.0),                # tags are lowercase
    ("", 0.0),
])
def test_format_reward(text, want):
    assert get_reward("format")([text]) == [want]


def test_exact_alnum():
    f = get_reward("exact_alnum")
    comps = ["<answer>(B).</answer>", "<answer>Dog!</answer>", "dogs", "", "<answer>3</answer>", "a-b"]
    assert f(comps, answer=["B", "dog", "dog", "", "three", "AB"]) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'answer'"):
        f(["a"])


def test_compute_rewards_format_plus_mcq():
    comps = ["<think>two beeps</think><answer>2</answer>",  # format 1, correct
             "<think>hm</think><answer>3</answer>",         # format 1, wrong
             "2",                                           # format 0, correct
             "<answer>2"]                                   # format 0, correct (unclosed)
    total, parts = compute_rewards({"format": 0.5, "mcq_accuracy": 1.0}, comps,
                                   answer=["2"] * 4, choices=[["1", "2", "3"]] * 4, key=list("abcd"))
    assert parts == {"format": [1.0, 1.0, 0.0, 0.0], "mcq_accuracy": [1.0, 0.0, 1.0, 1.0]}
    assert total == pytest.approx([1.5, 0.5, 1.0, 1.0])


def test_mcq_letter_mapping_leaves_letter_choices_alone():
    # choices that are themselves letters: "B" is the choice "B", not choices[1]
    f = get_reward("mcq_accuracy")
    assert f(["<answer>B</answer>"], answer=["B"], choices=[["B", "A"]]) == [1.0]
    assert f(["<answer>A</answer>"], answer=["B"], choices=[["B", "A"]]) == [0.0]
    # otherwise a bare letter still names a choice by position
    assert f(["<answer>B</answer>"], answer=["dog"], choices=[["cat", "dog"]]) == [1.0]
