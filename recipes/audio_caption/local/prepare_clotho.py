#!/usr/bin/env python3
"""Make caption manifests from a local copy of Clotho v2.

Reads the caption CSVs as distributed on Zenodo (``clotho_captions_development.csv``,
``clotho_captions_validation.csv``, ``clotho_captions_evaluation.csv``, in ``<corpus_dir>`` or
``<corpus_dir>/clotho_csv_files``) with the header

    file_name,caption_1,caption_2,caption_3,caption_4,caption_5

one row per clip (captions that contain commas are quoted), and the audio of each split, found
as ``<corpus_dir>/<split>/<file_name>`` or ``<corpus_dir>/clotho_audio_<split>/<file_name>``
(the archives' folder names). development becomes train, validation dev, evaluation test:

    <out_dir>/{train,dev,test}.jsonl, one row per clip:
    {"key": "<file name without extension, spaces as _>", "audio": "/abs/.../<file_name>",
     "task": "caption", "text": [caption_1 .. caption_5], "file_name": "...",
     "dataset": "clotho", "split": "train"}

Every problem (a row whose field count differs from the header's, an empty file_name or caption,
a duplicate file_name or key, a clip without audio) is collected over all files and reported at
once as ``file.csv:LINE: field: problem``; nothing is written then. With ``--skip_bad`` the bad
rows (whole clips) are left out instead, written with their reasons to
``<out_dir>/skipped.jsonl`` and counted; a missing CSV, a wrong header or a CSV syntax error
(such as a stray quote) still stops the run.
CSV reading and the error and output conventions come from ``prepare_audiocaps.py``.

Left out: downloading and extracting the 7z archives, the metadata CSVs (keywords, sound ids,
licences), audio decoding or resampling (Clotho is 44.1 kHz; loading resamples to 16 kHz), and
caption normalisation (captions are kept as written, surrounding spaces stripped).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from tools.local_module import load_sibling

_ac = load_sibling(__file__, "prepare_audiocaps")  # what Clotho shares with AudioCaps
PrepError, Problems, read_csv, row_dict, run_cli, summary, write_outputs = (
    _ac.PrepError, _ac.Problems, _ac.read_csv, _ac.row_dict, _ac.run_cli, _ac.summary, _ac.write_outputs)

SPLITS = {"development": "train", "validation": "dev", "evaluation": "test"}


def find_csv(corpus_dir: Path, split: str) -> Path:
    name = f"clotho_captions_{split}.csv"
    cands = [corpus_dir / name, corpus_dir / "clotho_csv_files" / name]
    for c in cands:
        if c.is_file():
            return c
    raise PrepError([f"Clotho {name} not found: looked for {' and '.join(map(str, cands))}"])


def audio_dirs(corpus_dir: Path, split: str) -> list[Path]:
    return [corpus_dir / split, corpus_dir / f"clotho_audio_{split}"]


def check_header(file: str, header: list[str]) -> None:
    want = ["file_name"] + [f"caption_{i}" for i in range(1, len(header))]
    if len(header) < 2 or header != want:
        raise PrepError([f"{file}:1: header: expected file_name,caption_1,...,caption_N (N >= 1, Clotho v2 "
                         f"has 5), got {','.join(header)}"])


def read_split(csv_path: Path, split: str, corpus_dir: Path, problems: Problems) -> list[dict]:
    """Manifest rows of one CSV; problems go to ``problems``."""
    file = str(csv_path)
    header, records = read_csv(csv_path)
    check_header(file, header)
    dirs = audio_dirs(corpus_dir, split)
    rows, seen_names, seen_keys = [], {}, {}
    for line, fields in records:
        if len(fields) != len(header):
            problems.add(file, line, split, [("row", f"expected {len(header)} fields ({','.join(header)}), "
                                                     f"got {len(fields)}")], row_dict(header, fields))
            continue
        name, captions = fields[0].strip(), [c.strip() for c in fields[1:]]
        errs = [(f"caption_{i}", "empty caption") for i, c in enumerate(captions, 1) if not c]
        audio = None
        if not name:
            errs.insert(0, ("file_name", "empty"))
        else:
            key = re.sub(r"\s+", "_", os.path.splitext(name)[0])
            if name in seen_names:
                errs.insert(0, ("file_name", f"duplicate file_name {name!r} (first on line {seen_names[name]})"))
            elif key in seen_keys:
                errs.insert(0, ("file_name", f"key {key!r} also comes from line {seen_keys[key]}"))
            else:
                seen_names[name], seen_keys[key] = line, line
                audio = next((d / name for d in dirs if (d / name).is_file()), None)
                if audio is None:
                    errs.append(("audio", f"no audio file {name!r} in {' or '.join(f'{d}/' for d in dirs)}"))
        if errs:
            problems.add(file, line, split, errs, row_dict(header, fields))
            continue
        rows.append({"key": key, "audio": str(audio.resolve()), "task": "caption", "text": captions,
                     "file_name": name, "dataset": "clotho", "split": SPLITS[split]})
    return rows


def prepare(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *, skip_bad: bool = False,
            splits: tuple[str, ...] = tuple(SPLITS)) -> dict:
    """Writes ``<out_dir>/{train,dev,test}.jsonl`` (for the Clotho splits asked); see the module doc."""
    corpus_dir = Path(corpus_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise PrepError([f"unknown Clotho split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}"])
    csvs, missing = {}, []
    for s in splits:
        try:
            csvs[s] = find_csv(corpus_dir, s)
        except PrepError as e:
            missing += e.problems
    if missing:
        raise PrepError(missing)
    problems = Problems()
    manifests = {SPLITS[s]: read_split(csvs[s], s, corpus_dir, problems) for s in splits}
    return write_outputs(out_dir, manifests, problems, skip_bad=skip_bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus_dir", required=True,
                    help="folder with clotho_captions_<split>.csv (or clotho_csv_files/...) and the audio in "
                         "<split>/ or clotho_audio_<split>/, split being development/validation/evaluation")
    ap.add_argument("--out_dir", required=True, help="where {train,dev,test}.jsonl are written")
    ap.add_argument("--splits", default=",".join(SPLITS),
                    help="comma-separated Clotho splits to convert (default: development,validation,evaluation)")
    ap.add_argument("--skip_bad", action="store_true",
                    help="leave bad rows out, writing them with reasons to <out_dir>/skipped.jsonl, "
                         "instead of failing")
    args = ap.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    return run_cli(lambda: prepare(args.corpus_dir, args.out_dir, skip_bad=args.skip_bad, splits=splits),
                   lambda st: summary("clotho", st))


if __name__ == "__main__":
    sys.exit(main())
