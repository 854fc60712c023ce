"""How the audio_visual_grpo recipe asks a multiple-choice question and what a reference answer is.

``render_prompt(row)``: the question, one line per choice ("A. x", "B. y", ...; choices that are
already lettered, like Daily-Omni's "A. ..." strings, are written as they are), then the output
format:

    Think first, then answer as <think>...</think><answer>...</answer> with the letter of one choice.

Rows with IntentBench's ``problem_type`` ``emer_ov_mc`` ask for every correct letter, comma
separated; ``judge`` rows ask for Yes or No (and have no choices).

``render_target(row, reasoning=None)``: ``<think>{reasoning}</think><answer>{answer}</answer>``, the
answer being the row's ``answer`` field (a letter, a letter set, or Yes/No) and the reasoning the
argument, else the row's ``reasoning`` field, else a generic sentence. ``add_prompts(rows)``
fills the ``prompt`` (and, for rows with an answer, ``target``) fields.

``strip_letter(choice, i)``: a choice without its "A. " style label (the label must be the i-th
letter). ``FORMAT_STRINGS``: the tags and letters, for the tokenizer's corpus.

``render_prompt(row, style="plain")`` (``run.sh --eval_only``'s default, for released checkpoints
never taught our format) asks Daily-Omni's questions for the letter alone, as Daily-Omni's own
runners do (its scorer reads the first character); IntentBench rows keep the answer tags, which
HumanOmniV2's scorer reads. ``python local/prompt.py IN.jsonl OUT.jsonl --style plain`` re-renders
the prompts of a prepared manifest.

Left out: system prompts, chat templates and the media placeholders (the trainer's processor adds
those), and few-shot examples.
"""
from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"
INSTRUCTIONS = {
    "multiple choice": "Think first, then answer as <think>...</think><answer>...</answer> "
                       "with the letter of one choice.",
    "emer_ov_mc": "Think first, then answer as <think>...</think><answer>...</answer> "
                  "with the letters of every correct choice, separated by commas.",
    "judge": "Think first, then answer as <think>...</think><answer>...</answer> with Yes or No.",
}
INSTRUCTION = INSTRUCTIONS["multiple choice"]
PLAIN_LETTER = "Answer with the letter of the correct option only."
STYLES = ("ours", "plain")
DEFAULT_REASONING = "I watch the video and listen to its sound."
FORMAT_STRINGS = ("<think>", "</think>", "<answer>", "</answer>", *LETTERS[:4], "Yes", "No")

_LABEL = re.compile(r"^\s*\(?([A-J])\s*[.):]\s*")


def choice_label(choice: str) -> str | None:
    """The letter of a labelled choice ("A. cat", "(B) dog", "C) x", "D: y"), else None."""
    m = _LABEL.match(str(choice))
    return m.group(1) if m else None


def is_lettered(choices) -> bool:
    """True when the i-th choice is labelled with the i-th letter, for every choice."""
    return bool(choices) and all(choice_label(c) == LETTERS[i] for i, c in enumerate(choices))


def strip_letter(choice: str, i: int) -> str:
    """``choice`` without a leading label of the ``i``-th letter ("A. x" -> "x"); others unchanged."""
    m = _LABEL.match(str(choice))
    if m and m.group(1) == LETTERS[i]:
        return str(choice)[m.end():].strip()
    return str(choice).strip()


def instruction(row: dict, style: str = "ours") -> str:
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}: one of {', '.join(STYLES)}")
    if style == "plain" and row.get("problem_type") is None:  # Daily-Omni: the letter alone
        return PLAIN_LETTER
    return INSTRUCTIONS.get(str(row.get("problem_type") or "multiple choice"), INSTRUCTION)


def render_prompt(row: dict, style: str = "ours") -> str:
    """The question, its choices one per line with letters, and the output instruction."""
    choices = list(row.get("choices") or [])
    if len(choices) > len(LETTERS):
        raise ValueError(f"row {row.get('key')!r}: {len(choices)} choices, at most {len(LETTERS)} can be lettered")
    if is_lettered(choices):
        lines = [str(c).strip() for c in choices]
    else:
        lines = [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return "\n".join([str(row["question"]).strip(), *lines, instruction(row, style)])


def render_target(row: dict, reasoning: str | None = None) -> str:
    """``<think>reasoning</think><answer>answer</answer>`` for a row with an ``answer``."""
    if row.get("answer") is None:
        raise ValueError(f"row {row.get('key')!r} has no answer to write a target for")
    why = reasoning or row.get("reasoning") or DEFAULT_REASONING
    return f"<think>{why}</think><answer>{row['answer']}</answer>"


def add_prompts(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with ``prompt`` and (when they have an answer) ``target``."""
    out = []
    for r in rows:
        r = dict(r, prompt=render_prompt(r))
        if r.get("answer") is not None:
            r["target"] = render_target(r)
        out.append(r)
    return out


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description="Re-render the prompts of a prepared manifest.")
    ap.add_argument("inp", help="manifest (JSONL) from a prep script")
    ap.add_argument("out", help="the same rows with their prompts in --style")
    ap.add_argument("--style", choices=STYLES, default="ours")
    args = ap.parse_args(argv)
    with open(args.inp, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(r, prompt=render_prompt(r, args.style)), ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
