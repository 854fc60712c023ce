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
