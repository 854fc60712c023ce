#!/usr/bin/env python3
"""Make an audio-visual multiple-choice manifest from a local copy of Daily-Omni.

Reads the official layout (huggingface.co/datasets/liarliar/Daily-Omni, ``qa.json`` + ``Videos.tar``
extracted):

    DIR/qa.json                                  a JSON list of records
    DIR/Videos/<video_id>/<video_id>_video.mp4   the videos (with their sound)

Each record is

    {"Question": "...", "Choice": ["A. ...", "B. ...", "C. ...", "D. ..."], "Answer": "B",
     "video_id": "G_VTkkb34gw", "Type": "AV Event Alignment", "video_category": "...",
     "video_duration": "30s", ["content_parent_category", "content_fine_category", ...]}

and becomes one manifest row (the same fields as the synthetic set's):

    {"key": "<video_id>-<index>", "video": "/abs/.../<video_id>_video.mp4", "task": "av_qa",
     "question", "choices": [4 strings without "A. "], "answer": "B", "answer_text",
     "Type", "video_category", "video_duration", "video_id", "dataset": "daily-omni",
     "index": record index, other fields of the record (``-`` in names becomes ``_``),
     "prompt" (``local/prompt.py``, choices lettered), "target"}

Every problem (bad JSON, a missing or empty field, a missing video, an answer that is not a letter
A-D, not exactly four choices, a choice labelled with the wrong letter) is collected and reported at
once as ``qa.json: item N (id VIDEO_ID): field: problem``; with ``--skip_bad`` the bad records are
written with their reasons to a side file (``<out>.bad.jsonl``) and counted instead.

Left out: downloading, decoding the videos (``read_manifest`` checks their audio track and
``core.data.video`` reads them), Daily-Omni's ``_audio.wav`` side files, and the official prompt
wording.
"""
from __future__ import annotations

import json
import os
import re
import sys

from tools.local_module import load_sibling
from tools.prep_common import (PrepError, add_bad, add_bad_args, make_parser, nonempty_str, run_cli,
                               skipped_note, write_outputs)

prompt = load_sibling(__file__, "prompt")

MAPPED = ("Question", "Choice", "Answer", "video_id", "Type", "video_category", "video_duration")
_ANSWER = re.compile(r"^\s*\(?([A-Da-d])\)?\.?\s*$")


def load_records(json_path: str | os.PathLike) -> list:
    """The JSON list of records; PrepError for a missing file, bad JSON or a non-list."""
    json_path = os.fspath(json_path)
    if not os.path.isfile(json_path):
        raise PrepError([f"{json_path}: no such file"])
    try:
        with open(json_path, encoding="utf-8") as f:
            items = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepError([f"{json_path}: not valid JSON ({e})"]) from e
    if not isinstance(items, list):
        raise PrepError([f"{json_path}: expected a JSON list of records, got {type(items).__name__}"])
    return items


def video_path(corpus_dir: str, video_id: str) -> str:
    return os.path.join(corpus_dir, "Videos", video_id, f"{video_id}_video.mp4")


