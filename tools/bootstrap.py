"""Bootstrap confidence intervals for the recipes' test-set metrics, over utterances / questions / clips.

Every metric here is a ratio of sums over the test items: accuracy (correct / 1 per question),
WER (errors / reference words per utterance), CER likewise. A bootstrap sample draws the items
with replacement and recomputes the ratio; the 95% interval is the 2.5th and 97.5th percentile of
``resamples`` such samples (the percentile bootstrap). A *paired* interval for a difference
(after - before, method - baseline) draws the same items for both systems, so the interval
reflects only how the two differ item by item; a difference whose interval includes 0 is not
significant at that level.

    ratio_ci(num, den)                      -> {"value", "ci95": [lo, hi]}
    paired_diff(num_a, den_a, num_b, den_b) -> {"diff", "ci95": [lo, hi], "significant"}   (a - b)

Deterministic: a fixed ``seed`` (default 0) gives the same interval on every run; items are
drawn in blocks so memory stays bounded for large test sets.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _as_arrays(num: Sequence[float], den: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(num, dtype=np.float64)
    d = np.ones_like(a) if den is None else np.asarray(den, dtype=np.float64)
    if a.ndim != 1 or a.shape != d.shape:
        raise ValueError(f"bootstrap: numerators {a.shape} and denominators {d.shape} must be two equal 1-D lists")
    if a.size == 0:
        raise ValueError("bootstrap: no items")
    return a, d


def _ratios(pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int, seed: int) -> list[np.ndarray]:
    """For each (num, den) of ``pairs`` (all over the same items), the ratio sum(num)/sum(den) of
    ``resamples`` bootstrap draws of the items, the same draws for every pair."""
    n = pairs[0][0].size
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in pairs]
    block = max(1, min(resamples, 2_000_000 // n))
    done = 0
    while done < resamples:
        k = min(block, resamples - done)
        idx = rng.integers(0, n, size=(k, n))
        for j, (a, d) in enumerate(pairs):
            den = d[idx].sum(1)
            out[j].append(np.divide(a[idx].sum(1), den, out=np.full(k, np.nan), where=den > 0))
        done += k
    return [np.concatenate(o) for o in out]


def _interval(x: np.ndarray, level: float) -> list[float]:
    x = x[~np.isnan(x)]
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return [round(float(lo), 6), round(float(hi), 6)]


def ratio_ci(num: Sequence[float], den: Sequence[float] | None = None, *, resamples: int = RESAMPLES,
             seed: int = 0, level: float = LEVEL) -> dict:
    """``{"value": sum(num)/sum(den), "ci95": [lo, hi], "n": items}``; ``den`` None: a mean."""
    a, d = _as_arrays(num, den)
    (r,) = _ratios([(a, d)], resamples, seed)
    return {"value": round(float(a.sum() / d.sum()), 6), "ci95": _interval(r, level), "n": int(a.size)}


def paired_diff(num_a: Sequence[float], den_a: Sequence[float] | None, num_b: Sequence[float],
                den_b: Sequence[float] | None, *, resamples: int = RESAMPLES, seed: int = 0,
                level: float = LEVEL) -> dict:
    """System a minus system b on the same items (item i of both lists is the same utterance /
    question): ``{"diff", "ci95": [lo, hi], "significant": interval excludes 0, "n"}``."""
    a, da = _as_arrays(num_a, den_a)
    b, db = _as_arrays(num_b, den_b)
    if a.size != b.size:
        raise ValueError(f"paired bootstrap: {a.size} items against {b.size}; both systems must score the same items")
    ra, rb = _ratios([(a, da), (b, db)], resamples, seed)
    lo, hi = _interval(ra - rb, level)
    return {"diff": round(float(a.sum() / da.sum() - b.sum() / db.sum()), 6), "ci95": [lo, hi],
            "significant": bool(lo > 0 or hi < 0), "n": int(a.size)}


def fmt_ci(ci: Sequence[float], scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    """``[lo, hi]`` in percent, as the tables write it (``sign``: with + / -, for differences)."""
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"[{f.format(scale * ci[0])}, {f.format(scale * ci[1])}]"


def keyed_diff(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], **kw) -> dict:
    """``paired_diff`` of two systems given as ``{item key: (num, den)}`` over the same keys."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"paired bootstrap: the systems scored different items (e.g. {only[:5]})")
    keys = sorted(a)
    return paired_diff([a[k][0] for k in keys], [a[k][1] for k in keys], [b[k][0] for k in keys],
                       [b[k][1] for k in keys], **kw)


def describe_diff(name: str, d: dict, scale: float = 100.0, digits: int = 1, unit: str = "points") -> str:
    """One line for a README: ``name: +2.5 points [+0.8, +4.1]`` (``(not significant)`` when the
    interval includes 0)."""
    return (f"{name}: {scale * d['diff']:+.{digits}f} {unit} {fmt_ci(d['ci95'], scale, digits, sign=True)}"
            + ("" if d["significant"] else " (not significant)"))


def differences(pairs: Sequence[tuple[str, str]], items_of) -> dict:
    """``{"a - b": keyed_diff(items_of(a), items_of(b))}`` for each system pair ``(a, b)``;
    ``items_of(name)`` gives a system's ``{item key: (num, den)}`` (the recipes read them from
    each system's score file)."""
    cache: dict = {}

    def items(name):
        if name not in cache:
            cache[name] = items_of(name)
        return cache[name]
    return {f"{a} - {b}": keyed_diff(items(a), items(b)) for a, b in pairs}


def score_items(path, *keys: str) -> dict[str, tuple[float, float]]:
    """``{item key: (score, 1)}`` from a JSON score file: the ``{key: score}`` mapping found under
    ``keys`` (e.g. ``score.json``'s ``per_item``, ``scores.json``'s ``per_clip`` / ``CIDEr``)."""
    import json
    from pathlib import Path
    d = json.loads(Path(path).read_text())
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            raise ValueError(f"{path}: no {'.'.join(keys)} (per-item scores) to compare systems on")
        d = d[k]
    return {k: (float(v), 1.0) for k, v in d.items()}
