#!/usr/bin/env python3
"""Score multiple-choice hypotheses against a QA manifest, with MMAU's or MMSU's rule.

    python local/score.py --manifest data/mmau_test.jsonl --hyp exp/x/hyp.jsonl \\
        --out exp/x/results.json [--rule mmau|mmsu] [--mmau_out exp/x/mmau_predictions.json]

Inputs: the manifest (JSONL: key, audio, question, choices, answer, category, sub_category,
difficulty, ...) and the hypotheses written by ``python -m core.bin.decode`` (JSONL lines
``{"key": ..., "text": ...}``). Every manifest key needs exactly one hypothesis and every
hypothesis a manifest row; otherwise an error names the missing keys.

The predicted answer of a hypothesis is ``core.rewards.extract_answer(text)`` (the last
``<answer>`` block, else the text without its reasoning). Rules:

- ``mmau`` (default): MMAU's official ``string_match`` (the ``mcq_accuracy`` reward): the
  prediction holds every word of the answer and no word that only a wrong choice has. A bare
  option letter ("B", "(B)") counts as that choice's text unless ``--no_letters`` or the
  prediction already names a choice ("A" for the choice "a"); the official script has no such
  mapping. ``acc_official`` beside ``acc`` is what MMAU's own ``evaluation.py``
  (github.com/Sakshi113/MMAU) computes on the ``--mmau_out`` file we write: ``string_match`` of
  each item's ``model_output`` (the predicted answer as the model gave it, no letter mapping)
  against its ``answer`` and ``choices``, over every item. So a letter answer is right in ``acc``
  and wrong in ``acc_official``, as MMAU's leaderboard would score it; ``official_warnings`` lists
  rows whose ``task`` (sound | music | speech) or ``difficulty`` (easy | medium | hard) the official
  script cannot tabulate (it stops with a KeyError on them).
- ``mmsu``: MMSU's official ``mmsu_evaluation.py`` (github.com/dingdongwang/MMSU): newlines
  removed; the letter is the first character if it is one of A-D, else the second-to-last
  character if it is one of A-D ("The answer is B.", "(B)"); ``choices[letter]`` must equal the
  answer string exactly. Letters are uppercase only. The official script leaves a non-empty
  response without such a letter out of the denominator; here it counts as wrong, and
  ``n_unparsed`` / ``acc_official`` (accuracy without them) are reported beside ``acc``.

Output (``--out``, JSON)::

    {"rule", "acc", "acc_ci95", "acc_official", "n", "by_category": {cat: {"acc", "n"}}, "by_task":
     {sub_category: ...}, "by_difficulty": {...}, "by_domain": {...}, "format_rate", "answer_dist":
     {category: {answer: count}}, "per_item": {key: 1 | 0}, ["official_warnings"], ["n_unparsed"]}

``acc_ci95``: the 95% bootstrap interval of ``acc`` over the questions (``tools/bootstrap.py``);
``per_item``: each question right (1) or not, for paired comparisons between systems.

Accuracies are fractions in [0, 1]. A breakdown is empty when no row has its field (rows
lacking it are grouped under "(none)" otherwise); ``by_domain`` groups by ``domain`` (MMAU's
sound | music | speech). ``format_rate`` is the share of hypotheses the ``format`` reward
accepts; ``answer_dist`` lists the most frequent predicted answers per category, to show a
policy collapsing onto one answer.

``--mmau_out`` writes the input of MMAU's official ``evaluation.py --input``: a JSON list with
MMAU's fields (id, audio_id, question, choices, answer, dataset, task, split, category,
sub-category, difficulty; taken from what ``prepare_mmau.py`` kept, else from key, audio,
sub_category) plus ``model_output`` = the predicted answer. It is written before scoring, so a
test-split manifest without answers still gives a file to submit; scoring then stops with an
error naming the rows without an answer.

Left out: LLM-judge matching, per-sample result dumps, confidence intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from core.rewards import extract_answer, get_reward, string_match
from tools.bootstrap import ratio_ci
from tools.hyps import check_alignment, keys_preview, read_hyps

RULES = ("mmau", "mmsu")
GROUPS = {"by_category": "category", "by_task": "sub_category", "by_difficulty": "difficulty",
          "by_domain": "domain"}
TOP_ANSWERS = 5


# ----------------------------------------------------------------------------- MMSU rule

def mmsu_letter(prediction: str) -> str | None:
    """MMSU's letter: the first character if in A-D, else the second-to-last if in A-D, else None."""
    p = prediction.strip().replace("\n", "")
    if p and p[0] in "ABCD":
        return p[0]
    if len(p) > 1 and p[-2] in "ABCD":
        return p[-2]
    return None


