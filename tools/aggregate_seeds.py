#!/usr/bin/env python3
"""Combine the ``results.json`` of runs that differ only in their training seed (``run.sh --seeds N``).

    python -m tools.aggregate_seeds --out exp/results.json --metric wer exp/seed0/results.json exp/seed1/results.json ...

Every number of the per-seed files becomes ``{"mean", "std", "per_seed": [...]}`` (``std``: the
sample standard deviation, 0 for one seed); a list of numbers (an interval) becomes ``{"per_seed":
[...]}``; anything else keeps the first seed's value when all seeds agree, else ``{"per_seed":
[...]}``. Keys missing from some seed are kept with the seeds that have them. ``seeds`` lists the
seeds. ``--metric`` also prints (and with ``--table``, writes) a Markdown table of that metric per
system (each top-level entry and each baseline that has it): mean, standard deviation and the
per-seed values, in percent.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def combine(values: list):
    """One aggregated value from the seeds' ``values`` (None where a seed lacks it)."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    if all(isinstance(v, dict) for v in have):
        keys = list(dict.fromkeys(k for v in have for k in v))
        return {k: combine([v.get(k) if isinstance(v, dict) else None for v in values]) for k in keys}
    if all(_is_num(v) for v in have):
        mean = statistics.fmean(have)
        std = statistics.stdev(have) if len(have) > 1 else 0.0
        return {"mean": round(mean, 6), "std": round(std, 6), "per_seed": have}
    if all(isinstance(v, list) and all(_is_num(x) for x in v) for v in have):
        return {"per_seed": have}
    if all(v == have[0] for v in have):
        return have[0]
    return {"per_seed": have}


def _shown(f: Path, base: Path) -> str:
    """``f`` as ``base``'s name plus the path below it (``exp/seed0/results.json``), so that a table
    written into a README names it from the recipe's folder; ``f`` itself when it is elsewhere."""
    try:
        return str(Path(base.resolve().name) / f.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(f)


def aggregate(files: list[Path], seeds: list[int] | None = None, base: Path | None = None) -> dict:
    """``base``: the folder of the combined results.json; the per-seed files are named from its
    parent (``exp/seed0/results.json``) where they lie below it."""
    runs = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no results.json (did that seed's run finish?)")
        runs.append(json.loads(f.read_text()))
    out = combine(runs)
    out["seeds"] = seeds if seeds is not None else list(range(len(files)))
    out["per_seed_files"] = [_shown(f, base) if base is not None else str(f) for f in files]
    return out


def metric_table(agg: dict, metric: str) -> str:
    """``metric``: a key of each system (``wer``, ``acc``: shown x 100, in percent), or ``KEY:SCALE``
    (``CIDEr:1``: shown as it is)."""
    metric, _, sc = metric.partition(":")
    scale = float(sc) if sc else 100.0
    unit = " (%)" if scale == 100.0 else ""
    rows = [(k, v) for k, v in agg.items() if isinstance(v, dict) and isinstance(v.get(metric), dict)
            and "mean" in v[metric]]
    rows += [(k, v) for k, v in (agg.get("baselines") or {}).items()
             if isinstance(v, dict) and isinstance(v.get(metric), dict) and "mean" in v[metric]]
    n = len(agg.get("seeds", []))
    lines = [f"| system | {metric}{unit} mean | std | per seed ({n}) |", "|---|---|---|---|"]
    for k, v in rows:
        m = v[metric]
        lines.append(f"| {k} | {scale * m['mean']:.2f} | {scale * m['std']:.2f} | "
                     + ", ".join(f"{scale * x:.2f}" for x in m["per_seed"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("files", nargs="+", type=Path, help="the per-seed results.json")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", default="", help="comma-separated seeds of the files (default 0, 1, ...)")
    ap.add_argument("--metric", default="", help="print a table of this metric (e.g. wer, acc: "
                    "in percent; CIDEr:1: as it is)")
    ap.add_argument("--table", type=Path, help="also write that table here (Markdown)")
    ap.add_argument("--report_exp", type=Path, help="write the table to this folder's RESULTS.md (tools/report.py)")
    ap.add_argument("--readme", default="", help="with --report_exp: also into this README's results section")
    ap.add_argument("--smoke", default="false", help="true: a smoke run, which never writes the README")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        if seeds is not None and len(seeds) != len(args.files):
            raise ValueError(f"--seeds names {len(seeds)} seeds for {len(args.files)} files")
        agg = aggregate(args.files, seeds, base=args.out.parent)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(agg, indent=2, ensure_ascii=False))
    if args.metric:
        t = metric_table(agg, args.metric)
        print(t)
        if args.table:
            args.table.write_text(t + "\n")
        if args.report_exp:
            from tools.report import write_results
            note = (f"\n\nMean and sample standard deviation over {len(agg['seeds'])} training seeds "
                    f"({', '.join(map(str, agg['seeds']))}) after the shared warm-up; each seed's own table, with "
                    f"its bootstrap intervals, is in its folder: {', '.join(agg['per_seed_files'])}.")
            write_results(args.report_exp, t + note, readme=args.readme, smoke=args.smoke == "true")
    return 0


if __name__ == "__main__":
    sys.exit(main())
