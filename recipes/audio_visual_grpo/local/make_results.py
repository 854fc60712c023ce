#!/usr/bin/env python3
"""Stage 4 of the audio_visual_grpo recipe: decode the test set with the model before GRPO (the
SFT warm-up), after GRPO and the baseline, score, and report.

For each system: greedy answers (``decode/<system>/hyp.jsonl``, the Omni thinker reading
``--num_frames`` frames and the sound track of each video) and ``local/score.py``'s accuracy:
overall, by question type, by duration and by rule (Daily-Omni's letter rule; IntentBench's
rules by problem type), the official score (each benchmark's own code on the
``dailyomni_predictions.json`` / ``intentbench_results.json`` written beside ``hyp.jsonl``), the unparsed count, the format rate and the most frequent answers per
type (to see a collapse). The training reward of GRPO (first and last tenth of the steps, the
best smoothed value) comes from its ``metrics.jsonl``.

Writes ``results.json`` (``{"before": {"acc", ...}, "after": {...}, "baselines": {"sft_answers":
{...}}, "training_reward": {...}, ...}``), prints the table, writes it to ``<exp>/RESULTS.md`` (with
``--readme``, i.e. ``run.sh --update_readme true``, also into that README between the ``results``
markers) and draws the reward curves into ``<exp>/plots``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tools.bootstrap import describe_diff, differences, fmt_ci, score_items
from tools.local_module import load_sibling
from tools.report import refresh_stage_seconds, write_results
from tools.step_budget import compute_line, compute_settings

SYSTEMS = {"before": ("sft_qa", "SFT warm-up: describe + questions, then the questions alone (the GRPO start)"),
           "after": ("grpo", "GRPO (format 0.1 + exact_alnum 0.9)")}
BASELINES = {"sft_answers": ("sft_answers", "SFT on the answers of GRPO's questions, equal compute")}
MAX_NEW_TOKENS = 40
WARMUP = ("sft", "sft_qa")   # the two passes of the warm-up: "before"'s train s and steps are their sums


def _score_module():
    return load_sibling(__file__, "score")


def load_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def evaluate(name: str, model_dir: Path, data: Path, exp: Path, args) -> dict:
    from core.bin.decode import decode
    sc = _score_module()
    out = exp / "decode" / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = decode(str(model_dir), str(data / "test.jsonl"), str(out / "hyp.jsonl"), prompt="{prompt}",
                  max_new_tokens=args.max_new_tokens, target_field="target", modality="av",
                  num_frames=args.num_frames, missing_audio=args.missing_audio, batch_size=16)
    rows, hyps = sc.read_rows(data / "test.jsonl"), sc.read_hyps(out / "hyp.jsonl")
    res = sc.score(rows, hyps)
    sc.write_official(out, rows, hyps)  # what Daily-Omni's / IntentBench's own code reads
    res["decode_seconds"] = round(time.time() - t0, 2)
    res["empty_outputs"] = info["empty"]
    res["model"] = str(model_dir)
    (out / "score.json").write_text(json.dumps(res, indent=2, ensure_ascii=False))
    res.pop("per_item")  # in score.json; results.json keeps the figures
    return res


def training_reward(metrics: Path) -> dict | None:
    """Mean training reward over the first and the last tenth of GRPO's steps, and its best
    running mean over 5 steps."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    r = [float(x["reward"]) for x in rows if "reward" in x and "step" in x]
    if not r:
        return None
    k = max(1, len(r) // 10)
    w = min(5, len(r))
    smooth = [sum(r[i:i + w]) / w for i in range(len(r) - w + 1)]
    return {"first": round(sum(r[:k]) / k, 4), "last": round(sum(r[-k:]) / k, 4), "max_smoothed": round(max(smooth), 4),
            "steps": len(r)}


def system_differences(exp: Path, pairs: list[tuple[str, str]]) -> dict:
    """Accuracy of system a minus system b for each ``(a, b)``, with a paired bootstrap interval
    over the test questions (each system's ``score.json``)."""
    return differences(pairs, lambda name: score_items(exp / "decode" / name / "score.json", "per_item"))


def fmt_table(results: dict) -> str:
    rows = [(k, results[k], SYSTEMS[k][1]) for k in SYSTEMS]
    rows += [(k, v, BASELINES[k][1]) for k, v in results.get("baselines", {}).items()]
    types = sorted({t for _, r, _ in rows for t in r.get("by_type", {})})
    tr = results.get("training", {})
    head = "| system | acc % | 95% CI | official % | " + " | ".join(types) + " | unparsed | train s | steps | what |"
    lines = [head, "|---" * (len(types) + 8) + "|"]
    for name, r, what in rows:
        d = (SYSTEMS.get(name) or BASELINES.get(name))[0]
        t = tr.get(d, {})
        if name == "before" and all(w in tr for w in WARMUP):
            t = {k: round(sum(tr[w].get(k, 0) for w in WARMUP), 2) for k in ("train_seconds", "steps")}
        cells = [f"{100 * r['by_type'][ty]['acc']:.1f}" if ty in r.get("by_type", {}) else "" for ty in types]
        off = f"{100 * r['acc_official']:.1f}" if r.get("acc_official") is not None else ""
        ci = fmt_ci(r["acc_ci95"]) if r.get("acc_ci95") else ""
        lines.append(f"| {name} | {100 * r['acc']:.1f} | {ci} | {off} | " + " | ".join(cells)
                     + f" | {r['unparsed']} | {t.get('train_seconds', '')} | {t.get('steps', '')} | {what} |")
    return "\n".join(lines)


def evaluate_only(model: Path, name: str, data: Path, exp: Path, args) -> int:
    """``run.sh --eval_only``: one checkpoint on the test set, without any training output."""
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model folder (no config.json)")
    res = evaluate(name, model, data, exp, args)
    results = {"eval_only": True, name: res,
               "settings": {"corpus": args.corpus, "decoding": f"greedy, at most {args.max_new_tokens} new tokens",
                            "num_frames": args.num_frames, "model": str(model), "test": str(data / "test.jsonl")}}
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(_score_module().format_table(res))
    print(f"official inputs (Daily-Omni / IntentBench layouts): {exp / 'decode' / name}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--exp", required=True)
    ap.add_argument("--readme", default="", help="also write the table into this README's results section "
                    "(run.sh --update_readme true; never for a smoke run); it always goes to <exp>/RESULTS.md")
    ap.add_argument("--corpus", default="synthetic")
    ap.add_argument("--num_frames", type=int, default=8)
    ap.add_argument("--missing_audio", default="error")
    ap.add_argument("--smoke", default="false")
    ap.add_argument("--budget", default="", help="run.sh --budget: seconds of wall-clock for GRPO and the "
                    "baseline; empty: the fixed step counts of --budget_conf")
    ap.add_argument("--budget_conf", default="conf/budget.yaml", help="the step counts and how they were measured")
    ap.add_argument("--only_times", action="store_true", help="only refresh stage_seconds in results.json")
    ap.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    ap.add_argument("--eval_model", default="", help="evaluation only: score this model folder (no training "
                    "outputs needed); results under <exp>/decode/<--eval_name>/ and <exp>/results.json")
    ap.add_argument("--eval_name", default="model", help="name of the --eval_model system")
    args = ap.parse_args(argv)
    data, exp = Path(args.data), Path(args.exp)
    res_path = exp / "results.json"
    times = load_json(exp / "stage_seconds.json") or {}
    if args.only_times:
        return refresh_stage_seconds(exp)

    from core.utils.logging import setup_console
    setup_console()
    if args.eval_model:
        return evaluate_only(Path(args.eval_model), args.eval_name, data, exp, args)
    results: dict = {}
    for name, (d, _) in SYSTEMS.items():
        m = exp / d / "final"
        if not (m / "config.json").is_file():
            raise SystemExit(f"{m} is missing: run stages 1-2 first")
        results[name] = evaluate(name, m, data, exp, args)
    results["baselines"] = {}
    for name, (d, _) in BASELINES.items():
        m = exp / d / "final"
        if (m / "config.json").is_file():
            results["baselines"][name] = evaluate(name, m, data, exp, args)
    results["gain"] = round(results["after"]["acc"] - results["before"]["acc"], 4)
    results["differences"] = system_differences(exp, [("after", "before")] + [("after", b) for b in results["baselines"]])
    results["training_reward"] = training_reward(exp / "grpo" / "metrics.jsonl")
    results["training"] = {d: load_json(exp / d / "train_summary.json") for d in (*WARMUP, "grpo", "sft_answers")
                           if (exp / d / "train_summary.json").is_file()}
    results["settings"] = {"corpus": args.corpus, "smoke": args.smoke == "true", "num_frames": args.num_frames,
                           "compute": compute_settings(args.budget, args.budget_conf, results["training"]),
                           "missing_audio": args.missing_audio, "model": load_json(exp / "model.json"),
                           "data": load_json(data / "stats.json"), "grpo_config": str(exp / "grpo" / "config.yaml"),
                           "decoding": f"greedy, at most {args.max_new_tokens} new tokens",
                           "generation_length": load_json(exp / "gen_length.json") or {"max_new_tokens": args.max_new_tokens}}
    results["stage_seconds"] = times
    exp.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))

    table = fmt_table(results)
    tr = results["training_reward"]
    lines = [table, "", f"GRPO changed test accuracy by {100 * results['gain']:+.1f} points "
                        f"({100 * results['before']['acc']:.1f} -> {100 * results['after']['acc']:.1f})."]
    lines += ["", "Paired bootstrap 95% intervals over the test questions:", ""]
    lines += [f"- {describe_diff(k, d)}" for k, d in results["differences"].items()]
    if tr:
        lines.append("")
        lines.append(f"Mean training reward: first tenth of the steps {tr['first']:.3f}, last tenth {tr['last']:.3f}, "
                     f"best 5-step mean {tr['max_smoothed']:.3f} ({tr['steps']} steps).")
    summary = "\n".join(lines)
    print(summary)
    write_results(exp, summary + f"\n\n(measured by `run.sh` on {time.strftime('%Y-%m-%d')}, "
                                 f"corpus {args.corpus}, {args.num_frames} frames; "
                                 f"{compute_line(results['settings']['compute'])})",
                  readme=args.readme, smoke=args.smoke == "true")
    try:
        from tools.plot_metrics import plot
        runs = [(d, exp / d / "metrics.jsonl") for d in ("grpo", "sft_answers")]
        runs = [(d, p) for d, p in runs if p.is_file()]
        if runs:
            plot([p for _, p in runs], keys=["reward", "reward/exact_alnum", "reward/format", "zero_std_frac",
                                            "completion_len", "loss"],
                 out_dir=exp / "plots", labels=[d for d, _ in runs], smooth=5)
    except Exception as e:  # noqa: BLE001  plots are a convenience; the numbers are in results.json
        print(f"warning: plots not drawn: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
