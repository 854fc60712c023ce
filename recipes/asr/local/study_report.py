#!/usr/bin/env python3
"""The table and the plot of ``local/study.sh``: test WER of each method in each setting, over seeds.

    python local/study_report.py --exp exp/study --settings commands_strong_small ... [--readme README.md]

Reads ``<exp>/<setting>/seed<s>/results.json`` (run.sh's stage 3 of each seed) and writes:

- ``<exp>/study.json``: per setting, per system, the WER of every seed, its mean and standard
  deviation, and the paired differences OPD - sequence-level KD and OPD - (KD then OPD), each
  with a 95% paired bootstrap interval over the utterances of all seeds together (an utterance of
  seed 0 is paired with the same utterance of seed 0 of the other method);
- ``<exp>/STUDY.md``: the table (``--readme``: also into the README between the
  ``<!-- study:start -->`` and ``<!-- study:end -->`` markers, with the plot copied to the
  README's ``assets/study.png``; never for a smoke run);
- ``<exp>/study.png``: the mean WER of each method per setting, with one dot per seed.

A setting with no finished seed is listed as missing; one with fewer seeds than the others says
how many it has.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_results import utterance_errors  # noqa: E402

from tools.aggregate_seeds import combine  # noqa: E402
from tools.bootstrap import fmt_ci, keyed_diff  # noqa: E402
from tools.report import update_readme  # noqa: E402

# (column, where results.json has it, the run's folder): the systems of one seed
METHODS = (("student SFT", ("student_before",), "student_sft"),
           ("more SFT", ("baselines", "sft_more"), "sft_more"),
           ("seq-KD", ("baselines", "seqkd"), "seqkd"),
           ("OPD", ("student_after",), "opd"),
           ("KD then OPD", ("baselines", "td_opd"), "td_opd"))
COMPARED = (("OPD - seq-KD", "opd", "seqkd"), ("OPD - KD then OPD", "opd", "td_opd"))
TASKS = {"commands": "commands (2-6 words)", "sentences": "sentences (5-18 words)"}
STUDENTS = {"small": "small", "tiny": "tiny"}


def _get(r: dict, path: tuple):
    for k in path:
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def setting_summary(folder: Path) -> dict | None:
    """One setting's seeds: WER per system (per seed, mean, std) and the pooled paired differences."""
    seeds = sorted((p for p in folder.glob("seed*") if (p / "results.json").is_file()),
                   key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    if not seeds:
        return None
    runs = [json.loads((p / "results.json").read_text()) for p in seeds]
    out: dict = {"seeds": [int(p.name[4:]) for p in seeds], "systems": {}}
    out["teacher"] = combine([r["teacher"]["wer"] for r in runs])   # mean, sample std, per seed
    for col, path, _ in METHODS:
        v = [_get(r, path) for r in runs]
        if any(x is None for x in v):
            continue
        out["systems"][col] = combine([x["wer"] for x in v])
    decoded = {"opd": "student_after", "seqkd": "seqkd", "td_opd": "td_opd"}
    for name, a, b in COMPARED:
        try:
            ea, eb = {}, {}
            for p in seeds:
                for k, v in utterance_errors(p, decoded[a]).items():
                    ea[f"{p.name}/{k}"] = v
                for k, v in utterance_errors(p, decoded[b]).items():
                    eb[f"{p.name}/{k}"] = v
            out.setdefault("differences", {})[name] = keyed_diff(ea, eb)
        except (OSError, KeyError, ValueError) as e:
            out.setdefault("differences", {})[name] = {"missing": str(e)}
    tr = runs[0].get("settings", {}).get("compute", {})
    out["steps"] = tr.get("steps_run") or tr.get("steps")
    return out


def fmt_table(study: dict) -> str:
    cols = [c for c, _, _ in METHODS]
    lines = ["| task | teacher | student | teacher WER | " + " | ".join(cols) + " | OPD - seq-KD | seeds |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for s, r in study["settings"].items():
        task, quality, size = s.split("_")
        head = f"| {TASKS.get(task, task)} | {quality} | {STUDENTS.get(size, size)} |"
        if r is None:
            lines.append(head + " (not run yet) |" + " |" * (len(cols) + 2))
            continue
        best = min(r["systems"].items(), key=lambda kv: kv[1]["mean"])[0] if r["systems"] else None
        cells = []
        for c in cols:
            v = r["systems"].get(c)
            if v is None:
                cells.append("")
                continue
            txt = f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
            cells.append(f"**{txt}**" if c == best else txt)
        d = (r.get("differences") or {}).get("OPD - seq-KD", {})
        diff = (f"{100 * d['diff']:+.2f} {fmt_ci(d['ci95'], digits=2, sign=True)}"
                + ("" if d["significant"] else " n.s.")) if "diff" in d else ""
        lines.append(f"{head} {100 * r['teacher']['mean']:.2f} | " + " | ".join(cells)
                     + f" | {diff} | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot(study: dict, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    done = {s: r for s, r in study["settings"].items() if r}
    fig = Figure(figsize=(max(6.0, 1.9 * len(done) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cols = [c for c, _, _ in METHODS]
    width = 0.8 / len(cols)
    dots_all = []
    for j, c in enumerate(cols):
        xs, ms, dots = [], [], []
        for i, r in enumerate(done.values()):
            v = r["systems"].get(c)
            if v is None:
                continue
            x = i + (j - (len(cols) - 1) / 2) * width
            xs.append(x)
            ms.append(100 * v["mean"])
            dots += [(x, 100 * w) for w in v["per_seed"]]
        ax.bar(xs, ms, width=width * 0.95, label=c)
        dots_all += dots + list(zip(xs, ms))
        if dots:
            ax.scatter([d[0] for d in dots], [d[1] for d in dots], s=6, color="black", zorder=3)
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels([s.replace("_", "\n") + f"\nteacher {100 * r['teacher']['mean']:.1f}%"
                        for s, r in done.items()], fontsize=8)
    ax.set_ylabel("test WER (%)")
    top = max([y for _, y in dots_all] or [100.0])
    ax.set_ylim(0, top * 1.25)   # room for the legend above the bars
    ax.set_title("Which method wins, at equal compute (bars: mean over seeds; dots: seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=len(cols), loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--exp", required=True, type=Path, help="the study's folder (exp/study)")
    ap.add_argument("--settings", nargs="+", required=True, help="TASK_TEACHER_STUDENT names, in table order")
    ap.add_argument("--readme", default="", help="also write the table into this README's study section")
    ap.add_argument("--smoke", default="false", help="true: a smoke run, which never writes the README")
    args = ap.parse_args(argv)
    study = {"settings": {s: setting_summary(args.exp / s) for s in args.settings}}
    if not any(study["settings"].values()):
        print(f"error: no finished seed under {args.exp} (run stage 2 first)", file=sys.stderr)
        return 2
    (args.exp / "study.json").write_text(json.dumps(study, indent=2))
    table = fmt_table(study)
    note = ("\n\nTest WER (%), mean ± standard deviation over seeds; bold: the lowest mean of the "
            "setting. OPD - seq-KD: the difference of their WER in points with a 95% paired bootstrap "
            "interval over the utterances of all seeds (n.s.: the interval includes 0; negative: OPD "
            "makes fewer errors). Each method's step count gives it the same seconds of training "
            "(`conf/study/budget_*.yaml`, measured per task and student).")
    (args.exp / "STUDY.md").write_text(f"# OPD study\n\n{table}{note}\n")
    print(table)
    plot(study, args.exp / "study.png")
    print(f"wrote {args.exp / 'STUDY.md'}, {args.exp / 'study.json'}, {args.exp / 'study.png'}")
    if args.readme and args.smoke != "true":
        assets = Path(args.readme).parent / "assets"
        assets.mkdir(exist_ok=True)
        shutil.copyfile(args.exp / "study.png", assets / "study.png")
        update_readme(args.readme, table + note + "\n\n![OPD study](assets/study.png)", tag="study")
        print(f"study table written into {args.readme}, its plot into {assets / 'study.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
