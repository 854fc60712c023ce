#!/usr/bin/env python3
"""Score audio-visual multiple-choice hypotheses with Daily-Omni's or IntentBench's rules.

    python local/score.py --hyp exp/x/hyp.jsonl --manifest data/test.jsonl [--out exp/x/score.json]

Inputs: the manifest (JSONL rows with ``key`` and ``answer``, plus ``Type``, ``problem_type``,
``duration`` / ``video_duration`` when they exist) and the hypotheses written by
``python -m core.bin.decode`` (JSONL lines ``{"key": ..., "text": ...}``). Every manifest key needs
exactly one hypothesis and every hypothesis a manifest row; otherwise an error names the keys.

The rule of a row follows its ``problem_type`` (IntentBench's), and is Daily-Omni's without one
(the synthetic set, Daily-Omni):

- letter (Daily-Omni): ``extract_letter(text)``: the answer is the content of the ``<answer>`` tag
  when there is one, else the output without its ``<think>`` reasoning
  (``core.rewards.extract_answer``); its letter is an A-D at its start (``B``, ``b``, ``B.``,
  ``(B)``, ``B) red``) not followed by a letter or digit, else the capital letter after "answer
  is" / "answer:" / "option" / "choice" ("Based on the video, the answer is B." is B), compared
  with the answer letter. Outputs without one count as unparsed (and wrong).
- ``multiple choice`` (IntentBench, HumanOmniV2's ``eval_humanomniv2.py``): the extracted answer
  equals the answer exactly after stripping spaces.
- ``emer_ov_mc``: F1 between the comma-separated letter sets of the prediction and the answer
  (each item stripped and read as a letter, so "A, C" counts like "A,C"; the official code does not
  strip).
- ``judge``: the first "yes" or "no" word of the prediction agrees with the answer's (the official
  code checks substrings, so there "I do not know" holds "no").

Official scores (``acc_official``, beside our lenient ``acc``), each exactly the benchmark's own
code on the predictions file we write (``official_predictions`` writes it):

- Daily-Omni (rows without ``problem_type``; github.com/Lliar-liar/Daily-Omni,
  ``test_model_api/test_utils.py`` ``evaluate_answer``): the item is right iff the model's answer
  (``model_answer``: the ``<answer>`` content, else the output without reasoning, as above),
  stripped and upper-cased, starts with the answer letter. So "b", "B. a red car" and
  "<think>...</think><answer>B</answer>" (the file holds "B") are right, "(B)" and "The answer is
  B." are wrong, and "Based on the video, the answer is C." counts as B. File: ``dailyomni_predictions.json``, a list of the ``qa.json`` fields
  (``video_id``, ``Question``, ``Choice``, ``Answer``, ``Type``, ``video_category``,
  ``video_duration``) with ``model_answer`` and ``correct``.
- IntentBench (rows with ``problem_type``; github.com/HumanMLLM/HumanOmniV2,
  ``eval/eval_humanomniv2.py``): the prediction is the FIRST ``<answer>...</answer>`` block of the
  raw output (ours takes the last); ``multiple choice``: equal after stripping, case-sensitive
  ("a" and "(A)" are wrong); ``emer_ov_mc``: both split on "," without stripping, score
  ``2 |P & G| / (len(P) + len(G))`` ("A, E" scores 0.5 against "A,E"); ``judge``: 1 when both
  contain the substring "yes", else when both contain "no" (so "Nope", "I don't know" and
  "cannot tell" agree with "No"), else 0. One departure: where an output has no ``<answer>``
  block the official script falls back to a leftover variable (another item's output); here
  the item's own whole output is used. File: ``intentbench_results.json`` in the official
  script's layout, ``{"results": [{...the record, "output", "prediction", "reward"}],
  "final_acc": [{"mean_acc"}]}``.

Output (``--out``, JSON)::

    {"acc", "acc_official", "n", "unparsed", "by_type": {Type: {"acc", "n"}}, "by_duration": {bucket: {"acc", "n"}},
     "by_rule": {...}, "format_rate", "pred_dist": {Type: {prediction: count}}}

``acc`` is the mean score in [0, 1] (the F1 for ``emer_ov_mc`` rows). ``by_type`` groups by the
row's ``Type`` (else ``problem_type``); ``by_duration`` by ``video_duration`` (Daily-Omni's
"30s" / "60s") or else ``duration`` rounded to whole seconds ("2s"); a breakdown is empty when no
row has its field. ``unparsed`` counts predictions the rule could not read (no letter, no letter
set, no yes/no, an empty answer). ``pred_dist`` shows the most frequent predictions per type, to
show a policy collapsing onto one letter.

``extract_letter`` / ``letter_set`` / ``yes_no`` / ``score_one`` are meant for the reward side too.

Left out: LLM-judge matching, per-sample dumps, confidence intervals, IntentBench's numerical and
regression types.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from core.rewards import extract_answer, get_reward
from tools.bootstrap import ratio_ci
from tools.hyps import check_alignment, jsonl_objects, read_hyps

RULES = ("letter", "multiple choice", "emer_ov_mc", "judge")
TOP_PREDICTIONS = 5
_LEAD_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Za-z])(?![A-Za-z0-9])")
_NAMED_LETTER = re.compile(r"(?i:\banswer\s*(?:is|:)|\boption|\bchoice)\s*:?\s*[(\[]?([A-Z])(?![A-Za-z0-9])")
_FIRST_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


# ----------------------------------------------------------------------------- rules

def extract_letter(text: str, letters: str = "ABCD") -> str | None:
    """The option letter an output answers with (uppercase), or None.

    The answer is ``core.rewards.extract_answer(text)`` (the last ``<answer>`` block, else the text
    without reasoning); its letter is the first character if it is one of ``letters`` in any case,
    optionally after "(" or "[", and not followed by a letter or digit; else the first capital
    letter named after "answer is", "answer:", "option" or "choice".
    """
    ans = extract_answer(text or "")
    for m in (_LEAD_LETTER.match(ans), _NAMED_LETTER.search(ans)):
        if m and m.group(1).upper() in letters.upper():
            return m.group(1).upper()
    return None


def letter_set(answer: str, letters: str = "ABCDEFGHIJ") -> set[str]:
    """The letters of a comma-separated answer ("A,C", "a, c", "(A), C."); items that are not a
    letter are dropped."""
    out = set()
    for item in str(answer).split(","):
        m = _LEAD_LETTER.match(item)
        if m and m.group(1).upper() in letters:
            out.add(m.group(1).upper())
    return out


def f1(pred: set, ref: set) -> float:
    """F1 of two sets (0.0 when either is empty)."""
    tp = len(pred & ref)
    if not pred or not ref or not tp:
        return 0.0
    p, r = tp / len(pred), tp / len(ref)
    return 2 * p * r / (p + r)


def yes_no(answer: str) -> str | None:
    """"yes" or "no": the first such word of ``answer`` (any case), else None."""
    m = _YES_NO.search(str(answer))
    return m.group(1).lower() if m else None


def rule_of(row: Mapping) -> str:
    """``letter`` for rows without IntentBench's ``problem_type``, else that type."""
    pt = row.get("problem_type")
    if pt is None:
        return "letter"
    if pt not in RULES[1:]:
        raise ValueError(f"row {row.get('key')!r}: unknown problem_type {pt!r}; one of {', '.join(RULES[1:])}")
    return str(pt)


