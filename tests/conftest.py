"""Shared fixtures: a tiny spoken corpus and tiny Qwen2-Audio student/teacher models.

``tiny`` (session scope) builds, once per test session in a temp dir:
- 12 short English clips spoken by espeak-ng, resampled to 16 kHz mono (each < 3 s);
- ``train.jsonl`` (key, audio, task=asr, text) beside them;
- a byte-level BPE tokenizer trained on the transcripts;
- a student (hidden 32, 1 layer, seed 0) and a teacher (hidden 48, 1 layer, seed 1) built with
  ``core.models.build_tiny_qwen2_audio`` and saved as ``save_pretrained`` folders.

``write_config`` / ``train_config`` write a training YAML for these models; ``run_train_cli`` runs
``python -m core.bin.train`` (or torchrun) in a subprocess, on the CPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "red green and blue",
    "one two three four",
    "hello world",
    "open the door please",
    "the sun is hot",
    "we like to read books",
    "turn left at the light",
    "fish swim in water",
    "birds fly high",
    "it is cold today",
]
SR = 16000
MAX_CLIP_SECONDS = 3.0


def smoke_scale(recipe: str) -> float:
    """The factor a recipe's smoke run applies to its conf/budget.yaml step counts (run.sh's budget_scale)."""
    m = re.search(r"^\s+budget_scale=([0-9.]+)", (REPO / "recipes" / recipe / "run.sh").read_text(), re.M)
    assert m, f"recipes/{recipe}/run.sh sets no budget_scale"
    return float(m.group(1))


def recipe_env(**extra) -> dict:
    """Environment of a recipe's run.sh in a test: one intra-op thread. The test command runs two
    files at a time on a 2-core machine, so two threads per recipe would put four on two cores
    (they spin against each other); a bitwise comparison also needs a fixed count."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def without_timing(x):
    """A ``results.json`` (or part of one) without what the clock decides: seconds, rates, dates."""
    if isinstance(x, dict):
        return {k: without_timing(v) for k, v in x.items()
                if not any(t in k for t in ("seconds", "time", "per_sec", "date", "elapsed"))}
    if isinstance(x, list):
        return [without_timing(v) for v in x]
    return x


# the files that run whole recipes take minutes each: they are collected first, so that with the
# test command's workers (pytest-xdist, one file per worker at a time) they start at once and the
# short files fill the other workers meanwhile, instead of the longest file starting last
LONG_FIRST = ("tests/recipes/test_asr_recipe.py", "tests/recipes/test_audio_visual_recipe.py",
              "tests/recipes/test_audio_caption_recipe.py", "tests/recipes/test_audio_qa_recipe.py",
              "tests/recipes/test_recipe_copy.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(LONG_FIRST)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::")[0], len(rank)))  # stable: files keep their order


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is needed to build the test corpus (bash run.sh setup installs it)")
    from core.models import build_tiny_qwen2_audio, train_tokenizer
    from tools.synth.speech import synthesize

    root = tmp_path_factory.mktemp("tiny")
    wavs = root / "wav"
    wavs.mkdir()
    rows = []
    for i, text in enumerate(TEXTS):
        dur = synthesize(text, wavs / f"utt{i:02d}.wav", voice="en-us", speed=170, sample_rate=SR)
        assert dur < MAX_CLIP_SECONDS, f"clip {i} is {dur:.2f} s long"
        rows.append({"key": f"utt{i:02d}", "audio": f"wav/utt{i:02d}.wav", "task": "asr", "text": text})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tok = train_tokenizer(TEXTS, 300)
    student_dir, teacher_dir = root / "student", root / "teacher"
    build_tiny_qwen2_audio(tok, hidden=32, layers=1, heads=2, seed=0, out_dir=student_dir)
    build_tiny_qwen2_audio(tok, hidden=48, layers=1, heads=2, seed=1, out_dir=teacher_dir)
    abs_rows = [dict(r, audio=str(root / r["audio"])) for r in rows]
    return SimpleNamespace(root=root, manifest=manifest, rows=abs_rows, texts=list(TEXTS),
                           tokenizer=tok, student=student_dir, teacher=teacher_dir)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs: the models are tiny, and two threads on a busy
    2-core machine spin against each other (and a bitwise comparison needs a fixed count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def write_config(tiny):
    """``write_config(folder, name, **sections)`` -> path of a YAML training config in ``folder``.

    The run writes into ``folder/name``; ``sections`` are merged over the defaults below.
    """

    def make(folder, name: str = "cfg", **over) -> Path:
        folder = Path(folder)
        cfg = {
            "method": "sft",
            "output_dir": str(folder / name),
            "model": {"path": str(tiny.student)},
            "teacher": {"path": str(tiny.teacher)},
            "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."},
            "rollout": {"n": 2, "max_new_tokens": 6},
            "optim": {"lr": 1e-2},
            "train": {"batch_size": 2, "max_steps": 3, "seed": 0},
            "backend": {"dist_backend": "gloo"},
        }
        cfg = _deep_update(cfg, over)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make


