#!/usr/bin/env python3
"""Stage 3 of the ASR recipe: decode the test set with every trained model, score WER (CER for
Chinese), and report.

Writes, under ``<exp>``: ``decode/<system>/hyp.jsonl``, ``report.json`` and ``utt_errors.txt``
(per-utterance errors, worst first); ``results.json``; PNG curves in ``plots/``. Prints the
results table and writes it to ``<exp>/RESULTS.md``; with ``--readme`` (``run.sh --update_readme
true``) also into that README between the ``results`` markers.
Systems: ``teacher``, ``student_before`` (the student after its SFT), ``student_after`` (after
OPD) and the baselines that were trained (``sft_more``, ``seqkd``, ``td_opd``).
Each system's WER has a 95% bootstrap interval over utterances (``wer_ci95``); the differences
the README claims (OPD against the student before it and against each baseline) have paired
bootstrap intervals in ``differences`` (``tools/bootstrap.py``), marked not significant when the
interval includes 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tools.bootstrap import describe_diff, differences, fmt_ci, ratio_ci
from tools.report import refresh_stage_seconds, write_results
from tools.step_budget import compute_line, compute_settings

PROMPT = "Transcribe the audio."   # the training configs' data.prompt
SYSTEMS = {"teacher": "teacher", "student_before": "student_sft", "student_after": "opd"}
BASELINES = {"sft_more": "more SFT on the student's labelled set",
             "seqkd": "sequence-level KD (SFT on the teacher's greedy transcripts)",
             "td_opd": "sequence-level KD, then OPD (half the budget each)"}


def load_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def decode_and_score(name: str, model_dir: Path | str, data: Path, exp: Path, lang: str,
                     max_new_tokens: int = 32, prompt: str = PROMPT, url: str = "", served_model: str = "") -> dict:
    """Decode the test set with ``model_dir`` (or the server at ``url``), score it."""
    from core.bin.decode import decode
    from tools.compute_wer import format_details, read_transcripts, score
    out = exp / "decode" / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if url:  # a teacher served elsewhere: its own length limit
        from core.bin.decode import decode_remote
        info = decode_remote(url, str(data / "test.jsonl"), str(out / "hyp.jsonl"), prompt=prompt,
                             served_model=served_model or None)
    else:
        info = decode(str(model_dir), str(data / "test.jsonl"), str(out / "hyp.jsonl"), prompt=prompt,
                      max_new_tokens=max_new_tokens)
    refs = read_transcripts(data / "test.jsonl")
    hyps = read_transcripts(out / "hyp.jsonl")
    cer = lang == "zh"
    res = score(refs, hyps, cer=cer, lang=lang)
    (out / "report.json").write_text(json.dumps(res, indent=2, ensure_ascii=False))
    (out / "utt_errors.txt").write_text(format_details(res, cer=cer))
    r = {"wer": res["error_rate"], "errors": res["errors"], "ref_tokens": res["num_ref_words"],
         "substitutions": res["substitutions"], "deletions": res["deletions"], "insertions": res["insertions"],
         "sentence_error_rate": res["sentence_error_rate"], "num_utts": res["num_utts"],
         "empty_hypotheses": info["empty"], "decode_seconds": round(time.time() - t0, 2), "model": str(model_dir),
         "max_new_tokens": max_new_tokens}
    if cer:
        r["cer"] = res["error_rate"]
    r["wer_ci95"] = ratio_ci([u["errors"] for u in res["utterances"]], [u["ref_len"] for u in res["utterances"]])["ci95"]
    worst = [u for u in res["utterances"] if u["errors"]][:5]
    r["worst"] = [{k: u[k] for k in ("key", "ref", "hyp", "errors")} for u in worst]
    return r


def utterance_errors(exp: Path, name: str) -> dict[str, tuple[int, int]]:
    """``{utterance key: (errors, reference words)}`` of a system's decode report."""
    rep = json.loads((exp / "decode" / name / "report.json").read_text())
    return {u["key"]: (u["errors"], u["ref_len"]) for u in rep["utterances"]}


def system_differences(exp: Path, others: list[str]) -> dict:
    """WER of student_after minus each of ``others`` (negative: OPD has fewer errors), with a
    paired bootstrap interval over the utterances."""
    return differences([("student_after", o) for o in others], lambda name: utterance_errors(exp, name))


