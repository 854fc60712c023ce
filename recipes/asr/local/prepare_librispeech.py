#!/usr/bin/env python3
"""Make JSONL manifests from a local copy of LibriSpeech.

Reads the corpus in its distributed layout (as extracted from openslr.org/12):

    <corpus_dir>/<part>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <corpus_dir>/<part>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("UTT-ID TEXT" lines)

(`<corpus_dir>/LibriSpeech/<part>` is accepted too) and writes
`<out_dir>/<name>.jsonl`, one row per utterance:

    {"key": "1089-134686-0000", "audio": "/abs/.../1089-134686-0000.flac",
     "text": "HE HOPED THERE WOULD BE STEW ...", "task": "asr", "language": "en",
     "speaker": "1089", "chapter": "134686"}

The text is kept exactly as distributed (upper case, no punctuation); scoring
(tools/compute_wer.py) normalises case, so nothing is lost or changed here.
`<name>` is the part name unless `--map part=name` renames it
(e.g. `--map train-clean-100=train dev-clean=dev`).

Nothing is dropped silently: flac files without a transcript line, transcript
lines without a flac file, and transcript lines with an empty text are counted,
printed, and listed in `<out_dir>/<name>.missing.txt` (written for every part,
empty when nothing is missing) as `reason<TAB>path-or-id<TAB>where`.

Left out: downloading and extracting the archives, audio decoding or duration
measurement (read_manifest checks the headers), text normalisation, and
speed perturbation or other augmentation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from core.data.manifest import write_manifest

DEFAULT_PARTS = ("train-clean-100", "dev-clean", "test-clean")


def _natural_key(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def find_part_dir(corpus_dir: str | os.PathLike, part: str) -> Path:
    """`<corpus_dir>/<part>` or `<corpus_dir>/LibriSpeech/<part>`; FileNotFoundError otherwise."""
    corpus_dir = Path(corpus_dir)
    for cand in (corpus_dir / part, corpus_dir / "LibriSpeech" / part):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"LibriSpeech part {part!r} not found: neither {corpus_dir / part} "
                            f"nor {corpus_dir / 'LibriSpeech' / part} is a directory")


def read_part(part_dir: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Rows of one part and its missing items as (reason, path-or-id, where) tuples.

    Reasons: `no_transcript` (a flac without a transcript line), `no_audio` (a
    transcript line without a flac), `empty_text` (a transcript line with no
    words), `duplicate_transcript` (an utterance id listed twice; first kept),
    `bad_transcript_line` (a line whose id does not match its file).
    """
    part_dir = Path(part_dir).resolve()
    flacs: dict[str, Path] = {}
    for flac in part_dir.glob("*/*/*.flac"):
        flacs[flac.stem] = flac
    texts: dict[str, tuple[str, str]] = {}  # utt -> (text, "trans-file:line")
    missing: list[tuple[str, str, str]] = []
    for trans in sorted(part_dir.glob("*/*/*.trans.txt")):
        prefix = trans.name[: -len(".trans.txt")] + "-"
        with open(trans, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                where = f"{trans}:{lineno}"
                utt, _, text = line.partition(" ")
                text = " ".join(text.split())
                if not utt.startswith(prefix):
                    missing.append(("bad_transcript_line", utt, where))
                elif utt in texts:
                    missing.append(("duplicate_transcript", utt, where))
                elif not text:
                    missing.append(("empty_text", utt, where))
                    texts[utt] = ("", where)
                else:
                    texts[utt] = (text, where)

    rows = []
    for utt, flac in flacs.items():
        if utt not in texts:
            missing.append(("no_transcript", str(flac), str(flac.parent)))
            continue
        text, _ = texts[utt]
        if not text:
            continue  # counted above as empty_text
        parts = utt.split("-")
        rows.append({"key": utt, "audio": str(flac), "text": text, "task": "asr",
                     "language": "en", "speaker": parts[0],
                     "chapter": parts[1] if len(parts) > 1 else ""})
    for utt, (_, where) in texts.items():
        if utt not in flacs:
            missing.append(("no_audio", utt, where))
    rows.sort(key=lambda r: _natural_key(r["key"]))
    missing.sort(key=lambda m: (m[0], _natural_key(m[1])))
    return rows, missing


def prepare(corpus_dir: str | os.PathLike, parts=DEFAULT_PARTS, out_dir: str | os.PathLike = "data",
            name_map: dict[str, str] | None = None) -> dict[str, dict]:
    """Writes `<out_dir>/<name>.jsonl` and `<name>.missing.txt` for each part.

    Returns {part: {"manifest", "missing_file", "utterances", "no_transcript",
    "no_audio", "empty_text", "duplicate_transcript", "bad_transcript_line"}}.
    Raises FileNotFoundError for a missing part directory and ValueError for a
    part without any usable utterance (wrong path or unextracted archive).
    """
    name_map = dict(name_map or {})
    names = [name_map.get(p, p) for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"two parts would write the same manifest: {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part_dirs = {part: find_part_dir(corpus_dir, part) for part in parts}  # fail before writing
    stats: dict[str, dict] = {}
    for part, part_dir in part_dirs.items():
        rows, missing = read_part(part_dir)
        if not rows:
            raise ValueError(f"{part_dir}: no utterance with both a .flac file and a transcript "
                             f"line ({len(missing)} unmatched item(s))")
        name = name_map.get(part, part)
        manifest = out_dir / f"{name}.jsonl"
        missing_file = out_dir / f"{name}.missing.txt"
        write_manifest(manifest, rows)
        tmp = missing_file.with_name(missing_file.name + ".tmp")
        tmp.write_text("".join("\t".join(m) + "\n" for m in missing), encoding="utf-8")
        os.replace(tmp, missing_file)
        st = {"manifest": str(manifest), "missing_file": str(missing_file), "utterances": len(rows)}
        for reason in ("no_transcript", "no_audio", "empty_text", "duplicate_transcript",
                       "bad_transcript_line"):
            st[reason] = sum(1 for m in missing if m[0] == reason)
        stats[part] = st
    return stats


def _parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst or "/" in dst:
            raise argparse.ArgumentTypeError(f"--map expects PART=NAME, got {item!r}")
        out[src] = dst
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus_dir", required=True,
                    help="folder holding the extracted parts (or a LibriSpeech/ folder with them)")
    ap.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS),
                    help="parts to prepare (default: %(default)s)")
    ap.add_argument("--out_dir", required=True, help="where <name>.jsonl manifests are written")
    ap.add_argument("--map", nargs="*", default=[], metavar="PART=NAME",
                    help="rename output manifests, e.g. train-clean-100=train dev-clean=dev")
    args = ap.parse_args(argv)
    try:
        name_map = _parse_map(args.map)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    unknown = sorted(set(name_map) - set(args.parts))
    if unknown:
        ap.error(f"--map names parts not in --parts: {unknown}")
    try:
        stats = prepare(args.corpus_dir, args.parts, args.out_dir, name_map)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for part, st in stats.items():
        unmatched = {k: v for k, v in st.items()
                     if k not in ("manifest", "missing_file", "utterances") and v}
        line = f"{part}: {st['utterances']} utterances -> {st['manifest']}"
        if unmatched:
            line += (" | unmatched: " + ", ".join(f"{k}={v}" for k, v in unmatched.items())
                     + f" (listed in {st['missing_file']})")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
