#!/usr/bin/env python3
"""Word / character error rate between reference and hypothesis transcripts, keyed by utterance.

Importable:
  normalize_text(s, lang="en")  lower-case, punctuation and symbols removed, spaces collapsed;
                                Chinese ("zh"): also every space removed, so it is scored per
                                character.
  score(refs, hyps, cer=False, lang=None) -> dict
                                refs / hyps map key -> text. Counts come from jiwer
                                (``process_words`` / ``process_characters``). A reference key with
                                no hypothesis is scored against an empty hypothesis (all its
                                words deleted) and listed in ``missing_keys``; hypotheses without a
                                reference are listed in ``extra_keys`` and not scored. ``lang``
                                normalises both sides first; ``None`` scores the texts as given
                                (only whitespace-split). In CER mode whitespace is not a character.
  read_transcripts(path, field="text") -> dict  a JSONL manifest (``key`` + ``field``) or a
                                Kaldi-style text file (``key transcript`` per line).

CLI (from the repository root):
  python -m tools.compute_wer --ref data/test.jsonl --hyp exp/decode/hyp.jsonl \
      [--cer] [--lang en|zh|none] [--out report.json] [--details utt_errors.txt]

prints ``%WER 3.27 [ 65 / 1988, 10 ins, 20 del, 35 sub ]`` and the utterance counts.

The result of ``score``: ``wer`` (or ``cer``) and ``error_rate`` as fractions (0.0327, not
percent), ``errors``, ``substitutions``, ``deletions``, ``insertions``, ``hits``,
``num_ref_words`` (reference tokens: words, or characters for CER), ``num_hyp_words``,
``num_utts``, ``num_utts_with_errors``, ``sentence_error_rate``, ``num_missing``,
``missing_keys``, ``num_extra``, ``extra_keys``, ``unit``, ``lang`` and ``utterances``: one dict
per reference (key, ref, hyp, errors, ref_len, substitutions, deletions, insertions, missing),
worst first (most errors, then highest rate, then key).

Left out: multiple references per utterance (caption metrics live in their recipe), text
normalisation beyond the rules above (numbers, spelling variants, Chinese word segmentation),
and confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import unicodedata
from pathlib import Path
from typing import Mapping

import jiwer

from tools.hyps import jsonl_objects

__all__ = ["normalize_text", "score", "read_transcripts", "format_summary", "format_details", "main"]

_ZH_LANGS = {"zh", "cmn", "yue", "zh-cn", "zh-tw", "zh_cn", "zh_tw", "chinese"}
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"}


def _is_chinese(lang: str | None) -> bool:
    return lang is not None and lang.lower() in _ZH_LANGS


def normalize_text(s: str, lang: str = "en") -> str:
    """Text as it is scored.

    Any language: Unicode NFKC (full-width forms become ASCII), lower-case, punctuation and symbols
    (Unicode categories P* and S*) replaced by spaces, runs of whitespace collapsed, ends stripped.
    An apostrophe between two letters or digits is kept ("don't" stays one word); elsewhere it is
    removed. Chinese (``lang`` "zh", "cmn", "yue" ...): punctuation and all whitespace removed, so
    that ``score(..., cer=True)`` counts characters.
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_text expects a string, got {type(s).__name__}")
    s = unicodedata.normalize("NFKC", s)
    for a, b in _APOSTROPHES.items():
        s = s.replace(a, b)
    s = s.lower()
    out = []
    n = len(s)
    for i, ch in enumerate(s):
        if ch == "'":
            if 0 < i < n - 1 and s[i - 1].isalnum() and s[i + 1].isalnum():
                out.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat[0] in ("P", "S"):
            out.append(" ")
        else:
            out.append(ch)
    s = "".join(out)
    if _is_chinese(lang):
        return "".join(s.split())
    return " ".join(s.split())


def _tokens(s: str, cer: bool) -> list[str]:
    return list("".join(s.split())) if cer else s.split()


def _counts(ref: str, hyp: str, cer: bool):
    """(substitutions, deletions, insertions, hits, ref_tokens, hyp_tokens, alignment chunks)."""
    r, h = _tokens(ref, cer), _tokens(hyp, cer)
    if not r or not h:  # handled here: older jiwer versions refuse an empty reference
        return 0, len(r), len(h), 0, r, h, None
    if cer:
        o = jiwer.process_characters("".join(r), "".join(h))
    else:
        o = jiwer.process_words(" ".join(r), " ".join(h))
    return o.substitutions, o.deletions, o.insertions, o.hits, r, h, o.alignments[0]


