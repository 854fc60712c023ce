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
    python -m tools.step_budget args --conf conf/budget.yaml opd      # -> train.max_seconds=0 train.max_steps=380
    python -m tools.step_budget table --conf conf/budget.yaml         # the README's table

ReST (``core/rest.py``) samples and trains in rounds, so its budget is a number of rounds, not of
steps: ``NAME=DIR`` of a ReST run (its ``rest_summary.json``) gives ``rounds.NAME``, the rounds
whose summed seconds (sampling and SFT steps) fit in the target (at least one), with their learning
rates; ``args`` then prints ``train.max_seconds=0 rest.rounds=R rest.lrs=[...]``. Every round runs
whole (one pass over its kept samples).
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
    steps, rounds = b.get("steps") or {}, b.get("rounds") or {}
    if not isinstance(steps, dict) or not isinstance(rounds, dict) or not (steps or rounds):
        raise BudgetError(f"{p}: key 'steps' must map each method to its step count")
    for k, v in rounds.items():
        ok = isinstance(v, dict) and isinstance(v.get("rounds"), int) and v["rounds"] >= 1
        if not ok or len(v.get("lrs") or []) != v["rounds"]:
            raise BudgetError(f"{p}: rounds.{k} needs 'rounds' (a positive integer) and one of 'lrs' per round")
    bad = [k for k, v in steps.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise BudgetError(f"{p}: steps.{bad[0]} must be a positive integer, got {steps[bad[0]]!r}")
    return b


def steps_of(conf: str | Path, name: str, scale: float = 1.0) -> int:
    """Method ``name``'s step count, times ``scale`` (rounded, at least 1)."""
    b = load(conf)
    steps = b.get("steps") or {}
    if name not in steps:
        raise BudgetError(f"{conf}: no steps.{name} (has: {', '.join(steps) or 'none'})")
    if scale <= 0:
        raise BudgetError(f"--scale must be positive, got {scale}")
    return max(1, round(steps[name] * scale))


def train_args(conf: str | Path, name: str, scale: float = 1.0) -> list[str]:
    """The ``core.bin.train`` overrides that bound method ``name``: its step count, or for a
    ReST entry its rounds (times ``scale``, at least 1) with their learning rates."""
    b = load(conf)
    r = (b.get("rounds") or {}).get(name)
    if r is None:
        return ["train.max_seconds=0", f"train.max_steps={steps_of(conf, name, scale)}"]
    if scale <= 0:
        raise BudgetError(f"--scale must be positive, got {scale}")
    n = max(1, round(r["rounds"] * scale))
    return ["train.max_seconds=0", f"rest.rounds={n}", "rest.lrs=[" + ",".join(repr(float(x)) for x in r["lrs"][:n]) + "]"]


def _measure_rest(name: str, d: Path, target: float) -> tuple[dict, dict]:
    """A ReST run's rounds that fit in ``target`` seconds (their sampling + SFT seconds summed; a
    round counts when at least half of it fits, so the total is the nearest to ``target``)."""
    s = d / "rest_summary.json"
    t = json.loads(s.read_text())
    rounds = [r for r in t.get("rounds", []) if "budget_seconds" in r]
    if not rounds:
        raise BudgetError(f"{s}: no finished round to measure")
    n, total = 0, 0.0
    for r in rounds:
        if n and total + r["budget_seconds"] / 2 > target:
            break
        n, total = n + 1, total + r["budget_seconds"]
    entry = {"rounds": n, "lrs": [float(r["lr"]) for r in rounds[:n]]}
    return entry, {"rounds_done": len(rounds), "seconds_per_round": [round(r["budget_seconds"], 2) for r in rounds],
                   "sft_steps": [r.get("sft_steps", 0) for r in rounds]}


def _others(old: dict, key: str, runs: dict) -> dict:
    """``old[key]`` without the entries of the methods measured now."""
    return {k: v for k, v in (old.get(key) or {}).items() if k not in runs}


def measure(conf: str | Path, runs: dict[str, Path], target_seconds: float, machine: str,
            note: str = "", shares: dict[str, float] | None = None) -> dict:
    """Seconds per step of each ``runs`` (name -> a finished run's folder) and the step counts
    for ``target_seconds`` (``shares[name]`` seconds for the names it has); written to ``conf``
    (other keys of an existing file are kept)."""
    shares = shares or {}
    if target_seconds <= 0:
        raise BudgetError("--target_seconds must be positive")
    sps, measured, rounds = {}, {}, {}
    for name, d in runs.items():
        if (Path(d) / "rest_summary.json").is_file():
            rounds[name], measured[name] = _measure_rest(name, Path(d), shares.get(name, target_seconds))
            continue
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
        # measured names replace their entries; the others' stay, with their own figures
        "seconds_per_step": {**_others(out, "seconds_per_step", runs), **{k: round(v, 5) for k, v in sps.items()}},
        "measured": {**_others(out, "measured", runs), **measured},
        "shares": {**_others(out, "shares", runs), **shares},
        "steps": {**(out.get("steps") or {}),
                  **{name: max(1, round(shares.get(name, target_seconds) / v)) for name, v in sps.items()}},
        "rounds": {**(out.get("rounds") or {}), **rounds},
    })
    if not out["shares"]:
        out.pop("shares")
    for k in ("steps", "rounds"):
        for name in runs:  # a method measured now in the other form loses its old entry
            if name not in (sps if k == "steps" else rounds):
                out[k].pop(name, None)
        if not out[k]:
            out.pop(k)
    Path(conf).write_text(HEADER + yaml.safe_dump(out, sort_keys=False))
    return out


