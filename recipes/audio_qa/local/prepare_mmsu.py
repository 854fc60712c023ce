#!/usr/bin/env python3
"""Make a QA manifest from a local copy of MMSU (the HF dataset ddwang2000/MMSU).

``--data`` is any of:

- a folder saved with ``datasets`` ``save_to_disk`` (a Dataset, or a DatasetDict: ``--split``);
- a folder of ``*.parquet`` files (the HF repository's layout; searched recursively), else of
  ``*.jsonl`` / ``*.json`` files, or one such file; loaded with ``datasets.load_dataset``.

Each record has ``id, audio, question, choice_a, choice_b, choice_c, choice_d, answer_gt,
task_name, category, sub-category`` (and more metadata). ``audio`` is a path string (relative
paths resolve against ``--audio_dir``, default the folder of ``--data``) or a dict with ``bytes``
(an encoded file, as an HF ``Audio`` column stores it), or ``array`` + ``sampling_rate``, or only
a ``path``. Bytes and arrays are decoded / written as 16-bit wav files with soundfile into
``--audio_out`` (default ``<out folder>/<out stem>_audio/``), and the manifest refers to them
relative to its own folder; existing paths are used where they are.

One manifest row per record:

    {"key": id, "audio": ..., "task": "qa", "question", "choices": [choice_a, ..., choice_d],
     "answer": answer_gt, "category", "sub_category", "dataset": "MMSU", "benchmark": "mmsu",
     "mmsu_id": id, "task_name", ...}

Empty trailing choices are dropped (a 2- or 3-choice item); ``answer_gt`` must equal one of the
choices exactly. ``-`` in field names becomes ``_``; other fields are kept as metadata. Every
problem (a missing field, an answer not among the choices, a gap in the choices, a missing or
undecodable audio, a duplicate id) is reported at once as ``data: item N (id X): field:
problem``; ``--skip_bad`` writes bad items with their reasons to ``<out>.bad.jsonl`` instead
(audio bytes and arrays replaced by their size).

Left out: downloading from the hub, resampling (the loader resamples at read time), prompts
(``local/prompt.py`` adds them).
"""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from tools.prep_common import (PrepError, add_bad, add_bad_args, make_parser, nonempty_str, run_cli,
                               skipped_note, write_outputs)

CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
MAPPED = ("id", "audio", "question", *CHOICES, "answer_gt", "category", "sub-category")


# ----------------------------------------------------------------------------- loading

def _data_files(data: Path) -> tuple[str, list[str]]:
    if data.is_file():
        ext = data.suffix.lower()
        builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(ext)
        if builder is None:
            raise PrepError([f"{data}: not a .parquet, .jsonl or .json file"])
        return builder, [str(data)]
    for builder, patterns in (("parquet", ("*.parquet",)), ("json", ("*.jsonl", "*.json"))):
        files = sorted(str(p) for pat in patterns for p in data.rglob(pat)
                       if p.name not in ("dataset_info.json", "state.json", "dataset_dict.json"))
        if files:
            return builder, files
    raise PrepError([f"{data}: no saved dataset, *.parquet, *.jsonl or *.json files found"])


def load_records(data: str | os.PathLike, split: str | None = None, cache_dir: str | None = None):
    """The records of a local MMSU copy as a ``datasets.Dataset`` with undecoded audio."""
    import datasets

    data = Path(data)
    if not data.exists():
        raise PrepError([f"{data}: no such file or folder"])
    try:
        if data.is_dir() and any((data / n).is_file() for n in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(data))
        else:
            builder, files = _data_files(data)
            ds = datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir)
    except PrepError:
        raise
    except Exception as e:  # bad JSON, unreadable parquet, ...
        raise PrepError([f"{data}: cannot load ({type(e).__name__}: {e})"]) from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) != 1:
            raise PrepError([f"{data}: several splits {names}; choose one with --split"])
        if (split or names[0]) not in ds:
            raise PrepError([f"{data}: no split {split!r}; splits: {names}"])
        ds = ds[split or names[0]]
    if isinstance(ds.features.get("audio"), datasets.Audio):
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    return ds


# ----------------------------------------------------------------------------- records

def _audio(audio, base: str) -> tuple[str | None, tuple | None, str | None]:
    """(existing path, (array, rate) to write, problem) of an ``audio`` value."""
    if isinstance(audio, dict):
        if audio.get("bytes"):
            try:
                x, sr = sf.read(io.BytesIO(audio["bytes"]), dtype="float32")
            except Exception as e:
                return None, None, f"undecodable audio bytes ({type(e).__name__}: {e})"
            return (None, (x, sr), None) if len(x) else (None, None, "audio bytes hold no samples")
        if audio.get("array") is not None:
            x, sr = np.asarray(audio["array"], dtype=np.float32), audio.get("sampling_rate")
            if not isinstance(sr, int) or sr <= 0:
                return None, None, f"array without a valid sampling_rate (got {sr!r})"
            return (None, (x, sr), None) if x.size else (None, None, "empty audio array")
        audio = audio.get("path")
    if not nonempty_str(audio):
        return None, None, "missing (no path, bytes or array)"
    path = os.path.normpath(os.path.join(base, os.path.expanduser(audio)))
    return (path, None, None) if os.path.isfile(path) else (None, None, f"no such audio file {path}")


