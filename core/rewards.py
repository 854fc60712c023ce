"""Reward functions and their registry.

What is here
------------
- A registry of reward functions by name: ``register_reward(name)`` (decorator), ``get_reward``,
  ``registered_rewards``.
- ``compute_rewards``: run several rewards on a batch of completions and combine them with
  weights, keeping each component for logging.
- Generic rewards: ``wer`` (1 - min(1, WER)) and ``cer`` (1 - min(1, CER)) against the sample's
  ``text`` field, after a simple normaliser (lowercase, punctuation removed, spaces collapsed).
- Multiple-choice rewards on ``<think>...</think><answer>...</answer>`` completions:
  ``extract_answer`` (the text a completion answers with), ``format`` (1 for exactly a think
  block then a non-empty answer block), ``mcq_accuracy`` (MMAU's official ``string_match`` rule
  against the ``answer`` and ``choices`` fields, plus bare option letters) and ``exact_alnum``
  (equality after keeping only lowercase letters and digits).

A reward follows TRL's convention: ``fn(completions: list[str], **kwargs) -> list[float]``, where
``kwargs`` carry the per-sample fields of the batch as lists aligned with ``completions`` (e.g.
``text=[...]``, ``answer=[...]``); a reward takes the fields it needs and ignores the others
(accept ``**kwargs``).

What is left out
----------------
Task-specific scoring (caption metrics, benchmark-specific answer rules such as MMSU's letter
parsing, ...): recipes register their own rewards from their ``local/`` code. No model-based
rewards (LLM judges), no partial credit for MCQs.

User rewards
------------
A config's ``rewards.modules: [local/my_rewards.py, my_package.rewards]`` lists Python files (or
importable module names) that ``load_reward_modules`` imports when the config loads, before any
reward name is checked. A file registers its functions with ``@register_reward("name")`` or by
defining ``REWARDS = {"name": fn}``; each function follows the signature above. Example::

    # recipes/my_task/local/my_rewards.py
    from core.rewards import extract_answer, register_reward

    @register_reward("emotion_match")
    def emotion_match(completions, answer=None, **kwargs):
        return [float(extract_answer(c).lower() == a.lower()) for c, a in zip(completions, answer)]
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
import unicodedata
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import jiwer

from core.utils.modules import load_module

__all__ = [
    "RewardFn",
    "register_reward",
    "get_reward",
    "registered_rewards",
    "compute_rewards",
    "load_reward_modules",
    "normalize_text",
    "wer_reward",
    "cer_reward",
    "extract_answer",
    "format_reward",
    "string_match",
    "mcq_accuracy_reward",
    "exact_alnum_reward",
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


def load_reward_modules(modules: Sequence[str], base: str | Path | None = None) -> List[str]:
    """Import the user's reward ``modules`` (file paths ending in ``.py``, relative ones against
    ``base`` or the working directory, or dotted module names) and register their rewards: what
    their ``@register_reward`` decorators register on import, plus a module-level
    ``REWARDS = {name: fn}`` dict. Returns the names registered by these modules.

    Raises ``ValueError`` naming the module for a missing file, an import that fails, a
    ``REWARDS`` that is not a dict of callables, or a name already taken by another function."""
    before = dict(_REGISTRY)
    for spec in modules:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"rewards.modules: expected a file path or module name, got {spec!r}")
        try:
            if spec.endswith(".py") or "/" in spec or "\\" in spec:
                path = Path(spec).expanduser()
                if not path.is_absolute():
                    path = Path(base or Path.cwd()) / path
                if not path.is_file():
                    raise ValueError(f"rewards.modules: {spec}: no such file ({path})")
                path = path.resolve()
                mod = load_module(path, "user_rewards_" + path.stem + "_"
                                  + hashlib.sha1(str(path).encode()).hexdigest()[:10])
            else:
                mod = importlib.import_module(spec)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code: say which file failed and why
            raise ValueError(f"rewards.modules: importing {spec} failed: {type(e).__name__}: {e}") from e
        table = getattr(mod, "REWARDS", None)
        if table is not None:
            if not isinstance(table, dict) or not all(isinstance(k, str) and callable(v) for k, v in table.items()):
                raise ValueError(f"rewards.modules: {spec}: REWARDS must be a dict of name -> function")
            for k, fn in table.items():
                register_reward(k)(fn)
    return sorted(k for k, v in _REGISTRY.items() if before.get(k) is not v)


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


# --------------------------------------------------------------------------------------------
# Multiple-choice rewards
# --------------------------------------------------------------------------------------------

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LETTER = re.compile(r"\(?([A-E])[.)]?")


def extract_answer(text: str) -> str:
    """The answer a completion gives, stripped.

    - the content of the LAST ``<answer>...</answer>`` block (tags case-insensitive, spanning lines);
    - else, after an opening ``<answer>`` that is never closed (a truncated completion), the text
      after the last opening tag;
    - else (no answer tag at all) the whole text with reasoning removed: every
      ``<think>...</think>`` block, an unclosed ``<think>`` and all after it, and everything up to
      a stray ``</think>`` (chat templates that open the think block in the prompt).
    """
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    opens = list(_ANSWER_OPEN.finditer(text))
    if opens:
        return text[opens[-1].end():].strip()
    text = _THINK_OPEN.sub("", _THINK_BLOCK.sub(" ", text))
    return _THINK_CLOSE.split(text)[-1].strip()


def _field(name: str, values, n: int) -> list:
    if values is None:
        raise ValueError(f"this reward needs the per-sample field {name!r}")
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != n:
        raise ValueError(f"field {name!r} must be a list with one entry per completion ({n})")
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"field {name!r} is missing (None) for sample {i}")
    return list(values)


@register_reward("format")
def format_reward(completions: Sequence[str], **kwargs) -> List[float]:
    """1.0 for a completion that is exactly ``<think>...</think>`` then ``<answer>...</answer>``.

    Whitespace is allowed around and between the blocks, nothing else; tags are lowercase, each
    appears once, and the answer is non-empty (the reasoning may be empty). Else 0.0.
    """
    out = []
    for c in completions:
        m = _FORMAT.fullmatch(c)
        ok = (m is not None and m.group(2).strip() != ""
              and not any(t in m.group(1) or t in m.group(2) for t in _TAGS))
        out.append(1.0 if ok else 0.0)
    return out


def _tokens(text: str) -> set:
    return set(re.findall(r"\b\w+\b", text.lower()))


def string_match(answer: str, prediction: str, choices: Sequence[str]) -> bool:
    """MMAU's official rule (``string_match`` in github.com/Sakshi113/MMAU ``evaluation.py``).

    Texts are sets of lowercase word tokens (``\\b\\w+\\b``). An empty prediction is wrong. The
    "incorrect tokens" are those of every choice whose token set differs from the answer's, minus
    the answer's tokens. Correct iff the prediction holds every answer token and no incorrect
    token. So "the woman speaks" is wrong for the answer "the man speaks" (``woman`` belongs only
    to a wrong choice), "3" is not "13" nor "three", and naming two choices is wrong.
    """
    pred = _tokens(prediction)
    if not pred:
        return False
    ans = _tokens(answer)
    incorrect = set()
    for choice in choices:
        toks = _tokens(choice)
        if toks != ans:
            incorrect |= toks - ans
    return ans <= pred and pred.isdisjoint(incorrect)


@register_reward("mcq_accuracy")
def mcq_accuracy_reward(completions: Sequence[str], answer=None, choices=None, letters: bool = True,
                        **kwargs) -> List[float]:
    """1.0 when ``extract_answer(completion)`` picks ``answer`` by MMAU's ``string_match`` rule.

    Fields: ``answer`` (str) and ``choices`` (list of str) per sample; a missing field raises
    ValueError naming it. Our addition to MMAU's rule (``letters=True``, the default): a
    prediction that is only an option letter ``A``-``E`` (uppercase, optionally ``A.``, ``A)`` or
    ``(A)``) is replaced by the text of that choice first (``A`` = ``choices[0]``), unless the
    prediction already names a choice by MMAU's tokens (choices that are letters or letter-words:
    "A" for the choice "a", a musical note "E"); a letter past the last choice is left as is (and
    is then wrong unless it matches by the rule).
    """
    n = len(completions)
    answers, choice_lists = _field("answer", answer, n), _field("choices", choices, n)
    out = []
    for i, (c, a, ch) in enumerate(zip(completions, answers, choice_lists)):
        if isinstance(ch, str) or not isinstance(ch, Sequence):
            raise ValueError(f"field 'choices' must hold a list of strings per sample (sample {i})")
        pred = extract_answer(c)
        names_a_choice = any(_tokens(pred) == _tokens(str(x)) for x in ch)
        m = _LETTER.fullmatch(pred) if letters and not names_a_choice else None
        if m and ord(m.group(1)) - ord("A") < len(ch):
            pred = ch[ord(m.group(1)) - ord("A")]
        out.append(1.0 if string_match(str(a), pred, [str(x) for x in ch]) else 0.0)
    return out


def _alnum(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


@register_reward("exact_alnum")
def exact_alnum_reward(completions: Sequence[str], answer=None, **kwargs) -> List[float]:
    """1.0 when ``extract_answer(completion)`` equals ``answer`` after keeping only ``[0-9a-z]``
    of the lowercased texts (so ``"(B)."`` matches ``"b"``); an empty prediction is wrong."""
    answers = _field("answer", answer, len(completions))
    out = []
    for c, a in zip(completions, answers):
        pred = _alnum(extract_answer(c))
        out.append(1.0 if pred and pred == _alnum(str(a)) else 0.0)
    return out
