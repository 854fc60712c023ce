#!/usr/bin/env python3
"""Make an audio-visual manifest from a local copy of IntentBench or IntentTrain (HumanOmniV2).

Reads the JSON list of records (huggingface.co/datasets/PhilipC/IntentBench, ``qa.json``; the
IntentTrain JSON has the same fields) whose videos lie under ``--video_root``:

    {"problem": "...", "problem_type": "multiple choice" | "emer_ov_mc" | "judge",
     "options": ["A. ...", "B. ...", ...], "solution": "<think>...</think><answer>B</answer>",
     "answer": "B", "video": "socialiq/xyz.mp4", "data_type": "video", [optional fields such as
     "problem_id", "content_parent_category", ...]}

(``path`` is accepted in place of ``video``), and writes one row per record:

    {"key": problem_id | id | "intentbench-<index>", "video": "/abs/...mp4", "task": "av_qa",
     "question": problem, "choices": [options without "A. "] (absent for judge records without
     options), "answer", "answer_text", "Type": the record's Type, else problem_type,
     "problem_type", "data_type", "dataset": "intentbench", "index", other fields of the record,
     "prompt" (``local/prompt.py``), "target"}

The answer is taken from ``solution``'s ``<answer>`` tag (what HumanOmniV2's evaluation compares
against), else from ``answer``, and written in one form per problem type: a letter for ``multiple
choice`` ("B"), the sorted letters for ``emer_ov_mc`` ("A,C"), "Yes" or "No" for ``judge``.
``answer_text`` is the chosen option's text (options joined with "; " for several).

Every problem (bad JSON, a missing field, an unknown problem_type, options that are not a list of
strings, an answer that is not a letter of the options or not yes/no, a missing video, a duplicate
id) is collected and reported at once as ``FILE: item N (id X): field: problem``; with
``--skip_bad`` the bad records are written with their reasons to a side file
(``<out>.bad.jsonl``) and counted instead.

Left out: IntentBench's numerical / regression / free-form types, downloading, decoding the videos,
and the official system prompt.
"""
from __future__ import annotations

import os
import re
import sys

from tools.local_module import load_sibling
from tools.prep_common import (PrepError, add_bad, add_bad_args, make_parser, nonempty_str, run_cli,
                               skipped_note, write_outputs)

prompt = load_sibling(__file__, "prompt")
score = load_sibling(__file__, "score")
load_records = load_sibling(__file__, "prepare_dailyomni").load_records

PROBLEM_TYPES = ("multiple choice", "emer_ov_mc", "judge")
MAPPED = ("problem", "problem_type", "options", "answer", "video", "path", "data_type")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_THINK_TAG = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)


def _gold(rec: dict) -> str | None:
    """The reference answer: the last <answer> block of ``solution``, else ``answer``."""
    sol = rec.get("solution")
    if isinstance(sol, str):
        blocks = _ANSWER_TAG.findall(sol)
        if blocks and blocks[-1].strip():
            return blocks[-1].strip()
    ans = rec.get("answer")
    return ans.strip() if isinstance(ans, str) and ans.strip() else None


