#!/usr/bin/env python3
"""Tokenizer and models of a recipe's first stage (asr, audio_caption, audio_qa): a byte-level BPE
tokenizer trained on the recipe's text, then a teacher and a smaller student
``Qwen2AudioForConditionalGeneration`` built from the sizes in the recipe's ``conf/models.yaml``.

    python -m tools.build_models --conf conf/models.yaml --text data/text_corpus.txt --exp exp [--seed 0]

(``run.sh`` sets PYTHONPATH to the repository root.) Writes ``<exp>/tokenizer``,
``<exp>/teacher_init``, ``<exp>/student_init`` and ``<exp>/models.json`` (per model: its folder,
whether it was built, its parameter count and sizes).

``conf/models.yaml`` keys: ``tokenizer: {vocab_size}``, ``chunk_seconds``, ``teacher`` and
``student`` (keyword arguments of ``core.models.build_tiny_qwen2_audio``: hidden sizes, layers ...),
``teacher_dir`` / ``student_dir``, ``student_from_teacher``. A model whose ``*_dir`` is set is not
built: the directory is checked (it must hold a config.json) and linked as ``<exp>/<name>_init``.
Teacher and student share one tokenizer; with two existing directories their vocabularies are
checked to agree.

With a ``teacher_dir`` and no ``student_dir`` the student is made from the teacher
(``core.models.student_from_teacher``): its decoder layers 0, k, 2k, ... (``student_from_teacher:
{keep_every: k, audio_keep_every: 1}``, default k = 2), initialised from the teacher's, with the
teacher's tokenizer and processor; no tokenizer is trained.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml


def planned_teacher(conf: dict) -> dict:
    """What stage 1 makes the teacher from a models conf, without building it: ``{"dir": DIR}``
    for an existing checkpoint (``teacher_dir``), else ``{"head_size", "mel_frames"}`` of the model
    its sizes build (what a server needs to know before it is started)."""
    if conf.get("teacher_dir"):
        return {"dir": conf["teacher_dir"]}
    sizes = conf.get("teacher") or {}
    return {"head_size": int(sizes.get("hidden", 64)) // int(sizes.get("heads", 4)),
            "mel_frames": int(conf.get("chunk_seconds", 3)) * 100}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", required=True, help="conf/models.yaml")
    ap.add_argument("--text", required=True, help="text corpus for the tokenizer (one utterance a line)")
    ap.add_argument("--exp", required=True, help="experiment dir: writes teacher_init/ and student_init/")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from core.models import (build_tiny_qwen2_audio, check_vocab_match, count_parameters,
                             load_model_and_processor, student_from_teacher, train_tokenizer)
    from core.utils.logging import setup_console
    setup_console()

    conf = yaml.safe_load(open(args.conf))
    allowed = {"teacher_dir", "student_dir", "tokenizer", "chunk_seconds", "teacher", "student",
               "student_from_teacher"}
    bad = set(conf) - allowed
    if bad:
        raise SystemExit(f"{args.conf}: unknown keys {sorted(bad)}; valid: {sorted(allowed)}")
    exp = Path(args.exp)
    exp.mkdir(parents=True, exist_ok=True)
    info = {}
    tok = None
    derive = bool(conf.get("teacher_dir")) and not conf.get("student_dir")
    shrink = dict(conf.get("student_from_teacher") or {})
    bad = set(shrink) - {"keep_every", "audio_keep_every"}
    if bad:
        raise SystemExit(f"{args.conf}: student_from_teacher: unknown keys {sorted(bad)}; valid: "
                         "['audio_keep_every', 'keep_every']")
    if not conf.get("teacher_dir"):  # a model built from config: a tokenizer trained on the recipe's text
        texts = [t.strip() for t in open(args.text, encoding="utf-8") if t.strip()]
        tok = train_tokenizer(texts, conf["tokenizer"]["vocab_size"], exp / "tokenizer")
        info["vocab_size"] = len(tok)
    for i, name in enumerate(("teacher", "student")):
        out = exp / f"{name}_init"
        given = conf.get(f"{name}_dir")
        if given:
            if not (Path(given) / "config.json").is_file():
                raise SystemExit(f"{args.conf}: {name}_dir={given} is not a model directory (no config.json)")
            if out.is_symlink():
                out.unlink()
            elif out.exists():  # a model an earlier run built (another models conf)
                shutil.rmtree(out)
            os.symlink(Path(given).resolve(), out)
            info[name] = {"dir": str(Path(given).resolve()), "built": False}
            continue
        if name == "student" and derive:  # a smaller student made of the teacher's own layers
            if out.is_symlink():
                out.unlink()
            kept = student_from_teacher(exp / "teacher_init", out, keep_every=int(shrink.get("keep_every", 2)),
                                        audio_keep_every=int(shrink.get("audio_keep_every", 1)))
            info[name] = {"dir": str(out), "built": True, "from_teacher": kept}
            continue
        sizes = dict(conf[name])
        model, _ = build_tiny_qwen2_audio(tok, chunk_seconds=conf.get("chunk_seconds", 3),
                                          seed=args.seed + i, out_dir=out, **sizes)
        info[name] = {"dir": str(out), "built": True, "parameters": count_parameters(model), **sizes}
    if conf.get("teacher_dir") or conf.get("student_dir"):
        _, tp = load_model_and_processor(exp / "teacher_init")
        _, sp = load_model_and_processor(exp / "student_init")
        try:
            check_vocab_match(sp, tp)
        except ValueError as e:
            raise SystemExit(f"{args.conf}: {e} (set teacher_dir alone to make the student from the teacher)")
    (exp / "models.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
