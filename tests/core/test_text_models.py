"""Text-only causal LMs through the same loop: a tiny ``Qwen2ForCausalLM`` student/teacher pair
built from config, a text manifest without media, SFT and OPD via ``Trainer``.

Checks: ``data.modality: auto`` picks the text collator for a model without an audio encoder and
reads the manifest without requiring media; SFT and OPD losses are finite and the trainer exports
a loadable model; one OPD optimizer step through the trainer's own engine lowers the reverse KL on
a fixed batch of samples; ``data.modality: audio`` on text rows fails clearly at start-up.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import config as C
from core.data.collate import TextPromptCollator
from core.data.manifest import ManifestError
from core.methods import METHODS
from core.models import build_tiny_causal_lm, load_model_and_processor, train_tokenizer
from core.forward import completion_logits
from core.rewards import register_reward
from core.trainer import Trainer
from core.trainer import run as train_run

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("count to three", "one two three"),
    ("say hello", "hello world"),
    ("name a pet", "the cat sat on the mat"),
    ("name three colours", "red green and blue"),
    ("where is the dog", "a dog ran in the park"),
    ("how is the weather", "it is cold today"),
    ("what do fish do", "fish swim in water"),
    ("what do birds do", "birds fly high"),
]


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_models")
    tok = train_tokenizer([f"{p} {t}" for p, t in PAIRS] * 4, vocab_size=300)
    build_tiny_causal_lm(tok, hidden=32, layers=1, heads=4, seed=0, out_dir=root / "student")
    build_tiny_causal_lm(tok, hidden=48, layers=1, heads=4, seed=1, out_dir=root / "teacher")
    manifest = root / "train.jsonl"
    rows = [{"key": f"s{i}", "task": "qa", "prompt": p, "text": t} for i, (p, t) in enumerate(PAIRS)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, student=root / "student", teacher=root / "teacher", manifest=manifest, rows=rows)


def _cfg(pair, out: Path, method: str, **over) -> C.TrainConfig:
    base = {
        "method": method, "output_dir": str(out),
        "model": {"path": str(pair.student)},
        "data": {"train": str(pair.manifest), "max_target_tokens": 16},
        "rollout": {"n": 2, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"batch_size": 4, "max_steps": 3, "resume": "never"},
    }
    if method == "opd":
        base["teacher"] = {"path": str(pair.teacher)}
        base["opd"] = {"form": "distribution", "divergence": "reverse_kl", "support": "full"}
    return C.load_config(overrides=C.deep_merge(base, over))


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]) for line in lines if line.strip()]


def test_text_collator_left_pads_chat_prompts(text_pair):
    _, tok = load_model_and_processor(text_pair.student)
    col = TextPromptCollator(tok, "Transcribe the audio.")
    batch = col.prompts(text_pair.rows[:3])
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert set(batch.inputs) == {"input_ids", "attention_mask"} and batch.audios == []
    assert (mask[:, -1] == 1).all(), "prompts are left-padded"
    for row, text in zip(text_pair.rows[:3], batch.texts):
        assert row["prompt"] in text and "audio" not in text.lower()
        assert text == tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               add_generation_prompt=True, tokenize=False)
    # a template that names a field is formatted with the row
    assert TextPromptCollator(tok, "Q: {prompt}").text(text_pair.rows[0]) == f"Q: {text_pair.rows[0]['prompt']}"
    t_ids, t_mask = col.targets(["hello world"])
    assert t_ids[0, int(t_mask.sum()) - 1] == tok.eos_token_id


def test_sft_on_a_text_model(text_pair, tmp_path):
    t = Trainer(_cfg(text_pair, tmp_path / "sft", "sft"))
    assert t.modality == "text" and isinstance(t.collator, TextPromptCollator)
    summary = t.train()
    losses = _losses(tmp_path / "sft")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    model, _ = load_model_and_processor(tmp_path / "sft" / "final")
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_opd_on_a_text_pair(text_pair, tmp_path):
    t = Trainer(_cfg(text_pair, tmp_path / "opd", "opd"))
    assert t.modality == "text"
    summary = t.train()
    losses = _losses(tmp_path / "opd")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)


def test_opd_step_lowers_the_reverse_kl_on_a_fixed_batch(text_pair, tmp_path):
    """One step exactly as the loop takes it (experience -> loss -> engine.backward -> engine.step)
    on a fixed batch: the same completions and teacher logits score a lower reverse KL after it."""
    t = Trainer(_cfg(text_pair, tmp_path / "opd_fixed", "opd", optim={"lr": 1e-2, "grad_clip": 0.0}))
    method, ctx = METHODS["opd"], t.ctx
    torch.manual_seed(0)
    exp = method.experience(ctx, text_pair.rows[:4], seed=0)
    assert len(exp) == 8 and exp.tensors["teacher_logits"] is not None

    def reverse_kl() -> float:
        with torch.no_grad():
            s = torch.log_softmax(completion_logits(ctx.forward_model, exp.batch, exp.comp.ids, exp.comp.mask), -1)
            tl = torch.log_softmax(exp.tensors["teacher_logits"], -1)
            kl = (s.exp() * (s - tl)).sum(-1)
            m = exp.tensors["mask"]
            return float((kl * m).sum() / m.sum())

    ctx.forward_model.train()
    kl0 = reverse_kl()
    loss, _ = method.loss(ctx, exp)
    assert math.isclose(float(loss.detach()), kl0, rel_tol=1e-4)
    t.engine.backward(loss)
    info = t.engine.step()
    assert not info["skipped"] and math.isfinite(info["grad_norm"])
    kl1 = reverse_kl()
    assert kl1 < 0.99 * kl0, f"reverse KL {kl0:.6f} -> {kl1:.6f}"


def test_modality_audio_on_text_rows_fails_at_start_up(text_pair, tmp_path):
    with pytest.raises(ManifestError, match="audio"):
        Trainer(_cfg(text_pair, tmp_path / "bad", "sft", data={"modality": "audio", "prompt": "Transcribe the audio."}))


def test_modality_is_validated(text_pair, tmp_path):
    with pytest.raises(C.ConfigError, match="data.modality"):
        _cfg(text_pair, tmp_path / "bad2", "sft", data={"modality": "video"})


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_opd_loss_fused_with_the_lm_head_equals_the_logits_path(text_pair, tmp_path, divergence):
    """``opd.fused_head: on`` (the divergence computed chunk by chunk from the student's last hidden
    states and its LM head weight) against ``off`` (logits, then ``distill_loss``) on one
    experience of n=2 samples per prompt: the same loss and the same gradient of every parameter."""
    from core import methods as Mth
    opd = {"fused_head": "on", "divergence": divergence, "beta": 0.3, "temperature": 1.5, "chunk_size": 5}
    t = Trainer(_cfg(text_pair, tmp_path / f"fused_{divergence}", "opd", opd=opd))
    method, ctx = METHODS["opd"], t.ctx
    torch.manual_seed(0)
    exp = method.experience(ctx, text_pair.rows[:4], seed=0)
    model = ctx.forward_model.train()
    assert Mth.fused_head(ctx, exp.tensors)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss, metrics = method.loss(ctx, exp)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), metrics, grads

    fused = loss_and_grads()
    ctx.cfg.opd.fused_head = "off"
    assert not Mth.fused_head(ctx, exp.tensors)
    plain = loss_and_grads()
    assert math.isclose(fused[0], plain[0], rel_tol=1e-5) and plain[0] > 0
    assert fused[2].keys() == plain[2].keys() and "lm_head.weight" in plain[2]
    for n in plain[2]:
        torch.testing.assert_close(fused[2][n], plain[2][n], atol=1e-6, rtol=1e-4, msg=n)
    # auto: only from a large vocabulary on (this one has 300 entries)
    ctx.cfg.opd.fused_head = "auto"
    assert not Mth.fused_head(ctx, exp.tensors)
    big = Mth.FUSED_HEAD_MIN_VOCAB
    old = Mth.FUSED_HEAD_MIN_VOCAB
    try:
        Mth.FUSED_HEAD_MIN_VOCAB = 300
        assert Mth.fused_head(ctx, exp.tensors)
        assert not Mth.fused_head(ctx, dict(exp.tensors, base_adv=torch.zeros(len(exp))))  # a reward term
    finally:
        Mth.FUSED_HEAD_MIN_VOCAB = old
    assert big == 32768


def test_fused_head_config_is_checked(text_pair, tmp_path):
    with pytest.raises(C.ConfigError, match="opd.fused_head"):
        _cfg(text_pair, tmp_path / "f1", "opd", opd={"fused_head": "yes"})
    with pytest.raises(C.ConfigError, match="opd.fused_head"):
        _cfg(text_pair, tmp_path / "f2", "opd", opd={"fused_head": "on", "support": "teacher_topk", "top_k": 4})


def test_fused_head_refused_where_logits_are_scaled_after_the_head(text_pair):
    """A model whose config scales or softcaps its logits after the LM head (Gemma 2, Cohere,
    Granite) cannot have its head replaced by a loss on the hidden states."""
    from core.forward import completion_hidden, fusable_head
    model, _ = load_model_and_processor(text_pair.student)
    assert fusable_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0
    assert fusable_head(model) is None
    with pytest.raises(ValueError, match="scaled"):
        completion_hidden(model, None, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_rollout_temperature_must_be_positive(text_pair, tmp_path):
    with pytest.raises(C.ConfigError, match="rollout.temperature"):
        _cfg(text_pair, tmp_path / "t0", "grpo", rollout={"temperature": 0.0})


def test_resume_keeps_this_runs_optimizer_implementation(tmp_path):
    """A checkpoint written by torch's default AdamW, resumed with ``optim.fused``: the state comes
    from the checkpoint, the implementation from this run (and the other way round)."""
    from transformers import get_scheduler

    from core.backends import TorchEngine

    def engine(fused: bool):
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if fused else {}))
        return TorchEngine(model, opt, get_scheduler("constant", opt), grad_clip=1.0)

    for saved, resumed in ((False, True), (True, False)):
        a = engine(saved)
        a.backward(a.module(torch.ones(2, 4)).sum())
        a.step()
        a.save_state(tmp_path)
        b = engine(resumed)
        b.load_state(tmp_path)
        assert bool(b.optimizer.param_groups[0].get("fused")) is resumed
        state_a, state_b = a.optimizer.state_dict()["state"][0], b.optimizer.state_dict()["state"][0]
        assert torch.equal(state_b["exp_avg"], state_a["exp_avg"])


def test_length_grouped_data_order():
    """``data.length_group``: every row once per epoch, batches of similar length, a seeded order
    that a resumed run rebuilds; without it the plain permutation."""
    from core.trainer import DataOrder
    g = torch.Generator().manual_seed(0)
    n, k = 48, 4
    lengths = [(float(x), 0) for x in torch.randint(0, 1000, (n,), generator=g).tolist()]
    plain = DataOrder(n, seed=3)
    grouped = DataOrder(n, seed=3, lengths=lengths, group=3, batch=k)
    assert DataOrder(n, seed=3, lengths=lengths, group=0, batch=k)._perm == plain._perm

    def spread(order):  # mean length range inside a batch over one epoch
        idx = [order.next_global(k) for _ in range(n // k)]
        assert sorted(i for b in idx for i in b) == list(range(n))
        return sum(max(lengths[i][0] for i in b) - min(lengths[i][0] for i in b) for b in idx) / len(idx), idx

    s_plain, _ = spread(plain)
    s_grouped, batches = spread(grouped)
    assert s_grouped < 0.5 * s_plain, (s_grouped, s_plain)
    # inside a window (3 batches) the batches are not left longest first: their order is shuffled
    heads = [lengths[b[0]][0] for b in batches]
    windows = [heads[w: w + 3] for w in range(0, len(heads), 3)]
    assert any(win != sorted(win, reverse=True) for win in windows), windows
    again = DataOrder(n, seed=3, lengths=lengths, group=3, batch=k)
    assert [again.next_global(k) for _ in range(n // k)] == batches  # seeded
    resumed = DataOrder(n, seed=3, lengths=lengths, group=3, batch=k)
    resumed.load({"epoch": 0, "pos": 2 * k})
    assert resumed.next_global(k) == batches[2]
    assert any(DataOrder(n, seed=s, lengths=lengths, group=3, batch=k).next_global(k) != batches[0] for s in (4, 5, 6))


def test_length_group_through_the_trainer(text_pair, tmp_path):
    t = Trainer(_cfg(text_pair, tmp_path / "lg", "sft", data={"length_group": 2},
                     train={"batch_size": 2, "max_steps": 3}))
    s = t.train()
    assert s["steps"] == 3 and s["skipped_steps"] == 0
    with pytest.raises(C.ConfigError, match="data.length_group"):
        _cfg(text_pair, tmp_path / "lg2", "sft", data={"length_group": -1})


# ----------------------------------------------------------------------------- Qwen3 text family
@register_reward("test_text_length")
def _text_length(completions, **kwargs):
    """Varies between samples, so GRPO groups and ReST's filter have a signal."""
    return [min(1.0, len(c) / 20.0) for c in completions]


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    """A Qwen3ForCausalLM student / teacher pair (the 8B / 32B text-OPD layout at tiny size)."""
    root = tmp_path_factory.mktemp("qwen3")
    tok = train_tokenizer([f"{p} {t}" for p, t in PAIRS] * 4, vocab_size=300)
    build_tiny_causal_lm(tok, hidden=32, layers=2, heads=4, kv_heads=2, seed=0, out_dir=root / "student",
                         family="qwen3")
    build_tiny_causal_lm(tok, hidden=48, layers=2, heads=4, kv_heads=2, seed=1, out_dir=root / "teacher",
                         family="qwen3")
    manifest = root / "train.jsonl"
    rows = [{"key": f"s{i}", "task": "qa", "prompt": p, "text": t} for i, (p, t) in enumerate(PAIRS)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, student=root / "student", teacher=root / "teacher", manifest=manifest, rows=rows)


