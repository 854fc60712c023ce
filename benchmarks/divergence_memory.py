"""Peak memory and time of a full-vocabulary distillation loss, forward + backward, on CPU.

Five ways to compute the same loss (token-mean over the masked positions of a divergence between
the student's and the teacher's next-token distributions, both from hidden states and LM heads):

- ``naive``: ``log_softmax`` over the full ``[B, T, V]`` logits ``hidden @ W^T``, plain autograd;
- ``distill_loss``: ``core.losses.distill_loss`` on the full logits (chunked over positions);
- ``from_hidden``: ``core.losses.distill_loss_from_hidden`` (chunked, fused with the LM head);
- ``trl_gkd``: ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` on the full logits;
- ``trl_chunked``: ``trl.trainer.distillation_trainer._chunked_divergence_loss``, the loss of TRL's
  ``DistillationTrainer`` (hidden states + LM heads, tiled by ``ChunkedDivergenceFunction``).

Every variant starts from the same seeded inputs (student hidden + LM head with gradient, teacher
hidden + LM head without), computes whatever logits it needs inside the measured region, and runs
one forward + backward in a fresh Python process. Peak memory is ``ru_maxrss`` after the run
minus the resident set size just before it (inputs already allocated). Divergences: reverse KL
(TRL's ``beta = 1``) and the generalised JSD with GKD's default ``beta = 0.5``.

Each process runs under an address-space limit (``MEM_LIMIT_GIB`` = 9 GiB above its size before
the run): a variant that needs more fails and is reported as such. Each case first tries
``[B, T] = [4, 512]`` at V = 151,936; if the naive variant cannot complete within the limit, the
positions are halved until it does, and all variants of that case run at that size. Values and
gradients of all variants are compared with the naive ones. TRL's GKD loss, if it does not fit in
the limit at the case size, is measured again (with the naive version beside it) at the largest
halved size where it fits (``trl_gkd_reduced_size``).

Returned per case: ``size``, per variant ``peak_gib`` / ``seconds`` / ``value`` and their ratios
to the naive and TRL chunked variants (or ``error``), ``agreement`` (relative value and absolute
gradient differences to naive), and ``goals`` (ours, the better of ``distill_loss`` and
``from_hidden``: peak <= 25% of naive, peak below TRL chunked, faster than TRL chunked).
No timing assertions: timings on a shared CPU are noisy, compare ratios from one run.

Usage: ``python benchmarks/divergence_memory.py [--smoke]`` prints the result as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = ("naive", "distill_loss", "from_hidden", "trl_gkd", "trl_chunked")
OURS = ("distill_loss", "from_hidden")
# (name, our divergence, beta of ours, beta in TRL's convention)
DIVERGENCE_CASES = (("reverse_kl", "reverse_kl", 0.5, 1.0), ("jsd_beta0.5", "jsd", 0.5, 0.5))
FULL = dict(V=151_936, H=128, Ht=128, B=4, T=512)
SMOKE = dict(V=1000, H=32, Ht=48, B=2, T=16)
MEM_LIMIT_GIB = 9.0  # address-space growth allowed to each variant's process
CHUNK_SIZE = 256  # positions per chunk for both of ours (their default)
GIB = float(1 << 30)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_inputs(cfg):
    import torch

    g = torch.Generator().manual_seed(1234)
    V, H, Ht, B, T = cfg["V"], cfg["H"], cfg["Ht"], cfg["B"], cfg["T"]
    # In-place scaling keeps input creation from raising the high-water mark above the baseline.
    h_s = torch.randn(B, T, H, generator=g)
    w_s = torch.randn(V, H, generator=g).mul_(2.0 / H**0.5)
    h_t = torch.randn(B, T, Ht, generator=g)
    w_t = torch.randn(V, Ht, generator=g).mul_(2.5 / Ht**0.5)
    mask = torch.ones(B, T)  # every position counts: no variant gains from skipping padding
    return h_s.requires_grad_(True), w_s.requires_grad_(True), h_t, w_t, mask


def _loss_fn(variant: str, divergence: str, beta: float, trl_beta: float, chunk: int):
    import torch
    import torch.nn.functional as F

    if variant == "naive":
        import math

        def run(h_s, w_s, h_t, w_t, mask):
            s = F.log_softmax(h_s @ w_s.T, dim=-1)
            with torch.no_grad():
                t = F.log_softmax(h_t @ w_t.T, dim=-1)
            if divergence == "reverse_kl":
                per = (s.exp() * (s - t)).sum(-1)
            else:
                log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
                per = beta * (t.exp() * (t - log_m)).sum(-1) + (1 - beta) * (s.exp() * (s - log_m)).sum(-1)
            return (per * mask).sum() / mask.sum()

    elif variant == "distill_loss":
        from core.losses import distill_loss

        def run(h_s, w_s, h_t, w_t, mask):
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            return distill_loss(h_s @ w_s.T, t_logits, mask=mask, divergence=divergence, beta=beta,
                                chunk_size=chunk)[0]

    elif variant == "from_hidden":
        from core.losses import distill_loss_from_hidden

        def run(h_s, w_s, h_t, w_t, mask):
            return distill_loss_from_hidden(h_s, w_s, teacher_hidden=h_t, teacher_lm_head_weight=w_t, mask=mask,
                                            divergence=divergence, beta=beta, chunk_size=chunk)[0]

    elif variant == "trl_gkd":
        from trl.experimental.gkd import GKDTrainer

        def run(h_s, w_s, h_t, w_t, mask):
            with torch.no_grad():
                t_logits = h_t @ w_t.T
            labels = torch.where(mask.bool(), 0, -100)
            return GKDTrainer.generalized_jsd_loss(h_s @ w_s.T, t_logits, labels=labels, beta=trl_beta)

    elif variant == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run(h_s, w_s, h_t, w_t, mask):
            return _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, trl_beta)[0]

    else:
        raise ValueError(f"unknown variant {variant!r}")
    return run


def _child(variant, case, cfg, chunk, limit_gib, out_path) -> Dict:
    """Runs in a fresh process: inputs, baseline RSS, one forward + backward, peak RSS."""
    try:
        import torch

        _, divergence, beta, trl_beta = case
        fn = _loss_fn(variant, divergence, beta, trl_beta, chunk)
        h_s, w_s, h_t, w_t, mask = _make_inputs(cfg)
        if limit_gib is not None:
            # Cap the address space at its current size + limit_gib: an allocation past it fails.
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            lim = vm + int(limit_gib * GIB)
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            resource.setrlimit(resource.RLIMIT_AS, (lim if hard == resource.RLIM_INFINITY else min(lim, hard), hard))
        base = _rss_bytes()
        hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        loss = fn(h_s, w_s, h_t, w_t, mask)
        loss.backward()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        value = float(loss.detach())
        del loss
        resource.setrlimit(resource.RLIMIT_AS, (resource.getrlimit(resource.RLIMIT_AS)[1],) * 2)
        torch.save({"loss": torch.tensor(value, dtype=torch.float64), "grad_h": h_s.grad, "grad_w": w_s.grad},
                   out_path)
        return {
            "ok": True,
            "peak_gib": (peak - base) / GIB,
            "seconds": seconds,
            "value": value,
            "baseline_gib": base / GIB,
            "hwm_before_excess_gib": max(0, hwm_before - base) / GIB,
            "torch_threads": torch.get_num_threads(),
        }
    except (RuntimeError, MemoryError) as e:  # allocation failure under the limit
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def _run_variant(variant, case, cfg, chunk, limit_gib, out_path, in_process: bool = False) -> Dict:
    """Run ``_child`` in a fresh interpreter (``python this_file --child ARGS``); JSON on stdout.

    ``in_process`` (smoke mode) runs it here instead: fast, but its peak memory means nothing.
    """
    if in_process:
        return _child(variant, case, cfg, chunk, limit_gib, out_path)
    args = json.dumps([variant, list(case), cfg, chunk, limit_gib, out_path])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if not lines:
        return {"ok": False, "error": f"process exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1][len(_TAG):])


_TAG = "@@divergence_memory@@"


def _compare_here(paths: Dict[str, str], ref: str) -> Dict[str, Dict[str, float]]:
    import torch

    r = torch.load(paths[ref])
    out = {}
    for name, path in paths.items():
        if name == ref:
            continue
        x = torch.load(path)
        entry = {"value_abs_diff": float((x["loss"] - r["loss"]).abs()),
                 "value_rel_diff": float((x["loss"] - r["loss"]).abs() / r["loss"].abs().clamp_min(1e-30))}
        for g in ("grad_h", "grad_w"):
            a, b = x[g].double(), r[g].double()
            entry[f"{g}_max_abs_diff"] = float((a - b).abs().max())
            entry[f"{g}_max_abs"] = float(b.abs().max())
        out[name] = entry
    return out


def _compare(paths: Dict[str, str], ref: str, in_process: bool = False) -> Dict[str, Dict[str, float]]:
    """Value and gradient differences to ``ref``, computed in a separate process.

    The parent stays small (no torch, no gradients loaded): a forked child inherits the parent's
    resident size as its starting ``ru_maxrss``, which would hide a smaller peak.
    """
    if in_process:
        return _compare_here(paths, ref)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compare", json.dumps([paths, ref])],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if not lines:
        raise RuntimeError(f"comparison failed: {proc.stderr.strip()[-500:]}")
    return json.loads(lines[-1][len(_TAG):])


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _run_case(case, cfg, chunk, limit, tmp, smoke, notes) -> Dict:
    """Size the case by the naive variant, then run every variant at that size."""
    results, paths = {}, {}
    cfg = dict(cfg)
    while True:
        path = os.path.join(tmp, f"{case[0]}_naive.pt")
        res = _run_variant("naive", case, cfg, chunk, limit, path, smoke)
        print(f"[divergence_memory] {case[0]} [{cfg['B']}, {cfg['T']}] naive: {res}", file=sys.stderr, flush=True)
        if res.get("ok") or smoke or (cfg["T"] <= 64 and cfg["B"] <= 1):
            break
        notes.append(f"{case[0]}: naive failed at [B, T] = [{cfg['B']}, {cfg['T']}] within {limit} GiB "
                     f"({res.get('error', '')[:120]}); halving the positions")
        if cfg["T"] > 64:
            cfg["T"] //= 2
        else:
            cfg["B"] //= 2
    results["naive"] = res
    if res.get("ok"):
        paths["naive"] = path
    for v in VARIANTS[1:]:
        path = os.path.join(tmp, f"{case[0]}_{v}.pt")
        res = _run_variant(v, case, cfg, chunk, limit, path, smoke)
        results[v] = res
        if res.get("ok"):
            paths[v] = path
        print(f"[divergence_memory] {case[0]} [{cfg['B']}, {cfg['T']}] {v}: {res}", file=sys.stderr, flush=True)
    reduced = None
    if not smoke and not results["trl_gkd"].get("ok"):
        reduced = _reduced_run("trl_gkd", case, cfg, chunk, limit, tmp, notes)
    return {"results": results, "paths": paths, "cfg": cfg, "reduced": reduced}


def _reduced_run(variant, case, cfg, chunk, limit, tmp, notes) -> Optional[Dict]:
    """``variant`` failed within the limit: halve the positions until it runs, and run the naive
    version at that size too, so that its peak, time and agreement are still reported."""
    cfg = dict(cfg)
    while cfg["T"] > 16:
        cfg["T"] //= 2
        path = os.path.join(tmp, f"{case[0]}_{variant}_reduced.pt")
        res = _run_variant(variant, case, cfg, chunk, limit, path, False)
        print(f"[divergence_memory] {case[0]} [{cfg['B']}, {cfg['T']}] {variant}: {res}", file=sys.stderr, flush=True)
        if not res.get("ok"):
            continue
        ref_path = os.path.join(tmp, f"{case[0]}_naive_reduced.pt")
        ref = _run_variant("naive", case, cfg, chunk, limit, ref_path, False)
        print(f"[divergence_memory] {case[0]} [{cfg['B']}, {cfg['T']}] naive: {ref}", file=sys.stderr, flush=True)
        out = {"variant": variant, "B": cfg["B"], "T": cfg["T"], "positions": cfg["B"] * cfg["T"],
               "peak_gib": res["peak_gib"], "seconds": res["seconds"], "value": res["value"]}
        if ref.get("ok"):
            out.update({"naive_peak_gib": ref["peak_gib"], "naive_seconds": ref["seconds"],
                        "naive_value": ref["value"], "peak_vs_naive": _ratio(res["peak_gib"], ref["peak_gib"]),
                        "seconds_vs_naive": _ratio(res["seconds"], ref["seconds"]),
                        "diffs_vs_naive": _compare({variant: path, "naive": ref_path}, "naive")[variant]})
        notes.append(f"{case[0]}: {variant} does not fit in {limit} GiB at the case size; measured at "
                     f"[B, T] = [{cfg['B']}, {cfg['T']}] instead (see {variant}_reduced_size)")
        return out
    return None


def run(smoke: bool = False, chunk_size: int = CHUNK_SIZE) -> Dict:
    """Run the comparison; returns a JSON-able dict (see the module docstring)."""
    cfg = dict(SMOKE if smoke else FULL)
    limit = None if smoke else MEM_LIMIT_GIB
    out: Dict = {"config": {**cfg, "chunk_size": chunk_size, "mem_limit_gib": limit, "mask": "all ones",
                            "dtype": "float32", "temperature": 1.0, "torch_threads": None,
                            "process_per_variant": not smoke},
                 "cases": {}, "notes": []}
    if smoke:
        out["notes"].append("smoke mode: variants run in this process, so peak_gib and timings mean nothing")
    with tempfile.TemporaryDirectory() as tmp:
        for case in DIVERGENCE_CASES:
            r = _run_case(case, cfg, chunk_size, limit, tmp, smoke, out["notes"])
            res, paths, case_cfg, reduced = r["results"], r["paths"], r["cfg"], r["reduced"]
            for x in res.values():
                if x.get("ok"):
                    out["config"]["torch_threads"] = x.get("torch_threads")
            case_out: Dict = {}
            for v in VARIANTS:
                x = res[v]
                case_out[v] = ({"peak_gib": x["peak_gib"], "seconds": x["seconds"], "value": x["value"],
                                "hwm_before_excess_gib": x["hwm_before_excess_gib"]}
                               if x.get("ok") else {"error": x.get("error")})
            ref = "naive" if "naive" in paths else (next(iter(paths)) if paths else None)
            diffs = _compare(paths, ref, in_process=smoke) if len(paths) > 1 else {}
            worst_val = max([d["value_rel_diff"] for d in diffs.values()] + [0.0])
            worst_grad = max([max(d["grad_h_max_abs_diff"], d["grad_w_max_abs_diff"]) for d in diffs.values()]
                             + [0.0])
            for v in VARIANTS:
                x = case_out[v]
                if "peak_gib" not in x:
                    continue
                x["peak_vs_naive"] = _ratio(x["peak_gib"], case_out["naive"].get("peak_gib"))
                x["seconds_vs_naive"] = _ratio(x["seconds"], case_out["naive"].get("seconds"))
                x["peak_vs_trl_chunked"] = _ratio(x["peak_gib"], case_out["trl_chunked"].get("peak_gib"))
                x["seconds_vs_trl_chunked"] = _ratio(x["seconds"], case_out["trl_chunked"].get("seconds"))
            ok_ours = [v for v in OURS if "peak_gib" in case_out[v]]
            best_mem = min(ok_ours, key=lambda v: case_out[v]["peak_gib"]) if ok_ours else None
            best_time = min(ok_ours, key=lambda v: case_out[v]["seconds"]) if ok_ours else None
            naive_p = case_out["naive"].get("peak_gib")
            trl = case_out["trl_chunked"]
            goals = {
                "best_ours_by_peak": best_mem,
                "best_ours_by_time": best_time,
                "ours_peak_at_most_25pct_of_naive": (case_out[best_mem]["peak_gib"] <= 0.25 * naive_p)
                if best_mem and naive_p else None,
                "ours_peak_below_trl_chunked": (case_out[best_mem]["peak_gib"] < trl["peak_gib"])
                if best_mem and "peak_gib" in trl else None,
                "ours_faster_than_trl_chunked": (case_out[best_time]["seconds"] < trl["seconds"])
                if best_time and "seconds" in trl else None,
                "from_hidden_meets_all": None,
            }
            fh = case_out["from_hidden"]
            if "peak_gib" in fh and naive_p and "peak_gib" in trl:
                goals["from_hidden_meets_all"] = bool(fh["peak_gib"] <= 0.25 * naive_p and fh["peak_gib"] < trl["peak_gib"]
                                                      and fh["seconds"] < trl["seconds"])
            out["cases"][case[0]] = {
                "size": {"B": case_cfg["B"], "T": case_cfg["T"], "positions": case_cfg["B"] * case_cfg["T"],
                         "V": case_cfg["V"], "H": case_cfg["H"], "H_teacher": case_cfg["Ht"]},
                "variants": case_out,
                "agreement": {"reference": ref, "diffs": diffs, "max_value_rel_diff": worst_val,
                              "max_grad_abs_diff": worst_grad, "values_agree_1e-5": worst_val <= 1e-5,
                              "grads_agree_1e-5": worst_grad <= 1e-5,
                              "variants_compared": sorted(paths)},
                "goals": goals,
            }
            if reduced is not None:
                out["cases"][case[0]]["trl_gkd_reduced_size"] = reduced
    return out


BENCHMARKS = {"divergence_memory": run}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        v, c, cf, ch, lim, path = json.loads(sys.argv[2])
        print(_TAG + json.dumps(_child(v, tuple(c), cf, ch, lim, path)), flush=True)
    elif len(sys.argv) == 3 and sys.argv[1] == "--compare":
        print(_TAG + json.dumps(_compare_here(*json.loads(sys.argv[2]))), flush=True)
    else:
        print(json.dumps(run(smoke="--smoke" in sys.argv[1:]), indent=2))