def score_one(text: str, row: Mapping) -> tuple[float, bool, str]:
    """(score in [0, 1], parsed, prediction) of one output for one row."""
    rule, answer = rule_of(row), str(row["answer"])
    if rule == "letter":
        n = len(row.get("choices") or []) or 4
        pred = extract_letter(text, "ABCDEFGHIJ"[:max(n, 4)])
        gold = answer.strip().upper()
        return (1.0 if pred is not None and pred == gold else 0.0), pred is not None, pred or ""
    pred_text = extract_answer(text or "").strip()
    if rule == "multiple choice":
        return (1.0 if pred_text and pred_text == answer.strip() else 0.0), bool(pred_text), pred_text
    if rule == "emer_ov_mc":
        pred = letter_set(pred_text)
        return f1(pred, letter_set(answer)), bool(pred), ",".join(sorted(pred))
    pred = yes_no(pred_text)
    return (1.0 if pred is not None and pred == yes_no(answer) else 0.0), pred is not None, pred or ""


# ----------------------------------------------------------------------------- official rules

def dailyomni_official(model_answer: str, answer: str) -> bool:
    """Daily-Omni's ``evaluate_answer``: the stripped, upper-cased answer starts with the letter."""
    if not isinstance(model_answer, str) or not model_answer:
        return False
    return model_answer.strip().upper().startswith(str(answer).strip().upper())


