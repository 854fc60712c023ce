"""Hypothesis files of ``python -m core.bin.decode`` and their match with a manifest.

- ``read_hyps(path) -> {key: text}``: a decode JSONL (lines ``{"key": ..., "text": ...}``); every
  bad line (malformed JSON, no string key or text, a duplicate key) is reported at once as
  ``file:line``, in one ValueError;
- ``check_alignment(rows, hyps)``: ValueError naming the manifest keys without a hypothesis and
  the hypotheses without a manifest row;
- ``keys_preview(keys)``: the first few keys, sorted, for an error message;
- ``jsonl_objects(path, problems)``: the JSON objects of a JSONL file with their line numbers,
  each malformed line added to ``problems`` as ``file:line`` (for readers that check fields of
  their own and report every bad line at once).

Used by the recipes' scoring scripts (``local/score.py``). Left out: Kaldi-style text files
(``tools/compute_wer.py`` reads those).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Mapping, Sequence


def keys_preview(keys: Iterable[str], limit: int = 10) -> str:
    """``"a, b, c ... and N more"``: at most ``limit`` keys, sorted."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_alignment(rows: Sequence[Mapping], hyps: Mapping[str, str], *, known: Iterable[str] | None = None,
                    missing: str = "manifest key(s) have no hypothesis",
                    stray: str = "hypothesis key(s) are not in the manifest") -> None:
    """ValueError naming the keys of ``rows`` without a hypothesis (``missing``) and the hypotheses
    whose key is not in ``known`` (default: the keys of ``rows``) (``stray``)."""
    keys = {r["key"] for r in rows}
    no_hyp, no_row = keys - set(hyps), set(hyps) - (keys if known is None else set(known))
    msgs = []
    if no_hyp:
        msgs.append(f"{len(no_hyp)} {missing}: {keys_preview(no_hyp)}")
    if no_row:
        msgs.append(f"{len(no_row)} {stray}: {keys_preview(no_row)}")
    if msgs:
        raise ValueError("; ".join(msgs))


def jsonl_objects(path: str | os.PathLike, problems: list, prefix: str = "") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of ``path`` that holds a JSON object;
    a line with malformed JSON or another JSON value is added to ``problems`` as
    ``file:line: <prefix>...`` and skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: {prefix}malformed JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{path}:{lineno}: {prefix}expected a JSON object")
                continue
            yield lineno, rec


def read_hyps(path: str | os.PathLike) -> dict[str, str]:
    """``{key: text}`` from a decode JSONL; ValueError naming ``file:line`` for bad lines
    (malformed JSON, no string key/text, a duplicate key), all at once."""
    hyps: dict[str, str] = {}
    problems: list[str] = []
    for lineno, rec in jsonl_objects(path, problems):
        if not isinstance(rec.get("key"), str) or not isinstance(rec.get("text"), str):
            problems.append(f"{path}:{lineno}: needs a string 'key' and a string 'text'")
        elif rec["key"] in hyps:
            problems.append(f"{path}:{lineno}: duplicate key {rec['key']!r}")
        else:
            hyps[rec["key"]] = rec["text"]
    if problems:
        raise ValueError(f"{path}: {len(problems)} bad line(s):\n" + "\n".join(problems[:50]))
    return hyps
