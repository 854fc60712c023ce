"""vLLM as the rollout engine (``rollout.engine: vllm``), against a real vLLM on the CPU.

Tiny ``Qwen2ForCausalLM`` models with head size 32 (vLLM's CPU attention takes no smaller).
Checks: the engine's log-probs of a fixed sequence equal the trainer model's to 1e-4, differ
after the trainer's weights move, and equal them again after ``sync``; samples under a fixed
seed are reproducible, never hold a suppressed token, stop at EOS, and their log-probs equal a
trainer forward on the same tokens; GRPO and OPD runs of a few steps through ``core.bin.train``
with ``rollout.engine: vllm`` raise a learnable reward / lower the divergence as the hf engine's
runs do; a missing or broken vLLM stops ``core.bin.train`` with one ``error:`` line; audio
prompts (a tiny Qwen2-Audio) and audio + video prompts (a tiny Qwen2.5-Omni thinker, before and
after a weight sync) sample with log-probs equal to a trainer forward on the same media.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.models import build_tiny_causal_lm, load_model_and_processor, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [("count to three", "one two three"), ("say hello", "hello world"),
         ("name a pet", "the cat sat on the mat"), ("name three colours", "red green and blue"),
         ("where is the dog", "a dog ran in the park"), ("how is the weather", "it is cold today"),
         ("what do fish do", "fish swim in water"), ("what do birds do", "birds fly high")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tok = train_tokenizer([f"{p} {t}" for p, t in PAIRS] * 4, vocab_size=300)
    build_tiny_causal_lm(tok, hidden=64, layers=2, heads=2, seed=0, out_dir=root / "student")
    build_tiny_causal_lm(tok, hidden=96, layers=2, heads=3, seed=1, out_dir=root / "teacher")
    manifest = root / "train.jsonl"
    rows = [{"key": f"s{i}", "task": "qa", "prompt": p, "text": t} for i, (p, t) in enumerate(PAIRS)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, student=root / "student", teacher=root / "teacher", manifest=manifest,
                           rows=rows)


@pytest.fixture(scope="module")
def engine(tiny):
    from core.vllm_engine import VLLMEngine
    eng = VLLMEngine(str(tiny.student), seed=0, max_model_len=128)
    yield eng
    eng.close()


def _trainer_logp(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :-1].float(), -1)
    return lp.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


def test_engine_follows_the_trainers_weights(tiny, engine):
    model, tok = load_model_and_processor(tiny.student)
    seq = tok("count to three one two three", add_special_tokens=False)["input_ids"]
    ours = _trainer_logp(model, seq)
    theirs = torch.tensor(engine.prompt_logprobs([seq])[0])
    assert (ours - theirs).abs().max() < 1e-4
    # a training step moves the trainer's weights: the engine still has the old ones
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = _trainer_logp(model, seq)
    assert (moved - theirs).abs().max() > 1e-2
    secs = engine.sync(model, version=1)
    assert engine.version == 1 and secs >= 0
    after = torch.tensor(engine.prompt_logprobs([seq])[0])
    assert (moved - after).abs().max() < 1e-4
    # back to the folder's weights for the tests below
    engine.sync(load_model_and_processor(tiny.student)[0], version=0)


def test_samples_are_reproducible_and_scored_like_the_trainer(tiny, engine):
    from core.data.collate import make_collator
    from core.models import special_token_ids
    model, tok = load_model_and_processor(tiny.student)
    collator = make_collator("text", tok)
    batch = collator.prompts(tiny.rows[:3])
    suppress = special_token_ids(tok)
    kw = dict(n=4, temperature=1.0, max_new_tokens=12, suppress_ids=suppress, eos_ids=[tok.eos_token_id], seed=7)
    rep, a = engine.generate(batch, tok, **kw)
    _, b = engine.generate(batch, tok, **kw)
    assert a.ids.shape[0] == 12 and len(rep) == 12 and torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp)
    _, c = engine.generate(batch, tok, **{**kw, "seed": 8})
    assert not torch.equal(a.ids, c.ids)
    # the n samples of one prompt differ from each other
    assert len({tuple(r.tolist()) for r in a.ids[:4]}) > 1
    sampled = a.ids[a.mask.bool()]
    assert not set(sampled.tolist()) & (set(suppress) - {tok.eos_token_id})
    for row, m in zip(a.ids, a.mask):  # the mask ends at the first EOS (kept), or runs to the length cap
        n = int(m.sum())
        eos = (row[:n] == tok.eos_token_id).nonzero()
        assert (len(eos) == 0 and n == 12) or (len(eos) == 1 and int(eos[0]) == n - 1)
    # the engine's log-probs are those of the distribution it sampled from: the suppressed tokens
    # are out of its softmax; a trainer forward with the same tokens out gives the same numbers
    from core.forward import completion_logits, token_logp
    with torch.no_grad():
        logits = completion_logits(model, rep, a.ids, a.mask)
        lp = token_logp(logits.index_fill(-1, torch.tensor(suppress), float("-inf")), a.ids)
        lp = torch.where(a.mask.bool(), lp, torch.zeros_like(lp))   # padding is a suppressed token
        full = token_logp(logits, a.ids) * a.mask
    assert (lp - a.logp).abs().max() < 1e-4
    assert ((full - a.logp) * a.mask).max() <= 1e-6   # with them in, every token is a little less likely


def _train(tiny, out: Path, method: str, engine: str, steps: int, **extra) -> list[dict]:
    cfg = {"method": method, "output_dir": str(out), "model": {"path": str(tiny.student)},
           "data": {"train": str(tiny.manifest), "max_target_tokens": 16},
           "rollout": {"n": 4, "max_new_tokens": 8, "temperature": 1.0, "engine": engine,
                       "vllm": {"max_model_len": 128}},
           "optim": {"lr": 1e-2, "scheduler": "constant", "grad_clip": 1.0},
           "train": {"batch_size": 8, "max_steps": steps, "resume": "never", "eval_every": 0, "save_every": 0}}
    cfg.update(extra)
    path = out.parent / f"{out.name}.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _mean(rows, key, part):
    vals = [r[key] for r in rows if key in r]
    k = max(1, len(vals) // 4)
    return sum(vals[:k]) / k if part == "first" else sum(vals[-k:]) / k


def test_grpo_with_vllm_learns_a_reward_like_the_hf_engine(tiny, tmp_path):
    """reward: the share of the letter o in the completion. 16 steps of GRPO raise it with either
    engine; with vLLM the engine's weights follow every update and the importance weights stay near 1."""
    grpo = {"grpo": {"rewards": {"test_o_share": 1.0}}, "rewards": {"modules": [str(ROOT / "tests/resources/rewards_o.py")]}}
    runs = {e: _train(tiny, tmp_path / e, "grpo", e, 16, **grpo) for e in ("hf", "vllm")}
    for e, rows in runs.items():
        first, last = _mean(rows, "reward", "first"), _mean(rows, "reward", "last")
        assert last > first + 0.1, (e, first, last)
    v = runs["vllm"]
    assert all("rollout/sync_seconds" in r for r in v[1:])
    assert all(0.9 < r["train/rollout/tis_weight_mean"] < 1.1 for r in v), [r["train/rollout/tis_weight_mean"] for r in v]
    assert max(r["train/rollout/logp_abs_diff"] for r in v) < 1e-3