@pytest.mark.parametrize("method, over", [
    ("sft", {}), ("opd", {}), ("grpo", {"grpo": {"rewards": {"test_text_length": 1.0}}}),
    ("rest", {"rest": {"rewards": {"test_text_length": 1.0}, "keep_min_reward": 0.0, "rounds": 1,
                       "samples": 2, "steps_per_round": 2, "lrs": [3e-3]}}),
    ("sft", {"model": {"lora": {"r": 4, "lora_alpha": 8}}}),
])
def test_qwen3_text_family_trains_and_exports(qwen3_pair, tmp_path, method, over):
    """Two steps of every method (and LoRA) on Qwen3, then the export loads in plain transformers
    and decodes."""
    from transformers import AutoModelForCausalLM
    from core.bin.decode import decode
    cfg = _cfg(qwen3_pair, tmp_path / method, method, train={"batch_size": 4, "max_steps": 2, "resume": "never"},
               **over)
    res = train_run(cfg)
    final = tmp_path / method / "final"
    assert (final / "config.json").is_file(), res
    m = AutoModelForCausalLM.from_pretrained(final)
    assert type(m).__name__ == "Qwen3ForCausalLM"
    info = decode(str(final), str(qwen3_pair.manifest), str(tmp_path / "hyp.jsonl"), max_new_tokens=4, device="cpu")
    assert info["samples"] == len(PAIRS) and info["modality"] == "text"


def test_qwen3_served_and_distilled_remotely(qwen3_pair, tmp_path):
    """The Qwen3 teacher behind our server: prompt_logprobs equal a local forward, and a remote OPD
    step of the Qwen3 student trains."""
    from core.serve.app import ServerThread, create_app
    cfg = _cfg(qwen3_pair, tmp_path / "local", "opd", opd={"form": "distribution", "support": "teacher_topk",
                                                                 "top_k": 8})
    local = Trainer(cfg).train()
    with ServerThread(create_app(qwen3_pair.teacher, device="cpu")) as s:
        cfg = _cfg(qwen3_pair, tmp_path / "remote", "opd", teacher={"kind": "remote", "url": s.url},
                   opd={"form": "distribution", "support": "teacher_topk", "top_k": 8})
        remote = Trainer(cfg).train()
    assert remote["steps"] == local["steps"] == 3 and remote["skipped_steps"] == 0
    a, b = _losses(tmp_path / "local"), _losses(tmp_path / "remote")
    assert all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-5) for x, y in zip(a, b)), (a, b)
