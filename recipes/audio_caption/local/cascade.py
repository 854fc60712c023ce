#!/usr/bin/env python3
"""Cascaded evaluation of captions: a text-only model reads a clip's caption and answers
multiple-choice questions about the clip. A caption that carries what is in the audio lets it
answer; a vague or wrong one does not. Accuracy is scored with MMAU's ``string_match`` rule (the
``mcq_accuracy`` reward of ``core.rewards``).

Caption manifests (rows with references) carry, besides ``key`` and ``text`` (the reference
captions), ``questions: [{"question": str, "choices": [str, ...], "answer": one of choices}, ...]``
(a question may also carry ``category`` or ``type``, used to group the accuracy).

    # training rows for the text model: one per (reference caption, question)
    python local/cascade.py make-train --manifest data/teacher_train.jsonl [--manifest ...] \\
        --out exp/cascade_data/qa_train.jsonl [--refs_per_clip 5]
    # the text model: a tiny Qwen2ForCausalLM sharing the recipe's tokenizer, or a local HF LLM
    python local/cascade.py build --tokenizer exp/student_init --out exp/cascade_init [--hidden 64 --layers 2 --heads 4]
    python local/cascade.py build --model /models/Qwen2.5-1.5B-Instruct [--out exp/cascade_init]
    # train it (SFT: prompt -> answer text)
    python -m core.bin.train --config conf/cascade_sft.yaml model.path=exp/cascade_init \\
        data.train=exp/cascade_data/qa_train.jsonl output_dir=exp/cascade
    # answer the test questions from each clip's hypothesis caption
    python local/cascade.py eval --model exp/cascade/final --hyp exp/decode/x/hyp.jsonl \\
        --manifest data/test.jsonl --out exp/decode/x/cascade.json [--batch_size 64]

``--hyp`` is a ``core.bin.decode`` output (``{"key", "text"}`` lines), or one of two reserved
words: ``refs`` (each clip's first reference caption: the ceiling, what a captioner that writes
like the references would reach) and ``none`` (an empty caption: the floor, what the questions'
wording and the answer priors give without any caption).

The prompt (``render_prompt``) is ``Caption: ...\\nQuestion: ...\\nChoices: a | b | c\\nAnswer:``,
the target the answer's text; the trainer's and decoder's ``TextPromptCollator`` put it in a
user turn of the tokenizer's chat template.

``eval`` writes ``--out`` (JSON)::

    {"acc", "n": questions, "n_clips", "clips_without_questions", "by_question": {group: {"acc", "n"}},
     "caption_source": "hypotheses" | "first_reference" | "none", "captions": path | note,
     "empty_captions", "model", "answers": path of the per-question answers}

and, beside it, ``<out stem>.questions.jsonl`` (the prompts) and ``<out stem>.answers.jsonl``
(``key``, ``text`` = the model's answer, ``ref`` = the right one). ``by_question`` groups by the
question's ``category`` or ``type`` when it has one, else by the question text.

Rows without a ``questions`` field are skipped and counted (``clips_without_questions``); a
malformed ``questions`` field is an error naming ``file:line`` and the item. Left out: open-ended
questions, LLM judges, letter-option prompts, and the training loop itself (``core.bin.train``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence


HYP_MODES = {"refs": "first_reference", "none": "none"}
CAPTION_NOTES = {
    "first_reference": "each clip's first reference caption (the ceiling: a captioner writing like the references)",
    "none": "no caption (the floor: question wording and answer priors only)",
}


def render_prompt(caption: str, q: Mapping) -> str:
    """The text model's prompt for one question about a clip described by ``caption``."""
    return (f"Caption: {caption}\nQuestion: {q['question']}\n"
            f"Choices: {' | '.join(str(c) for c in q['choices'])}\nAnswer:")


# ----------------------------------------------------------------------------- reading