def fmt_table(results: dict, unit: str) -> str:
    rows = [("teacher", results["teacher"], "SFT on its own labelled set"),
            ("student_before", results["student_before"], "SFT on the small labelled set"),
            ("student_after", results["student_after"], "OPD on unlabelled audio")]
    rows += [(k, v, BASELINES.get(k, "")) for k, v in results.get("baselines", {}).items()]
    tr = results.get("training", {})
    lines = [f"| system | {unit} (%) | 95% CI | errors / ref | train s | steps | what |", "|---|---|---|---|---|---|---|"]
    key_of = {"student_before": "student_sft", "student_after": "opd"}
    for name, r, what in rows:
        t = tr.get(key_of.get(name, name), {})
        secs, steps = t.get("train_seconds", ""), t.get("steps", "")
        if name == "td_opd" and "td_kd" in tr and t:  # two runs: KD then OPD
            secs = round(tr["td_kd"]["train_seconds"] + t["train_seconds"], 2)
            steps = f"{tr['td_kd']['steps']} + {t['steps']}"
        ci = fmt_ci(r["wer_ci95"], digits=2) if r.get("wer_ci95") else ""
        lines.append(f"| {name} | {100 * r['wer']:.2f} | {ci} | {r['errors']} / {r['ref_tokens']} | "
                     f"{secs} | {steps} | {what} |")
    return "\n".join(lines)


