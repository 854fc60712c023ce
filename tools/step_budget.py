#!/usr/bin/env python3
"""Equal compute as fixed step counts: the recipes' ``conf/budget.yaml``.

The methods a recipe compares (OPD against its baselines ...) each get a number of optimizer
steps, not seconds, so a default run gives the same numbers on a busy machine as on a quiet one.
The step counts give every method the same compute: ``target_seconds`` at the seconds per step
each method took on a reference machine, measured once by a run with a wall-clock budget::

    bash recipes/asr/run.sh --budget 150            # every compared method trains 150 s
    python -m tools.step_budget measure --conf recipes/asr/conf/budget.yaml --target_seconds 150 \\
        --machine "2-core CPU" opd=recipes/asr/exp/opd sft_more=recipes/asr/exp/sft_more td_kd=recipes/asr/exp/td_kd@75 ...

``measure`` reads each run's ``train_summary.json`` (``steps``, ``train_seconds``: the seconds
spent in training steps, evaluation excluded), writes ``seconds_per_step`` and ``steps`` =
round(target_seconds / seconds_per_step) with the date and machine into the YAML (``NAME=DIR@S``:
that method's share is S seconds, e.g. each half of a two-part method). Then::

    python -m tools.step_budget steps --conf conf/budget.yaml opd     # -> 406 (run.sh reads this)
    python -m tools.step_budget steps --conf conf/budget.yaml opd --scale 0.05   # -> 20 (smoke runs)
    python -m tools.step_budget show --conf conf/budget.yaml          # the file as JSON (results.json)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import yaml

HEADER = ("# Equal compute as fixed step counts (tools/step_budget.py): each compared method trains\n"
          "# `steps`, the steps it takes in `target_seconds` at the seconds per step measured on the\n"
          "# reference machine. Regenerate with `python -m tools.step_budget measure` after a run with\n"
          "# a wall-clock --budget (the recipe README says how).\n")


class BudgetError(ValueError):
    pass


def load(conf: str | Path) -> dict:
    p = Path(conf)
    if not p.is_file():
        raise BudgetError(f"{p}: no step budget file")
    try:
        b = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise BudgetError(f"{p}: not valid YAML: {e}") from None
    steps = b.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise BudgetError(f"{p}: key 'steps' must map each method to its step count")
    bad = [k for k, v in steps.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise BudgetError(f"{p}: steps.{bad[0]} must be a positive integer, got {steps[bad[0]]!r}")
    return b


def steps_of(conf: str | Path, name: str, scale: float = 1.0) -> int:
    """Method ``name``'s step count, times ``scale`` (rounded, at least 1)."""
    b = load(conf)
    if name not in b["steps"]:
        raise BudgetError(f"{conf}: no steps.{name} (has: {', '.join(b['steps'])})")
    if scale <= 0:
        raise BudgetError(f"--scale must be positive, got {scale}")
    return max(1, round(b["steps"][name] * scale))


def measure(conf: str | Path, runs: dict[str, Path], target_seconds: float, machine: str,
            note: str = "", shares: dict[str, float] | None = None) -> dict:
    """Seconds per step of each ``runs`` (name -> a finished run's folder) and the step counts
    for ``target_seconds`` (``shares[name]`` seconds for the names it has); written to ``conf``
    (other keys of an existing file are kept)."""
    shares = shares or {}
    if target_seconds <= 0:
        raise BudgetError("--target_seconds must be positive")
    sps, measured = {}, {}
    for name, d in runs.items():
        s = Path(d) / "train_summary.json"
        if not s.is_file():
            raise BudgetError(f"{name}={d}: no train_summary.json (a finished run's folder is needed)")
        t = json.loads(s.read_text())
        if not t.get("steps") or not t.get("train_seconds"):
            raise BudgetError(f"{s}: no steps / train_seconds to measure")
        sps[name] = t["train_seconds"] / t["steps"]
        measured[name] = {"steps": t["steps"], "train_seconds": t["train_seconds"]}
    old = yaml.safe_load(Path(conf).read_text()) if Path(conf).is_file() else {}
    out = dict(old or {})
    out.update({
        "target_seconds": target_seconds,
        "reference": {"machine": machine, "date": datetime.date.today().isoformat(),
                      **({"note": note} if note else {})},
        "seconds_per_step": {k: round(v, 5) for k, v in sps.items()},
        "measured": measured,
        **({"shares": shares} if shares else {}),
        "steps": {name: max(1, round(shares.get(name, target_seconds) / v)) for name, v in sps.items()},
    })
    Path(conf).write_text(HEADER + yaml.safe_dump(out, sort_keys=False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="seconds per step of finished runs -> step counts")
    m.add_argument("--conf", required=True)
    m.add_argument("--target_seconds", type=float, required=True)
    m.add_argument("--machine", required=True, help="what the reference machine is (written into the file)")
    m.add_argument("--note", default="")
    m.add_argument("runs", nargs="+", help="NAME=RUN_DIR[@SECONDS] (a run folder with train_summary.json; "
                   "@SECONDS: that method's share instead of --target_seconds)")
    s = sub.add_parser("steps", help="print one method's step count")
    s.add_argument("--conf", required=True)
    s.add_argument("name")
    s.add_argument("--scale", type=float, default=1.0, help="multiply the count (smoke runs), at least 1")
    sh = sub.add_parser("show", help="print the file as JSON")
    sh.add_argument("--conf", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "measure":
            runs, shares = {}, {}
            for r in args.runs:
                name, sep, d = r.partition("=")
                if not sep or not name or not d:
                    raise BudgetError(f"{r!r}: expected NAME=RUN_DIR[@SECONDS]")
                d, at, sec = d.partition("@")
                if at:
                    try:
                        shares[name] = float(sec)
                    except ValueError:
                        raise BudgetError(f"{r!r}: @{sec} is not a number of seconds") from None
                runs[name] = Path(d)
            out = measure(args.conf, runs, args.target_seconds, args.machine, args.note, shares)
            print(json.dumps(out["steps"]))
        elif args.cmd == "steps":
            print(steps_of(args.conf, args.name, args.scale))
        else:
            print(json.dumps(load(args.conf)))
    except BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
