"""Bad input: every case of the corpus in ``tests/resources/bad/`` (``cases.yaml``: missing, corrupt,
zero-length, no-frames, wrong-sample-rate and unreadable audio, a folder for a file, a video
without an audio track, empty and non-string text, a malformed JSON line, a non-object line, a
duplicate and a missing key, an answer not among the choices, a reversed segment, a non-UTF-8
line, an empty manifest, missing train/dev manifests, unknown and mistyped config keys, a YAML
that does not parse, a DeepSpeed JSON that does not parse, a teacher with another vocabulary)
goes through ``core.bin.train``'s ``main``; each exits 2 with an ``error:`` naming the file and
line or the config key, and leaves nothing in ``output_dir`` (not even the folder). One case runs
as a real child process to check the process exit status and that no traceback is printed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cpu_env
from core.bin.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = REPO / "tests" / "resources" / "bad"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def foreign_teacher(tiny, tmp_path_factory):
    from core.models import build_tiny_qwen2_audio, train_tokenizer

    out = tmp_path_factory.mktemp("foreign") / "teacher"
    build_tiny_qwen2_audio(train_tokenizer(["zebra quartz jump", "a vexing corpus"], 280), hidden=32, layers=1,
                           heads=2, seed=3, out_dir=out)
    return out


def _subst(x, teacher: Path):
    if isinstance(x, dict):
        return {k: _subst(v, teacher) for k, v in x.items()}
    if isinstance(x, list):
        return [_subst(v, teacher) for v in x]
    if isinstance(x, str):
        return str(teacher) if x == "@foreign_teacher" else x.replace("@here/", f"{BAD}/")
    return x


def _config(case: dict, name: str, tmp_path: Path, write_config, teacher: Path) -> tuple[Path, Path]:
    """(config path, output_dir) of a case."""
    out = tmp_path / "exp" / name
    if "config_file" in case:
        return BAD / case["config_file"], out
    sections = _subst(case.get("config", {}), teacher)
    if "manifest" in case:
        sections.setdefault("data", {})["train"] = str(BAD / case["manifest"])
    cfg = write_config(tmp_path, name, **sections)
    text = yaml.safe_load(cfg.read_text())
    text["output_dir"] = str(out)
    cfg.write_text(yaml.safe_dump(text, sort_keys=False))
    return cfg, out


def test_the_corpus_has_the_cases_the_issue_lists():
    assert len(CASES) >= 15
    media = {p.name for p in (BAD / "media").iterdir()}
    assert {"corrupt.wav", "empty.wav", "no_frames.wav", "rate_100hz.wav", "aac.m4a", "folder.wav",
            "video_no_audio.mp4"} <= media
    for name, case in CASES.items():
        assert case.get("expect") and case.get("exit") and case.get("what"), name
        assert "manifest" not in case or (BAD / case["manifest"]).is_file(), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_non_zero_naming_the_place(name, tmp_path, write_config, foreign_teacher, capsys):
    case = CASES[name]
    cfg, out = _config(case, name, tmp_path, write_config, foreign_teacher)
    before = {p.name for p in BAD.iterdir()}
    rc = train_main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == case["exit"], (name, rc, err[-2000:])
    assert err.startswith("error: "), err[-2000:]
    for want in _subst(case["expect"], foreign_teacher):
        assert want in err, f"{name}: {want!r} not in:\n{err[-3000:]}"
    assert not out.exists(), f"{name}: {sorted(p.name for p in out.rglob('*'))} written to {out}"
    assert {p.name for p in BAD.iterdir()} == before, "nothing is written beside the corpus either"


def test_bad_input_in_a_child_process_exits_2_without_a_traceback(tmp_path, write_config, foreign_teacher):
    cfg, out = _config(CASES["corrupt_audio"], "child", tmp_path, write_config, foreign_teacher)
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=REPO,
                       env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert f"error: {BAD}/corrupt_audio.jsonl: 1 problem in manifest" in p.stderr
    assert f"{BAD}/corrupt_audio.jsonl:2: audio: {BAD}/media/corrupt.wav: unreadable or corrupt audio" in p.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def moe_vl(tmp_path_factory):
    """A Qwen3-VL-MoE folder as released (its config.json; no weights are needed to refuse it): a
    type transformers knows and this project does not train."""
    from transformers import Qwen3VLMoeConfig

    out = tmp_path_factory.mktemp("qwen3_vl_moe") / "Qwen3-VL-30B-A3B-Instruct"
    Qwen3VLMoeConfig().save_pretrained(out)
    return out


def _one_error_line(stderr: str, *wants: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len([ln for ln in lines if ln.startswith("error: ")]) == 1, stderr[-3000:]
    for want in wants:
        assert want in stderr, (want, stderr[-3000:])


def test_an_unsupported_model_type_is_one_error_line_and_exit_2(tmp_path, write_config, moe_vl, tiny):
    names = ("model_type 'qwen3_vl_moe' is not supported", "qwen2_audio", "qwen2_5_omni", "qwen3_omni_moe",
             "text-only causal LMs")
    out = tmp_path / "exp"
    cfg = write_config(tmp_path, "moe", model={"path": str(moe_vl)}, output_dir=str(out))
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=REPO,
                       env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    _one_error_line(p.stderr, "config key 'model.path'", *names)
    assert not out.exists()
    # as an OPD teacher
    cfg = write_config(tmp_path, "moe_teacher", method="opd", teacher={"path": str(moe_vl)}, output_dir=str(out))
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=REPO,
                       env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    _one_error_line(p.stderr, "config key 'teacher.path'", *names)
    # decoding and serving it
    for cmd in (["core.bin.decode", "--model", str(moe_vl), "--manifest", str(tiny.manifest),
                 "--out", str(tmp_path / "hyp.jsonl"), "--prompt", "Transcribe the audio."],
                ["core.bin.serve_teacher", "--model", str(moe_vl), "--port", "0"]):
        p = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=cpu_env(1), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 2, (cmd[0], p.stderr[-3000:])
        _one_error_line(p.stderr, *names)
