#!/usr/bin/env python3
"""Last stage of the audio_qa recipe: greedy-decode the test questions with every trained model,
score them (MMAU's rule, or MMSU's with ``--rule mmsu``), and report.

Writes, under ``<exp>``: ``decode/<system>/hyp.jsonl``, ``score.json`` (accuracy overall and by
category, task and difficulty, format rate, most frequent answers) and ``mmau_predictions.json``
(the input of MMAU's official ``evaluation.py``); ``results.json``; training-reward curves in
``plots/``. Prints the table and writes it to ``<exp>/RESULTS.md``; with ``--readme``
(``run.sh --update_readme true``) also into that README between the ``results`` markers.

Systems: ``base`` (the SFT-warmed policy), ``grpo``, ``rest``, ``opd`` (each trained from the
base), the baseline ``sft_answers`` (plain SFT on the answers, same base, equal compute) and the
teacher before and after its GRPO (with ``--teacher_url``, the served teacher instead, decoded
through the server's ``/v1/audio/transcriptions``). A system whose model is missing is skipped
with a note, except ``base``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tools.bootstrap import describe_diff, differences, fmt_ci, score_items
from tools.local_module import load_sibling
from tools.report import write_results
from tools.step_budget import compute_line, compute_settings

SYSTEMS = {"base": ("base_sft", "SFT warm-up: describe every clip + labelled questions"),
           "grpo": ("grpo", "GRPO from base (format + MMAU-rule accuracy rewards)"),
           "rest": ("rest", "ReST from base (sample, keep the correct, SFT; rounds)"),
           "opd": ("opd", "OPD from base, teacher = teacher_grpo")}
BASELINES = {"sft_answers": ("sft_answers", "plain SFT on the answers, from base, equal compute")}
TEACHERS = {"teacher_sft": ("teacher_sft", "bigger teacher after its SFT warm-up"),
            "teacher_grpo": ("teacher_grpo", "the teacher after GRPO (OPD's teacher)"),
            "teacher_served": ("teacher_served", "the teacher at --teacher_url (OPD's teacher)")}


def load_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def decode_and_score(name: str, model_dir: Path | str, test: Path, exp: Path, rule: str, max_new_tokens: int,
                     url: str = "", served_model: str = "") -> dict:
    """Decode ``test`` with ``model_dir`` (or the server at ``url``, with its own length limit),
    write the MMAU-format predictions, then score them (only the predictions when the test set's
    answers are withheld)."""
    from core.bin.decode import decode, decode_remote
    from core.data.manifest import read_manifest
    S = load_sibling(__file__, "score")
    mmau_items, read_hyps, score = S.mmau_items, S.read_hyps, S.score
    out = exp / "decode" / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if url:
        info = decode_remote(url, str(test), str(out / "hyp.jsonl"), prompt="{prompt}", served_model=served_model or None)
    else:
        info = decode(str(model_dir), str(test), str(out / "hyp.jsonl"), prompt="{prompt}",
                      max_new_tokens=max_new_tokens)
    rows = read_manifest(test, check_media=False)
    hyps = read_hyps(out / "hyp.jsonl")
    (out / "mmau_predictions.json").write_text(json.dumps(mmau_items(rows, hyps), indent=1, ensure_ascii=False))
    if any(not r.get("answer") for r in rows):
        res = {"acc": None, "n": len(rows), "note": "answers withheld: submit mmau_predictions.json"}
    else:
        res = score(rows, hyps, rule=rule)
        (out / "score.json").write_text(json.dumps(res, indent=2, ensure_ascii=False))
        res.pop("per_item")  # in score.json; results.json keeps the figures
    res["decode_seconds"] = round(time.time() - t0, 2)
    res["empty_outputs"] = info["empty"]
    res["model"] = str(model_dir)
    return res


def system_differences(exp: Path, pairs: list[tuple[str, str]]) -> dict:
    """Accuracy of system a minus system b for each ``(a, b)``, with a paired bootstrap interval
    over the test questions (each system's ``score.json``)."""
    return differences(pairs, lambda name: score_items(exp / "decode" / name / "score.json", "per_item"))


def fmt_table(results: dict, training: dict) -> str:
    cats = sorted(results["base"]["by_category"])
    lines = ["| system | acc (%) | 95% CI | official (%) | " + " | ".join(cats) + " | format (%) | train s | steps | what |",
             "|---|---|---|---|" + "---|" * len(cats) + "---|---|---|---|"]
    entries = [(k, results.get(k), SYSTEMS[k]) for k in SYSTEMS]
    entries += [(k, results["baselines"].get(k), BASELINES[k]) for k in BASELINES]
    entries += [(k, results.get(k), TEACHERS[k]) for k in TEACHERS]
    for name, r, (d, what) in entries:
        if not r:
            continue
        t = training.get(d) or {}
        per = " | ".join(f"{100 * r['by_category'].get(c, {}).get('acc', 0):.1f}" for c in cats)
        off = r.get("acc_official")
        off = f"{100 * off:.1f}" if off is not None else ""
        ci = fmt_ci(r["acc_ci95"]) if r.get("acc_ci95") else ""
        lines.append(f"| {name} | {100 * r['acc']:.1f} | {ci} | {off} | {per} | {100 * r['format_rate']:.0f} | "
                     f"{t.get('train_seconds', '')} | {t.get('steps', '')} | {what} |")
    return "\n".join(lines)


def task_table(results: dict) -> str:
    names = [k for k in ("base", "grpo", "rest", "opd") if results.get(k)] + list(results["baselines"])
    get = lambda k: results.get(k) or results["baselines"].get(k)  # noqa: E731
    tasks = sorted(results["base"]["by_task"])
    lines = ["| task | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for t in tasks:
        n = results["base"]["by_task"][t]["n"]
        lines.append(f"| {t} | {n} | " + " | ".join(f"{100 * get(k)['by_task'][t]['acc']:.1f}" for k in names) + " |")
    return "\n".join(lines)


def evaluate_only(model: Path, name: str, test: Path, exp: Path, args) -> int:
    """``run.sh --eval_only``: one checkpoint on the test set, without any training output."""
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model folder (no config.json)")
    res = decode_and_score(name, model, test, exp, args.rule, args.max_new_tokens)
    results = {"eval_only": True, name: res,
               "settings": {"corpus": args.corpus, "rule": args.rule, "decoding": "greedy",
                            "max_new_tokens": args.max_new_tokens, "model": str(model), "test": str(test)}}
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    pred = exp / "decode" / name / "mmau_predictions.json"
    if res["acc"] is None:
        print(f"{test} has no answers: submit {pred} (MMAU's evaluation.py / leaderboard)")
        return 0
    print(load_sibling(__file__, "score").format_table(res))
    print(f"predictions for MMAU's evaluation.py: {pred}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with test.jsonl")
    ap.add_argument("--exp", required=True)
    ap.add_argument("--rule", default="mmau", choices=("mmau", "mmsu"))
    ap.add_argument("--readme", default="", help="also write the table into this README's results section "
                    "(run.sh --update_readme true; never for a smoke run); it always goes to <exp>/RESULTS.md")
    ap.add_argument("--corpus", default="synthetic")
    ap.add_argument("--budget", default="", help="run.sh --budget: seconds of wall-clock per compared method; "
                    "empty: the fixed step counts (ReST: rounds) of --budget_conf")
    ap.add_argument("--budget_conf", default="conf/budget.yaml", help="the step counts and how they were measured")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="decoding length (run.sh --max_new_tokens)")
    ap.add_argument("--smoke", default="false")
    ap.add_argument("--teacher_url", default="", help="the teacher is served there: its row is decoded through it")
    ap.add_argument("--teacher_model", default="", help="--teacher_url: the model name the server expects")
    ap.add_argument("--eval_model", default="", help="evaluation only: score this model folder (no training "
                    "outputs needed); results under <exp>/decode/<--eval_name>/ and <exp>/results.json")
    ap.add_argument("--eval_name", default="model", help="name of the --eval_model system")
    args = ap.parse_args(argv)
    data, exp = Path(args.data), Path(args.exp)
    test = data / "test.jsonl"
    from core.utils.logging import setup_console
    setup_console()
    if args.eval_model:
        return evaluate_only(Path(args.eval_model), args.eval_name, test, exp, args)

    def run(name, d):
        if name == "teacher_served":
            if not args.teacher_url:
                return None
            try:  # /v1/audio/transcriptions: vLLM answers it for its transcription models only
                res = decode_and_score(name, args.teacher_url, test, exp, args.rule, args.max_new_tokens,
                                       url=args.teacher_url, served_model=args.teacher_model)
            except (RuntimeError, ValueError) as e:
                print(f"note: teacher_served: not decoded through {args.teacher_url}, row skipped: {e}", file=sys.stderr)
                return None
            res["max_new_tokens"] = "the server's own limit"
            return res
        m = exp / d / "final"
        if not (m / "config.json").is_file():
            if name == "base":
                raise SystemExit(f"{m} is missing: run stage 1 first")
            print(f"note: {name}: no model at {m}, skipped", file=sys.stderr)
            return None
        return decode_and_score(name, m, test, exp, args.rule, args.max_new_tokens)

    results: dict = {k: run(k, d) for k, (d, _) in SYSTEMS.items()}
    results["baselines"] = {k: r for k, (d, _) in BASELINES.items() if (r := run(k, d))}
    results.update({k: run(k, d) for k, (d, _) in TEACHERS.items()})
    if results["base"]["acc"] is None:  # a test split without answers: predictions only
        (exp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
        print(f"{test} has no answers: wrote exp/decode/<system>/mmau_predictions.json for the official scorer")
        return 0
    base = results["base"]["acc"]
    results["delta_vs_base"] = {k: round(results[k]["acc"] - base, 4) for k in ("grpo", "rest", "opd") if results.get(k)}
    results["delta_vs_base"].update({k: round(v["acc"] - base, 4) for k, v in results["baselines"].items()})
    results["differences"] = system_differences(exp, [(k, "base") for k in results["delta_vs_base"]])
    dirs = [d for d, _ in list(SYSTEMS.values()) + list(BASELINES.values()) + list(TEACHERS.values())]
    training = {d: load_json(exp / d / "train_summary.json") for d in dirs if (exp / d / "train_summary.json").is_file()}
    rest = load_json(exp / "rest" / "rest_summary.json")
    if rest:  # ReST: sampling + SFT steps of every round
        training["rest"] = {"train_seconds": rest.get("budget_seconds", rest.get("seconds")),
                            "steps": sum(r.get("sft_steps", 0) for r in rest["rounds"]), "rounds": rest["rounds"]}
    results["training"] = training
    results["settings"] = {"corpus": args.corpus, "rule": args.rule,
                           "compute": compute_settings(args.budget, args.budget_conf, training),
                           "smoke": args.smoke == "true", "decoding": "greedy",
                           "generation_length": load_json(exp / "gen_length.json") or
                           {"max_new_tokens": args.max_new_tokens}, "teacher_url": args.teacher_url or None,
                           "models": load_json(exp / "models.json"), "data": load_json(data / "stats.json")}
    results["stage_seconds"] = load_json(exp / "stage_seconds.json") or {}
    (exp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))

    summary = fmt_table(results, training) + "\n\nAccuracy (%) by task:\n\n" + task_table(results)
    deltas = ", ".join(f"{k} {100 * v:+.1f}" for k, v in results["delta_vs_base"].items())
    summary += f"\n\nChange vs base (accuracy points): {deltas}."
    summary += ("\n\nPaired bootstrap 95% intervals over the test questions:\n\n"
                + "\n".join(f"- {describe_diff(k, d)}" for k, d in results["differences"].items()))
    print(summary)
    write_results(exp, summary + f"\n\n(measured by `run.sh` on {time.strftime('%Y-%m-%d')}, corpus {args.corpus}, "
                                 f"{compute_line(results['settings']['compute'])}, greedy decoding)",
                  readme=args.readme, smoke=args.smoke == "true")
    try:
        from tools.plot_metrics import plot
        runs = [(d, exp / d / "metrics.jsonl") for d in ("grpo", "teacher_grpo", "opd", "sft_answers", "rest")]
        runs = [(d, p) for d, p in runs if p.is_file()]
        if runs:
            plot([p for _, p in runs], keys=["reward", "reward/mcq_accuracy", "reward/format", "zero_std_frac",
                                            "dev/mcq_accuracy_reward", "completion_len", "kl_sampled",
                                            "rest/kept_share"],
                 out_dir=exp / "plots", labels=[d for d, _ in runs], smooth=5)
    except Exception as e:  # noqa: BLE001  plots are a convenience; the numbers are in results.json
        print(f"warning: plots not drawn: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