def convert_record(rec, index: int, corpus_dir: str) -> tuple[dict | None, list[tuple[str, str]]]:
    """One Daily-Omni record as a manifest row, or None and its (field, problem)s."""
    if not isinstance(rec, dict):
        return None, [("item", f"expected a JSON object, got {type(rec).__name__}")]
    errs = []
    for name in ("Question", "video_id"):
        if not nonempty_str(rec.get(name)):
            errs.append((name, "missing" if rec.get(name) is None else
                         f"must be a non-empty string, got {rec.get(name)!r}"))
    choice, answer = rec.get("Choice"), rec.get("Answer")
    choices = None
    if not isinstance(choice, list) or not all(nonempty_str(c) for c in choice):
        errs.append(("Choice", "missing" if choice is None else
                     f"must be a list of 4 non-empty strings, got {choice!r}"))
    elif len(choice) != 4:
        errs.append(("Choice", f"needs exactly 4 choices (A-D), got {len(choice)}"))
    else:
        wrong = [(i, prompt.choice_label(c)) for i, c in enumerate(choice)
                 if prompt.choice_label(c) not in (None, prompt.LETTERS[i])]
        if wrong:
            errs.append(("Choice", "; ".join(f"choice {i} is labelled {lab!r}, expected {prompt.LETTERS[i]!r}"
                                             for i, lab in wrong)))
        else:
            choices = [prompt.strip_letter(c, i) for i, c in enumerate(choice)]
            if not all(choices):
                errs.append(("Choice", f"a choice is empty once its letter is removed: {choice!r}"))
    m = _ANSWER.match(answer) if isinstance(answer, str) else None
    if not m:
        errs.append(("Answer", "missing" if answer is None else f"must be one letter A-D, got {answer!r}"))
    path = None
    if nonempty_str(rec.get("video_id")):
        path = os.path.abspath(video_path(corpus_dir, rec["video_id"].strip()))
        if not os.path.isfile(path):
            errs.append(("video_id", f"no such video file {path}"))
    if errs:
        return None, errs
    letter = m.group(1).upper()
    vid = rec["video_id"].strip()
    row = {"key": f"{vid}-{index:04d}", "video": path, "task": "av_qa", "question": rec["Question"].strip(),
           "choices": choices, "answer": letter, "answer_text": choices["ABCD".index(letter)],
           "Type": rec.get("Type"), "video_category": rec.get("video_category"),
           "video_duration": rec.get("video_duration"), "video_id": vid, "dataset": "daily-omni",
           "index": index}
    for k, v in rec.items():
        if k not in MAPPED:
            row.setdefault(k.replace("-", "_"), v)
    row = {k: v for k, v in row.items() if v is not None}
    row["prompt"] = prompt.render_prompt(row)
    row["target"] = prompt.render_target(row)
    return row, []


def prepare(corpus_dir: str | os.PathLike, out: str | os.PathLike, *, qa_json: str | None = None,
            skip_bad: bool = False, bad_out: str | None = None) -> dict:
    """Writes the manifest ``out``; returns {"manifest", "rows", "bad", "bad_file"}.

    Raises PrepError listing every problem (unless ``skip_bad``: bad records then go with their
    reasons to ``bad_out``, default ``<out>.bad.jsonl``), or when no record is left.
    """
    corpus_dir, out = os.fspath(corpus_dir), os.fspath(out)
    json_path = qa_json or os.path.join(corpus_dir, "qa.json")
    records = load_records(json_path)
    if not records:
        raise PrepError([f"{json_path}: no records"])
    rows, problems, bad = [], [], []
    for i, rec in enumerate(records):
        row, errs = convert_record(rec, i, corpus_dir)
        if errs:
            ident = rec.get("video_id") if isinstance(rec, dict) else None
            add_bad(problems, bad, json_path, i, ident, errs, rec)
        else:
            rows.append(row)
    bad_file = write_outputs(out, rows, problems, bad, skip_bad=skip_bad, bad_out=bad_out,
                             none_left=f"{json_path}: no valid record left")
    return {"manifest": out, "rows": len(rows), "bad": len(bad), "bad_file": bad_file}


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--corpus_dir", required=True, help="Daily-Omni folder holding qa.json and Videos/")
    ap.add_argument("--out", required=True, help="output manifest (JSONL), e.g. data/dailyomni_test.jsonl")
    ap.add_argument("--qa_json", help="the records (default: CORPUS_DIR/qa.json)")
    add_bad_args(ap, "records")
    args = ap.parse_args(argv)
    return run_cli(lambda: prepare(args.corpus_dir, args.out, qa_json=args.qa_json, skip_bad=args.skip_bad,
                                   bad_out=args.bad_out),
                   lambda st: f"daily-omni: {st['rows']} rows -> {st['manifest']}" + skipped_note(st, "record"))


if __name__ == "__main__":
    sys.exit(main())