def score(refs: Mapping[str, str], hyps: Mapping[str, str], cer: bool = False,
          lang: str | None = None) -> dict:
    """Score ``hyps`` against ``refs`` (both key -> text); see the module docstring for the result."""
    if not refs:
        raise ValueError("no references to score")
    bad = [k for k, v in list(refs.items()) + list(hyps.items()) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"transcripts must be strings; not for keys {bad[:5]}")
    norm = (lambda t: normalize_text(t, lang)) if lang is not None else (lambda t: t)
    utts = []
    tot = dict(substitutions=0, deletions=0, insertions=0, hits=0, ref=0, hyp=0)
    missing = []
    for key, ref_raw in refs.items():
        is_missing = key not in hyps
        if is_missing:
            missing.append(key)
        ref, hyp = norm(ref_raw), norm(hyps.get(key, ""))
        s, d, i, h, rt, ht, _ = _counts(ref, hyp, cer)
        errors = s + d + i
        for name, v in (("substitutions", s), ("deletions", d), ("insertions", i), ("hits", h),
                        ("ref", len(rt)), ("hyp", len(ht))):
            tot[name] += v
        utts.append({"key": key, "ref": ref, "hyp": hyp, "errors": errors, "ref_len": len(rt),
                     "substitutions": s, "deletions": d, "insertions": i, "missing": is_missing})
    utts.sort(key=lambda u: (-u["errors"], -(u["errors"] / max(u["ref_len"], 1)), u["key"]))
    errors = tot["substitutions"] + tot["deletions"] + tot["insertions"]
    if tot["ref"]:
        rate = errors / tot["ref"]
    else:
        rate = 0.0 if errors == 0 else math.inf
    n_err_utts = sum(1 for u in utts if u["errors"] > 0)
    extra = sorted(k for k in hyps if k not in refs)
    metric = "cer" if cer else "wer"
    return {
        "metric": metric,
        metric: rate,
        "error_rate": rate,
        "errors": errors,
        "substitutions": tot["substitutions"],
        "deletions": tot["deletions"],
        "insertions": tot["insertions"],
        "hits": tot["hits"],
        "num_ref_words": tot["ref"],
        "num_hyp_words": tot["hyp"],
        "unit": "char" if cer else "word",
        "lang": lang,
        "num_utts": len(utts),
        "num_utts_with_errors": n_err_utts,
        "sentence_error_rate": n_err_utts / len(utts),
        "num_missing": len(missing),
        "missing_keys": missing,
        "num_extra": len(extra),
        "extra_keys": extra,
        "utterances": utts,
    }


def format_summary(result: dict) -> str:
    """wenet-style summary lines for a ``score`` result."""
    m = result["metric"].upper()
    lines = [
        f"%{m} {100 * result['error_rate']:.2f} [ {result['errors']} / {result['num_ref_words']}, "
        f"{result['insertions']} ins, {result['deletions']} del, {result['substitutions']} sub ]",
        f"utterances: {result['num_utts']}, with errors: {result['num_utts_with_errors']} "
        f"({100 * result['sentence_error_rate']:.2f}%), missing hypotheses: {result['num_missing']}, "
        f"hypotheses without reference: {result['num_extra']}",
    ]
    if result["num_missing"]:
        shown = ", ".join(result["missing_keys"][:10])
        more = " ..." if result["num_missing"] > 10 else ""
        lines.append(f"missing (scored as all deletions): {shown}{more}")
    return "\n".join(lines)


def _aligned(ref: str, hyp: str, cer: bool) -> tuple[str, str, str]:
    """Three aligned rows (REF, HYP, operations) for a details file."""
    _, _, _, _, r, h, chunks = _counts(ref, hyp, cer)
    if chunks is None:
        chunks = []
        if r:
            chunks.append(jiwer.AlignmentChunk("delete", 0, len(r), 0, 0))
        if h:
            chunks.append(jiwer.AlignmentChunk("insert", 0, 0, 0, len(h)))
    rows = ([], [], [])
    for c in chunks:
        rs, hs = r[c.ref_start_idx:c.ref_end_idx], h[c.hyp_start_idx:c.hyp_end_idx]
        pairs = {"equal": zip(rs, hs), "substitute": zip(rs, hs),
                 "delete": ((x, "") for x in rs), "insert": (("", y) for y in hs)}[c.type]
        op = {"equal": "", "substitute": "S", "delete": "D", "insert": "I"}[c.type]
        for a, b in pairs:
            w = max(len(a), len(b), 1)
            rows[0].append((a or "*" * w).ljust(w))
            rows[1].append((b or "*" * w).ljust(w))
            rows[2].append(op.ljust(w))
    return tuple(" ".join(x).rstrip() for x in rows)  # type: ignore[return-value]