def convert_record(rec: dict, base: str) -> tuple[dict | None, tuple | None, list[tuple[str, str]]]:
    """(row without its audio when the audio must be written, (array, rate) or None, problems)."""
    errs = []
    key = rec.get("id")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not nonempty_str(key):
        errs.append(("id", "missing" if key is None else f"must be a non-empty string, got {key!r}"))
    if not nonempty_str(rec.get("question")):
        errs.append(("question", "missing or empty"))
    raw = [rec.get(c) for c in CHOICES]
    n = max((i + 1 for i, c in enumerate(raw) if nonempty_str(c)), default=0)
    gaps = [CHOICES[i] for i in range(n) if not nonempty_str(raw[i])]
    choices = raw[:n]
    if gaps:
        errs.append((gaps[0], f"empty while a later choice is set ({[c for c in raw]!r})"))
    elif n < 2:
        errs.append(("choice_b", f"needs at least choice_a and choice_b, got {raw!r}"))
    answer = rec.get("answer_gt")
    if not nonempty_str(answer):
        errs.append(("answer_gt", "missing or empty"))
    elif not gaps and n >= 2 and answer not in choices:
        errs.append(("answer_gt", f"{answer!r} is not one of the choices {choices!r}"))
    path, wav, problem = _audio(rec.get("audio"), base)
    if problem:
        errs.append(("audio", problem))
    if errs:
        return None, None, errs
    row = {"key": key, "audio": path, "task": "qa", "question": rec["question"], "choices": choices,
           "answer": answer, "category": rec.get("category"), "sub_category": rec.get("sub-category"),
           "dataset": "MMSU", "benchmark": "mmsu", "mmsu_id": key}
    for k, v in rec.items():
        if k not in MAPPED:
            row.setdefault(k.replace("-", "_"), v)
    return {k: v for k, v in row.items() if v is not None}, wav, []


def _printable(rec: dict) -> dict:
    a = rec.get("audio")
    if isinstance(a, dict):
        a = {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else
                 f"<array of {np.asarray(v).size} samples>" if k == "array" and v is not None else v)
             for k, v in a.items()}
    return {**rec, "audio": a}


def prepare(data: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
            audio_dir: str | None = None, audio_out: str | None = None, skip_bad: bool = False,
            bad_out: str | None = None) -> dict:
    """Writes the manifest ``out`` (and wav files); returns {"manifest", "rows", "bad",
    "bad_file", "written_audio"}. Raises PrepError listing every problem (unless ``skip_bad``)."""
    data, out = Path(data), os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    base = os.path.abspath(audio_dir or (data if data.is_dir() else data.parent))
    audio_out = os.path.abspath(audio_out or os.path.join(out_dir, Path(out).stem + "_audio"))
    rows, problems, bad, seen, names, written = [], [], [], {}, set(), []
    with tempfile.TemporaryDirectory(prefix="mmsu_cache_") as cache:
        ds = load_records(data, split, cache_dir=cache)
        if "id" not in ds.column_names and len(ds):
            raise PrepError([f"{data}: no 'id' column; columns: {ds.column_names}"])
        for i, rec in enumerate(ds):
            row, wav, errs = convert_record(rec, base)
            ident = None if rec.get("id") is None else str(rec["id"])
            if ident is not None and ident in seen:
                row, errs = None, errs + [("id", f"duplicate id (first at item {seen[ident]})")]
            seen.setdefault(ident, i)
            if errs:
                add_bad(problems, bad, data, i, rec.get("id"), errs, _printable(rec))
                continue
            if wav is not None and not (problems and not skip_bad):  # the run fails: stop writing
                name = re.sub(r"[^\w.-]", "_", row["key"])
                name = name if name not in names else f"{name}_{i}"
                names.add(name)
                os.makedirs(audio_out, exist_ok=True)
                path = os.path.join(audio_out, name + ".wav")
                sf.write(path, wav[0], wav[1], subtype="PCM_16")
                written.append(path)
                row = {"key": row["key"], "audio": os.path.relpath(path, out_dir), **row}
            rows.append(row)
    if problems and not skip_bad:
        for path in written:  # a failing run leaves no audio behind
            os.unlink(path)
    bad_file = write_outputs(out, rows, problems, bad, skip_bad=skip_bad, bad_out=bad_out,
                             none_left=f"{data}: no valid record left")
    return {"manifest": out, "rows": len(rows), "bad": len(bad), "bad_file": bad_file,
            "written_audio": len(written)}


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--data", required=True,
                    help="local MMSU copy: a save_to_disk folder, a folder of parquet/jsonl/json files, or a file")
    ap.add_argument("--out", required=True, help="output manifest (JSONL), e.g. data/mmsu_test.jsonl")
    ap.add_argument("--split", help="split of a saved DatasetDict (default: its only split)")
    ap.add_argument("--audio_dir", help="folder that relative audio paths resolve against (default: --data's folder)")
    ap.add_argument("--audio_out", help="where decoded audio is written as wav (default: <out folder>/<out stem>_audio)")
    add_bad_args(ap, "records")
    args = ap.parse_args(argv)

    def summary(st: dict) -> str:
        return (f"mmsu: {st['rows']} rows -> {st['manifest']} ({st['written_audio']} wav files written)"
                + skipped_note(st, "record"))

    return run_cli(lambda: prepare(args.data, args.out, split=args.split, audio_dir=args.audio_dir,
                                   audio_out=args.audio_out, skip_bad=args.skip_bad,
                                   bad_out=args.bad_out), summary)


if __name__ == "__main__":
    sys.exit(main())
