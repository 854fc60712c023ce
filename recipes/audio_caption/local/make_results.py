#!/usr/bin/env python3
"""Stage 3 of the audio_caption recipe: caption the test clips with every trained model, score
the captions, run the cascaded evaluation, and report.

For each system: greedy captions (``decode/<system>/hyp.jsonl``), reference-based caption metrics
(BLEU-1..4, ROUGE-L, CIDEr through pycocoevalcap; METEOR and SPICE when Java is present) and,
when the test clips carry multiple-choice ``questions`` and a cascade model exists
(``<exp>/cascade/final`` or ``--qa_model``), the cascaded accuracy: a text-only model reads the
caption and answers the questions (``cascade_acc``). The same text model reading a reference
caption gives the cascade's ceiling (``cascade_reference``).

Writes ``results.json`` (``{"teacher": {metric: value}, "student_before": {...},
"student_after": {...}, "baselines": {name: {...}}, ...}``: every number under those keys is a
metric where higher is better; decoding details live under ``decode``), prints the table, writes
it to ``<exp>/RESULTS.md`` (with ``--readme``, i.e. ``run.sh --update_readme true``, also into that
README between the ``results`` markers) and draws the training curves.
Systems: ``teacher``, ``student_before`` (the student after its SFT), ``student_after`` (after
OPD) and the baselines that were trained (``sft_more``, ``seqkd``).
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

PROMPT = "Describe the audio."
MAX_NEW_TOKENS = 24
SYSTEMS = {"teacher": "teacher", "student_before": "student_sft", "student_after": "opd"}
BASELINES = {"sft_more": "more SFT on the student's captioned set",
             "seqkd": "SFT on the teacher's greedy captions of the unlabelled clips"}
WHAT = {"teacher": "SFT on its own captioned clips", "student_before": "SFT on the small captioned set",
        "student_after": "OPD on clips without captions"}
TRAIN_DIR = {"student_before": "student_sft", "student_after": "opd"}
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", "METEOR", "SPICE", "cascade_acc")
COLUMNS = ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "METEOR", "SPICE", "cascade_acc")   # in the table


def load_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def references(test_rows: list[dict]) -> dict[str, list[str]]:
    refs = {}
    for r in test_rows:
        t = r.get("text")
        refs[r["key"]] = [t] if isinstance(t, str) else list(t or [])
    return refs


def evaluate(name: str, model_dir: Path | str, data: Path, exp: Path, qa_model: Path | None, has_questions: bool,
             java_metrics: bool | str = "auto", prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS,
             url: str = "", served_model: str = "") -> tuple[dict, dict]:
    """(metrics, decoding details) of one system on the test clips (``url``: a model served there)."""
    from core.bin.decode import decode
    score_captions = load_sibling(__file__, "caption_metrics").score_captions
    out = exp / "decode" / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if url:
        from core.bin.decode import decode_remote
        info = decode_remote(url, str(data / "test.jsonl"), str(out / "hyp.jsonl"), prompt=prompt,
                             served_model=served_model or None)
    else:
        info = decode(str(model_dir), str(data / "test.jsonl"), str(out / "hyp.jsonl"), prompt=prompt,
                      max_new_tokens=max_new_tokens)
    secs = round(time.time() - t0, 2)
    test_rows = read_jsonl(data / "test.jsonl")
    hyps = {h["key"]: h["text"] for h in read_jsonl(out / "hyp.jsonl")}
    scores = score_captions(hyps, references(test_rows), java_metrics=java_metrics)
    metrics = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k in METRICS}
    details = {"model": str(model_dir), "decode_seconds": secs, "num_clips": len(hyps), "max_new_tokens": max_new_tokens,
               "empty_captions": info["empty"], "skipped_metrics": scores.get("skipped", {}),
               "examples": [{"key": r["key"], "hyp": hyps[r["key"]], "ref": references([r])[r["key"]][0]}
                            for r in test_rows[:5]]}
    if qa_model is not None and has_questions:
        metrics["cascade_acc"], details["cascade"] = cascade_eval(qa_model, out / "hyp.jsonl", data, out)
    details["ci95"] = scores.get("ci95", {})
    (out / "scores.json").write_text(json.dumps({"metrics": metrics, **details, "per_clip": scores.get("per_clip", {})},
                                               indent=2, ensure_ascii=False))
    return metrics, details


def cascade_eval(qa_model: Path, hyp, data: Path, out: Path) -> tuple[float, dict]:
    cascade_evaluate = load_sibling(__file__, "cascade").evaluate
    res = cascade_evaluate(str(qa_model), str(hyp), str(data / "test.jsonl"), str(out / "cascade.json"))
    return float(res["acc"]), res


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ""


def system_differences(exp: Path, pairs: list[tuple[str, str]], metric: str = "CIDEr") -> dict:
    """``metric`` of system a minus system b for each ``(a, b)``, with a paired bootstrap interval
    over the test clips (the per-clip scores in each system's ``scores.json``)."""
    return differences(pairs, lambda name: score_items(exp / "decode" / name / "scores.json", "per_clip", metric))


def fmt_table(results: dict) -> str:
    rows = [(k, results[k], WHAT[k]) for k in SYSTEMS]
    rows += [(k, v, BASELINES.get(k, "")) for k, v in results.get("baselines", {}).items()]
    cols = [c for c in COLUMNS if any(c in r for _, r, _ in rows)]
    tr = results.get("training", {})
    lines = ["| system | " + " | ".join(c.replace("_", "-") if c != "cascade_acc" else "cascade acc" for c in cols)
             + " | CIDEr 95% CI | train s | steps | what |", "|---" * (len(cols) + 5) + "|"]
    for name, r, what in rows:
        t = tr.get(TRAIN_DIR.get(name, name), {})
        ci = ((results.get("decode") or {}).get(name) or {}).get("ci95", {}).get("CIDEr")
        lines.append(f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols)
                     + f" | {fmt_ci(ci, scale=1.0, digits=3) if ci else ''} | {t.get('train_seconds', '')} | "
                     f"{t.get('steps', '')} | {what} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--exp", required=True)
    ap.add_argument("--readme", default="", help="also write the table into this README's results section "
                    "(run.sh --update_readme true; never for a smoke run); it always goes to <exp>/RESULTS.md")
    ap.add_argument("--corpus", default="synthetic")
    ap.add_argument("--teacher", default="remote", help="how OPD reached the teacher (remote | local), for the report")
    ap.add_argument("--qa_model", default="", help="cascade text model (default: <exp>/cascade/final when trained)")
    ap.add_argument("--smoke", default="false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", default="", help="run.sh --budget: seconds of wall-clock per compared method; "
                    "empty: the fixed step counts of --budget_conf")
    ap.add_argument("--budget_conf", default="conf/budget.yaml", help="the step counts and how they were measured")
    ap.add_argument("--only_times", action="store_true", help="only refresh stage_seconds in results.json")
    ap.add_argument("--prompt", default=PROMPT, help="the user turn after the audio")
    ap.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="caption length limit")
    ap.add_argument("--eval_model", default="", help="evaluation only: score this model folder (no training "
                    "outputs needed); results under <exp>/decode/<--eval_name>/ and <exp>/results.json")
    ap.add_argument("--eval_name", default="model", help="name of the --eval_model system")
    ap.add_argument("--teacher_url", default="", help="the teacher is served there: caption its row through it")
    ap.add_argument("--teacher_model", default="", help="--teacher_url: the model name the server expects")
    args = ap.parse_args(argv)
    data, exp = Path(args.data), Path(args.exp)
    res_path = exp / "results.json"
    times = load_json(exp / "stage_seconds.json") or {}
    if args.only_times:
        return refresh_stage_seconds(exp)

    from core.utils.logging import setup_console
    setup_console()
    test_rows = read_jsonl(data / "test.jsonl")
    has_questions = any(r.get("questions") for r in test_rows)
    qa_model = Path(args.qa_model) if args.qa_model else exp / "cascade" / "final"
    if not (qa_model / "config.json").is_file():
        if args.qa_model:
            raise SystemExit(f"--qa_model {qa_model}: no config.json there")
        qa_model = None
    java = False if args.smoke == "true" else "auto"   # METEOR / SPICE start a JVM per call: not in smoke runs
    if args.eval_model:
        model = Path(args.eval_model)
        if not (model / "config.json").is_file():
            raise SystemExit(f"--model {model}: not a model folder (no config.json)")
        metrics, details = evaluate(args.eval_name, model, data, exp, qa_model, has_questions, java,
                                    prompt=args.prompt, max_new_tokens=args.max_new_tokens)
        out = {"eval_only": True, args.eval_name: metrics, "decode": {args.eval_name: details},
               "settings": {"corpus": args.corpus, "prompt": args.prompt, "decoding": "greedy",
                            "max_new_tokens": args.max_new_tokens, "model": str(model), "test": str(data / "test.jsonl")}}
        exp.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
        print(f"{args.eval_name} on {len(test_rows)} clips: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        skipped = details.get("skipped_metrics")
        if skipped:
            print(f"not computed: {skipped}")
        return 0
    results: dict = {"decode": {}}
    for name, d in SYSTEMS.items():
        m = exp / d / "final"
        if name == "teacher" and args.teacher_url:
            results[name], results["decode"][name] = evaluate(name, args.teacher_url, data, exp, qa_model,
                                                              has_questions, java, url=args.teacher_url,
                                                              served_model=args.teacher_model)
            continue
        if not (m / "config.json").is_file():
            raise SystemExit(f"{m} is missing: run stages 1-2 first")
        results[name], results["decode"][name] = evaluate(name, m, data, exp, qa_model, has_questions, java,
                                                          max_new_tokens=args.max_new_tokens)
    results["baselines"] = {}
    for name in BASELINES:
        m = exp / name / "final"
        if (m / "config.json").is_file():
            results["baselines"][name], results["decode"][name] = evaluate(name, m, data, exp, qa_model, has_questions,
                                                                           java, max_new_tokens=args.max_new_tokens)
    if qa_model is not None and has_questions:
        out = exp / "decode" / "references"
        out.mkdir(parents=True, exist_ok=True)
        refs = references(test_rows)
        (out / "hyp.jsonl").write_text("".join(json.dumps({"key": k, "text": v[0]}) + "\n" for k, v in refs.items()))
        acc, _ = cascade_eval(qa_model, out / "hyp.jsonl", data, out)
        results["cascade_reference"] = {"cascade_acc": acc, "what": "the cascade model reading a reference caption"}
    b, a = results["student_before"], results["student_after"]
    keys = [k for k in b if k in a]
    results["improved_metrics"] = [k for k in keys if a[k] > b[k]]
    results["differences"] = system_differences(exp, [("student_after", o) for o in ["student_before", *results["baselines"]]])
    results["training"] = {d: load_json(exp / d / "train_summary.json") for d in
                           ("teacher", "student_sft", "opd", "sft_more", "seqkd", "cascade")
                           if (exp / d / "train_summary.json").is_file()}
    results["settings"] = {"corpus": args.corpus, "teacher": args.teacher, "smoke": args.smoke == "true",
                           "compute": compute_settings(args.budget, args.budget_conf, results["training"]),
                           "prompt": PROMPT, "max_new_tokens": args.max_new_tokens,
                           "generation_length": load_json(exp / "gen_length.json") or {"max_new_tokens": args.max_new_tokens},
                           "cascade_model": str(qa_model or ""),
                           "models": load_json(exp / "models.json"), "data": load_json(data / "stats.json"),
                           "opd_config": str(exp / "opd" / "config.yaml")}
    results["stage_seconds"] = times
    exp.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))

    table = fmt_table(results)
    lines = [table, ""]
    if "cascade_reference" in results:
        lines.append(f"Cascade ceiling (the text model reading a reference caption): "
                     f"{results['cascade_reference']['cascade_acc']:.3f}.")
    lines.append(f"OPD improved {len(results['improved_metrics'])}/{len(keys)} metrics over student_before"
                 f" ({', '.join(results['improved_metrics']) or 'none'}).")
    lines += ["", "CIDEr differences, paired bootstrap 95% intervals over the test clips:", ""]
    lines += [f"- {describe_diff(k, d, scale=1.0, digits=3, unit='CIDEr')}" for k, d in results["differences"].items()]
    summary = "\n".join(lines)
    print(summary)
    write_results(exp, summary + f"\n\n(measured by `run.sh` on {time.strftime('%Y-%m-%d')}, corpus {args.corpus}, "
                                 f"{args.teacher} teacher; {compute_line(results['settings']['compute'])})",
                  readme=args.readme, smoke=args.smoke == "true")
    try:
        from tools.plot_metrics import plot
        runs = [(d, exp / d / "metrics.jsonl") for d in ("opd", "sft_more", "seqkd")]
        runs = [(d, p) for d, p in runs if p.is_file()]
        if runs:
            plot([p for _, p in runs], keys=["loss", "kl_sampled", "train/divergence", "completion_len"],
                 out_dir=exp / "plots", labels=[d for d, _ in runs], smooth=5)
    except Exception as e:  # noqa: BLE001  plots are a convenience; the numbers are in results.json
        print(f"warning: plots not drawn: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