@pytest.fixture
def train_config(write_config, tmp_path):
    """``train_config(name, **sections)``: ``write_config`` into this test's tmp_path."""
    return lambda name="cfg", **over: write_config(tmp_path, name, **over)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(threads: int = 1) -> dict:
    """Environment of a CPU-only child process with no inherited process-group variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


@pytest.fixture(scope="session")
def run_train_cli():
    """``run_train_cli(config, *overrides, nproc=1, threads=1)`` runs core.bin.train in a child
    process (``threads``: its OpenMP threads; float reductions depend on the thread count, so a
    run compared bitwise with one in this process uses ``torch.get_num_threads()``)."""

    def run(config, *overrides, nproc: int = 1, threads: int = 1, timeout: int = 300):
        if nproc == 1:
            cmd = [sys.executable, "-m", "core.bin.train"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "core.bin.train"]
        cmd += ["--config", str(config), *overrides]
        p = subprocess.run(cmd, cwd=REPO, env=cpu_env(threads), capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr[-6000:]}")
        return p

    return run


@contextlib.contextmanager
def teacher_server(model_dir, max_new_tokens: int = 32):
    """``python -m core.bin.serve_teacher`` on ``model_dir`` at a free port of 127.0.0.1, in a child
    process (one thread); yields its URL once /health answers, and stops it after."""
    import httpx
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core.bin.serve_teacher", "--model", str(model_dir), "--port",
                             str(port), "--max-new-tokens", str(max_new_tokens), "--log-level", "warning"],
                            cwd=REPO, env=cpu_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"the teacher server exited: {proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"no answer from {url}/health after 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def vllm_server(model_dir, served_model_name: str = "teacher", max_model_len: int = 512):
    """A real vLLM OpenAI-compatible server on ``model_dir`` at a free port of 127.0.0.1, started
    with ``core.vllm_engine.server_command`` (the README's command), one thread; yields its URL once
    /health answers (vLLM's start-up takes about a minute on 2 cores), and stops it after."""
    import httpx
    from core.vllm_engine import server_command, server_env
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(server_command(model_dir, port=port, served_model_name=served_model_name,
                                           max_model_len=max_model_len),
                            cwd=REPO, env=server_env(threads=1), stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the vLLM server exited: {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"no answer from {url}/health after 600 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)


# ----------------------------------------------------------------------------- model families
# The chat template Qwen2-Audio-7B-Instruct's checkpoints carry when saved by transformers 4.x:
# a part is audio when it has an "audio" or "audio_url" key (not by its type).
QWEN2_AUDIO_4X_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or "
    "'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}Audio "
    "{{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run_losses(out) -> list[float]:
    """The step losses of a training run in ``out`` (ReST: its rounds' SFT steps, whose own log
    holds one line per round)."""
    logs = [Path(out) / "metrics.jsonl"] + sorted(Path(out).glob("round_*/metrics.jsonl"))
    rows = [json.loads(x) for f in logs for x in f.read_text().splitlines() if x.strip()]
    return [float(r["loss"]) for r in rows if "loss" in r]


def check_served_teacher(teacher_dir, audio, prompt: str, opd_run, tmp_path, *,
                         prefill: str = "hello world<|im_end|>", k: int = 3) -> tuple[list[int], str]:
    """The teacher folder behind our server (``core.serve.app``, in this process):

    - one chat request with ``prompt_logprobs`` (the clip ``audio`` + ``prompt``, the assistant's
      ``prefill`` continued) returns the token ids of the prompt the folder's chat template
      renders, each position's top-k led by the actual token, and log-probs equal to a plain
      forward of that prompt (1e-4);
    - ``opd_run(out_dir, teacher_overrides)`` (an OPD run, returning its summary) with the remote
      teacher trains the same steps with the same losses as with the local one.

    Returns the prompt's ids and rendered text for family-specific checks."""
    import base64

    import httpx
    import soundfile as sf
    import torch

    from core.models import load_model_and_processor
    from core.serve.app import ServerThread, create_app
    data = base64.b64encode(Path(audio).read_bytes()).decode("ascii")
    body = {"model": str(teacher_dir), "max_tokens": 1, "temperature": 0, "prompt_logprobs": k,
            "return_token_ids": True, "add_generation_prompt": False, "continue_final_message": True,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                {"type": "text", "text": prompt}]}, {"role": "assistant", "content": prefill}]}
    local = opd_run(tmp_path / "local", {})
    with ServerThread(create_app(teacher_dir, device="cpu")) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)
        remote = opd_run(tmp_path / "remote", {"kind": "remote", "url": s.url})
    assert r.status_code == 200, r.text
    ids, plp = r.json()["prompt_token_ids"], r.json()["prompt_logprobs"]
    model, proc = load_model_and_processor(teacher_dir)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "a"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": prefill}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    wav, _ = sf.read(str(audio), dtype="float32")
    enc = proc(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")
    assert ids == enc["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(**{k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"})
        logp = torch.log_softmax(logits.logits[0].float(), -1)
    assert plp[0] is None and len(plp) == len(ids)
    for pos in range(1, len(ids)):
        assert next(iter(plp[pos])) == str(ids[pos])  # the actual token first
        for key, v in plp[pos].items():
            assert v["logprob"] == pytest.approx(float(logp[pos - 1, int(key)]), abs=1e-4)
    assert remote["steps"] == local["steps"] > 0 and remote["skipped_steps"] == 0
    a, b = run_losses(tmp_path / "local"), run_losses(tmp_path / "remote")
    assert len(a) == len(b) == local["steps"]
    assert all(abs(x - y) <= 1e-5 + 1e-3 * abs(y) for x, y in zip(a, b)), (a, b)
    return ids, text


def safetensors_of(folder) -> dict:
    """Every tensor of a model folder's ``*.safetensors`` files (shards included), by name."""
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out
