#!/usr/bin/env python3
"""Make a QA manifest from a local copy of MMAU (test-mini or test).

Reads the official JSON list (github.com/Sakshi113/MMAU, ``mmau-test-mini.json``) whose items are

    {"id": "3fe6...", "audio_id": "./test-mini-audios/3fe6....wav", "question": "...",
     "choices": ["Man", "Woman", ...], "answer": "Man", "dataset": "AudioSet", "task": "sound",
     "split": "test-mini", "category": "Reasoning", "sub-category": "...", "difficulty": "medium"}

with ``audio_id`` relative to the JSON's folder (or to ``--audio_dir``), and writes one manifest
row per item:

    {"key": id, "audio": "/abs/.../3fe6....wav", "task": "qa", "question", "choices", "answer",
     "category": "Reasoning", "sub_category", "difficulty", "dataset": "AudioSet",
     "domain": "sound", "benchmark": "mmau", "mmau_id": id, "audio_id", "split", ...}

MMAU's ``task`` (sound | music | speech) becomes ``domain`` since ``task`` names our task type;
a ``category`` given as a list is flattened (one element: that element, several: joined with
" / "); ``-`` in other field names becomes ``_``; unknown fields are kept as metadata.

The test split's JSON withholds the answers: when no item has a non-empty ``answer``, rows are
written without one and marked ``"answer_missing": true`` (``score.py`` then refuses to score
them and can still write the file to submit). When only some items lack it, those items are errors.

Every problem (bad JSON, a missing or empty field, a missing audio file, an answer that is not one
of the choices, a duplicate id) is collected and reported at once as ``file: item N (id X): field:
problem``; with ``--skip_bad`` the bad items are written with their reasons to a side file
(``<out>.bad.jsonl``) and counted instead.

Left out: downloading, audio decoding (only existence is checked here; ``read_manifest`` checks
the headers), and prompts (``local/prompt.py`` adds them).
"""
from __future__ import annotations

import json
import os
import sys

from tools.prep_common import (PrepError, add_bad, add_bad_args, make_parser, nonempty_str, run_cli,
                               skipped_note, write_outputs)

MAPPED = ("id", "audio_id", "question", "choices", "answer", "category", "sub-category",
          "difficulty", "dataset", "task", "split")


def load_items(json_path: str | os.PathLike) -> list:
    """The JSON list of MMAU items; PrepError for a missing file, bad JSON or a non-list."""
    json_path = os.fspath(json_path)
    if not os.path.isfile(json_path):
        raise PrepError([f"{json_path}: no such file"])
    try:
        with open(json_path, encoding="utf-8") as f:
            items = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepError([f"{json_path}: not valid JSON ({e})"]) from e
    if not isinstance(items, list):
        raise PrepError([f"{json_path}: expected a JSON list of items, got {type(items).__name__}"])
    return items


def _flatten(category):
    if isinstance(category, list):
        category = [str(c) for c in category if c is not None and str(c).strip()]
        return " / ".join(category) if category else None
    return category


def convert_item(item, audio_base: str, with_answer: bool) -> tuple[dict | None, list[tuple[str, str]]]:
    """One MMAU item as a manifest row, or None and its (field, problem)s."""
    if not isinstance(item, dict):
        return None, [("item", f"expected a JSON object, got {type(item).__name__}")]
    errs = []
    for name in ("id", "audio_id", "question"):
        if not nonempty_str(item.get(name)):
            errs.append((name, "missing" if item.get(name) is None else f"must be a non-empty string, "
                                                                        f"got {item.get(name)!r}"))
    choices, answer = item.get("choices"), item.get("answer")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(nonempty_str(c) for c in choices)):
        errs.append(("choices", "missing" if choices is None else
                     f"must be a list of >= 2 non-empty strings, got {choices!r}"))
    elif with_answer:
        if not nonempty_str(answer):
            errs.append(("answer", "missing" if answer is None else f"must be a non-empty string, "
                                                                    f"got {answer!r}"))
        elif answer not in choices:
            errs.append(("answer", f"{answer!r} is not one of the choices {choices!r}"))
    audio = None
    if nonempty_str(item.get("audio_id")):
        audio = os.path.normpath(os.path.join(audio_base, os.path.expanduser(item["audio_id"])))
        if not os.path.isfile(audio):
            errs.append(("audio_id", f"no such audio file {audio}"))
    if errs:
        return None, errs
    row = {"key": item["id"], "audio": audio, "task": "qa", "question": item["question"],
           "choices": choices}
    if with_answer:
        row["answer"] = answer
    else:
        row["answer_missing"] = True
    row.update({"category": _flatten(item.get("category")), "sub_category": item.get("sub-category"),
                "difficulty": item.get("difficulty"), "dataset": item.get("dataset"),
                "domain": item.get("task"), "benchmark": "mmau", "mmau_id": item["id"],
                "audio_id": item["audio_id"], "split": item.get("split")})
    for k, v in item.items():
        if k not in MAPPED:
            row.setdefault(k.replace("-", "_"), v)
    return {k: v for k, v in row.items() if v is not None}, []


def prepare(json_path: str | os.PathLike, out: str | os.PathLike, *, audio_dir: str | None = None,
            skip_bad: bool = False, bad_out: str | None = None) -> dict:
    """Writes the manifest ``out``; returns {"manifest", "rows", "bad", "bad_file", "answers"}.

    Raises PrepError listing every problem (unless ``skip_bad``: bad items then go with their
    reasons to ``bad_out``, default ``<out>.bad.jsonl``), or when no item is left.
    """
    json_path, out = os.fspath(json_path), os.fspath(out)
    items = load_items(json_path)
    if not items:
        raise PrepError([f"{json_path}: no items"])
    audio_base = os.path.abspath(audio_dir or os.path.dirname(os.path.abspath(json_path)))
    with_answer = any(isinstance(it, dict) and nonempty_str(it.get("answer")) for it in items)
    rows, problems, bad, seen = [], [], [], {}
    for i, item in enumerate(items):
        row, errs = convert_item(item, audio_base, with_answer)
        ident = item.get("id") if isinstance(item, dict) else None
        if nonempty_str(ident):
            if ident in seen:
                row, errs = None, errs + [("id", f"duplicate id (first at item {seen[ident]})")]
            seen.setdefault(ident, i)
        if errs:
            add_bad(problems, bad, json_path, i, ident, errs, item)
        else:
            rows.append(row)
    bad_file = write_outputs(out, rows, problems, bad, skip_bad=skip_bad, bad_out=bad_out,
                             none_left=f"{json_path}: no valid item left")
    return {"manifest": out, "rows": len(rows), "bad": len(bad), "bad_file": bad_file,
            "answers": with_answer}


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--json", required=True, help="MMAU JSON list, e.g. DIR/mmau-test-mini.json")
    ap.add_argument("--out", required=True, help="output manifest (JSONL), e.g. data/mmau_test.jsonl")
    ap.add_argument("--audio_dir", help="folder that audio_id paths are relative to (default: the JSON's folder)")
    add_bad_args(ap, "items")
    args = ap.parse_args(argv)

    def summary(st: dict) -> str:
        line = f"mmau: {st['rows']} rows -> {st['manifest']}" + skipped_note(st, "item")
        if not st["answers"]:
            line += " | no answers in this split (rows marked answer_missing)"
        return line

    return run_cli(lambda: prepare(args.json, args.out, audio_dir=args.audio_dir,
                                   skip_bad=args.skip_bad, bad_out=args.bad_out), summary)


if __name__ == "__main__":
    sys.exit(main())
