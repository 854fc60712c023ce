#!/usr/bin/env python3
"""Split a real corpus's training manifest into the recipe's sets: the teacher's labelled set,
the student's small labelled set and its unlabelled audio (``text`` removed; kept in
``unlabelled_reference.jsonl`` for analysis only), by speaker so that the three share no
speaker. Dev and test are copied. Also writes ``text_corpus.txt`` for the tokenizer.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--teacher_share", type=float, default=0.5, help="share of speakers for the teacher")
    ap.add_argument("--labelled_share", type=float, default=0.05, help="share of speakers for the student's labelled set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from core.data.manifest import read_manifest, write_manifest
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(args.train, require=("text",))
    spk = lambda r: str(r.get("speaker") or r["key"].split("-")[0].split("_")[0])  # noqa: E731
    speakers = sorted({spk(r) for r in rows})
    random.Random(args.seed).shuffle(speakers)
    n_t = max(1, int(len(speakers) * args.teacher_share))
    n_l = max(1, int(len(speakers) * args.labelled_share))
    if len(speakers) < 3:
        raise SystemExit(f"{args.train}: need at least 3 speakers to split, found {len(speakers)}")
    group = {s: ("teacher" if i < n_t else "labelled" if i < n_t + n_l else "unlabelled")
             for i, s in enumerate(speakers)}
    sets = {"teacher": [], "labelled": [], "unlabelled": []}
    for r in rows:
        sets[group[spk(r)]].append(r)
    write_manifest(out / "teacher_train.jsonl", sets["teacher"])
    write_manifest(out / "student_labelled.jsonl", sets["labelled"])
    write_manifest(out / "unlabelled.jsonl", [{k: v for k, v in r.items() if k != "text"} for r in sets["unlabelled"]])
    write_manifest(out / "unlabelled_reference.jsonl", [{"key": r["key"], "text": r["text"]} for r in sets["unlabelled"]])
    for name, src in (("dev", args.dev), ("test", args.test)):
        write_manifest(out / f"{name}.jsonl", read_manifest(src, require=("text",)))
    with open(out / "text_corpus.txt", "w", encoding="utf-8") as f:
        for r in sets["teacher"] + sets["labelled"]:
            f.write(r["text"] + "\n")
    stats = {k: len(v) for k, v in sets.items()} | {"speakers": len(speakers)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