def mmsu_correct(prediction: str, answer: str, choices: Sequence[str]) -> bool:
    """MMSU's rule: the letter's choice text equals the answer (a letter past the choices is wrong)."""
    letter = mmsu_letter(prediction)
    if letter is None:
        return False
    i = "ABCD".index(letter)
    return i < len(choices) and choices[i] == answer


def _mmsu_unparsed(prediction: str) -> bool:
    """A response MMSU's script skips (non-empty, not "None", no letter found)."""
    p = prediction.strip().replace("\n", "")
    return bool(p) and p != "None" and mmsu_letter(p) is None


# ----------------------------------------------------------------------------- scoring

def _acc(correct: list[bool]) -> dict:
    return {"acc": sum(correct) / len(correct) if correct else 0.0, "n": len(correct)}


def score(rows: Sequence[Mapping], hyps: Mapping[str, str], rule: str = "mmau", *,
          letters: bool = True) -> dict:
    """Accuracy and its breakdowns (see the module docstring for the output's keys).

    Args:
        rows: manifest rows (``key``, ``choices``, ``answer``, and the grouping fields).
        hyps: ``{key: hypothesis text}``, one per row.
        rule: ``mmau`` or ``mmsu``.
        letters: with ``mmau``, map a bare option letter to its choice first.

    Raises:
        ValueError: an unknown rule, keys that do not match, or rows without an answer.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    check_alignment(rows, hyps)
    no_answer = [r["key"] for r in rows if not r.get("answer")]
    if no_answer:
        raise ValueError(f"{len(no_answer)} row(s) have no answer, nothing to score them against "
                         f"(e.g. a test split whose answers are withheld; submit the --mmau_out "
                         f"file instead): {keys_preview(no_answer)}")
    texts = [hyps[r["key"]] for r in rows]
    preds = [extract_answer(t) for t in texts]
    if rule == "mmau":
        values = get_reward("mcq_accuracy")(texts, answer=[r["answer"] for r in rows],
                                            choices=[r["choices"] for r in rows], letters=letters)
        correct = [v == 1.0 for v in values]
        official = mmau_official(mmau_items(rows, hyps))
    else:
        correct = [mmsu_correct(p, r["answer"], r["choices"]) for p, r in zip(preds, rows)]

    out = {"rule": rule, **_acc(correct)}
    out["acc_ci95"] = ratio_ci([float(c) for c in correct])["ci95"]  # bootstrap over the questions
    out["per_item"] = {r["key"]: int(c) for r, c in zip(rows, correct)}
    if rule == "mmau":
        out["acc_official"] = official["acc"]
        if official["warnings"]:
            out["official_warnings"] = official["warnings"]
    for name, field in GROUPS.items():
        groups: dict[str, list[bool]] = defaultdict(list)
        if any(r.get(field) is not None for r in rows):
            for r, c in zip(rows, correct):
                groups[str(r.get(field) if r.get(field) is not None else "(none)")].append(c)
        out[name] = {g: _acc(groups[g]) for g in sorted(groups)}
    fmt = get_reward("format")(texts)
    out["format_rate"] = sum(fmt) / len(fmt) if fmt else 0.0
    dist: dict[str, Counter] = defaultdict(Counter)
    for r, p in zip(rows, preds):
        dist[str(r.get("category") or "(none)")][p[:80]] += 1
    out["answer_dist"] = {c: dict(dist[c].most_common(TOP_ANSWERS)) for c in sorted(dist)}
    if rule == "mmsu":
        unparsed = [_mmsu_unparsed(p) for p in preds]
        out["n_unparsed"] = sum(unparsed)
        kept = [c for c, u in zip(correct, unparsed) if not u]
        out["acc_official"] = _acc(kept)["acc"]
    return out


MMAU_TASKS = ("sound", "music", "speech")
MMAU_DIFFICULTIES = ("easy", "medium", "hard")


def mmau_official(items: Sequence[Mapping]) -> dict:
    """MMAU's ``evaluation.py`` on a list of its input items: items without ``model_output`` are
    skipped (as there), every other item is right iff ``string_match(answer, model_output,
    choices)``; ``acc`` over the items kept. ``warnings`` names items whose ``task`` or
    ``difficulty`` the official script cannot tabulate."""
    kept = [it for it in items if "model_output" in it]
    right = [string_match(str(it.get("answer", "")), str(it["model_output"] or ""),
                          [str(c) for c in it.get("choices") or []]) for it in kept]
    warnings = []
    for it in kept:
        if it.get("task") not in MMAU_TASKS or it.get("difficulty") not in MMAU_DIFFICULTIES:
            warnings.append(f"{it.get('id')}: task {it.get('task')!r} / difficulty {it.get('difficulty')!r}")
    if warnings:
        warnings = [f"{len(warnings)} item(s) outside MMAU's tasks {MMAU_TASKS} / difficulties "
                    f"{MMAU_DIFFICULTIES}, which its evaluation.py stops on: " + "; ".join(warnings[:5])]
    return {"acc": sum(right) / len(right) if right else 0.0, "n": len(right), "warnings": warnings}


def mmau_items(rows: Sequence[Mapping], hyps: Mapping[str, str]) -> list[dict]:
    """Rows as MMAU's official evaluation input, ``model_output`` = the predicted answer."""
    check_alignment(rows, hyps)
    items = []
    for r in rows:
        item = {
            "id": r.get("mmau_id", r["key"]),
            "audio_id": r.get("audio_id", r.get("audio")),
            "question": r.get("question"),
            "choices": r.get("choices"),
            "answer": r.get("answer"),
            "dataset": r.get("dataset"),
            "task": r.get("domain", r.get("task")),  # MMAU's task (sound|music|speech) is our domain
            "split": r.get("split"),
            "category": r.get("category"),
            "sub-category": r.get("sub_category"),
            "difficulty": r.get("difficulty"),
            "model_output": extract_answer(hyps[r["key"]]),
        }
        if not r.get("answer"):
            del item["answer"]
        items.append(item)
    return items


