"""How the audio_qa recipe asks a question and what a reference answer looks like.

``render_prompt(row, letters=False)``: the question, its choices (in the row's order; with
``letters`` as "A. x | B. y") and the output format; ``render_target(row, letters=False)``:
``<think>{reasoning}</think><answer>{answer}</answer>``, where the reasoning is the row's
``description`` (what is heard) when it has one and the answer is the choice's text, or its
letter with ``letters`` (MMSU's scorer reads a letter). ``add_prompts`` fills the ``prompt`` and
``target`` fields of manifest rows.

``python local/prompt.py IN.jsonl OUT.jsonl [--letters] [--style ours|plain]`` does it for a whole
manifest (real corpora after their prep); relative audio paths are rewritten to stay valid from
OUT's folder. ``--style plain`` (``run.sh --eval_only``'s default, for released checkpoints that
were never taught our format) asks for the choice's text (or letter) alone, with no think/answer
tags: what MMAU's ``evaluation.py`` matches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

INSTRUCTION = "Think first, then answer as <think>...</think><answer>...</answer>."
PLAIN = {False: "Answer with the text of one choice.", True: "Answer with the letter of one choice."}
STYLES = ("ours", "plain")
DESCRIBE = "Describe the audio."
LETTERS = "ABCDEFGHIJ"


def render_prompt(row: dict, letters: bool = False, style: str = "ours") -> str:
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: one of {', '.join(STYLES)}")
    ch = [f"{LETTERS[i]}. {c}" if letters else str(c) for i, c in enumerate(row["choices"])]
    return f"{row['question']}\nChoices: {' | '.join(ch)}\n{INSTRUCTION if style == 'ours' else PLAIN[letters]}"


def render_target(row: dict, letters: bool = False) -> str:
    answer = row["answer"]
    if letters:
        answer = LETTERS[[str(c) for c in row["choices"]].index(str(answer))]
    return f"<think>{row.get('description') or 'I listen to the audio.'}</think><answer>{answer}</answer>"


def add_prompts(rows: list[dict], letters: bool = False, style: str = "ours") -> list[dict]:
    out = []
    for r in rows:
        r = dict(r, prompt=render_prompt(r, letters, style))
        if r.get("answer") is not None:
            r["target"] = render_target(r, letters)
        out.append(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inp", help="manifest from a prep script (JSONL)")
    ap.add_argument("out", help="the same rows with 'prompt' and 'target'")
    ap.add_argument("--letters", action="store_true", help="label the choices A, B, ... and answer with the letter")
    ap.add_argument("--style", choices=STYLES, default="ours",
                    help="ours: think/answer tags (what the recipe trains); plain: the answer alone (released models)")
    args = ap.parse_args(argv)
    src, dst = os.path.dirname(os.path.abspath(args.inp)), os.path.dirname(os.path.abspath(args.out))
    with open(args.inp, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        a = r.get("audio")
        if isinstance(a, str) and a and not os.path.isabs(a):
            r["audio"] = os.path.relpath(os.path.join(src, a), dst)
    os.makedirs(dst, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in add_prompts(rows, args.letters, args.style):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
