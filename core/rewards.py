"""Reward functions and their registry.

What is here
------------
- A registry of reward functions by name: ``register_reward(name)`` (decorator), ``get_reward``,
  ``registered_rewards``.
- ``compute_rewards``: run several rewards on a batch of completions and combine them with
  weights, keeping each component for logging.
- Generic rewards: ``wer`` (1 - min(1, WER)) and ``cer`` (1 - min(1, CER)) against the sample's
  ``text`` field, after a simple normaliser (lowercase, punctuation removed, spaces collapsed).

A reward follows TRL's convention: ``fn(completions: list[str], **kwargs) -> list[float]``, where
``kwargs`` carry the per-sample fields of the batch as lists aligned with ``completions`` (e.g.
``text=[...]``, ``answer=[...]``); a reward takes the fields it needs and ignores the others
(accept ``**kwargs``).

What is left out
----------------
Task-specific scoring (multiple-choice answer parsing, caption metrics, ...): recipes register
their own rewards from their ``local/`` code with ``register_reward``. No model-based rewards.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import jiwer

__all__ = [
    "RewardFn",
    "register_reward",
    "get_reward",
    "registered_rewards",
    "compute_rewards",
    "normalize_text",
    "wer_reward",
    "cer_reward",
]

RewardFn = Callable[..., List[float]]
_REGISTRY: Dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(completions, **sample_fields) -> list[float]`` under ``name``.

    Registering a different function under a taken name is an error; re-registering the same
    function (same module and qualified name, e.g. on module reload) replaces it.
    """

    def deco(fn: RewardFn) -> RewardFn:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"reward {name!r} is already registered by {old.__module__}.{old.__qualname__}"
            )
        _REGISTRY[name] = fn
        return fn

    return deco


def registered_rewards() -> List[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward {name!r}; registered rewards: {', '.join(registered_rewards()) or '(none)'}"
        ) from None


def compute_rewards(
    names_weights: Mapping[str, float],
    completions: Sequence[str],
    **sample_fields,
) -> Tuple[List[float], Dict[str, List[float]]]:
    """Run the named rewards and combine them.

    Args:
        names_weights: ``{reward_name: weight}``.
        completions: ``N`` decoded completions.
        **sample_fields: per-sample fields, each a list of length ``N`` (scalars are passed as is).

    Returns:
        ``(total, per_component)``: ``total[i] = sum_name weight * reward_name[i]``;
        ``per_component[name]`` is the unweighted list of floats of each reward.

    Raises:
        KeyError: an unknown reward name (the message lists the registered ones).
        ValueError: a field whose length differs from ``N``, or a reward returning a wrong number
            of values or a non-finite value (named in the message).
    """
    completions = list(completions)
    n = len(completions)
    for key, value in sample_fields.items():
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise ValueError(f"sample field {key!r} has {len(value)} values for {n} completions")
    fns = {name: get_reward(name) for name in names_weights}  # fail before running any reward
    total = [0.0] * n
    per_component: Dict[str, List[float]] = {}
    for name, weight in names_weights.items():
        values = fns[name](completions, **sample_fields)
        values = list(values)
        if len(values) != n:
            raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
        out = []
        for i, v in enumerate(values):
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"reward {name!r} returned a non-finite value {v} for sample {i}")
            out.append(v)
        per_component[name] = out
        w = float(weight)
        total = [acc + w * v for acc, v in zip(total, out)]
    return total, per_component


# --------------------------------------------------------------------------------------------
# Generic rewards
# --------------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation (Unicode category P*), collapse whitespace, strip."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACES.sub(" ", text).strip()


def _references(field: str, refs, n: int) -> List[List[str]]:
    if refs is None:
        raise ValueError(f"this reward needs the per-sample field {field!r}")
    if isinstance(refs, str) or len(refs) != n:
        raise ValueError(f"field {field!r} must be a list with one entry per completion ({n})")
    out = []
    for i, r in enumerate(refs):
        cands = [r] if isinstance(r, str) else list(r)
        norm = [normalize_text(c) for c in cands]
        if not norm or any(c == "" for c in norm):
            raise ValueError(f"empty reference in field {field!r} for sample {i}")
        out.append(norm)
    return out


def _error_rate_reward(completions, refs, measure: Callable[[str, str], float]) -> List[float]:
    rewards = []
    for hyp, cands in zip(completions, refs):
        h = normalize_text(hyp)
        # An empty hypothesis is all deletions: error rate 1.
        err = min(1.0 if h == "" else float(measure(c, h)) for c in cands)
        rewards.append(1.0 - min(1.0, err))
    return rewards


@register_reward("wer")
def wer_reward(completions: Sequence[str], text=None, **kwargs) -> List[float]:
    """``1 - min(1, WER(text_i, completion_i))`` per sample, after ``normalize_text``.

    ``text[i]`` may be a string or a list of references (the best one counts). An empty
    reference raises ValueError naming the sample index.
    """
    return _error_rate_reward(completions, _references("text", text, len(completions)), jiwer.wer)


@register_reward("cer")
def cer_reward(completions: Sequence[str], text=None, **kwargs) -> List[float]:
    """``1 - min(1, CER(text_i, completion_i))`` per sample (for unsegmented scripts), as ``wer``."""
    return _error_rate_reward(completions, _references("text", text, len(completions)), jiwer.cer)
