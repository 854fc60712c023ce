"""The training loop on tiny models, on the CPU: one OPD step, backends (torch, DeepSpeed ZeRO-2/3,
two processes under torchrun), exact resume, export, calibrate, and non-finite steps.

Runs that need their own process group (DeepSpeed, torchrun) go through ``python -m
core.bin.train`` in a child process; the rest run ``Trainer`` in this process.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import config as C
from core.data.collate import AudioPromptCollator
from core.methods import METHODS, Context
from core.models import load_model_and_processor, special_token_ids
from core.forward import completion_logits
from core.teacher import LocalTeacher
from core.trainer import Trainer, TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(out_dir) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(out_dir)]


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def train_in_process(config_path, **overrides) -> tuple[Trainer, dict]:
    t = Trainer(C.load_config(config_path, overrides=[f"{k}={v}" for k, v in overrides.items()]))
    return t, t.train()


# ----------------------------------------------------------------------------- one OPD step
def _reverse_kl_per_token(student_logits, teacher_logits, mask):
    """sum_v pS(v) (log pS(v) - log pT(v)), averaged over the completion tokens."""
    ls, lt = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def test_one_opd_step_lowers_the_reverse_kl(tiny):
    cfg = C.load_config(overrides={
        "method": "opd", "model": {"path": str(tiny.student)}, "teacher": {"path": str(tiny.teacher)},
        "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}, "rollout": {"n": 2, "max_new_tokens": 8},
        "opd": {"form": "distribution", "divergence": "reverse_kl", "support": "full"}})
    torch.manual_seed(0)
    model, proc = load_model_and_processor(cfg.model.path)
    tmodel, _ = load_model_and_processor(cfg.teacher.path)
    teacher_before = {k: v.clone() for k, v in tmodel.state_dict().items()}
    tok = proc.tokenizer
    ctx = Context(model=model, forward_model=model, processor=proc, tokenizer=tok,
                  collator=AudioPromptCollator(proc, cfg.data.prompt), cfg=cfg, teacher=LocalTeacher(tmodel),
                  suppress_ids=special_token_ids(proc), eos_ids=[tok.eos_token_id])
    method = METHODS["opd"]
    exp = method.experience(ctx, tiny.rows[:4], seed=0)
    assert len(exp) == 8 and exp.tensors["teacher_logits"] is not None
    mask = exp.tensors["mask"]
    t_logits = exp.tensors["teacher_logits"]

    model.train()
    loss0, m0 = method.loss(ctx, exp)
    with torch.no_grad():
        kl0 = _reverse_kl_per_token(completion_logits(model, exp.batch, exp.comp.ids, exp.comp.mask), t_logits, mask)
    assert kl0 > 0
    torch.testing.assert_close(loss0.detach(), kl0, rtol=1e-4, atol=1e-7)
    assert math.isclose(m0["loss"], float(kl0), rel_tol=1e-4)

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.zero_grad()
    loss0.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()

    with torch.no_grad():
        loss1, _ = method.loss(ctx, exp)  # the same completions and teacher scores
        kl1 = _reverse_kl_per_token(completion_logits(model, exp.batch, exp.comp.ids, exp.comp.mask), t_logits, mask)
    torch.testing.assert_close(loss1, kl1, rtol=1e-4, atol=1e-7)
    assert kl1 < 0.99 * kl0, f"reverse KL {float(kl0):.6f} -> {float(kl1):.6f}"
    # the teacher is frozen
    for k, v in tmodel.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


# ----------------------------------------------------------------------------- backends
DS_BASE = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 1000000,
           "wall_clock_breakdown": False}


def ds_json(folder: Path, stage: int) -> Path:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    path = folder / f"ds_zero{stage}.json"
    path.write_text(json.dumps({**DS_BASE, "zero_optimization": zero}, indent=1))
    return path


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory, write_config, run_train_cli):
    """``backend_runs(name, *overrides, nproc=1)`` -> output dir of an SFT CLI run, run once per name.

    Reference completions are cut to 3 tokens (every transcript has more), so every sample has
    the same token count: a per-rank token-mean averaged over ranks then equals the token-mean
    over the global batch, and one- and two-process runs can be compared exactly.
    """
    folder = tmp_path_factory.mktemp("backends")
    cfg = write_config(folder, "sft", method="sft", train={"batch_size": 2, "max_steps": 3},
                       data={"max_target_tokens": 3}, optim={"lr": 1e-2})
    done: dict[str, Path] = {}

    def get(name: str, *overrides: str, nproc: int = 1) -> Path:
        if name not in done:
            out = folder / name
            run_train_cli(cfg, f"output_dir={out}", *overrides, nproc=nproc)
            assert (out / "final" / "model.safetensors").is_file()
            done[name] = out
        return done[name]

    get.folder = folder
    return get


def _assert_same_run(out, ref, rtol=1e-4, weights_atol=1e-4):
    """Same loss curve (rtol) and final weights (atol: Adam turns float-summation-order noise in
    near-zero gradients into differences of up to ~1e-5 when the reduction order changes; a real
    difference in the updates moves weights by ~lr = 1e-2)."""
    a, b = losses(out), losses(ref)
    assert len(a) == len(b) == 3
    assert a[0] != a[-1], "the loss should move over the run"
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol), (a, b)
    # gradient norms before clipping (clipping at 1.0 would hide a wrongly scaled gradient)
    ga = [float(r["grad_norm"]) for r in read_metrics(out)]
    gb = [float(r["grad_norm"]) for r in read_metrics(ref)]
    for x, y in zip(ga, gb):
        assert math.isclose(x, y, rel_tol=rtol), (ga, gb)
    wa, wb = final_weights(out), final_weights(ref)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=weights_atol, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_one_process_matches_torch(backend_runs, tiny, stage):
    ref = backend_runs("torch_b2")
    ds = backend_runs(f"ds{stage}_b2", "backend.name=deepspeed",
                      f"backend.ds_config={ds_json(backend_runs.folder, stage)}")
    _assert_same_run(ds, ref)
    # the export of a ZeRO-3 run gathers the partitioned weights
    w, init = final_weights(ds), load_file(str(tiny.student / "model.safetensors"))
    changed = [k for k in w if not torch.equal(w[k], init[k])]
    assert len(changed) > len(w) // 2
    # the frozen Whisper position table stays as built
    pos = [k for k in w if k.endswith("audio_tower.embed_positions.weight")]
    assert pos and all(torch.equal(w[k], init[k]) for k in pos)


def test_torchrun_two_processes_match_one_process_with_double_batch(backend_runs):
    ref = backend_runs("torch_b4", "train.batch_size=4")
    two = backend_runs("torch_2x2", "train.batch_size=2", nproc=2)
    _assert_same_run(two, ref)


def test_torchrun_two_processes_deepspeed_zero2(backend_runs):
    ref = backend_runs("torch_b4", "train.batch_size=4")
    two = backend_runs("ds2_2x2", "train.batch_size=2", "backend.name=deepspeed",
                       f"backend.ds_config={ds_json(backend_runs.folder, 2)}", nproc=2)
    _assert_same_run(two, ref)


# ----------------------------------------------------------------------------- resume
def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ after resume: {diff[:5]}"


@pytest.mark.parametrize("method", ["sft", "opd"])
def test_resume_matches_an_uninterrupted_run(train_config, run_train_cli, tiny, method):
    sections = dict(method=method, rollout={"n": 2, "max_new_tokens": 6},
                    optim={"lr": 1e-2, "grad_accum": 2 if method == "opd" else 1},
                    train={"batch_size": 2 if method == "opd" else 4, "max_steps": 5, "save_every": 2,
                           "keep_last": 1, "resume": "auto"})
    full = train_config("full", **sections)
    part = train_config("part", **sections)
    out_full, out_part = Path(C.load_config(full).output_dir), Path(C.load_config(part).output_dir)

    train_in_process(full)
    # interrupted after step 2 (the checkpoint of step 2 written), then resumed in a fresh process
    _, s1 = train_in_process(part, **{"train.stop_after_steps": 2})
    assert s1["interrupted"] and s1["steps"] == 2
    assert not (out_part / "final").exists()
    assert (out_part / "checkpoints" / "latest").read_text().strip() == "step_2"
    p = run_train_cli(part, "train.stop_after_steps=0", threads=torch.get_num_threads())
    assert "resumed from" in p.stderr

    _assert_bitwise_equal(final_weights(out_full), final_weights(out_part))
    init = load_file(str(tiny.student / "model.safetensors"))
    assert any(not torch.equal(v, init[k]) for k, v in final_weights(out_full).items())
    # the metrics of the steps after the resume are those of the uninterrupted run
    mf, mp = read_metrics(out_full), read_metrics(out_part)
    assert [r["step"] for r in mp] == [1, 2, 3, 4, 5]
    for a, b in zip(mf, mp):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"], (a["step"], a["loss"], b["loss"])
    if method == "sft":  # 5 steps x 4 rows over 12 rows: the data order crossed an epoch after the resume
        assert mp[-1]["epoch"] == 1
    # keep_last=1 leaves one checkpoint
    cks = sorted(p.name for p in (out_part / "checkpoints").glob("step_*"))
    assert cks == ["step_5"]


# ----------------------------------------------------------------------------- export
def test_export_loads_with_plain_transformers(train_config, tiny):
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from core.data.audio import load_audio

    cfg = train_config("export", train={"max_steps": 2})
    trainer, summary = train_in_process(cfg)
    final = Path(summary["final_model"])
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(final)).eval()
    proc = AutoProcessor.from_pretrained(str(final))
    assert len(proc.tokenizer) == len(tiny.tokenizer)
    assert proc.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"type": "text", "text": "Transcribe the audio."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    audio = load_audio(tiny.rows[0]["audio"])
    inputs = proc(text=[text], audio=[audio], sampling_rate=16000, return_tensors="pt", padding=True)
    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"}
    trained = trainer.engine.module.eval()
    with torch.no_grad():
        got = model(**inputs).logits
        want = trained(**inputs).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    init = load_file(str(tiny.student / "model.safetensors"))
    exported = final_weights(final.parent)
    assert any(not torch.equal(v, init[k]) for k, v in exported.items())
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3


# ----------------------------------------------------------------------------- calibrate
def test_calibrate_writes_a_finite_kl(train_config, tiny):
    cfg = train_config("calib", method="calibrate", data={"train": "", "dev": str(tiny.manifest)},
                       rollout={"n": 1, "max_new_tokens": 6}, train={"batch_size": 6})
    trainer, res = train_in_process(cfg)
    out = Path(trainer.cfg.output_dir)
    written = json.loads((out / "calibrate.json").read_text())
    assert written == pytest.approx(res)
    kl = written["reverse_kl_per_token"]
    assert math.isfinite(kl) and 0 < kl < math.log(len(tiny.tokenizer))
    assert written["samples"] == len(tiny.rows) and written["tokens"] > 0
    assert math.isfinite(written["sampled_kl_per_token"])
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- non-finite steps
def test_absurd_lr_stops_after_max_bad_steps(train_config):
    cfg = train_config("lr", optim={"lr": 1e30, "scheduler": "constant"},
                       train={"max_steps": 20, "max_bad_steps": 3})
    t = Trainer(C.load_config(cfg))
    with pytest.raises(TrainingError, match="max_bad_steps=3"):
        t.train()
    rows = read_metrics(t.cfg.output_dir)
    # step 1 is fine and blows the weights up; every later step is non-finite and skipped
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]
    assert math.isfinite(float(rows[0]["loss"]))
    assert not (Path(t.cfg.output_dir) / "final").exists()


def _nan_on(calls: set[int], counter: list[int]):
    real = type(METHODS["sft"]).loss

    def loss(ctx, exp, norm=None):
        counter[0] += 1
        value, m = real(METHODS["sft"], ctx, exp, norm)
        if counter[0] in calls:
            value = value * float("nan")
        return value, m

    return loss


def test_nan_loss_steps_are_skipped_and_counted(train_config, monkeypatch):
    counter = [0]
    monkeypatch.setattr(METHODS["sft"], "loss", _nan_on({2, 3}, counter))
    cfg = train_config("nan", train={"max_steps": 5, "max_bad_steps": 3})
    t, summary = train_in_process(cfg)
    assert counter[0] == 5
    assert summary["skipped_steps"] == 2 and summary["steps"] == 5
    rows = read_metrics(t.cfg.output_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 2]
    assert [r["loss"] for r in rows][1:3] == ["nan", "nan"]  # a skipped step logs no loss
    assert all(isinstance(r["loss"], float) for r in rows[:1] + rows[3:])
    # the optimizer stepped only on the 3 good steps
    opt = t.engine.optimizer
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3}
    assert (Path(t.cfg.output_dir) / "final" / "model.safetensors").is_file()


def test_nan_loss_every_step_raises(train_config, monkeypatch):
    counter = [0]
    monkeypatch.setattr(METHODS["sft"], "loss", _nan_on(set(range(1, 100)), counter))
    cfg = train_config("nan_all", train={"max_steps": 10, "max_bad_steps": 2})
    with pytest.raises(TrainingError, match="consecutive non-finite"):
        train_in_process(cfg)
    assert counter[0] == 2