def test_opd_with_vllm_lowers_the_divergence_like_the_hf_engine(tiny, tmp_path):
    opd = {"teacher": {"path": str(tiny.teacher)},
           "opd": {"form": "distribution", "divergence": "reverse_kl", "support": "full"}}
    runs = {e: _train(tiny, tmp_path / e, "opd", e, 12, **opd) for e in ("hf", "vllm")}
    for e, rows in runs.items():
        first, last = _mean(rows, "loss", "first"), _mean(rows, "loss", "last")
        assert last < 0.8 * first, (e, first, last)


def test_a_broken_vllm_is_one_error_line(tiny, tmp_path):
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text("raise ImportError('libtorch_cpu.so: undefined symbol: xyz')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"method": "grpo", "output_dir": str(tmp_path / "o"), "model": {"path": str(tiny.student)},
                               "data": {"train": str(tiny.manifest)}, "grpo": {"rewards": {"format": 1.0}},
                               "rollout": {"engine": "vllm"}, "train": {"max_steps": 1}}))
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "rollout.engine" in err[0] and "undefined symbol" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_two_processes_each_sample_with_their_own_engine(tiny, tmp_path, run_train_cli):
    """torchrun with 2 processes (gloo): each rank starts its engine inside the launcher's process
    group and GRPO trains; the ranks' rewards are averaged into one log."""
    import yaml
    cfg = {"method": "grpo", "output_dir": str(tmp_path / "o"), "model": {"path": str(tiny.student)},
           "data": {"train": str(tiny.manifest)}, "grpo": {"rewards": {"test_o_share": 1.0}},
           "rewards": {"modules": [str(ROOT / "tests/resources/rewards_o.py")]},
           "rollout": {"n": 4, "max_new_tokens": 8, "engine": "vllm", "vllm": {"max_model_len": 128}},
           "optim": {"lr": 1e-2, "scheduler": "constant"},
           "train": {"batch_size": 4, "max_steps": 2, "resume": "never", "save_every": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_train_cli(tmp_path / "c.yaml", nproc=2, timeout=900)
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 2 and all("rollout/sync_seconds" in r for r in rows[1:])
    assert all(abs(r["train/rollout/tis_weight_mean"] - 1) < 0.1 for r in rows)


def test_rest_samples_with_vllm(tiny, tmp_path):
    """ReST with rollout.engine vllm: the engine samples each round (started once, given the
    second round's weights), and both rounds keep samples and train."""
    rest = {"rest": {"rounds": 2, "samples": 4, "lrs": [1e-2, 1e-2], "rewards": {"test_o_share": 1.0},
                     "keep_min_reward": 0.05, "steps_per_round": 2},
            "grpo": {"rewards": {"test_o_share": 1.0}},
            "rewards": {"modules": [str(ROOT / "tests/resources/rewards_o.py")]}}
    _train(tiny, tmp_path / "rest", "rest", "vllm", 2, **rest)
    summary = json.loads((tmp_path / "rest" / "rest_summary.json").read_text())
    assert summary["rounds_done"] == 2
    for st in summary["rounds"]:
        assert st["samples"] == 4 * len(tiny.rows) and st["kept"] > 0 and st["trained"]


def test_lora_weights_reach_the_engine_merged(tiny, tmp_path):
    """GRPO with LoRA: the adapters are merged into the weights the engine gets, so after each
    update the engine's sampling log-probs still equal the trainer's."""
    grpo = {"grpo": {"rewards": {"test_o_share": 1.0}}, "rewards": {"modules": [str(ROOT / "tests/resources/rewards_o.py")]},
            "model": {"path": str(tiny.student), "lora": {"r": 4, "lora_alpha": 8}}}
    rows = _train(tiny, tmp_path / "lora", "grpo", "vllm", 3, **grpo)
    assert len(rows) == 3 and max(r["train/rollout/logp_abs_diff"] for r in rows) < 1e-3
    assert abs(rows[-1]["train/rollout/tis_weight_mean"] - 1) < 0.01


def test_zero3_partitions_are_gathered_for_the_engine(tiny, tmp_path):
    """DeepSpeed ZeRO-3 (one process, gloo): the partitioned weights are gathered for each sync,
    so after every update the engine's sampling log-probs still equal the trainer's."""
    ds = tmp_path / "ds_zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {
                                  "stage": 3, "stage3_param_persistence_threshold": 0}}))
    grpo = {"grpo": {"rewards": {"test_o_share": 1.0}}, "rewards": {"modules": [str(ROOT / "tests/resources/rewards_o.py")]},
            "backend": {"name": "deepspeed", "ds_config": str(ds)}}
    rows = _train(tiny, tmp_path / "z3", "grpo", "vllm", 3, **grpo)
    assert len(rows) == 3 and max(r["train/rollout/logp_abs_diff"] for r in rows) < 1e-3


