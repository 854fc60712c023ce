#!/usr/bin/env python3
"""Stage 1a of the audio_visual_grpo recipe: a byte-level BPE tokenizer with the Omni specials,
then a tiny ``Qwen2_5OmniThinkerForConditionalGeneration`` and its ``Qwen2_5OmniProcessor``
built from the sizes in ``conf/models.yaml``, saved as ``<exp>/init``.

With ``model_dir`` set in the YAML (a local Qwen2.5-Omni thinker directory: a ``config.json``
whose model type the core loads), nothing is built: the directory is checked and linked as
``<exp>/init``. Left out: loading the talker or the token2wav parts of a full Omni checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ALLOWED = {"model_dir", "tokenizer", "chunk_seconds", "thinker"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", required=True, help="conf/models.yaml")
    ap.add_argument("--text", required=True, help="text corpus for the tokenizer (one line per prompt/target)")
    ap.add_argument("--exp", required=True, help="experiment dir: writes init/ and model.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from core.models import build_tiny_omni_thinker, count_parameters, train_tokenizer
    from core.utils.logging import setup_console
    setup_console()

    conf = yaml.safe_load(open(args.conf)) or {}
    bad = set(conf) - ALLOWED
    if bad:
        raise SystemExit(f"{args.conf}: unknown keys {sorted(bad)}; valid: {sorted(ALLOWED)}")
    exp = Path(args.exp)
    exp.mkdir(parents=True, exist_ok=True)
    out = exp / "init"
    if out.is_symlink():
        out.unlink()
    given = conf.get("model_dir")
    if given:
        if not (Path(given) / "config.json").is_file():
            raise SystemExit(f"{args.conf}: model_dir={given} is not a model directory (no config.json)")
        os.symlink(Path(given).resolve(), out)
        info = {"dir": str(Path(given).resolve()), "built": False}
    else:
        texts = [t.strip() for t in open(args.text, encoding="utf-8") if t.strip()]
        if not texts:
            raise SystemExit(f"{args.text}: no text to train the tokenizer on")
        tok = train_tokenizer(texts, conf["tokenizer"]["vocab_size"], exp / "tokenizer", omni=True)
        sizes = dict(conf.get("thinker") or {})
        try:
            model, _ = build_tiny_omni_thinker(tok, chunk_seconds=conf.get("chunk_seconds", 4), seed=args.seed,
                                               out_dir=out, **sizes)
        except TypeError as e:
            raise SystemExit(f"{args.conf}: thinker: {e}") from None
        info = {"dir": str(out), "built": True, "vocab_size": len(tok), "parameters": count_parameters(model), **sizes}
    (exp / "model.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
