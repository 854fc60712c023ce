"""Where tensors live: the device choice (``backend.device``, ``decode --device``), batches and
teacher scores moved to the policy's device, and the GPU runs themselves.

The CPU tests check the choice, its errors and the moves (to the ``meta`` device, which needs no
hardware). The tests marked ``cuda`` train and decode on a GPU (every method with the plain
PyTorch backend, DeepSpeed ZeRO-2 in bf16) and are skipped on a machine without CUDA.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import config as C
from core.data.collate import AudioPromptCollator, PromptBatch
from core.methods import Context, prompts
from core.models import load_model_and_processor
from core.teacher import LocalTeacher, TeacherScores
from core.utils import dist

REPO = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the choice
def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else \
        torch.device("cpu")
    assert dist.device("auto") == want
    assert dist.device("") == want
    assert dist.device("cpu") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("choice", ["cuda", "cuda:1"])
def test_a_gpu_on_a_machine_without_one_is_refused(choice):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        dist.device(choice)


@pytest.mark.parametrize("choice", ["gpu0", "meta", "tpu"])
def test_other_devices_are_refused(choice):
    with pytest.raises(ValueError, match=r"auto \| cpu \| cuda \| cuda:N"):
        dist.device(choice)


def test_config_names_the_device_key(tiny):
    base = {"model": {"path": str(tiny.student)}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}}
    with pytest.raises(C.ConfigError, match="backend.device") as e:
        C.load_config(overrides=dict(base, backend={"device": "gpu0"}))
    assert "gpu0" in str(e.value)
    ds = REPO / "recipes" / "asr" / "conf" / "ds_zero2.json"
    with pytest.raises(C.ConfigError, match="backend.device.*DeepSpeed places the model"):
        C.load_config(overrides=dict(base, backend={"name": "deepspeed", "ds_config": str(ds), "device": "cpu"}))
    assert C.load_config(overrides=dict(base, backend={"device": "cpu"})).backend.device == "cpu"


@no_cuda
def test_config_refuses_cuda_without_a_gpu(tiny):
    with pytest.raises(C.ConfigError, match="backend.device.*no CUDA GPU"):
        C.load_config(overrides={"model": {"path": str(tiny.student)}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."},
                                 "backend": {"device": "cuda"}})


def test_a_4bit_model_keeps_the_device_it_is_loaded_on(tiny):
    with pytest.raises(C.ConfigError, match="backend.device.*4-bit model is loaded onto this process's GPU"):
        C.load_config(overrides={"model": {"path": str(tiny.student), "load_in_4bit": True, "lora": {"r": 4}},
                                 "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}, "backend": {"device": "cpu"}})


@cuda
def test_one_named_gpu_for_several_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every one of the 2 processes on one GPU"):
        dist.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one visible GPU per task
    assert dist.device("auto") == torch.device("cuda", 0)


def test_resume_puts_the_step_counts_where_this_runs_optimizer_wants_them(tmp_path):
    """A checkpoint of a foreach AdamW resumed by a fused one (and back): the step counts follow this
    run's implementation (the fused kernel reads them on the parameters' device), as float32."""
    from transformers import get_scheduler

    from core.backends import TorchEngine

    def engine(fused):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if fused else {"foreach": True}))
        return TorchEngine(model, opt, get_scheduler("constant", opt))

    for saved_fused in (False, True):
        a = engine(saved_fused)
        a.backward(a.module(torch.randn(2, 4)).pow(2).mean())
        a.step()
        a.save_state(tmp_path)
        b = engine(not saved_fused)
        b.load_state(tmp_path)
        for g in b.optimizer.param_groups:
            assert bool(g.get("fused")) == (not saved_fused)
            for prm in g["params"]:
                step = b.optimizer.state[prm]["step"]
                assert step.dtype == torch.float32 and float(step) == 1.0 and step.device == prm.device
        b.backward(b.module(torch.randn(2, 4)).pow(2).mean())
        assert not b.step()["skipped"]


# ----------------------------------------------------------------------------- the moves
@pytest.fixture(scope="module")
def audio_batch(tiny):
    model, proc = load_model_and_processor(tiny.student)
    col = AudioPromptCollator(proc, "Transcribe the audio.")
    return model, proc, col, col.prompts(tiny.rows[:3]).repeat(2)


def test_prompt_batch_moves_every_input_and_keeps_the_rest(audio_batch):
    _, _, _, batch = audio_batch
    assert batch.to("cpu") is batch  # already there: no copy
    moved = batch.to("meta")
    assert set(moved.inputs) == set(batch.inputs)
    for k, v in moved.inputs.items():
        assert v.device.type == "meta", k
        assert v.shape == batch.inputs[k].shape and v.dtype == batch.inputs[k].dtype, k
    assert moved.rows is batch.rows and moved.texts == batch.texts and moved.groups == batch.groups
    assert len(moved.audios) == len(batch.audios) == 6
    assert all(v.device.type == "cpu" for v in batch.inputs.values())  # the original is untouched


def test_methods_collate_onto_the_context_device(audio_batch, tiny):
    model, proc, col, _ = audio_batch
    cfg = C.load_config(overrides={"model": {"path": str(tiny.student)}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}})
    ctx = Context(model=model, forward_model=model, processor=proc, tokenizer=proc.tokenizer, collator=col,
                  cfg=cfg, device=torch.device("meta"))
    assert all(v.device.type == "meta" for v in prompts(ctx, tiny.rows[:2]).inputs.values())
    ctx.device = None  # a context built without a device keeps the collator's tensors
    assert all(v.device.type == "cpu" for v in prompts(ctx, tiny.rows[:2]).inputs.values())


def test_teacher_scores_move_with_their_optional_parts():
    s = TeacherScores(logp=torch.zeros(2, 3), valid=torch.ones(2, dtype=torch.bool),
                      topk_ids=torch.zeros(2, 3, 4, dtype=torch.long), topk_logp=torch.zeros(2, 3, 4))
    m = s.to("meta")
    assert m.logits is None and s.logits is None
    for name in ("logp", "valid", "topk_ids", "topk_logp"):
        a, b = getattr(s, name), getattr(m, name)
        assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, name


def test_local_teacher_valid_flags_live_with_its_scores(audio_batch, tiny):
    from core.sampling import generate_completions
    _, proc, col, _ = audio_batch
    tmodel, _ = load_model_and_processor(tiny.teacher)
    student, _ = load_model_and_processor(tiny.student)
    batch = col.prompts(tiny.rows[:2])
    rep, comp = generate_completions(student, batch, proc.tokenizer, n=2, max_new_tokens=4, seed=0)
    s = LocalTeacher(tmodel, device="cpu").score(rep, comp)
    assert s.valid.device == s.logp.device == torch.device("cpu") and bool(s.valid.all())


# ----------------------------------------------------------------------------- on a GPU
def _gpu_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "DS_ACCELERATOR")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


@cuda
@pytest.mark.parametrize("method", ["opd", "grpo", "sft"])
def test_every_method_trains_on_the_gpu(method, write_config, tmp_path):
    from core.trainer import Trainer
    sections = {"method": method, "train": {"batch_size": 2, "max_steps": 2, "seed": 0},
                "backend": {"dist_backend": "", "device": "cuda"}}
    if method == "opd":
        sections["opd"] = {"form": "distribution", "divergence": "reverse_kl", "support": "full"}
    if method == "grpo":
        sections["grpo"] = {"rewards": {"wer": 1.0}, "kl_beta": 0.05}
    t = Trainer(C.load_config(write_config(tmp_path, method, **sections)))
    assert next(t.model.parameters()).device.type == "cuda"
    if t.teacher is not None:
        assert next(t.teacher.model.parameters()).device.type == "cuda"
    if t.ref is not None:
        assert next(t.ref.parameters()).device.type == "cuda"
    before = {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()}
    summary = t.train()
    assert summary["steps"] == 2
    recs = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    after = t.model.state_dict()
    assert any(not torch.equal(before[k], after[k].detach().cpu()) for k in before), "no weight moved"


@cuda
def test_deepspeed_zero2_bf16_on_the_gpu(write_config, tmp_path):
    ds = json.loads((REPO / "recipes" / "asr" / "conf" / "ds_zero2.json").read_text())
    ds["bf16"] = {"enabled": True}
    ds_path = tmp_path / "ds_zero2_bf16.json"
    ds_path.write_text(json.dumps(ds))
    cfg = write_config(tmp_path, "ds", method="opd", model={"dtype": "bfloat16"}, teacher={"dtype": "bfloat16"},
                       opd={"form": "distribution", "divergence": "reverse_kl", "support": "full"},
                       train={"batch_size": 2, "max_steps": 2, "seed": 0},
                       backend={"name": "deepspeed", "ds_config": str(ds_path), "dist_backend": ""})
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=REPO, env=_gpu_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    recs = [json.loads(x) for x in (tmp_path / "ds" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


@cuda
def test_decode_on_the_gpu(tiny, tmp_path):
    from core.bin.decode import decode
    out = tmp_path / "hyp.jsonl"
    info = decode(str(tiny.student), str(tiny.manifest), str(out), batch_size=4, max_new_tokens=6, device="cuda")
    assert info["samples"] == len(tiny.rows)
    assert len(out.read_text().splitlines()) == len(tiny.rows)
