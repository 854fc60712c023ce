"""Greedy (or sampled) decoding of a manifest: ``python -m core.bin.decode --model DIR --manifest in.jsonl --out hyp.jsonl``.

Writes one JSON line per sample (``key``, ``text``: the hypothesis, plus ``ref`` when the
manifest has the target field); ``--as_manifest`` writes the input rows with the hypothesis in
the target field instead, ready for SFT (sequence-level knowledge distillation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def decode(model_dir: str, manifest: str, out: str, *, prompt: str = "Transcribe the audio.", batch_size: int = 32,
           max_new_tokens: int = 32, target_field: str = "text", as_manifest: bool = False,
           temperature: float = 0.0, seed: int = 0) -> dict:
    from core.data.collate import AudioPromptCollator
    from core.data.manifest import read_manifest, write_manifest
    from core.models import load_model_and_processor, special_token_ids
    from core.rollout import generate_completions
    from core.utils.logging import setup_console

    setup_console()
    torch.set_grad_enabled(False)
    model, proc = load_model_and_processor(model_dir)
    model.eval()
    tok = getattr(proc, "tokenizer", proc)
    rows = read_manifest(manifest)
    col = AudioPromptCollator(proc, prompt)
    hyps = []
    t0 = time.time()
    for i in tqdm(range(0, len(rows), batch_size), desc=f"decode {Path(manifest).name}", leave=False):
        chunk = rows[i: i + batch_size]
        _, comp = generate_completions(model, col.prompts(chunk), tok, do_sample=temperature > 0,
                                       temperature=temperature or 1.0, max_new_tokens=max_new_tokens,
                                       suppress_ids=special_token_ids(proc), eos_ids=[tok.eos_token_id],
                                       seed=seed + i, return_logp=False)
        hyps += comp.texts
    secs = time.time() - t0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if as_manifest:
        write_manifest(out, [{**r, target_field: h} for r, h in zip(rows, hyps)])
    else:
        with open(out, "w") as f:
            for r, h in zip(rows, hyps):
                rec = {"key": r["key"], "text": h}
                if r.get(target_field) is not None:
                    rec["ref"] = r[target_field]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"samples": len(rows), "seconds": round(secs, 2), "empty": sum(1 for h in hyps if not h)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (save_pretrained folder)")
    ap.add_argument("--manifest", required=True, help="input manifest (JSONL)")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--prompt", default="Transcribe the audio.")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--target_field", default="text")
    ap.add_argument("--as_manifest", action="store_true", help="write input rows with the hypothesis as target")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = ap.parse_args(argv)
    info = decode(args.model, args.manifest, args.out, prompt=args.prompt, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, target_field=args.target_field,
                  as_manifest=args.as_manifest, temperature=args.temperature)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
