"""tools/bootstrap.py: percentile intervals of ratio metrics and paired differences."""
import numpy as np
import pytest

from tools.bootstrap import fmt_ci, paired_diff, ratio_ci


def test_accuracy_interval_has_the_binomial_width_and_is_seeded():
    correct = [1] * 50 + [0] * 50
    r = ratio_ci(correct)
    lo, hi = r["ci95"]
    assert r["value"] == 0.5 and r["n"] == 100 and lo < 0.5 < hi
    # normal approximation: +-1.96 * sqrt(0.25 / 100) = +-0.098
    assert 0.17 < hi - lo < 0.23, (lo, hi)
    assert ratio_ci(correct) == r  # seeded: the same interval on every run


def test_wer_is_a_ratio_of_sums_not_a_mean_of_rates():
    errors, words = [0, 0, 0, 5], [10, 10, 10, 2]  # 5 errors / 32 words, not mean(0, 0, 0, 2.5)
    r = ratio_ci(errors, words)
    assert r["value"] == pytest.approx(5 / 32, abs=1e-6)
    assert 0.0 <= r["ci95"][0] <= r["value"] <= r["ci95"][1]


def test_paired_differences():
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    same = paired_diff(base, None, base, None)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    better = base.copy()
    better[base == 0] = 1  # right wherever base was, and on every item base got wrong
    d = paired_diff(better, None, base, None)
    assert d["diff"] > 0.4 and d["significant"] and d["ci95"][0] > 0.3
    one = base.copy()
    one[np.flatnonzero(base == 0)[0]] = 1  # one more item right of 200: no evidence
    d = paired_diff(one, None, base, None)
    assert d["diff"] == pytest.approx(0.005) and not d["significant"] and d["ci95"][0] <= 0 <= d["ci95"][1]
    # paired is tighter than comparing two unpaired intervals: both systems share most items
    noisy = base.copy()
    flip = np.flatnonzero(base == 0)[:20]
    noisy[flip] = 1
    d = paired_diff(noisy, None, base, None)
    a, b = ratio_ci(noisy), ratio_ci(base)
    assert d["significant"] and a["ci95"][0] < b["ci95"][1]  # the unpaired intervals overlap


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_diff([1, 0], None, [1], None)
    with pytest.raises(ValueError, match="no items"):
        ratio_ci([])
    with pytest.raises(ValueError, match="equal 1-D"):
        ratio_ci([1, 2], [1])


def test_format():
    assert fmt_ci([0.1234, 0.5]) == "[12.3, 50.0]"
    assert fmt_ci([-0.02, 0.031], sign=True) == "[-2.0, +3.1]"


def test_keyed_differences_align_items_by_key():
    from tools.bootstrap import describe_diff, keyed_diff
    a = {"u1": (0, 4), "u2": (1, 5), "u3": (0, 3)}
    b = {"u3": (2, 3), "u1": (1, 4), "u2": (1, 5)}
    d = keyed_diff(a, b)
    assert d["diff"] == pytest.approx((1 - 4) / 12)
    assert describe_diff("after - before", d).startswith("after - before: -25.0 points [")
    with pytest.raises(ValueError, match="different items"):
        keyed_diff(a, {"u1": (0, 4)})