def intentbench_first_answer(text: str) -> str:
    """HumanOmniV2's extraction: the first ``<answer>`` block's content, stripped, else ""."""
    m = _FIRST_ANSWER.search(text or "")
    return m.group(1).strip() if m else ""


def intentbench_official(output: str, answer: str, problem_type: str) -> tuple[float, str]:
    """(reward, prediction) of HumanOmniV2's ``reward_fn`` for one IntentBench output."""
    pred = intentbench_first_answer(output) or (output or "")  # see the module docstring
    gt = intentbench_first_answer(answer) or str(answer)
    if problem_type == "multiple choice":
        return (1.0 if pred.strip() == gt.strip() else 0.0), pred
    if problem_type == "emer_ov_mc":
        p, g = pred.split(","), gt.split(",")
        return 2 * len(set(p) & set(g)) / (len(p) + len(g)), pred
    if problem_type == "judge":
        pl, gl = pred.lower(), gt.lower()
        return (1.0 if ("yes" in pl and "yes" in gl) or ("no" in pl and "no" in gl) else 0.0), pred
    raise ValueError(f"unknown problem_type {problem_type!r}; one of {', '.join(RULES[1:])}")


DAILYOMNI_FIELDS = ("video_id", "Question", "Choice", "Answer", "Type", "video_category", "video_duration")


def official_predictions(rows: Sequence[Mapping], hyps: Mapping[str, str]) -> dict:
    """The files each benchmark's own code reads, with its scores.

    Returns ``{"dailyomni": [items] | None, "intentbench": {"results", "final_acc"} | None,
    "scores": [per-row official score]}`` (rows in order; a set without rows is None).
    """
    check_alignment(rows, hyps)
    daily, ib, scores = [], [], []
    for r in rows:
        text = hyps[r["key"]]
        if rule_of(r) == "letter":
            model_answer = extract_answer(text or "")
            ok = dailyomni_official(model_answer, r["answer"])
            choices = r.get("choices") or []
            item = {"video_id": r.get("video_id", r["key"]), "Question": r.get("question"),
                    "Choice": [f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(choices)],
                    "Answer": r["answer"], "Type": r.get("Type"), "video_category": r.get("video_category"),
                    "video_duration": r.get("video_duration"), "model_answer": model_answer, "correct": ok}
            daily.append(item)
            scores.append(1.0 if ok else 0.0)
        else:
            reward, pred = intentbench_official(text, r["answer"], r["problem_type"])
            rec = {k: v for k, v in r.items() if k not in ("video",)}
            ib.append({**rec, "video": r.get("video"), "output": text, "prediction": pred, "reward": reward})
            scores.append(reward)
    ib_file = None
    if ib:
        ib_file = {"results": ib, "final_acc": [{"mean_acc": sum(x["reward"] for x in ib) / len(ib)}]}
    return {"dailyomni": daily or None, "intentbench": ib_file, "scores": scores}


# ----------------------------------------------------------------------------- scoring

def duration_bucket(row: Mapping) -> str | None:
    """Daily-Omni's ``video_duration`` ("30s"), else ``duration`` rounded to seconds ("2s"), else None."""
    vd = row.get("video_duration")
    if vd is not None and str(vd).strip():
        return str(vd).strip()
    d = row.get("duration")
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return f"{int(round(d))}s"
    return None


def _acc(values: list[float]) -> dict:
    return {"acc": sum(values) / len(values) if values else 0.0, "n": len(values)}