def convert_record(rec, index: int, video_root: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """One IntentBench record as a manifest row, or None and its (field, problem)s."""
    if not isinstance(rec, dict):
        return None, [("item", f"expected a JSON object, got {type(rec).__name__}")]
    errs = []
    if not nonempty_str(rec.get("problem")):
        errs.append(("problem", "missing" if rec.get("problem") is None else
                     f"must be a non-empty string, got {rec.get('problem')!r}"))
    ptype = rec.get("problem_type")
    if ptype not in PROBLEM_TYPES:
        errs.append(("problem_type", "missing" if ptype is None else
                     f"{ptype!r} is not supported; one of {', '.join(PROBLEM_TYPES)}"))
    options, choices = rec.get("options"), None
    needs_options = ptype in ("multiple choice", "emer_ov_mc")
    if options is None or (options == [] and not needs_options):
        if needs_options:
            errs.append(("options", f"missing (a {ptype} record needs its options)"))
    elif not isinstance(options, list) or not all(nonempty_str(o) for o in options):
        errs.append(("options", f"must be a list of non-empty strings, got {options!r}"))
    elif len(options) < 2 or len(options) > len(prompt.LETTERS):
        errs.append(("options", f"needs 2 to {len(prompt.LETTERS)} options, got {len(options)}"))
    else:
        wrong = [(i, prompt.choice_label(o)) for i, o in enumerate(options)
                 if prompt.choice_label(o) not in (None, prompt.LETTERS[i])]
        if wrong:
            errs.append(("options", "; ".join(f"option {i} is labelled {lab!r}, expected {prompt.LETTERS[i]!r}"
                                              for i, lab in wrong)))
        else:
            choices = [prompt.strip_letter(o, i) for i, o in enumerate(options)]
    gold = _gold(rec)
    answer = answer_text = None
    if gold is None:
        errs.append(("solution", "no <answer>...</answer> in solution and no answer field"))
    elif ptype == "judge":
        yn = score.yes_no(gold)
        if yn is None:
            errs.append(("solution", f"a judge answer must be yes or no, got {gold!r}"))
        else:
            answer = answer_text = yn.capitalize()
    elif choices is not None:
        valid = prompt.LETTERS[:len(choices)]
        if ptype == "multiple choice":
            letter = score.extract_letter(gold, valid)
            if letter is None or len(gold.strip(" .()")) != 1:
                errs.append(("solution", f"a multiple choice answer must be one letter of {valid}, got {gold!r}"))
            else:
                answer, answer_text = letter, choices[valid.index(letter)]
        else:
            letters = score.letter_set(gold, valid)
            items = [x for x in gold.split(",") if x.strip()]
            if not letters or len(letters) != len(items):
                errs.append(("solution", f"an emer_ov_mc answer must be letters of {valid} separated by "
                                         f"commas, got {gold!r}"))
            else:
                answer = ",".join(sorted(letters))
                answer_text = "; ".join(choices[valid.index(x)] for x in sorted(letters))
    rel = rec.get("video", rec.get("path"))
    path = None
    if not nonempty_str(rel):
        errs.append(("video", "missing" if rel is None else f"must be a non-empty path string, got {rel!r}"))
    else:
        path = os.path.normpath(os.path.join(video_root, os.path.expanduser(rel.strip())))
        if not os.path.isfile(path):
            errs.append(("video", f"no such video file {path}"))
    if errs:
        return None, errs
    ident = rec.get("problem_id", rec.get("id"))
    row = {"key": str(ident) if ident is not None and str(ident).strip() else f"intentbench-{index:06d}",
           "video": path, "task": "av_qa", "question": rec["problem"].strip(), "choices": choices,
           "answer": answer, "answer_text": answer_text, "Type": rec.get("Type") or ptype,
           "problem_type": ptype, "data_type": rec.get("data_type"), "dataset": "intentbench", "index": index}
    for k, v in rec.items():
        if k not in MAPPED:
            row.setdefault(k.replace("-", "_"), v)
    row = {k: v for k, v in row.items() if v is not None}
    row["prompt"] = prompt.render_prompt(row)
    think = _THINK_TAG.findall(rec.get("solution") or "") if isinstance(rec.get("solution"), str) else []
    row["target"] = prompt.render_target(row, think[-1].strip() if think and think[-1].strip() else None)
    return row, []


def prepare(json_path: str | os.PathLike, video_root: str | os.PathLike, out: str | os.PathLike, *,
            skip_bad: bool = False, bad_out: str | None = None) -> dict:
    """Writes the manifest ``out``; returns {"manifest", "rows", "bad", "bad_file", "problem_types"}.

    Raises PrepError listing every problem (unless ``skip_bad``: bad records then go with their
    reasons to ``bad_out``, default ``<out>.bad.jsonl``), or when no record is left.
    """
    json_path, out = os.fspath(json_path), os.fspath(out)
    video_root = os.path.abspath(os.fspath(video_root))
    records = load_records(json_path)
    if not records:
        raise PrepError([f"{json_path}: no records"])
    rows, problems, bad, seen = [], [], [], {}
    for i, rec in enumerate(records):
        row, errs = convert_record(rec, i, video_root)
        ident = (rec.get("problem_id", rec.get("id")) if isinstance(rec, dict) else None)
        if row is not None:
            if row["key"] in seen:
                row, errs = None, [("problem_id", f"duplicate id {row['key']!r} (first at item {seen[row['key']]})")]
            else:
                seen[row["key"]] = i
        if errs:
            add_bad(problems, bad, json_path, i, ident, errs, rec)
        else:
            rows.append(row)
    bad_file = write_outputs(out, rows, problems, bad, skip_bad=skip_bad, bad_out=bad_out,
                             none_left=f"{json_path}: no valid record left")
    types: dict[str, int] = {}
    for r in rows:
        types[r["problem_type"]] = types.get(r["problem_type"], 0) + 1
    return {"manifest": out, "rows": len(rows), "bad": len(bad), "bad_file": bad_file, "problem_types": types}


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--json", required=True, help="IntentBench qa.json or an IntentTrain JSON list")
    ap.add_argument("--video_root", required=True, help="folder the records' video paths are relative to")
    ap.add_argument("--out", required=True, help="output manifest (JSONL), e.g. data/intentbench_test.jsonl")
    add_bad_args(ap, "records")
    args = ap.parse_args(argv)
    return run_cli(lambda: prepare(args.json, args.video_root, args.out, skip_bad=args.skip_bad,
                                   bad_out=args.bad_out),
                   lambda st: (f"intentbench: {st['rows']} rows {st['problem_types']} -> {st['manifest']}"
                               + skipped_note(st, "record")))


if __name__ == "__main__":
    sys.exit(main())
