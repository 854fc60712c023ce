#!/usr/bin/env python3
"""Make caption manifests from a local copy of AudioCaps.

Reads the official CSVs (github.com/cdjkim/audiocaps, ``dataset/{train,val,test}.csv``), found
as ``<corpus_dir>/<split>.csv`` or ``<corpus_dir>/dataset/<split>.csv``, with the header

    audiocap_id,youtube_id,start_time,caption

and one row per caption (train: one per clip, val/test: five per clip; captions with commas are
quoted). Rows are grouped by clip (youtube_id, start_time) in order of first appearance, and
each clip's audio is looked for, in this order, under every audio root (``--audio_dir``, or else
``<corpus_dir>`` and ``<corpus_dir>/audio``):

    <root>/<split>/<youtube_id>_<start_time>.wav   (start_time as written in the CSV, e.g. 30;
    <root>/<split>/<youtube_id>_<start_time>.flac   an integral "30.0" also tries "30")
    <root>/<split>/<audiocap_id>.wav               (any of the clip's audiocap_ids)
    <root>/<split>/<audiocap_id>.flac

Written: ``<out_dir>/{train,dev,test}.jsonl`` (val becomes dev), one row per clip:

    {"key": "<youtube_id>_<start_time>", "audio": "/abs/.../<file>", "task": "caption",
     "text": [its captions in CSV order], "youtube_id", "start_time": 30,
     "audiocap_ids": [...], "dataset": "audiocaps", "split": "dev"}

Every problem (a row without four fields, an empty audiocap_id / youtube_id / caption, a
start_time that is not a number >= 0, a duplicate audiocap_id, a clip without audio) is collected
over all files and reported at once as ``file.csv:LINE: field: problem``; nothing is written
then. With ``--skip_bad`` the bad rows are left out instead, written with their reasons to
``<out_dir>/skipped.jsonl`` (``{"file", "line", "split", "reasons", "row"}``) and counted; a
missing CSV, a wrong header or a CSV syntax error (such as a stray quote) still stops the run.
The CSV reading and the error and output conventions are shared with ``prepare_clotho.py``.

Left out: downloading from YouTube, cutting or resampling audio (only the file's existence is
checked here; ``read_manifest`` checks the headers and loading resamples to 16 kHz), and caption
normalisation (captions are kept as written, surrounding spaces stripped).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from core.data.manifest import write_manifest
from tools.prep_common import PrepError, run_cli

HEADER = ["audiocap_id", "youtube_id", "start_time", "caption"]
SPLITS = {"train": "train", "val": "dev", "test": "test"}
AUDIO_EXTS = (".wav", ".flac")
SKIPPED = "skipped.jsonl"


# ----------------------------------------------------------------------------- shared with Clotho

def read_csv(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, fields)]) of a CSV file; ``line`` is the 1-based line a record starts on.

    Blank (or whitespace-only) lines are skipped; a UTF-8 byte-order mark is ignored. PrepError names the file and
    line for an unreadable file or a CSV syntax error, and for a file without a header.
    """
    path = os.fspath(path)
    records: list[tuple[int, list[str]]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            start = 1
            try:
                for fields in reader:
                    if fields and not (len(fields) == 1 and not fields[0].strip()):  # blank lines
                        records.append((start, fields))
                    start = reader.line_num + 1
            except csv.Error as e:
                raise PrepError([f"{path}:{start}: not valid CSV ({e})"]) from e
    except UnicodeDecodeError as e:
        raise PrepError([f"{path}: not UTF-8 text ({e})"]) from e
    except OSError as e:
        raise PrepError([f"{path}: cannot read ({e.strerror or e})"]) from e
    if not records:
        raise PrepError([f"{path}:1: header: the file is empty"])
    (_, header), rows = records[0], records[1:]
    return [h.strip() for h in header], rows


class Problems:
    """Collects ``file:line: field: problem`` lines and the side file's rows."""

    def __init__(self):
        self.lines: list[str] = []
        self.skipped: list[dict] = []

    def add(self, file: str, line: int, split: str, errs: list[tuple[str, str]], row: dict) -> None:
        self.lines += [f"{file}:{line}: {f}: {m}" for f, m in errs]
        self.skipped.append({"file": file, "line": line, "split": split,
                             "reasons": [f"{f}: {m}" for f, m in errs], "row": row})


def write_outputs(out_dir: str | os.PathLike, manifests: dict[str, list[dict]], problems: Problems, *,
                  skip_bad: bool) -> dict:
    """Raises PrepError listing every problem unless ``skip_bad``; else writes ``skipped.jsonl``
    (always, empty when nothing was skipped) and the manifests ``<out_dir>/<name>.jsonl``.
    Returns {"out_dir", "clips": {name: n}, "skipped": n, "skipped_file": path or None}."""
    if problems.lines and not skip_bad:
        raise PrepError(problems.lines)
    empty = [name for name, rows in manifests.items() if not rows]
    if empty:
        raise PrepError(problems.lines + [f"no valid clip left for {', '.join(empty)}"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped_file = out_dir / SKIPPED
    if skip_bad:
        write_manifest(skipped_file, problems.skipped)
    elif skipped_file.exists():
        skipped_file.unlink()  # stale, from an earlier --skip_bad run
    for name, rows in manifests.items():
        write_manifest(out_dir / f"{name}.jsonl", rows)
    return {"out_dir": str(out_dir), "clips": {n: len(r) for n, r in manifests.items()},
            "captions": {n: sum(len(x["text"]) for x in r) for n, r in manifests.items()},
            "skipped": len(problems.skipped), "skipped_file": str(skipped_file) if skip_bad else None}


def summary(name: str, st: dict) -> str:
    parts = [f"{n} {c} clips / {st['captions'][n]} captions" for n, c in st["clips"].items()]
    line = f"{name}: " + ", ".join(parts) + f" -> {st['out_dir']}"
    if st["skipped_file"]:
        line += f" | skipped {st['skipped']} bad row(s), listed with reasons in {st['skipped_file']}"
    return line


def row_dict(header: list[str], fields: list[str]) -> dict:
    """The CSV record as a dict for the side file (extra fields under ``_extra``)."""
    d = dict(zip(header, fields))
    if len(fields) > len(header):
        d["_extra"] = fields[len(header):]
    return d


# ----------------------------------------------------------------------------- AudioCaps

def find_csv(corpus_dir: Path, split: str) -> Path:
    cands = [corpus_dir / f"{split}.csv", corpus_dir / "dataset" / f"{split}.csv"]
    for c in cands:
        if c.is_file():
            return c
    raise PrepError([f"AudioCaps {split}.csv not found: looked for {' and '.join(map(str, cands))}"])


def _start_names(start: str) -> list[str]:
    names = [start]
    try:
        v = float(start)
        if v.is_integer() and str(int(v)) != start:
            names.append(str(int(v)))
    except ValueError:
        pass
    return names


def find_audio(roots: list[Path], split: str, youtube_id: str, start: str, ids: list[str]) -> Path | None:
    for root in roots:
        d = root / split
        stems = [f"{youtube_id}_{s}" for s in _start_names(start)] + list(ids)
        for stem in stems:
            for ext in AUDIO_EXTS:
                if (d / f"{stem}{ext}").is_file():
                    return d / f"{stem}{ext}"
    return None


def _number(s: str) -> int | float:
    v = float(s)
    return int(v) if v.is_integer() else v


def check_row(fields: list[str]) -> list[tuple[str, str]]:
    if len(fields) != len(HEADER):
        return [("row", f"expected {len(HEADER)} fields ({','.join(HEADER)}), got {len(fields)}")]
    errs = []
    aid, yt, start, caption = (x.strip() for x in fields)
    for name, v in (("audiocap_id", aid), ("youtube_id", yt)):
        if not v:
            errs.append((name, "empty"))
    if not caption:
        errs.append(("caption", "empty caption"))
    try:
        v = float(start)
        if not (v >= 0 and v != float("inf")):
            raise ValueError
    except ValueError:
        errs.append(("start_time", f"must be a number of seconds >= 0, got {start!r}"))
    return errs


def read_split(csv_path: Path, split: str, roots: list[Path], problems: Problems) -> list[dict]:
    """Manifest rows of one CSV (valid rows, grouped by clip); problems go to ``problems``."""
    file = str(csv_path)
    header, records = read_csv(csv_path)
    if header != HEADER:
        raise PrepError([f"{file}:1: header: expected {','.join(HEADER)}, got {','.join(header)}"])
    clips: dict[tuple[str, str], dict] = {}
    seen_ids: dict[str, int] = {}
    for line, fields in records:
        errs = check_row(fields)
        aid = fields[0].strip() if fields else ""
        if not errs:
            if aid in seen_ids:
                errs.append(("audiocap_id", f"duplicate audiocap_id {aid} (first on line {seen_ids[aid]})"))
            else:
                seen_ids[aid] = line
        if errs:
            problems.add(file, line, split, errs, row_dict(HEADER, fields))
            continue
        aid, yt, start, caption = (x.strip() for x in fields)
        clip = clips.setdefault((yt, start), {"lines": [], "ids": [], "captions": [], "fields": []})
        clip["lines"].append(line)
        clip["ids"].append(aid)
        clip["captions"].append(caption)
        clip["fields"].append(fields)
    rows = []
    for (yt, start), c in clips.items():
        audio = find_audio(roots, split, yt, start, c["ids"])
        if audio is None:
            where = " or ".join(f"{r / split}/" for r in roots)
            msg = (f"no audio file for clip {yt}_{start} (lines {', '.join(map(str, c['lines']))}): looked in "
                   f"{where} for {yt}_{start}.wav/.flac and <audiocap_id>.wav/.flac")
            for line, fields in zip(c["lines"], c["fields"]):
                problems.add(file, line, split, [("audio", msg)], row_dict(HEADER, fields))
            continue
        rows.append({"key": f"{yt}_{start}", "audio": str(audio.resolve()), "task": "caption",
                     "text": c["captions"], "youtube_id": yt, "start_time": _number(start),
                     "audiocap_ids": c["ids"], "dataset": "audiocaps", "split": SPLITS[split]})
    return rows


def prepare(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, *, audio_dir: str | None = None,
            skip_bad: bool = False, splits: tuple[str, ...] = tuple(SPLITS)) -> dict:
    """Writes ``<out_dir>/{train,dev,test}.jsonl`` (for the CSV splits asked); see the module doc."""
    corpus_dir = Path(corpus_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise PrepError([f"unknown AudioCaps split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}"])
    roots = [Path(audio_dir)] if audio_dir else [corpus_dir, corpus_dir / "audio"]
    csvs = {}
    missing = []
    for s in splits:
        try:
            csvs[s] = find_csv(corpus_dir, s)
        except PrepError as e:
            missing += e.problems
    if missing:
        raise PrepError(missing)
    problems = Problems()
    manifests = {SPLITS[s]: read_split(csvs[s], s, roots, problems) for s in splits}
    return write_outputs(out_dir, manifests, problems, skip_bad=skip_bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus_dir", required=True,
                    help="folder with {train,val,test}.csv (or dataset/{train,val,test}.csv)")
    ap.add_argument("--out_dir", required=True, help="where {train,dev,test}.jsonl are written")
    ap.add_argument("--audio_dir",
                    help="audio root holding <split>/<youtube_id>_<start_time>.wav (or .flac) or "
                         "<split>/<audiocap_id>.wav (or .flac), split being train/val/test "
                         "(default: <corpus_dir>, then <corpus_dir>/audio)")
    ap.add_argument("--splits", default=",".join(SPLITS),
                    help="comma-separated CSV splits to convert (default: train,val,test)")
    ap.add_argument("--skip_bad", action="store_true",
                    help="leave bad rows out, writing them with reasons to <out_dir>/skipped.jsonl, "
                         "instead of failing")
    args = ap.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    return run_cli(lambda: prepare(args.corpus_dir, args.out_dir, audio_dir=args.audio_dir,
                                   skip_bad=args.skip_bad, splits=splits),
                   lambda st: summary("audiocaps", st))


if __name__ == "__main__":
    sys.exit(main())