def score(rows: Sequence[Mapping], hyps: Mapping[str, str]) -> dict:
    """Accuracy, its breakdowns and the unparsed count (see the module docstring for the keys).

    Raises:
        ValueError: keys that do not match, rows without an answer, an unknown problem_type.
    """
    check_alignment(rows, hyps)
    no_answer = [r["key"] for r in rows if r.get("answer") is None or not str(r["answer"]).strip()]
    if no_answer:
        more = f" ... and {len(no_answer) - 10} more" if len(no_answer) > 10 else ""
        raise ValueError(f"{len(no_answer)} row(s) have no answer to score against: "
                         f"{', '.join(no_answer[:10])}{more}")
    values, parsed, preds = [], [], []
    for r in rows:
        v, ok, p = score_one(hyps[r["key"]], r)
        values.append(v)
        parsed.append(ok)
        preds.append(p)
    official = official_predictions(rows, hyps)["scores"]
    out = {**_acc(values), "acc_official": sum(official) / len(official), "unparsed": sum(not p for p in parsed)}
    out["acc_ci95"] = ratio_ci(values)["ci95"]  # bootstrap over the questions (tools/bootstrap.py)
    out["per_item"] = {r["key"]: v for r, v in zip(rows, values)}  # for paired comparisons
    groups = {"by_type": lambda r: r.get("Type", r.get("problem_type")),
              "by_duration": duration_bucket,
              "by_rule": rule_of}
    for name, fn in groups.items():
        keys = [fn(r) for r in rows]
        g: dict[str, list[float]] = defaultdict(list)
        go: dict[str, list[float]] = defaultdict(list)
        if any(k is not None for k in keys):
            for k, v, o in zip(keys, values, official):
                g[str(k) if k is not None else "(none)"].append(v)
                go[str(k) if k is not None else "(none)"].append(o)
        out[name] = {k: {**_acc(g[k]), "acc_official": _acc(go[k])["acc"]} for k in sorted(g)}
    fmt = get_reward("format")([hyps[r["key"]] for r in rows])
    out["format_rate"] = sum(fmt) / len(fmt) if fmt else 0.0
    dist: dict[str, Counter] = defaultdict(Counter)
    for r, p in zip(rows, preds):
        dist[str(r.get("Type", r.get("problem_type")) or "(none)")][p[:40] or "(unparsed)"] += 1
    out["pred_dist"] = {t: dict(dist[t].most_common(TOP_PREDICTIONS)) for t in sorted(dist)}
    return out


# ----------------------------------------------------------------------------- files

def read_rows(path: str | os.PathLike) -> list[dict]:
    """Manifest rows (only ``key`` and ``answer`` are checked); ValueError naming ``file:line`` and
    the field for every bad line at once. Media are not opened."""
    rows, problems, seen = [], [], {}
    for lineno, rec in jsonl_objects(path, problems, prefix="json: "):
        key = rec.get("key")
        if not isinstance(key, str) or not key.strip():
            problems.append(f"{path}:{lineno}: key: missing or not a non-empty string")
        elif key in seen:
            problems.append(f"{path}:{lineno}: key: duplicate key {key!r} (first on line {seen[key]})")
        else:
            seen[key] = lineno
        if not isinstance(rec.get("answer"), str) or not rec["answer"].strip():
            problems.append(f"{path}:{lineno}: answer: missing or not a non-empty string")
        pt = rec.get("problem_type")
        if pt is not None and pt not in RULES[1:]:
            problems.append(f"{path}:{lineno}: problem_type: {pt!r} is not one of {', '.join(RULES[1:])}")
        rows.append(rec)
    if problems:
        raise ValueError(f"{path}: {len(problems)} bad line(s):\n" + "\n".join(problems[:50]))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def write_official(folder: str | os.PathLike, rows: Sequence[Mapping], hyps: Mapping[str, str]) -> list[Path]:
    """Writes ``dailyomni_predictions.json`` and/or ``intentbench_results.json`` into ``folder``."""
    off = official_predictions(rows, hyps)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, obj in (("dailyomni_predictions.json", off["dailyomni"]), ("intentbench_results.json", off["intentbench"])):
        if obj is not None:
            (folder / name).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            written.append(folder / name)
    return written


def format_table(res: dict) -> str:
    lines = [f"acc {100 * res['acc']:.2f}% over {res['n']} (unparsed {res['unparsed']}, "
             f"format ok {100 * res['format_rate']:.1f}%); official rules {100 * res['acc_official']:.2f}%"]
    for name in ("by_type", "by_duration", "by_rule"):
        if res[name]:
            lines.append(f"{name[3:]}:")
            width = max(len(g) for g in res[name])
            lines += [f"  {g:<{width}}  {100 * v['acc']:6.2f}%  {v['n']:>5}" for g, v in res[name].items()]
    for t, dist in res["pred_dist"].items():
        lines.append(f"top predictions [{t}]: " + ", ".join(f"{a!r}: {n}" for a, n in dist.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyp", required=True, help="hypotheses from core.bin.decode (JSONL key/text)")
    ap.add_argument("--manifest", required=True, help="test manifest (JSONL)")
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--official_dir", help="write dailyomni_predictions.json / intentbench_results.json here")
    args = ap.parse_args(argv)
    try:
        rows, hyps = read_rows(args.manifest), read_hyps(args.hyp)
        res = score(rows, hyps)
        if args.official_dir:
            write_official(args.official_dir, rows, hyps)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, args.out)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