def evaluate_only(model: Path, name: str, data: Path, exp: Path, args, dec: dict) -> int:
    """``run.sh --eval_only``: one checkpoint on the test set, without any training output."""
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: not a model folder (no config.json)")
    r = decode_and_score(name, model, data, exp, args.lang, **dec)
    unit = "CER" if args.lang == "zh" else "WER"
    results = {"eval_only": True, name: r,
               "settings": {"corpus": args.corpus, "lang": args.lang, "metric": unit.lower(), "decoding": "greedy",
                            "prompt": args.prompt, "model": str(model), "test": str(data / "test.jsonl"),
                            "generation_length": load_json(exp / "gen_length.json") or dec["max_new_tokens"]}}
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"{name}: %{unit} {100 * r['wer']:.2f} [ {r['errors']} / {r['ref_tokens']}, {r['insertions']} ins, "
          f"{r['deletions']} del, {r['substitutions']} sub ] over {r['num_utts']} utterances "
          f"(at most {dec['max_new_tokens']} new tokens); per utterance: {exp / 'decode' / name / 'utt_errors.txt'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--exp", required=True)
    ap.add_argument("--lang", default="en", help="en (WER) | zh (CER)")
    ap.add_argument("--readme", default="", help="also write the table into this README's results section "
                    "(run.sh --update_readme true; never for a smoke run); it always goes to <exp>/RESULTS.md")
    ap.add_argument("--corpus", default="synthetic")
    ap.add_argument("--budget", default="", help="run.sh --budget: seconds of wall-clock per compared method; "
                    "empty: the fixed step counts of --budget_conf")
    ap.add_argument("--budget_conf", default="conf/budget.yaml", help="the step counts and how they were measured")
    ap.add_argument("--budget_scale", type=float, default=1.0, help="run.sh --budget_scale: the counts were multiplied by it")
    ap.add_argument("--smoke", default="false")
    ap.add_argument("--only_times", action="store_true", help="only refresh stage_seconds in results.json")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="decoding length (run.sh: tools/gen_length.py)")
    ap.add_argument("--prompt", default=PROMPT, help="the user turn after the audio")
    ap.add_argument("--eval_model", default="", help="evaluation only: score this model folder (no training "
                    "outputs needed); results under <exp>/decode/<--eval_name>/ and <exp>/results.json")
    ap.add_argument("--eval_name", default="model", help="name of the --eval_model system")
    ap.add_argument("--teacher_url", default="", help="the teacher is served there: decode its row through it")
    ap.add_argument("--teacher_model", default="", help="--teacher_url: the model name the server expects")
    args = ap.parse_args(argv)
    data, exp = Path(args.data), Path(args.exp)
    res_path = exp / "results.json"
    times = load_json(exp / "stage_seconds.json") or {}
    if args.only_times:
        return refresh_stage_seconds(exp)

    from core.utils.logging import setup_console
    setup_console()
    dec = dict(max_new_tokens=args.max_new_tokens, prompt=args.prompt)
    if args.eval_model:
        return evaluate_only(Path(args.eval_model), args.eval_name, data, exp, args, dec)
    results: dict = {}
    for name, d in SYSTEMS.items():
        m = exp / d / "final"
        if name == "teacher" and args.teacher_url:
            results[name] = decode_and_score(name, args.teacher_url, data, exp, args.lang, **dec,
                                             url=args.teacher_url, served_model=args.teacher_model)
            continue
        if not (m / "config.json").is_file():
            raise SystemExit(f"{m} is missing: run stages 1-2 first")
        results[name] = decode_and_score(name, m, data, exp, args.lang, **dec)
    results["baselines"] = {}
    for name in BASELINES:
        m = exp / name / "final"
        if (m / "config.json").is_file():
            results["baselines"][name] = decode_and_score(name, m, data, exp, args.lang, **dec)
    results["differences"] = system_differences(exp, ["student_before"] + list(results["baselines"]))
    b, a = results["student_before"]["wer"], results["student_after"]["wer"]
    results["relative_improvement"] = round((b - a) / b, 4) if b > 0 else None
    results["calibrate"] = {k: load_json(exp / f"calibrate_{k}" / "calibrate.json") for k in ("before", "after")}
    results["training"] = {d: load_json(exp / d / "train_summary.json") for d in
                           ("teacher", "student_sft", "opd", "sft_more", "seqkd", "td_kd", "td_opd")
                           if (exp / d / "train_summary.json").is_file()}
    best = min([("student_after", a)] + [(k, v["wer"]) for k, v in results["baselines"].items()], key=lambda x: x[1])
    results["best_student"] = best[0]
    results["settings"] = {"corpus": args.corpus, "lang": args.lang, "metric": "cer" if args.lang == "zh" else "wer",
                           "compute": compute_settings(args.budget, args.budget_conf, results["training"],
                                                              args.budget_scale),
                           "smoke": args.smoke == "true",
                           "models": load_json(exp / "models.json"), "data": load_json(data / "stats.json"),
                           "opd_config": str(exp / "opd" / "config.yaml"),
                           "generation_length": load_json(exp / "gen_length.json") or {"max_new_tokens": args.max_new_tokens}}
    results["stage_seconds"] = times
    exp.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))

    unit = "CER" if args.lang == "zh" else "WER"
    table = fmt_table(results, unit)
    cal = results["calibrate"]
    cal_line = ""
    if cal.get("before") and cal.get("after"):
        cal_line = (f"\n\nStudent-teacher reverse KL per token on dev (calibrate): before OPD "
                    f"{cal['before']['reverse_kl_per_token']:.3f}, after {cal['after']['reverse_kl_per_token']:.3f}.")
    rel = results["relative_improvement"]
    summary = (f"{table}\n\nOPD relative {unit} change vs student_before: "
               f"{-100 * rel:+.1f}%. Best student: {best[0]}.{cal_line}" if rel is not None else table)
    if results["differences"]:
        summary += (f"\n\n{unit} differences, paired bootstrap 95% intervals over the test utterances:\n\n"
                    + "\n".join(f"- {describe_diff(k, d, digits=2)}" for k, d in results["differences"].items()))
    print(summary)
    write_results(exp, summary + f"\n\n(measured by `run.sh` on {time.strftime('%Y-%m-%d')}, "
                                 f"corpus {args.corpus}; {compute_line(results['settings']['compute'], 'stage-2 method')})",
                  readme=args.readme, smoke=args.smoke == "true")
    try:
        from tools.plot_metrics import plot
        runs = [(d, exp / d / "metrics.jsonl") for d in ("opd", "sft_more", "seqkd", "td_opd")]
        runs = [(d, p) for d, p in runs if p.is_file()]
        if runs:
            plot([p for _, p in runs], keys=["loss", "kl_sampled", "train/divergence", "completion_len",
                                            "dev/wer_reward", "nonempty_share"],
                 out_dir=exp / "plots", labels=[d for d, _ in runs], smooth=5)
    except Exception as e:  # noqa: BLE001  plots are a convenience; the numbers are in results.json
        print(f"warning: plots not drawn: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
