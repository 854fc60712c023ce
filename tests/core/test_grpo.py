"""GRPO through the trainer's own method and engine on a tiny ``Qwen2ForCausalLM``.

Checks: one GRPO step on a fixed batch, with reward 1 for the first completion of every group and
0 for the others, raises the log-probability of the rewarded completions and lowers the others';
a second optimisation epoch on the same rollout sees importance ratios away from 1 and reports
clipping; with the rewards of the registry, every component is logged separately; Dr.GRPO
(``scale: none``) leaves advantages unscaled.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from core import advantages as A
from core import config as C
from core.methods import METHODS
from core.models import build_tiny_causal_lm, train_tokenizer
from core.rewards import register_reward
from core.forward import completion_logits, token_logp
from core.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [("is fire hot or cold", ["hot", "cold"], "hot"), ("is ice hot or cold", ["hot", "cold"], "cold"),
             ("is the sky blue or green", ["blue", "green"], "blue"),
             ("is grass blue or green", ["blue", "green"], "green")]


@register_reward("test_starts_with_h")
def _starts_with_h(completions, **kwargs):
    return [1.0 if c.strip().startswith("h") else 0.0 for c in completions]


@register_reward("test_length")
def _length(completions, **kwargs):  # differs between samples whatever they are: non-zero advantages
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    texts = [f"{q} <think>i know</think><answer>{a}</answer>" for q, _, a in QUESTIONS] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    build_tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=0, out_dir=root / "policy")
    manifest = root / "train.jsonl"
    rows = [{"key": f"q{i}", "task": "qa", "prompt": q, "question": q, "choices": ch, "answer": a}
            for i, (q, ch, a) in enumerate(QUESTIONS)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, model=root / "policy", manifest=manifest, rows=rows)


def _trainer(p, out, **over) -> Trainer:
    base = {"method": "grpo", "output_dir": str(out), "model": {"path": str(p.model)},
            "data": {"train": str(p.manifest)},
            "rollout": {"n": 4, "max_new_tokens": 6, "temperature": 1.0},
            "grpo": {"rewards": {"format": 0.1, "mcq_accuracy": 1.0, "test_starts_with_h": 0.5}},
            "optim": {"lr": 1e-2, "grad_clip": 0.0, "scheduler": "constant"},
            "train": {"batch_size": 4, "max_steps": 2, "resume": "never"}}
    return Trainer(C.load_config(overrides=C.deep_merge(base, over)))


def _seq_logp(ctx, exp) -> torch.Tensor:
    with torch.no_grad():
        lp = token_logp(completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask,
                                          temperature=ctx.cfg.rollout.temperature), exp.comp.ids)
    return (lp * exp.tensors["mask"]).sum(-1)


def test_grpo_step_raises_the_logp_of_the_rewarded_completion(policy, tmp_path):
    t = _trainer(policy, tmp_path / "run")
    method, ctx, n = METHODS["grpo"], t.ctx, 4
    exp = method.experience(ctx, policy.rows, seed=0)
    assert len(exp) == 16
    # every reward component is reported on its own, plus the weighted total
    for k in ("reward", "reward/format", "reward/mcq_accuracy", "reward/test_starts_with_h"):
        assert k in exp.metrics
    # a fixed reward: the first completion of each group is right, the others wrong
    r = torch.tensor([1.0 if i % n == 0 else 0.0 for i in range(len(exp))])
    exp.tensors["adv"] = A.group_advantages(r, n)
    ctx.forward_model.train()
    before = _seq_logp(ctx, exp)
    # the sampler's log-probabilities are the policy's own: the first ratio is exactly 1
    assert torch.allclose((exp.tensors["old_logp"] * exp.tensors["mask"]).sum(-1), before, atol=1e-4)
    loss, m = method.loss(ctx, exp)
    assert abs(m["ratio_mean"] - 1.0) < 1e-4 and m["clip_frac"] == 0.0
    t.engine.backward(loss)
    assert not t.engine.step()["skipped"]
    after = _seq_logp(ctx, exp)
    rewarded = torch.arange(len(exp)) % n == 0
    assert (after - before)[rewarded].mean() > 0, (before, after)
    assert (after - before)[~rewarded].mean() < 0, (before, after)
    # a second epoch on the same rollout: ratios move away from 1, the clip acts on some tokens
    loss2, m2 = method.loss(ctx, exp)
    assert max(abs(m2["ratio_max"] - 1.0), abs(m2["ratio_min"] - 1.0)) > 1e-3
    assert "clip_frac" in m2


def test_grpo_epochs_and_minibatches_through_the_loop(policy, tmp_path):
    out = tmp_path / "loop"
    t = _trainer(policy, out, grpo={"epochs": 2, "minibatches": 2, "kl_beta": 0.05, "kl_kind": "k3",
                                    "agg": "seq-mean-token-sum-norm", "scale": "none",
                                    "rewards": {"format": 0.1, "mcq_accuracy": 1.0, "test_length": 0.5}})
    s = t.train()
    assert s["steps"] == 2 and s["skipped_steps"] == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["advantage_abs_mean"] > 0 for x in lines)
    assert all("reward/mcq_accuracy" in x and "reward/format" in x for x in lines)
    assert all("train/kl_ref" in x for x in lines)
    # two epochs x two minibatches: the later passes use importance ratios of an updated policy
    assert any(abs(x["train/ratio_max"] - 1.0) > 1e-4 or abs(x["train/ratio_min"] - 1.0) > 1e-4 for x in lines)
    assert (out / "final" / "config.json").is_file()


def test_dr_grpo_advantages_are_not_scaled():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    std = A.group_advantages(r, 4, scale="std")
    none = A.group_advantages(r, 4, scale="none")
    assert torch.allclose(none[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(none[4:], torch.zeros(4)) and torch.allclose(std[4:], torch.zeros(4))
    assert torch.allclose(std[:4], none[:4] / r[:4].std(), atol=1e-3)
