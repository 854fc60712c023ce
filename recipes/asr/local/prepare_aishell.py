#!/usr/bin/env python3
"""Make JSONL manifests from a local copy of AISHELL-1.

Reads the corpus in its distributed layout (openslr.org/33, with the per-speaker
wav archives extracted in place):

    <corpus_dir>/data_aishell/wav/{train,dev,test}/<speaker>/<utt>.wav
    <corpus_dir>/data_aishell/transcript/aishell_transcript_v0.8.txt   ("UTTID word word ..." lines)

(`<corpus_dir>` may also be the `data_aishell` folder itself) and writes
`<out_dir>/{train,dev,test}.jsonl`, one row per utterance:

    {"key": "BAC009S0002W0122", "audio": "/abs/.../BAC009S0002W0122.wav",
     "text": "而对楼市成交抑制作用最大的限购", "task": "asr", "language": "zh",
     "speaker": "S0002"}

The transcript is word-segmented; the words are joined without spaces, since
Chinese is scored by character error rate.

Nothing is dropped silently: wav files without a transcript line are counted,
printed, and listed in `<out_dir>/<split>.missing.txt` (written for every split,
empty when nothing is missing); transcript lines whose wav exists in none of
the splits are counted and listed in `<out_dir>/transcript.missing.txt`; lines
with an id but no words, and repeated ids, are counted and listed there too.
Each listing line is `reason<TAB>path-or-id<TAB>where`.

Left out: downloading, extracting the per-speaker .tar.gz archives, audio
decoding, text normalisation beyond removing the word segmentation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core.data.manifest import write_manifest

SPLITS = ("train", "dev", "test")
TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"


def find_root(corpus_dir: str | os.PathLike) -> Path:
    """The folder holding `wav/` and `transcript/`: `<corpus_dir>/data_aishell` or `<corpus_dir>`."""
    corpus_dir = Path(corpus_dir)
    for cand in (corpus_dir / "data_aishell", corpus_dir):
        if (cand / "wav").is_dir():
            return cand
    raise FileNotFoundError(f"AISHELL-1 not found: neither {corpus_dir / 'data_aishell' / 'wav'} "
                            f"nor {corpus_dir / 'wav'} is a directory")


def read_transcript(path: str | os.PathLike) -> tuple[dict[str, tuple[str, str]], list[tuple]]:
    """{utt: (text without spaces, "file:line")} and problems (reason, id, where)."""
    texts: dict[str, tuple[str, str]] = {}
    problems: list[tuple[str, str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            utt, words = parts[0], parts[1:]
            where = f"{path}:{lineno}"
            if utt in texts:
                problems.append(("duplicate_transcript", utt, where))
            elif not words:
                problems.append(("empty_text", utt, where))
            else:
                texts[utt] = ("".join(words), where)
    return texts, problems


def prepare(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike,
            splits=SPLITS) -> dict[str, dict]:
    """Writes `<out_dir>/<split>.jsonl` and `<split>.missing.txt` for each split.

    Returns {split: {"manifest", "missing_file", "utterances", "no_transcript"}}
    plus {"transcript": {"missing_file", "lines", "no_audio", "empty_text",
    "duplicate_transcript"}}. Raises FileNotFoundError when the corpus, the
    transcript or a split folder is missing, ValueError when a split has no
    usable utterance.
    """
    root = find_root(corpus_dir)
    trans_path = root / TRANSCRIPT
    if not trans_path.is_file():
        raise FileNotFoundError(f"AISHELL-1 transcript not found: {trans_path}")
    split_dirs = {s: root / "wav" / s for s in splits}
    for s, d in split_dirs.items():
        if not d.is_dir():
            raise FileNotFoundError(f"AISHELL-1 split {s!r} not found: {d} is not a directory "
                                    f"(are the per-speaker .tar.gz archives extracted?)")
    texts, trans_problems = read_transcript(trans_path)
    empty_ids = {utt for reason, utt, _ in trans_problems if reason == "empty_text"}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict] = {}
    seen: set[str] = set()
    for split, d in split_dirs.items():
        rows, missing = [], []
        for wav in sorted(d.resolve().glob("*/*.wav")):
            utt = wav.stem
            seen.add(utt)
            if utt not in texts:
                reason = "empty_text" if utt in empty_ids else "no_transcript"
                missing.append((reason, str(wav), str(trans_path)))
                continue
            rows.append({"key": utt, "audio": str(wav), "text": texts[utt][0], "task": "asr",
                         "language": "zh", "speaker": wav.parent.name})
        if not rows:
            raise ValueError(f"{d}: no .wav file with a transcript line "
                             f"({len(missing)} wav(s) without one)")
        manifest = out_dir / f"{split}.jsonl"
        missing_file = out_dir / f"{split}.missing.txt"
        write_manifest(manifest, rows)
        _write_lines(missing_file, missing)
        stats[split] = {"manifest": str(manifest), "missing_file": str(missing_file),
                        "utterances": len(rows),
                        "no_transcript": sum(m[0] == "no_transcript" for m in missing),
                        "empty_text": sum(m[0] == "empty_text" for m in missing)}

    no_audio = [("no_audio", utt, where) for utt, (_, where) in texts.items() if utt not in seen]
    listing = no_audio + trans_problems
    trans_missing = out_dir / "transcript.missing.txt"
    _write_lines(trans_missing, listing)
    stats["transcript"] = {"missing_file": str(trans_missing), "lines": len(texts),
                           "no_audio": len(no_audio),
                           "empty_text": sum(p[0] == "empty_text" for p in trans_problems),
                           "duplicate_transcript": sum(p[0] == "duplicate_transcript"
                                                       for p in trans_problems)}
    return stats


def _write_lines(path: Path, items: list[tuple]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join("\t".join(map(str, it)) + "\n" for it in items), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus_dir", required=True,
                    help="folder holding data_aishell/ (or the data_aishell folder itself)")
    ap.add_argument("--out_dir", required=True, help="where <split>.jsonl manifests are written")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                    help="splits to prepare (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        stats = prepare(args.corpus_dir, args.out_dir, args.splits)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    trans = stats.pop("transcript")
    for split, st in stats.items():
        line = f"{split}: {st['utterances']} utterances -> {st['manifest']}"
        if st["no_transcript"] or st["empty_text"]:
            line += (f" | {st['no_transcript']} wav(s) without transcript, {st['empty_text']} "
                     f"with an empty one (listed in {st['missing_file']})")
        print(line)
    if trans["no_audio"] or trans["empty_text"] or trans["duplicate_transcript"]:
        print(f"transcript: {trans['no_audio']} line(s) without a wav in the prepared splits, "
              f"{trans['empty_text']} empty, {trans['duplicate_transcript']} duplicate "
              f"(listed in {trans['missing_file']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
