"""The audio_caption recipe end to end on its smoke configuration, in a temporary folder: OPD
from the in-process teacher (the default), the baselines, and stage 3's caption metrics and
cascaded accuracy. Then stage 2 again against the teacher server that run.sh starts and stops
(--teacher remote), stage 2 against a real vLLM server that run.sh starts and stops (--teacher_server
vllm, with a teacher vLLM's CPU build serves), and stages 2-3 again to check that they give the same
numbers."""
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import recipe_env, smoke_scale, without_timing

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SCALE = smoke_scale("audio_caption")
RUN = ROOT / "recipes/audio_caption/run.sh"


def _run(*args, timeout=1200):
    env = recipe_env()
    proc = subprocess.run(["bash", str(RUN), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _server_running(exp: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", f"serve_teacher --model {exp}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _running(*pgrep_args: str) -> list[str]:
    """The processes ``pgrep`` finds that still run (not zombies: one whose parent is gone waits to
    be reaped by init, dead)."""
    out = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True).stdout.split()
    states = {p: subprocess.run(["ps", "-o", "stat=", "-p", p], capture_output=True, text=True).stdout.strip()
              for p in out}
    return [f"{p} {st}" for p, st in states.items() if st and not st.startswith("Z")]


def _default_teacher_head() -> int:
    """The head size of the teacher conf/models.yaml builds (hidden / heads)."""
    sizes = yaml.safe_load((ROOT / "recipes/audio_caption/conf/models.yaml").read_text())["teacher"]
    return sizes["hidden"] // sizes["heads"]


def _vllm_refusal(proc) -> str:
    """The one error line of a run.sh that refused --teacher_server vllm before anything ran."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: --teacher_server vllm: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio_caption")
    data, exp = tmp / "data", tmp / "exp"
    proc = _run("--smoke", "true", "--data", data, "--exp", exp)
    return data, exp, proc


def test_audio_caption_recipe_smoke(smoke_run):
    data, exp, proc = smoke_run
    res = json.loads((exp / "results.json").read_text())
    metrics = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", "cascade_acc")
    for name in ("teacher", "student_before", "student_after"):
        assert set(metrics) <= set(res[name]), (name, res[name])
        for k, v in res[name].items():
            assert isinstance(v, float) and math.isfinite(v) and v >= 0, (name, k, v)
        assert res["decode"][name]["num_clips"] == 16
    assert set(res["baselines"]) == {"sft_more", "seqkd"}
    assert 0.0 <= res["cascade_reference"]["cascade_acc"] <= 1.0
    # bootstrap intervals over the clips: CIDEr and ROUGE-L inside their own, paired CIDEr differences
    for name in ("teacher", "student_before", "student_after", "sft_more", "seqkd"):
        r = res[name] if name in res else res["baselines"][name]
        for m in ("CIDEr", "ROUGE_L"):
            lo, hi = res["decode"][name]["ci95"][m]
            assert lo - 1e-9 <= r[m] <= hi + 1e-9, (name, m)
    assert set(res["differences"]) == {"student_after - student_before", "student_after - sft_more",
                                       "student_after - seqkd"}
    d = res["differences"]["student_after - student_before"]
    assert d["diff"] == pytest.approx(res["student_after"]["CIDEr"] - res["student_before"]["CIDEr"], abs=1e-5)
    for v in ("data", "models", "opd", "sft_more", "seqkd", "eval"):
        assert v in res["stage_seconds"], v
    # OPD and the baselines trained conf/budget.yaml's step counts (x the smoke scale)
    from tools.step_budget import steps_of
    tr = res["training"]
    for name in ("opd", "sft_more", "seqkd"):
        assert tr[name]["steps"] == steps_of(ROOT / "recipes/audio_caption/conf/budget.yaml", name, SMOKE_SCALE), name
    assert res["settings"]["compute"]["mode"] == "steps"
    # the default teacher is the in-process one: no server
    assert "kind: local" in (exp / "opd" / "config.yaml").read_text()
    assert "starting the teacher server" not in proc.stdout
    rows = [json.loads(line) for line in (exp / "opd" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == tr["opd"]["steps"] and all(math.isfinite(r["loss"]) for r in train_rows)
    assert all(r.get("unscored_samples", 0) == 0 for r in train_rows)
    # hypotheses for every test clip, and the unlabelled manifest has no captions
    hyp = (exp / "decode/student_after/hyp.jsonl").read_text().splitlines()
    assert len(hyp) == 16
    for line in (data / "unlabelled.jsonl").read_text().splitlines():
        assert "text" not in json.loads(line)
    assert (exp / "opd/final/model.safetensors").is_file()
    assert (exp / "cascade/final/config.json").is_file()


def test_audio_caption_remote_teacher(smoke_run, tmp_path):
    """--teacher remote: OPD goes through the HTTP server that run.sh starts, every sample is
    scored, and the server is gone afterwards."""
    data, exp, _ = smoke_run
    exp2 = tmp_path / "exp"
    shutil.copytree(exp, exp2, symlinks=True)
    shutil.rmtree(exp2 / "opd")
    proc = _run("--smoke", "true", "--data", data, "--exp", exp2, "--stage", "2", "--stop_stage", "2",
                "--teacher", "remote", "--baselines", "false")
    cfg = (exp2 / "opd" / "config.yaml").read_text()
    assert "kind: remote" in cfg and "http://127.0.0.1:" in cfg
    assert "starting the teacher server" in proc.stdout and "stopping the teacher server" in proc.stdout
    assert not _server_running(exp2)
    summary = json.loads((exp2 / "opd" / "train_summary.json").read_text())
    from tools.step_budget import steps_of
    assert summary["steps"] == steps_of(ROOT / "recipes/audio_caption/conf/budget.yaml", "opd", SMOKE_SCALE)
    rows = [json.loads(line) for line in (exp2 / "opd" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == summary["steps"] and all(math.isfinite(r["loss"]) for r in train_rows)
    assert all(r.get("unscored_samples", 0) == 0 for r in train_rows)


def test_stages_2_and_3_give_the_same_numbers_again(smoke_run, tmp_path):
    """OPD and the baselines train fixed step counts, so stages 2-3 run again from the same
    warm-up (teacher, student, cascade reader) give the same results.json, timings aside."""
    data, exp0, _ = smoke_run
    exp = tmp_path / "exp"
    exp.mkdir()
    for d in ("tokenizer", "teacher", "teacher_init", "student_init", "student_sft", "models.json",
              "cascade", "cascade_init", "cascade_data", "gen_length.json"):
        if (exp0 / d).exists():
            (exp / d).symlink_to(exp0 / d)
    _run("--smoke", "true", "--stage", "2", "--data", data, "--exp", exp)

    def load(p):
        return json.loads(p.read_text().replace(str(exp0), "<exp>").replace(str(exp), "<exp>"))
    a, b = load(exp0 / "results.json"), load(exp / "results.json")
    a.pop("stage_seconds"), b.pop("stage_seconds")
    assert without_timing(a) == without_timing(b)


def test_audio_caption_unreachable_teacher(smoke_run, tmp_path):
    """A teacher URL nobody answers: OPD stops with a clear error, nothing is trained silently."""
    data, exp, _ = smoke_run
    exp2 = tmp_path / "exp"
    shutil.copytree(exp, exp2, symlinks=True)
    shutil.rmtree(exp2 / "opd")
    env = recipe_env()
    proc = subprocess.run(["bash", str(RUN), "--smoke", "true", "--data", str(data), "--exp", str(exp2),
                           "--stage", "2", "--stop_stage", "2", "--baselines", "false",
                           "--teacher_url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "127.0.0.1:9" in err
    assert not (exp2 / "opd" / "final").exists()


def test_audio_caption_teacher_row_from_a_served_teacher(smoke_run, tmp_path):
    """--teacher_url: stage 3 captions the teacher's row through the server (its transcriptions
    route with the captioning prompt), equal to captioning with its folder here."""
    from conftest import teacher_server
    data, exp, _ = smoke_run
    exp2 = tmp_path / "exp"
    shutil.copytree(exp, exp2, symlinks=True)
    with teacher_server(exp / "teacher" / "final", max_new_tokens=24) as url:
        proc = subprocess.run(["bash", str(RUN), "--smoke", "true", "--data", str(data), "--exp", str(exp2),
                               "--stage", "3", "--teacher_url", url],
                              capture_output=True, text=True, env=recipe_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = json.loads((exp / "results.json").read_text())["teacher"]
    b = json.loads((exp2 / "results.json").read_text())["teacher"]
    assert a == b
    assert [json.loads(x)["text"] for x in (exp2 / "decode/teacher/hyp.jsonl").read_text().splitlines()] == \
           [json.loads(x)["text"] for x in (exp / "decode/teacher/hyp.jsonl").read_text().splitlines()]


def test_audio_caption_vllm_teacher(smoke_run, tmp_path):
    """--teacher_server vllm: stage 1 takes the models of a --models_conf (a teacher with head size
    32 and the 30 s audio chunk, which vLLM's CPU build serves; the smoke run's student), stage 2
    serves that teacher with vLLM's OpenAI-compatible server (the command and environment
    core.vllm_engine.server_command / server_env build), OPD trains its steps against it with
    teacher.kind: remote and the server's top-k cap, and the server and its engine are gone
    afterwards. The smoke run's own teacher (head size 24) is refused first, before anything runs.
    Three new tokens per caption: vLLM scores the text of a sample tokenised again, and the smoke
    student's longer samples almost never tokenise back to its own ids (left out of the loss)."""
    from transformers import AutoTokenizer

    from core.models import build_tiny_qwen2_audio
    from core.vllm_engine import server_command
    from tools.step_budget import steps_of
    data, exp, _ = smoke_run
    ref = tmp_path / "exp_ref"   # only the smoke run's teacher: the module's exp/ is left alone
    ref.mkdir()
    (ref / "teacher").symlink_to(exp / "teacher")
    proc = subprocess.run(["bash", str(RUN), "--smoke", "true", "--data", str(data), "--exp", str(ref),
                           "--stage", "2", "--teacher_server", "vllm"],
                          capture_output=True, text=True, env=recipe_env(), timeout=120)
    assert f"the teacher {ref}/teacher/final: head size {_default_teacher_head()} < 32" in _vllm_refusal(proc)
    assert sorted(p.name for p in ref.iterdir()) == ["teacher"]

    teacher = tmp_path / "teacher"
    build_tiny_qwen2_audio(AutoTokenizer.from_pretrained(exp / "tokenizer"), hidden=64, layers=2, heads=2,
                           audio_hidden=64, audio_layers=2, chunk_seconds=30, seed=1, out_dir=teacher)
    conf = tmp_path / "models.yaml"
    conf.write_text(yaml.safe_dump({"teacher_dir": str(teacher), "student_dir": str(exp / "student_sft" / "final")}))
    exp2 = tmp_path / "exp"
    proc = _run("--smoke", "true", "--data", data, "--exp", exp2, "--stage", "1", "--stop_stage", "2",
                "--models_conf", conf, "--teacher_server", "vllm", "--baselines", "false", "--max_new_tokens", "3",
                timeout=900)
    m = re.search(r"the vLLM teacher server answers after \d+ s: (.*)$", proc.stdout, re.M)
    assert m, proc.stdout[-3000:]
    cmd = shlex.split(m.group(1))
    port = int(cmd[cmd.index("--port") + 1])
    assert cmd == server_command(str(exp2 / "teacher" / "final"), port=port, max_logprobs=20, python=cmd[0])
    # stopped: nothing listens on its port, no process of its group (its engine's) is left
    pid = re.search(r"stopping the teacher server \(pid (\d+)\)", proc.stdout)
    assert pid, proc.stdout[-3000:]
    assert not _listening(port)
    assert not _running("-g", pid.group(1)) and not _running("-f", f"api_server --model {exp2}")
    assert (exp2 / "teacher" / "final").resolve() == teacher.resolve()
    served = (exp2 / "teacher_server.log").read_text()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in served
    cfg = yaml.safe_load((exp2 / "opd" / "config.yaml").read_text())
    assert cfg["teacher"]["kind"] == "remote" and cfg["teacher"]["url"] == f"http://127.0.0.1:{port}"
    assert cfg["teacher"]["model"] == "teacher" and cfg["teacher"]["top_k_cap"] == 20
    assert cfg["opd"]["support"] == "teacher_topk"
    summary = json.loads((exp2 / "opd" / "train_summary.json").read_text())
    assert summary["steps"] == steps_of(ROOT / "recipes/audio_caption/conf/budget.yaml", "opd", SMOKE_SCALE)
    assert summary["skipped_steps"] == 0 and (exp2 / "opd" / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (exp2 / "opd" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == summary["steps"] and all(math.isfinite(r["loss"]) for r in train_rows)
    # every step distilled on samples the vLLM teacher scored
    assert all(r["aligned_share"] > 0 and r["train/num_tokens"] > 0 for r in train_rows)


def test_audio_caption_vllm_teacher_refused(tmp_path):
    """--teacher_server vllm with the default models (text head size 96 / 4 = 24, a 3 s audio
    chunk): vLLM's CPU build would refuse them at start-up, so run.sh stops before anything runs
    with one error line naming the option, the reason and what to give instead."""
    head = _default_teacher_head()
    data, exp = tmp_path / "data", tmp_path / "exp"
    proc = subprocess.run(["bash", str(RUN), "--smoke", "true", "--data", str(data), "--exp", str(exp),
                           "--teacher_server", "vllm"], capture_output=True, text=True, env=recipe_env(), timeout=120)
    line = _vllm_refusal(proc)
    assert f"head size {head} < 32" in line and "audio chunk 3 s" in line
    assert "head size >= 32 and a 30 s audio chunk" in line and "--models_conf" in line
    assert not data.exists() and not exp.exists()