def _child_check(script: str, tmp_path) -> dict:
    """Run ``tests/resources/<script>`` in a child process (this module's engine is alive in this
    one) on ``tmp_path``; its last stdout line, a JSON object."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/resources" / script), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_audio_prompts_through_the_engine(tmp_path):
    """A tiny Qwen2-Audio (head size 32, the released 30 s feature chunk): the collator's prompt
    ids (audio placeholders expanded) and the clip go to vLLM as multi-modal data; the samples'
    log-probs equal a trainer forward with the same audio features. Run in a child process: this
    module's engine is alive in this one."""
    res = _child_check("vllm_audio_check.py", tmp_path)
    assert res["rows"] == 4 and res["tokens"] > 0
    assert res["max_abs_diff"] < 1e-4, res


def test_audio_video_prompts_through_the_engine(tmp_path):
    """A tiny Qwen2.5-Omni thinker saved alone (head size 32), two short mp4 clips with a sound
    track collated by ``AVPromptCollator`` (video item, then its audio item): vLLM runs its own
    thinker from the folder (config wrapped as the full model's, weights under ``thinker.``), the
    frames go with the collator's frame-size cap and fps so that its processor expands the
    placeholders to our counts, 2 samples per prompt never hold a suppressed token, and their
    log-probs equal a trainer forward with the same media and suppression; blanking the media
    moves the trainer's log-probs, so the agreement is not that of a model that ignores them.
    After the trainer's weights move and are synced, the same clips sample again (the engine's
    encoder cache emptied with its weights) and still agree. Run in a child process: this
    module's engine is alive in this one."""
    res = _child_check("vllm_av_check.py", tmp_path)
    assert res["rows"] == 4 and res["tokens"] > 0 and not res["suppressed_drawn"], res
    assert res["prompt_tokens"][0] != res["prompt_tokens"][1], res   # clips of two lengths: other placeholder counts
    assert res["max_abs_diff"] < 1e-4 and res["max_abs_diff_after_sync"] < 1e-4, res
    assert res["media_effect"] > 1e-2, res
