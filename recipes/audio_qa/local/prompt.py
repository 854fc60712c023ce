"""How the audio_qa recipe asks a question and what a reference answer looks like.

``render_prompt(row)``: the question, its choices (in the row's order) and the output format;
``render_target(row)``: ``<think>{reasoning}</think><answer>{answer}</answer>``, where the
reasoning is the row's ``description`` (what is heard) when it has one. ``add_prompts`` fills the
``prompt`` and ``target`` fields of manifest rows; ``python local/prompt.py in.jsonl out.jsonl``
does it for a whole manifest (used for real corpora after their prep).
"""
from __future__ import annotations

import json
import sys

INSTRUCTION = "Think first, then answer as <think>...</think><answer>...</answer>."
DESCRIBE = "Describe the audio."


def render_prompt(row: dict) -> str:
    choices = " | ".join(str(c) for c in row["choices"])
    return f"{row['question']}\nChoices: {choices}\n{INSTRUCTION}"


def render_target(row: dict) -> str:
    return f"<think>{row.get('description') or 'I listen to the audio.'}</think><answer>{row['answer']}</answer>"


def add_prompts(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r, prompt=render_prompt(r))
        if r.get("answer") is not None:
            r["target"] = render_target(r)
        out.append(r)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python local/prompt.py IN.jsonl OUT.jsonl  (adds 'prompt' and 'target' fields)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    with open(argv[0], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(argv[1], "w", encoding="utf-8") as f:
        for r in add_prompts(rows):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
