"""The benchmark harness runs end to end in smoke mode and every benchmark returns its result dict.

Runs ``python -m benchmarks.run --smoke --out <tmp>/results.json`` in a subprocess and checks the
exit code, the machine block and each benchmark's keys. Timings are never thresholded here (the
machine is shared and noisy): whether a speed goal is met is the benchmark's report, not a test.
A benchmark module that is not in the tree is left out of the check (and named in the skip list).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# benchmark name -> (module, keys its result dict must have)
EXPECTED = {
    "opd_step": ("benchmarks.trl_compare", ["ratio", "goal", "met"]),
    "grpo_step": ("benchmarks.trl_compare", ["ratio", "goal", "met"]),
    "opd_step_long_prompt": ("benchmarks.trl_compare", ["ratio", "goal", "met", "prompt_tokens_median"]),
    "grpo_step_long_prompt": ("benchmarks.trl_compare", ["ratio", "goal", "met", "prompt_tokens_median"]),
    "overhead": ("benchmarks.overhead", ["ours_s", "reference_s", "ratio", "goal", "met", "reference_parts_s",
                                         "same_tokens", "step"]),
    "divergence_memory": ("benchmarks.divergence_memory", []),
    "rollout": ("benchmarks.rollout_speed", ["ours_tokens_per_s", "reference_tokens_per_s", "ratio", "goal",
                                             "met", "generated_tokens", "same_tokens_with_multinomial_draw",
                                             "ours_multinomial_tokens_per_s"]),
    "audio_opd_profile": ("benchmarks.audio_opd_profile", ["step_s", "seconds", "shares"]),
    "lm_head_slice": ("benchmarks.audio_opd_profile", ["ours_s", "reference_s", "ratio", "same_loss"]),
    "rollout_vllm": ("benchmarks.vllm_rollout", ["ours_tokens_per_s", "reference_tokens_per_s", "ratio",
                                                 "vllm_start_s", "vllm_sync_s", "generated_tokens"]),
    "rollout_vllm_0.5b": ("benchmarks.vllm_rollout", ["skipped"]),   # not built in a smoke run
}
PROFILE_PARTS = ["prompts", "rollout", "teacher", "experience_other", "student_forward_backward", "optimizer"]


def _present(module: str) -> bool:
    return (REPO / (module.replace(".", "/") + ".py")).is_file()


def test_smoke_run_writes_every_result(tmp_path):
    out = tmp_path / "results.json"
    present = {name: spec for name, spec in EXPECTED.items() if _present(spec[0])}
    missing = sorted({spec[0] for name, spec in EXPECTED.items() if name not in present})
    modules = sorted({spec[0].rsplit(".", 1)[-1] for spec in present.values()})
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--only", *modules]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"benchmarks.run exited {p.returncode} (modules not in the tree: {missing}):\n" \
                              f"{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["smoke"] is True and res["failed"] == []
    for key in ("platform", "cpu_count", "torch", "transformers", "trl"):
        assert key in res["machine"], key
    assert res["date"]
    benches = res["benchmarks"]
    for name, (module, keys) in present.items():
        if name not in benches:
            # a module may name its benchmarks differently from the expected list: accept any of its
            assert any(r.get("module") == module for r in benches.values()), (name, sorted(benches))
            continue
        r = benches[name]
        assert "error" not in r, (name, r.get("error"))
        for k in keys:
            assert k in r, (name, k, sorted(r))
    for r in benches.values():
        assert isinstance(r, dict) and "error" not in r
    if "audio_opd_profile" in present:
        prof = benches["audio_opd_profile"]
        assert sorted(prof["seconds"]) == sorted(PROFILE_PARTS)
        assert all(v >= 0 for v in prof["seconds"].values())
    if "overhead" in present:
        assert benches["overhead"]["same_tokens"] is True, "ours and the reference should sample the same tokens"
    if "lm_head_slice" in present:
        assert benches["lm_head_slice"]["same_loss"] is True
    if "rollout_vllm" in present:
        assert all(v > 0 for v in benches["rollout_vllm"]["generated_tokens"].values())
    if "rollout" in present:
        assert benches["rollout"]["same_tokens_with_multinomial_draw"] is True
        assert benches["rollout"]["generated_tokens"] > 0
    for kind in ("opd_step", "grpo_step"):  # the long-prompt variants do have the longer prompts
        if kind in benches and f"{kind}_long_prompt" in benches:
            assert benches[f"{kind}_long_prompt"]["prompt_tokens_median"] > benches[kind]["prompt_tokens_median"]
    # every table row was printed
    for name in benches:
        assert name in p.stdout


def _bench_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return env


def test_bf16_smoke_runs_both_sides_in_bf16(tmp_path):
    """``--dtype bfloat16`` (the GPU default) on the CPU: our trainer with ``model.dtype`` and
    TRL's models loaded in bf16, and the rollout's model in bf16; the results name the run."""
    out = tmp_path / "bf16.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--dtype", "bfloat16", "--out", str(out),
           "--only", "opd_step", "rollout"]
    p = subprocess.run(cmd, cwd=REPO, env=_bench_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["machine"]["run"] == {"device": "cpu", "dtype": "bfloat16", "zero": 0}
    b = res["benchmarks"]
    assert b["opd_step"]["dtype"] == "bfloat16" and "error" not in b["opd_step"]
    assert b["rollout"]["setup"]["dtype"] == "bfloat16" and b["rollout"]["generated_tokens"] > 0


def test_run_settings_are_checked():
    import torch

    from benchmarks import common
    try:
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="no CUDA GPU"):
                common.configure("cuda")
        with pytest.raises(ValueError, match="run on a GPU"):
            common.configure("cpu", zero=2)
        with pytest.raises(ValueError, match="dtype"):
            common.configure("cpu", dtype="float16")
        run = common.configure("cpu")
        assert (run.device, run.dtype, run.zero) == ("cpu", "float32", 0)
        assert common.ds_config(Path("/nonexistent")) is None  # no DeepSpeed: nothing written
    finally:
        common.configure("cpu")


def test_ds_config_of_a_gpu_run(tmp_path):
    from benchmarks import common
    saved = (common.RUN.device, common.RUN.dtype, common.RUN.zero)
    try:
        common.RUN.device, common.RUN.dtype, common.RUN.zero = "cuda", "bfloat16", 2  # as configure("cuda") sets it
        path = common.ds_config(tmp_path)
        cfg = json.loads(path.read_text())
        assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"] == {"enabled": True}
        assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_clipping"] == "auto"
    finally:
        common.RUN.device, common.RUN.dtype, common.RUN.zero = saved


def test_gpu_run_is_refused_clearly_without_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cuda"], cwd=REPO, env=_bench_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA GPU" in p.stderr, p.stderr[-2000:]
