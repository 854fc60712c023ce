#!/usr/bin/env python3
"""Generation lengths that fit the corpus: the longest reference, in the model's tokens, plus a margin.

    python -m tools.gen_length --model exp/student_sft/final --manifest data/student_labelled.jsonl \\
        [--field text] [--margin 1.25] [--extra 8] [--floor 16]

prints ``max_new_tokens`` = max(floor, ceil(margin * longest) + extra), where ``longest`` is the
most tokens any row's ``field`` (a string, or a list of references: each counts) takes in the tokenizer of ``--model`` (a model folder or a
tokenizer folder), counting the end-of-sequence token. ``run.sh`` uses it for decoding and
rollouts with ``--max_new_tokens auto`` (the default), so long transcripts (LibriSpeech) and
reasoning blocks are not cut at a fixed 32 tokens; ``--json`` prints the figures behind it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def longest_reference(tokenizer, manifests, field: str = "text") -> tuple[int, int]:
    """(most tokens of one ``field`` + EOS, rows read) over the JSONL ``manifests``."""
    from tools.hyps import jsonl_objects
    longest, rows, problems = 0, 0, []
    for path in manifests:
        for lineno, rec in jsonl_objects(path, problems):
            text = rec.get(field)
            texts = [text] if isinstance(text, str) else [t for t in text if isinstance(t, str)] \
                if isinstance(text, list) else []   # a list: several references (captions)
            if not texts:
                continue
            rows += 1
            longest = max([longest] + [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts])
    if problems:
        raise ValueError("\n".join(problems[:20]))
    if not rows:
        raise ValueError(f"no row of {', '.join(map(str, manifests))} has a '{field}' text to measure")
    return longest, rows


def auto_max_new_tokens(model_dir, manifests, field: str = "text", margin: float = 1.25, extra: int = 8,
                        floor: int = 16) -> dict:
    """``{"max_new_tokens", "longest_reference_tokens", "rows", "rule"}``."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    longest, rows = longest_reference(tok, [Path(m) for m in manifests], field)
    n = max(floor, math.ceil(margin * longest) + extra)
    return {"max_new_tokens": n, "longest_reference_tokens": longest, "rows": rows,
            "rule": f"max({floor}, ceil({margin} x longest '{field}' in tokens incl. EOS) + {extra})"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model (or tokenizer) folder whose tokens are counted")
    ap.add_argument("--manifest", nargs="+", required=True, help="JSONL manifests holding the references")
    ap.add_argument("--field", default="text", help="the reference field (default: %(default)s)")
    ap.add_argument("--margin", type=float, default=1.25)
    ap.add_argument("--extra", type=int, default=8)
    ap.add_argument("--floor", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    try:
        r = auto_max_new_tokens(args.model, args.manifest, args.field, args.margin, args.extra, args.floor)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else r["max_new_tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
