"""Run every benchmark in one process and write ``results.json``.

    python -m benchmarks.run [--smoke] [--only NAME ...] [--out benchmarks/results.json]
    python -m benchmarks.run --device cuda [--dtype bfloat16] [--zero 2]   # on a GPU

Each benchmark module exposes ``BENCHMARKS = {name: fn}`` with ``fn(smoke: bool = False) -> dict``.
All run in this one invocation with the same settings (``torch.set_num_threads(2)``, the same
seeds before each benchmark). A benchmark that raises, or a module that cannot be imported, is
recorded with its error and the run goes on; the exit code is 1 at the end if any failed.
``--only`` takes benchmark names or module names (``overhead``, ``trl_compare``, ``opd_step``).

Prints a table (benchmark, ours, reference, ratio, goal, met) and writes the date, the machine
(platform, CPU count, threads, torch / transformers / trl versions) and each benchmark's dict.

``--device cuda`` runs the GPU-ready benchmarks (``GPU_READY``: the training steps against TRL,
in bf16 under DeepSpeed ZeRO-2 on both sides unless ``--dtype`` / ``--zero`` say otherwise, and
the rollout) on this process's GPU and writes ``benchmarks/results_gpu.json``, so the CPU table
stays beside it; the others are listed as skipped.

What it leaves out: any threshold on timings (a missed goal is reported, not an error).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

# module -> the benchmark names it is expected to provide (used to name an import failure)
MODULES = {
    "benchmarks.trl_compare": ["opd_step", "grpo_step", "opd_step_long_prompt", "grpo_step_long_prompt"],
    "benchmarks.overhead": ["overhead"],
    "benchmarks.divergence_memory": ["divergence_memory"],
    "benchmarks.rollout_speed": ["rollout"],
    "benchmarks.audio_opd_profile": ["audio_opd_profile", "lm_head_slice", "encoder_once"],
    "benchmarks.vllm_rollout": ["rollout_vllm", "rollout_vllm_0.5b"],
}
THREADS = 2
SEED = 0
# the benchmarks that run on a GPU too; the others measure the CPU (process RSS, CPU kernels)
GPU_READY = ("opd_step", "grpo_step", "opd_step_long_prompt", "grpo_step_long_prompt", "rollout")


def _seed_all(seed: int = SEED) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _wanted(only, module: str, name: str) -> bool:
    if not only:
        return True
    short = module.rsplit(".", 1)[-1]
    return name in only or short in only or module in only


def collect(only=None):
    """[(name, fn_or_None, error_or_None, module)] in run order."""
    out = []
    for module, expected in MODULES.items():
        names = [n for n in expected if _wanted(only, module, n)]
        try:
            mod = importlib.import_module(module)
            benches = getattr(mod, "BENCHMARKS")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            err = f"{type(e).__name__}: {e}"
            if names or _wanted(only, module, ""):
                tb = traceback.format_exc()
                for n in (names or expected):
                    out.append((n, None, {"error": err, "traceback": tb}, module))
            continue
        for name, fn in benches.items():
            if _wanted(only, module, name):
                out.append((name, fn, None, module))
    return out


def _first(d: dict, prefixes) -> object:
    for p in prefixes:
        if p in d:
            return d[p]
    for p in prefixes:
        for k, v in d.items():
            if k.startswith(p) and isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
    return None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(results: dict) -> str:
    head = ["benchmark", "ours", "reference", "ratio", "goal", "met"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "ERROR", "-", "-", "-", r["error"][:60]])
            continue
        if "skipped" in r:
            rows.append([name, "skipped", "-", "-", "-", r["skipped"][:60]])
            continue
        ours = _first(r, ["ours", "ours_tokens_per_s", "ours_s", "step_s", "ours_"])
        ref = _first(r, ["reference", "reference_tokens_per_s", "reference_s", "ref", "trl", "reference_", "trl_"])
        rows.append([name, _fmt(ours), _fmt(ref), _fmt(r.get("ratio")), _fmt(r.get("goal")), _fmt(r.get("met"))])
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few repeats (a quick check, not numbers)")
    ap.add_argument("--only", nargs="+", default=None, help="benchmark or module names to run")
    ap.add_argument("--out", default=None,
                    help="where to write the results (default benchmarks/results.json, on a GPU "
                         "benchmarks/results_gpu.json)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help=f"cuda: run {', '.join(GPU_READY)} on this process's GPU")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights and compute (default float32 on the CPU, bfloat16 on a GPU)")
    ap.add_argument("--zero", type=int, choices=(0, 2, 3), default=None,
                    help="DeepSpeed ZeRO stage of the training-step comparisons, both sides (0 = no DeepSpeed; "
                         "default 0 on the CPU, 2 on a GPU)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(THREADS)
    from benchmarks import common
    try:
        common.configure(args.device, args.dtype, args.zero)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = "benchmarks/results_gpu.json" if args.device == "cuda" else "benchmarks/results.json"

    started = time.time()
    results, failed = {}, []
    todo = collect(args.only)
    if not todo:
        print(f"no benchmark matches --only {args.only}", file=sys.stderr)
        return 2
    for name, fn, err, module in todo:
        if err is not None:
            results[name] = dict(err, module=module)
            failed.append(name)
            print(f"[bench] {name}: import failed: {err['error']}", file=sys.stderr, flush=True)
            continue
        if common.on_gpu() and name not in GPU_READY:
            results[name] = {"skipped": "a CPU benchmark (run without --device cuda)", "module": module}
            continue
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        torch.set_num_threads(THREADS)
        _seed_all()
        t0 = time.time()
        try:
            r = fn(smoke=args.smoke)
            if not isinstance(r, dict):
                raise TypeError(f"benchmark {name} returned {type(r).__name__}, not a dict")
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed.append(name)
            print(f"[bench] {name} failed: {r['error']}", file=sys.stderr, flush=True)
        r = dict(r)
        r.setdefault("module", module)
        r["wall_s"] = round(time.time() - t0, 2)
        results[name] = r
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "smoke": args.smoke, "machine": common.machine(), "seed": SEED,
           "total_s": round(time.time() - started, 2), "failed": failed, "benchmarks": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(table(results))
    print(f"\nwrote {path} ({'smoke, ' if args.smoke else ''}{out['total_s']} s)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