def format_details(result: dict, cer: bool | None = None) -> str:
    """Per-utterance alignments, worst first, for utterances with errors."""
    cer = result["unit"] == "char" if cer is None else cer
    blocks = []
    for u in result["utterances"]:
        if u["errors"] == 0:
            continue
        ref_row, hyp_row, ops = _aligned(u["ref"], u["hyp"], cer)
        head = (f"{u['key']}  errors {u['errors']} / {u['ref_len']}  (sub {u['substitutions']}, "
                f"del {u['deletions']}, ins {u['insertions']})" + ("  [missing hypothesis]" if u["missing"] else ""))
        blocks.append(f"{head}\nREF: {ref_row}\nHYP: {hyp_row}\nOPS: {ops}\n")
    return "\n".join(blocks)


def read_transcripts(path: str | Path, field: str = "text") -> dict[str, str]:
    """key -> text from a JSONL file (``key`` and ``field``) or a Kaldi text file (``key words...``).

    Files ending in ``.jsonl`` / ``.json`` are read as JSONL, anything else as Kaldi text. All bad
    lines (broken JSON, missing key or field, non-string text, duplicate key) are reported together
    in one ``ValueError`` naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out: dict[str, str] = {}
    problems: list[str] = []

    def add(where: str, key: str, text: str) -> None:
        if key in out:
            problems.append(f"{where}: duplicate key {key!r}")
        else:
            out[key] = text

    if path.suffix in (".jsonl", ".json"):
        for lineno, obj in jsonl_objects(path, problems):
            where = f"{path}:{lineno}"
            key, text = obj.get("key"), obj.get(field)
            if key is None:
                problems.append(f"{where}: no 'key' field")
            elif field not in obj:
                problems.append(f"{where}: no '{field}' field (key {key})")
            elif isinstance(text, list):
                problems.append(f"{where}: '{field}' is a list; WER takes one reference per utterance")
            elif not isinstance(text, str):
                problems.append(f"{where}: '{field}' must be a string, got {type(text).__name__}")
            else:
                add(where, str(key), text)
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    parts = line.rstrip("\n").split(maxsplit=1)
                    add(f"{path}:{lineno}", parts[0], parts[1] if len(parts) > 1 else "")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{len(problems)} problem(s) in {path}:\n  " + "\n  ".join(problems[:20]) + more)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description="Word (or character) error rate of hypotheses against references, matched by key. "
                    "A reference without a hypothesis counts as all deletions and is reported; hypotheses "
                    "without a reference are reported and not scored.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ref", required=True,
                   help="references: JSONL manifest with 'key' and --ref_field, or a Kaldi text file (key words...)")
    p.add_argument("--hyp", required=True, help="hypotheses: JSONL with 'key' and --hyp_field, or a Kaldi text file")
    p.add_argument("--ref_field", default="text", help="transcript field in the reference JSONL")
    p.add_argument("--hyp_field", default="text", help="transcript field in the hypothesis JSONL")
    p.add_argument("--cer", action="store_true", help="character error rate (whitespace not counted)")
    p.add_argument("--lang", default="en",
                   help="normalisation: 'en' (or any space-separated language), 'zh' (implies --cer), "
                        "or 'none' to score the texts as given")
    p.add_argument("--out", help="write the full result (summary, counts, per-utterance list) as JSON here")
    p.add_argument("--details", help="write per-utterance alignments of the utterances with errors, worst first")
    a = p.parse_args(argv)
    lang = None if a.lang.lower() == "none" else a.lang
    cer = a.cer or _is_chinese(lang)
    try:
        refs = read_transcripts(a.ref, a.ref_field)
        hyps = read_transcripts(a.hyp, a.hyp_field)
        result = score(refs, hyps, cer=cer, lang=lang)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"compute_wer: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(format_summary(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write("\n")
    if a.details:
        Path(a.details).parent.mkdir(parents=True, exist_ok=True)
        Path(a.details).write_text(format_details(result, cer), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