def _line_numbers(path: str | os.PathLike) -> dict[str, int]:
    """key -> line number of a manifest that ``read_manifest`` has already validated."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out[json.loads(line)["key"]] = lineno
    return out


def _check_questions(qs, where: str) -> list[str]:
    if not isinstance(qs, list) or not qs:
        return [f"{where}: questions: must be a non-empty list of {{question, choices, answer}} objects"]
    errs = []
    for j, q in enumerate(qs):
        at = f"{where}: questions[{j}]"
        if not isinstance(q, dict):
            errs.append(f"{at}: must be an object with question, choices, answer")
            continue
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            errs.append(f"{at}.question: must be a non-empty string")
        ch = q.get("choices")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c.strip() for c in ch):
            errs.append(f"{at}.choices: must be a list of at least 2 non-empty strings")
        elif not isinstance(q.get("answer"), str) or q["answer"] not in ch:
            errs.append(f"{at}.answer: {q.get('answer')!r} is not one of the choices {ch}")
    return errs


def read_clips(path: str | os.PathLike, *, need_refs: bool = False) -> tuple[list[dict], int]:
    """``(rows with questions, number of rows without)`` of a caption manifest.

    Raises ``ValueError`` listing every malformed ``questions`` item (and, with ``need_refs``,
    every row with questions but no reference ``text``) as ``file:line: field: problem``;
    ``core.data.manifest.ManifestError`` for the manifest's own fields.
    """
    from core.data.manifest import read_manifest

    rows = read_manifest(path, check_media=False, require_media=False)
    lines = _line_numbers(path)
    errs, kept, without = [], [], 0
    for r in rows:
        if r.get("questions") is None:
            without += 1
            continue
        where = f"{path}:{lines[r['key']]}"
        errs += _check_questions(r["questions"], where)
        if need_refs and r.get("text") is None:
            errs.append(f"{where}: text: the reference captions are required (make-train pairs them with "
                        "the questions)")
        kept.append(r)
    if errs:
        more = f"\n... and {len(errs) - 50} more" if len(errs) > 50 else ""
        raise ValueError(f"{path}: {len(errs)} problem(s):\n" + "\n".join(errs[:50]) + more)
    if not kept:
        raise ValueError(f"{path}: no row has a 'questions' field ({without} rows); the cascade needs "
                         "multiple-choice questions about the clips")
    return kept, without


def references(row: Mapping) -> list[str]:
    t = row.get("text")
    return [t] if isinstance(t, str) else list(t or [])


# ----------------------------------------------------------------------------- make-train

def make_train(manifests: Sequence[str], out: str, *, refs_per_clip: int = 5) -> dict:
    """One text row per (reference caption, question) of every clip with questions; see the docstring."""
    from core.data.manifest import write_manifest

    if refs_per_clip < 1:
        raise ValueError(f"--refs_per_clip must be >= 1, got {refs_per_clip}")
    out_rows, seen, clips, without = [], {}, 0, 0
    for m in manifests:
        rows, n_without = read_clips(m, need_refs=True)
        without += n_without
        for r in rows:
            if r["key"] in seen:
                raise ValueError(f"{m}: key {r['key']!r} is also in {seen[r['key']]}; clip keys must be unique "
                                 "across the manifests")
            seen[r["key"]] = m
            clips += 1
            for i, cap in enumerate(references(r)[:refs_per_clip]):
                for j, q in enumerate(r["questions"]):
                    out_rows.append({"key": f"{r['key']}-r{i}-q{j}", "task": "qa", "prompt": render_prompt(cap, q),
                                     "target": q["answer"], "question": q["question"],
                                     "choices": list(q["choices"]), "answer": q["answer"]})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, out_rows)
    return {"rows": len(out_rows), "clips": clips, "clips_without_questions": without, "out": str(out)}


# ----------------------------------------------------------------------------- build

def build(out: str | None, *, tokenizer: str | None = None, model: str | None = None, hidden: int = 64,
          layers: int = 2, heads: int = 4, seed: int = 0) -> dict:
    """A tiny ``Qwen2ForCausalLM`` on ``tokenizer``'s vocabulary saved to ``out``, or (``model``) a
    check that a local HF text LM directory is there, linked as ``out`` when given."""
    if (tokenizer is None) == (model is None):
        raise ValueError("build: give exactly one of --tokenizer (build a tiny model) or --model (use a local LLM)")
    if model is not None:
        cfg = Path(model) / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"--model {model}: not a model directory (no config.json)")
        if not any((Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise FileNotFoundError(f"--model {model}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        c = json.loads(cfg.read_text())
        info = {"dir": str(Path(model).resolve()), "built": False, "model_type": c.get("model_type", ""),
                "architectures": c.get("architectures", [])}
        if out is not None:
            o = Path(out)
            if o.is_symlink():
                o.unlink()
            elif o.exists():
                raise FileExistsError(f"--out {out} exists and is not a link; remove it first")
            o.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(model).resolve(), o)
            info["linked_as"] = str(o)
        return info
    if out is None:
        raise ValueError("build --tokenizer needs --out")
    from transformers import AutoTokenizer

    from core.models import build_tiny_causal_lm, count_parameters

    if not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such directory")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    m, _ = build_tiny_causal_lm(tok, hidden=hidden, layers=layers, heads=heads, seed=seed, out_dir=out)
    return {"dir": str(out), "built": True, "parameters": count_parameters(m), "hidden": hidden, "layers": layers,
            "heads": heads, "vocab_size": len(tok), "tokenizer": str(tokenizer)}


# ----------------------------------------------------------------------------- eval

def _captions(hyp: str, rows: Sequence[Mapping], manifest: str) -> tuple[dict[str, str], str]:
    if hyp in HYP_MODES:
        mode = HYP_MODES[hyp]
        if mode == "first_reference":
            missing = [r["key"] for r in rows if not references(r)]
            if missing:
                raise ValueError(f"--hyp refs: {len(missing)} clip(s) of {manifest} have questions but no reference "
                                 f"'text': {', '.join(missing[:10])}")
            return {r["key"]: references(r)[0] for r in rows}, mode
        return {r["key"]: "" for r in rows}, mode
    from tools.compute_wer import read_transcripts

    caps = read_transcripts(hyp)
    return caps, "hypotheses"


def evaluate(model_dir: str, hyp: str, manifest: str, out: str, *, batch_size: int = 64,
             max_new_tokens: int = 16) -> dict:
    """Answer every question of every clip of ``manifest`` from its caption; the output is in the
    module docstring (also written to ``out``)."""
    from core.bin.decode import decode
    from core.data.manifest import read_manifest, write_manifest
    from core.rewards import get_reward
    from tools.compute_wer import read_transcripts
    from tools.hyps import check_alignment

    rows, without = read_clips(manifest)
    all_keys = {r["key"] for r in read_manifest(manifest, check_media=False, require_media=False)}
    caps, source = _captions(hyp, rows, manifest)
    if source == "hypotheses":
        check_alignment(rows, caps, known=all_keys, missing=f"clip(s) with questions have no caption in {hyp}",
                        stray=f"caption key(s) of {hyp} are not in {manifest}")
    qrows, groups = [], []
    for r in rows:
        for j, q in enumerate(r["questions"]):
            qrows.append({"key": f"{r['key']}-q{j}", "task": "qa", "prompt": render_prompt(caps[r["key"]], q),
                          "question": q["question"], "choices": list(q["choices"]), "answer": q["answer"]})
            groups.append(str(q.get("category") or q.get("type") or q["question"]))
    outp = Path(out)
    stem = outp.with_suffix("") if outp.suffix == ".json" else outp
    qpath, apath = Path(f"{stem}.questions.jsonl"), Path(f"{stem}.answers.jsonl")
    outp.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(qpath, qrows)
    decode(str(model_dir), str(qpath), str(apath), prompt="{prompt}", batch_size=batch_size,
           max_new_tokens=max_new_tokens, target_field="answer", modality="text")
    answers = read_transcripts(apath)
    texts = [answers[q["key"]] for q in qrows]
    correct = get_reward("mcq_accuracy")(texts, answer=[q["answer"] for q in qrows],
                                         choices=[q["choices"] for q in qrows])
    by: dict[str, list[float]] = defaultdict(list)
    for g, c in zip(groups, correct):
        by[g].append(c)
    res = {"acc": sum(correct) / len(correct), "n": len(correct), "n_clips": len(rows),
           "clips_without_questions": without,
           "by_question": {g: {"acc": sum(v) / len(v), "n": len(v)} for g, v in sorted(by.items())},
           "caption_source": source, "captions": str(hyp) if source == "hypotheses" else CAPTION_NOTES[source],
           "empty_captions": sum(1 for r in rows if not caps[r["key"]].strip()),
           "model": str(model_dir), "answers": str(apath)}
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, out)
    return res


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mt = sub.add_parser("make-train", help="text QA rows: one per (reference caption, question)")
    mt.add_argument("--manifest", action="append", required=True, help="caption manifest with questions (repeatable)")
    mt.add_argument("--out", required=True, help="output manifest (JSONL)")
    mt.add_argument("--refs_per_clip", type=int, default=5, help="use at most this many references of a clip")
    b = sub.add_parser("build", help="the text model: a tiny Qwen2ForCausalLM, or a check of a local LLM")
    b.add_argument("--tokenizer", help="folder holding the recipe's tokenizer (e.g. an audio model's processor folder)")
    b.add_argument("--model", help="an existing local HF text LM directory (instead of building one)")
    b.add_argument("--out", help="where the built model goes (with --model: a link to it, optional)")
    b.add_argument("--hidden", type=int, default=64)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="answer the test questions from captions, score them")
    e.add_argument("--model", required=True, help="the trained text model (save_pretrained folder)")
    e.add_argument("--hyp", required=True, help="captions (core.bin.decode JSONL), or 'refs' (first reference "
                                                "caption: the ceiling) or 'none' (no caption: the floor)")
    e.add_argument("--manifest", required=True, help="test manifest with questions")
    e.add_argument("--out", required=True, help="results JSON")
    e.add_argument("--batch_size", type=int, default=64)
    e.add_argument("--max_new_tokens", type=int, default=16)
    args = ap.parse_args(argv)

    try:  # ManifestError is a ValueError
        if args.cmd == "make-train":
            info = make_train(args.manifest, args.out, refs_per_clip=args.refs_per_clip)
        elif args.cmd == "build":
            info = build(args.out, tokenizer=args.tokenizer, model=args.model, hidden=args.hidden,
                         layers=args.layers, heads=args.heads, seed=args.seed)
        else:
            res = evaluate(args.model, args.hyp, args.manifest, args.out, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens)
            info = {k: res[k] for k in ("acc", "n", "n_clips", "caption_source")}
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