# ----------------------------------------------------------------------------- files

def format_table(res: dict) -> str:
    lines = [f"rule {res['rule']}: acc {100 * res['acc']:.2f}% over {res['n']} "
             f"(format ok {100 * res['format_rate']:.1f}%)"]
    if res["rule"] == "mmau":
        lines.append(f"  official MMAU evaluation.py on the predictions file: {100 * res['acc_official']:.2f}%")
        lines += [f"  warning: {w}" for w in res.get("official_warnings", [])]
    if "n_unparsed" in res:
        lines.append(f"  unparsed {res['n_unparsed']}; acc without them (official MMSU) "
                     f"{100 * res['acc_official']:.2f}%")
    for name in GROUPS:
        if res[name]:
            lines.append(f"{name[3:]}:")
            width = max(len(g) for g in res[name])
            lines += [f"  {g:<{width}}  {100 * v['acc']:6.2f}%  {v['n']:>5}" for g, v in res[name].items()]
    for cat, dist in res["answer_dist"].items():
        top = ", ".join(f"{a!r}: {n}" for a, n in dist.items())
        lines.append(f"top answers [{cat}]: {top}")
    return "\n".join(lines)


def _write_json(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="rules: mmau = MMAU string_match (+ letters), "
                                        "mmsu = MMSU letter rule; see the module docstring")
    ap.add_argument("--manifest", required=True, help="test manifest (JSONL)")
    ap.add_argument("--hyp", required=True, help="hypotheses from core.bin.decode (JSONL key/text)")
    ap.add_argument("--rule", choices=RULES, default="mmau", help="answer rule (default: %(default)s)")
    ap.add_argument("--no_letters", action="store_true",
                    help="mmau rule: do not map a bare option letter to its choice (as the official script)")
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--mmau_out", help="write MMAU's evaluation.py input (JSON list with model_output)")
    args = ap.parse_args(argv)

    from core.data.manifest import read_manifest
    try:
        rows = read_manifest(args.manifest, require=("question", "choices"), check_media=False)
        hyps = read_hyps(args.hyp)
        check_alignment(rows, hyps)
        if args.mmau_out:
            _write_json(args.mmau_out, mmau_items(rows, hyps))
            print(f"wrote {len(rows)} MMAU evaluation items to {args.mmau_out}")
        res = score(rows, hyps, args.rule, letters=not args.no_letters)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        _write_json(args.out, res)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
