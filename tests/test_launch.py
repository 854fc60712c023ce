"""The launch options every recipe's run.sh shares (tools/launch_options.sh, applied by
tools/recipe_common.sh's train()): the command each combination writes, --resume's choice between
continuing and starting over, and real launches on CPU: --ngpu 2 as two gloo processes (equal to
one process with the double batch) and --dtype bfloat16 --zero 2 through the recipe's DeepSpeed JSON."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import cpu_env

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "tools" / "recipe_common.sh"
RECIPES = ("asr", "audio_caption", "audio_qa", "audio_visual_grpo")


def _train_sh(cwd: Path, options: str, *args: str, dry: bool = True, fake_py: bool = False,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Sources recipe_common.sh in ``cwd`` with ``options`` (shell assignments, as run.sh's
    parse_options leaves them) and calls ``train conf.yaml ARGS``."""
    lines = ["set -euo pipefail", "recipe=test; exp=exp; seed=0", f". {ROOT / 'tools' / 'launch_options.sh'}",
             options, f". {COMMON}"]
    if fake_py:
        lines.append('fake() { echo "ran $*"; }; launch_prefix() { LAUNCH=(fake); }')
    lines.append("train conf.yaml " + " ".join(f"'{a}'" for a in args))
    env = cpu_env(threads=1)
    if dry:
        env["LAUNCH_DRY_RUN"] = "1"
    return subprocess.run(["bash", "-c", "\n".join(lines)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def conf_dir(tmp_path):
    (tmp_path / "conf.yaml").write_text("method: sft\n")
    return tmp_path


def test_one_process_by_default(conf_dir):
    r = _train_sh(conf_dir, "", "output_dir=out")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.strip()
    assert cmd.startswith(f"{ROOT}/.venv/bin/python -m core.bin.train --config conf.yaml train.seed=0 ")
    assert "model.dtype=float32 teacher.dtype=float32 train.resume=auto" in cmd
    assert "torch.distributed.run" not in cmd and "backend.name" not in cmd


def test_ngpu_num_nodes_and_hostfile_choose_the_launcher(conf_dir):
    r = _train_sh(conf_dir, "ngpu=2")
    assert r.returncode == 0, r.stderr
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m core.bin.train" in r.stdout
    r = _train_sh(conf_dir, "ngpu=8; num_nodes=2; node_rank=1; master_addr=10.0.0.1; master_port=29600")
    assert r.returncode == 0, r.stderr
    assert ("-m torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 "
            "--master_port 29600 -m core.bin.train") in r.stdout
    (conf_dir / "hostfile").write_text("node1 slots=8\nnode2 slots=8\n")
    r = _train_sh(conf_dir, "ngpu=8; num_nodes=2; hostfile=hostfile; zero=3")
    assert r.returncode == 0, r.stderr
    # DeepSpeed finds node 0's address itself (a --master_addr would be passed on only when given)
    assert (f"{ROOT}/.venv/bin/deepspeed --hostfile {conf_dir}/hostfile --num_nodes 2 --num_gpus 8 "
            "--master_port 29500 --module core.bin.train --config conf.yaml") in r.stdout
    assert "backend.ds_config=conf/ds_zero3.json backend.name=deepspeed" in r.stdout


@pytest.mark.parametrize("options, message", [
    ("ngpu=0", "--ngpu must be a positive integer, got '0'"),
    ("num_nodes=x", "--num_nodes must be a positive integer"),
    ("num_nodes=2; node_rank=2; master_addr=10.0.0.1", "--node_rank must be 0 .. 1, got '2'"),
    ("num_nodes=2; node_rank=1", "--num_nodes 2 (torchrun) needs --master_addr"),
    ("hostfile=nowhere", "/nowhere: no such file"),  # made absolute against the caller's folder
    ("dtype=bf16", "--dtype must be float32, bfloat16 or float16, got 'bf16'"),
    ("zero=1", "--zero must be 2 or 3"),
    ("resume=maybe", "--resume must be auto or never, got 'maybe'"),
])
def test_bad_launch_options_are_refused(conf_dir, options, message):
    """Refused when recipe_common.sh is sourced (before any stage runs), and by train()."""
    r = _train_sh(conf_dir, options)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
    assert "core.bin.train" not in r.stdout


def test_dtype_and_zero(conf_dir):
    r = _train_sh(conf_dir, "dtype=bfloat16; zero=2")
    assert r.returncode == 0, r.stderr
    assert "model.dtype=bfloat16 teacher.dtype=bfloat16" in r.stdout
    assert "backend.ds_config=conf/ds_zero2.json backend.name=deepspeed" in r.stdout


def test_resume_continues_an_interrupted_stage_and_restarts_a_finished_one(conf_dir):
    def state(name, *files):
        d = conf_dir / name
        for f in files:
            (d / f).mkdir(parents=True, exist_ok=True)
        return d

    interrupted = state("interrupted", "checkpoints/step_4")
    finished = state("finished", "checkpoints/step_9", "final")
    nothing = state("nothing", "curves")          # no checkpoint: nothing to continue
    rest = state("rest", "round_0/checkpoints")     # ReST's rounds
    rest_done = state("rest_done", "round_0/checkpoints", "round_1/final", "final")
    for d, kept in ((interrupted, True), (finished, False), (nothing, False), (rest, True), (rest_done, False)):
        r = _train_sh(conf_dir, "", f"output_dir={d.name}", dry=False, fake_py=True)
        assert r.returncode == 0, r.stderr
        assert d.exists() == kept, d.name
        assert ("continuing its interrupted run" in r.stdout) == kept
        assert "ran core.bin.train" in r.stdout
    # --resume never always starts over; a call that sets train.resume itself decides alone
    r = _train_sh(conf_dir, "resume=never", "output_dir=interrupted", dry=False, fake_py=True)
    assert r.returncode == 0 and not interrupted.exists()
    r = _train_sh(conf_dir, "resume=never", "output_dir=rest", dry=False, fake_py=True)
    assert r.returncode == 0 and not rest.exists() and "continuing" not in r.stdout
    d = state("own", "final")
    r = _train_sh(conf_dir, "", "output_dir=own", "train.resume=auto", dry=False, fake_py=True)
    assert r.returncode == 0 and d.exists()


def test_every_recipe_sources_the_launch_options_and_lists_them():
    for name in RECIPES:
        run_sh = ROOT / "recipes" / name / "run.sh"
        text = run_sh.read_text()
        assert ". ../../tools/launch_options.sh" in text and "train.resume=never" not in text, name
        r = subprocess.run(["bash", str(run_sh), "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        for opt in ("--ngpu", "--num_nodes", "--hostfile", "--dtype", "--zero", "--resume", "--skip_bad"):
            assert opt in r.stdout, (name, opt)
        for stage in (2, 3):  # --zero N names conf/ds_zero<N>.json, whose bf16/fp16 follow --dtype
            ds = json.loads((ROOT / "recipes" / name / "conf" / f"ds_zero{stage}.json").read_text())
            assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto", name
            assert ds["zero_optimization"]["stage"] == stage


# ----------------------------------------------------------------------------- real launches

def _weights(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [float(r["loss"]) for r in rows if r.get("split", "train") == "train" and "loss" in r]


@pytest.fixture(scope="module")
def sft_conf(tmp_path_factory, write_config):
    folder = tmp_path_factory.mktemp("launch")
    write_config(folder, "conf", method="sft", train={"batch_size": 2, "max_steps": 3},
                 data={"max_target_tokens": 3}, optim={"lr": 1e-2})
    (folder / "conf").mkdir()  # --zero 2 names conf/ds_zero2.json: the recipe's own
    shutil.copy(ROOT / "recipes" / "asr" / "conf" / "ds_zero2.json", folder / "conf" / "ds_zero2.json")
    return folder


def test_ngpu_2_runs_two_gloo_processes(sft_conf):
    """--ngpu 2 with batch 2 per process trains as one process with batch 4 (same samples,
    same global token-mean), so the launch really ran two ranks that shared one step."""
    one = _train_sh(sft_conf, "", "output_dir=one", "train.batch_size=4", dry=False)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _train_sh(sft_conf, "ngpu=2", "output_dir=two", dry=False)
    assert two.returncode == 0, two.stderr[-4000:]
    a, b = _losses(sft_conf / "one"), _losses(sft_conf / "two")
    assert len(a) == len(b) == 3 and a[0] != a[-1]
    assert all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(a, b)), (a, b)
    wa, wb = _weights(sft_conf / "one"), _weights(sft_conf / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4, msg=k)


def test_dtype_bfloat16_with_zero_2_trains_in_bf16(sft_conf):
    r = _train_sh(sft_conf, "dtype=bfloat16; zero=2", "output_dir=bf16", dry=False)
    assert r.returncode == 0, r.stderr[-4000:]
    out = sft_conf / "bf16"
    loss = _losses(out)
    assert len(loss) == 3 and all(math.isfinite(x) for x in loss)
    w = _weights(out)
    floats = [t.dtype for t in w.values() if t.is_floating_point()]
    assert floats and all(d == torch.bfloat16 for d in floats), set(floats)


def test_a_bad_launch_option_stops_run_sh_before_stage_0(tmp_path):
    for name in RECIPES:
        r = subprocess.run(["bash", str(ROOT / "recipes" / name / "run.sh"), "--ngpu", "0", "--data",
                            str(tmp_path / "data"), "--exp", str(tmp_path / "exp")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--ngpu must be a positive integer, got '0'" in r.stderr, (name, r.stderr)
        assert not (tmp_path / "data").exists(), name


def test_eval_only_outputs_leave_a_training_run_alone(tmp_path):
    """--eval_only's data/ and exp/ default to data/eval_<tag> and exp/eval_<model> (".../opd/final"
    is "opd"), so a training run's results and test set are not overwritten."""
    (tmp_path / "opd" / "final").mkdir(parents=True)
    (tmp_path / "opd" / "final" / "config.json").write_text("{}")
    script = (f"set -euo pipefail\nrecipe=t; seed=0; data=data; exp=exp; corpus=mmau; model={tmp_path}/opd/final\n"
              f". {COMMON}\neval_model_ok\necho \"$data $exp $eval_name\"\n"
              f"data=/abs/d; exp=/abs/e; eval_model_ok\necho \"$data $exp\"")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["data/eval_mmau exp/eval_opd opd", "/abs/d /abs/e"]
