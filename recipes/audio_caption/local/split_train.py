#!/usr/bin/env python3
"""Split a real caption corpus's training manifest into the recipe's sets, by clip at random:
the teacher's captioned set (``--teacher_share`` of the clips), the student's small captioned
set (``--student_labelled`` clips) and its unlabelled audio (the rest).

Reads ``--train``, ``--dev`` and ``--test`` (manifests from ``prepare_audiocaps.py`` or
``prepare_clotho.py``; every row needs a ``text``; all three are checked with ``read_manifest``,
audio headers included, before anything is written) and writes into ``--out_dir``:

  teacher_train.jsonl, student_labelled.jsonl   rows as they were
  unlabelled.jsonl            rows without ``text`` / ``questions`` / ``question`` / ``choices``
                              / ``answer``
  unlabelled_reference.jsonl  ``{"key", "text"}`` (and ``questions`` when present) of the
                              unlabelled clips, for analysis only
  dev.jsonl, test.jsonl       copies
  text_corpus.txt             the prompt strings of ``make_synthetic.py`` ("Describe the audio.",
                              "Caption:", "Question:", "Choices:", "Answer:"), then every caption
                              (and question, choice, answer) of the two captioned training sets
  stats.json                  clip counts

A relative audio path is rewritten to stay valid from ``--out_dir``; an absolute one is kept. The
split depends only on ``--seed`` and the input order. Left out: splitting by source recording or
by caption similarity (clips are assumed independent), and any resampling or copying of audio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from core.data.manifest import ManifestError, read_manifest, write_manifest
from tools.local_module import load_sibling

corpus_lines = load_sibling(__file__, "make_synthetic").corpus_lines

LABEL_FIELDS = ("text", "questions", "question", "choices", "answer")


def load(path: str, out_dir: Path) -> list[dict]:
    """Rows of a manifest, validated, with relative audio/video paths rewritten against ``out_dir``."""
    rows = read_manifest(path, require=("text",))  # media paths come back absolute
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    out_abs = os.path.abspath(out_dir)
    for r, orig in zip(rows, raw):
        for name in ("audio", "video"):
            v = orig.get(name)
            if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
                r[name] = os.path.relpath(r[name], out_abs)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--train", required=True, help="training manifest (JSONL) to split")
    ap.add_argument("--dev", required=True, help="dev manifest, copied")
    ap.add_argument("--test", required=True, help="test manifest, copied")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--student_labelled", type=int, default=500, help="clips in the student's captioned set")
    ap.add_argument("--teacher_share", type=float, default=0.5, help="share of the train clips for the teacher")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (0.0 < args.teacher_share < 1.0):
        raise SystemExit(f"--teacher_share must be in (0, 1), got {args.teacher_share}")
    if args.student_labelled < 0:
        raise SystemExit(f"--student_labelled must be >= 0, got {args.student_labelled}")
    out = Path(args.out_dir)
    try:
        train, dev, test = (load(p, out) for p in (args.train, args.dev, args.test))
    except ManifestError as e:
        raise SystemExit(f"error: {e}")
    n = len(train)
    n_teacher = int(round(n * args.teacher_share))
    n_unlab = n - n_teacher - args.student_labelled
    if n_teacher < 1 or n_unlab < 1:
        raise SystemExit(f"{args.train}: {n} clips cannot give {n_teacher} to the teacher (--teacher_share "
                         f"{args.teacher_share}), {args.student_labelled} to the student's captioned set "
                         f"and at least 1 unlabelled")
    order = list(range(n))
    random.Random(args.seed).shuffle(order)
    teacher = [train[i] for i in sorted(order[:n_teacher])]
    labelled = [train[i] for i in sorted(order[n_teacher:n_teacher + args.student_labelled])]
    unlab = [train[i] for i in sorted(order[n_teacher + args.student_labelled:])]

    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "teacher_train.jsonl", teacher)
    write_manifest(out / "student_labelled.jsonl", labelled)
    write_manifest(out / "unlabelled.jsonl", [{k: v for k, v in r.items() if k not in LABEL_FIELDS} for r in unlab])
    write_manifest(out / "unlabelled_reference.jsonl",
                   [{"key": r["key"], "text": r["text"], **({"questions": r["questions"]} if "questions" in r else {})}
                    for r in unlab])
    write_manifest(out / "dev.jsonl", dev)
    write_manifest(out / "test.jsonl", test)
    lines = corpus_lines(teacher + labelled)
    (out / "text_corpus.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    stats = {"teacher_train": len(teacher), "student_labelled": len(labelled), "unlabelled": len(unlab),
             "dev": len(dev), "test": len(test), "train_clips": n, "seed": args.seed,
             "teacher_share": args.teacher_share, "text_corpus_lines": len(lines)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