def markdown(conf: str | Path) -> str:
    """The budget file as a Markdown table: each method's measured seconds per step (ReST: per
    round) and its count."""
    b = load(conf)
    sps, meas = b.get("seconds_per_step") or {}, b.get("measured") or {}
    share = b.get("shares") or {}
    lines = ["| method | seconds / step | steps | of seconds |", "|---|---|---|---|"]
    for k, n in (b.get("steps") or {}).items():
        lines.append(f"| {k} | {sps.get(k, float('nan')):.3f} | {n} | {share.get(k, b.get('target_seconds'))} |")
    for k, r in (b.get("rounds") or {}).items():
        per = (meas.get(k) or {}).get("seconds_per_round") or []
        lines.append(f"| {k} | rounds of {', '.join(f'{x:.0f}' for x in per[:r['rounds']])} s | "
                     f"{r['rounds']} round(s) | {share.get(k, b.get('target_seconds'))} |")
    return "\n".join(lines)


def compute_settings(budget: str, conf: str | Path, training: dict, scale: float = 1.0) -> dict:
    """How a recipe's compared methods were made equal, for its ``results.json``: fixed step
    counts (with the seconds per step they were derived from; ``scale``: the counts were
    multiplied by it) or seconds of wall-clock (``run.sh --budget``). ``training``: each run's
    summary (``steps``), by name."""
    if budget:
        return {"mode": "wall_clock", "budget_seconds": float(budget)}
    b = load(conf)
    if scale != 1.0:
        b["scale"] = scale
    return {"mode": "steps", "conf": str(conf), **b,
            "steps_run": {k: (training.get(k) or {}).get("steps") for k in b.get("steps") or {}},
            "rounds_run": {k: len((training.get(k) or {}).get("rounds") or []) for k in b.get("rounds") or {}}}


def compute_line(c: dict, what: str = "compared method") -> str:
    """One sentence for a results table: how the compute was made equal."""
    if c["mode"] == "wall_clock":
        return f"{c['budget_seconds']:g} s of wall-clock per {what}"
    ref = c.get("reference", {})
    ran = {k: v for k, v in (c.get("steps_run") or c.get("steps") or {}).items() if v}
    parts = [f"{k} {v}" for k, v in ran.items()]
    rounds = c.get("rounds_run") or {k: r["rounds"] for k, r in (c.get("rounds") or {}).items()}
    parts += [f"{k} {v} round(s)" for k, v in rounds.items() if v]
    scaled = f" (x {c['scale']:g} here)" if c.get("scale", 1.0) != 1.0 else ""
    return (f"fixed steps per {what} ({', '.join(parts)}); {c['conf']}'s counts{scaled} give each "
            f"{c.get('target_seconds')} s at the seconds per step measured on "
            f"{ref.get('date', '?')} ({ref.get('machine', '?')})")


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
    a = sub.add_parser("args", help="print one method's train overrides (steps, or ReST's rounds)")
    a.add_argument("--conf", required=True)
    a.add_argument("name")
    a.add_argument("--scale", type=float, default=1.0, help="multiply the count (smoke runs), at least 1")
    t = sub.add_parser("table", help="print the file as a Markdown table (for a README)")
    t.add_argument("--conf", required=True)
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
        elif args.cmd == "table":
            print(markdown(args.conf))
        elif args.cmd == "args":
            print(" ".join(train_args(args.conf, args.name, args.scale)))
        else:
            print(json.dumps(load(args.conf)))
    except BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
