"""LoRA (peft) for every method, 4-bit loading's refusal without a GPU, and ReST, on the tiny models.

LoRA: only the adapters train, checkpoints hold the adapters, the export merges them into a plain
model folder (same logits as the peft model), resume is exact, GRPO's KL reference is the base with
adapters disabled, OPD runs through the wrapper, and DeepSpeed ZeRO-2/3 export the same merge.
ReST: the filter by hand-worked cases, a 2-round run (kept manifests, summary, metrics, a final
model that moved), resume without redoing rounds, an empty round, the budget, config errors.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import config as C
from core.bin.train import main as train_main
from core.data.collate import AudioPromptCollator
from core.models import (build_tiny_causal_lm, is_peft_model, load_model_and_processor, lora_target_modules)
from core.rest import filter_samples
from core.rewards import register_reward
from core.forward import completion_logits
from core.trainer import AdapterDisabled, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"r": 4, "lora_alpha": 8}


@register_reward("test_has_e")
def _has_e(completions, **kwargs):
    return [float("e" in c) for c in completions]


@register_reward("test_zero")
def _zero(completions, **kwargs):
    return [0.0] * len(completions)


def train_in_process(config_path, **overrides):
    t = Trainer(C.load_config(config_path, overrides=[f"{k}={v}" for k, v in overrides.items()]))
    return t, t.train()


def final_weights(out_dir) -> dict:
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def prompt_inputs(proc, rows):
    return AudioPromptCollator(proc, "Transcribe the audio.").prompts(rows).inputs


# ----------------------------------------------------------------------------- default targets
def test_default_lora_targets_are_the_language_models_projections(tiny):
    import re

    model, _ = load_model_and_processor(tiny.student)
    rx = lora_target_modules(model)
    hit = [n for n, _ in model.named_modules() if re.fullmatch(rx, n)]
    leaves = {n.rsplit(".", 1)[-1] for n in hit}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".language_model." in n for n in hit) and not any("audio_tower" in n for n in hit)
    lm, _ = build_tiny_causal_lm(tiny.tokenizer, hidden=32, layers=2, heads=2)
    hit = [n for n, _ in lm.named_modules() if re.fullmatch(lora_target_modules(lm), n)]
    assert len(hit) == 2 * 7 and all(n.startswith("model.layers.") for n in hit)


# ----------------------------------------------------------------------------- SFT + export
def test_lora_sft_trains_adapters_only_and_exports_a_plain_merged_model(train_config, tiny):
    from transformers import Qwen2AudioForConditionalGeneration

    cfg = train_config("lora_sft", model={"path": str(tiny.student), "lora": LORA}, train={"max_steps": 3})
    t = Trainer(C.load_config(cfg))
    assert is_peft_model(t.model)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("audio_tower" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    summary = t.train()
    after = dict(t.model.named_parameters())
    for n, p in before.items():  # the base is frozen, every adapter moved
        assert torch.equal(p, after[n]) != (n in trainable), n
    # the checkpoint holds the adapters (and their optimizer state) only
    ck = torch.load(Path(t.cfg.output_dir) / "checkpoints" / "step_3" / "engine.pt", weights_only=False)
    assert set(ck["model"]) == trainable and ck["optimizer"]["state"]

    final = Path(summary["final_model"])
    assert not (final / "adapter_config.json").exists()
    exported, proc = load_model_and_processor(final)
    assert type(exported) is Qwen2AudioForConditionalGeneration and not is_peft_model(exported)
    w, init = final_weights(final.parent), load_file(str(tiny.student / "model.safetensors"))
    assert w.keys() == init.keys()
    changed = {k for k in w if not torch.equal(w[k], init[k])}
    assert changed and all("language_model." in k and k.rsplit(".", 2)[-2].endswith("proj") for k in changed)

    inputs = prompt_inputs(proc, tiny.rows[:2])
    peft_model = t.model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        got = exported.eval()(**inputs).logits
        want = merged(**inputs).logits
        live = peft_model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, live, atol=1e-5, rtol=1e-5)
    base, _ = load_model_and_processor(tiny.student)
    with torch.no_grad():
        assert not torch.allclose(got, base.eval()(**inputs).logits, atol=1e-4)


def test_lora_resume_matches_an_uninterrupted_run(train_config, tiny):
    sections = dict(model={"path": str(tiny.student), "lora": LORA},
                    train={"batch_size": 4, "max_steps": 4, "save_every": 2, "keep_last": 1, "resume": "auto"})
    full, part = train_config("full", **sections), train_config("part", **sections)
    _, s_full = train_in_process(full)
    _, s1 = train_in_process(part, **{"train.stop_after_steps": 2})
    assert s1["interrupted"] and s1["steps"] == 2
    t2, s2 = train_in_process(part)
    assert s2["steps"] == 4 and not s2["interrupted"]
    a, b = final_weights(Path(s_full["final_model"]).parent), final_weights(Path(s2["final_model"]).parent)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    rows = [json.loads(x) for x in (Path(t2.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (Path(C.load_config(full).output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


# ----------------------------------------------------------------------------- GRPO, OPD
def test_lora_grpo_uses_the_base_with_adapters_disabled_as_reference(train_config, tiny):
    cfg = train_config("lora_grpo", method="grpo", model={"path": str(tiny.student), "lora": LORA},
                       grpo={"rewards": {"test_has_e": 1.0}, "kl_beta": 0.1},
                       rollout={"n": 2, "max_new_tokens": 6}, train={"max_steps": 2})
    t = Trainer(C.load_config(cfg))
    assert isinstance(t.ref, AdapterDisabled) and t.ctx.ref_model is t.ref
    summary = t.train()
    assert summary["steps"] == 2
    rows = [json.loads(x) for x in (Path(t.cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all("train/kl_ref" in r for r in rows)
    # after training, the reference is still the untouched base model, and the policy is not
    base, proc = load_model_and_processor(tiny.student)
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(tiny.rows[:2])
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.ones_like(ids)
    t.model.train()
    with torch.no_grad():
        ref = completion_logits(t.ref, batch, ids, mask)
        want = completion_logits(base.eval(), batch, ids, mask)
        pol = completion_logits(t.model, batch, ids, mask)
    assert t.model.training  # the reference forward restores the mode
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(pol, want, atol=1e-4)


def test_lora_opd_runs_through_the_peft_wrapper(train_config, tiny):
    cfg = train_config("lora_opd", method="opd", model={"path": str(tiny.student), "lora": LORA},
                       train={"max_steps": 1})
    t, summary = train_in_process(cfg)
    assert is_peft_model(t.model) and summary["steps"] == 1
    assert (Path(summary["final_model"]) / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- DeepSpeed
def _ds_json(folder: Path, stage: int) -> Path:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    path = folder / f"ds_zero{stage}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "train_batch_size": "auto", "gradient_clipping": "auto",
                                "steps_per_print": 1000000, "zero_optimization": zero}))
    return path


@pytest.fixture(scope="module")
def lora_torch_run(tmp_path_factory, write_config, run_train_cli, tiny):
    folder = tmp_path_factory.mktemp("lora_ds")
    cfg = write_config(folder, "lora", model={"path": str(tiny.student), "lora": LORA},
                       data={"max_target_tokens": 3}, train={"max_steps": 3, "save_every": 2})
    run_train_cli(cfg, f"output_dir={folder / 'torch'}")
    return folder, cfg


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_lora_exports_the_same_merged_model(lora_torch_run, run_train_cli, stage):
    folder, cfg = lora_torch_run
    out = folder / f"ds{stage}"
    run_train_cli(cfg, f"output_dir={out}", "backend.name=deepspeed",
                  f"backend.ds_config={_ds_json(folder, stage)}")
    a, b = final_weights(out), final_weights(folder / "torch")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    # the DeepSpeed checkpoint leaves the frozen base out
    states = [p for p in (out / "checkpoints").rglob("*model_states.pt")]
    assert states
    sd = torch.load(states[0], weights_only=False)["module"]
    assert sd and all("lora_" in k for k in sd)
    # and a resume from it continues
    p = run_train_cli(cfg, f"output_dir={out}", "backend.name=deepspeed", f"backend.ds_config={_ds_json(folder, stage)}",
                      "train.max_steps=4")
    assert "resumed from" in p.stderr


# ----------------------------------------------------------------------------- 4-bit
def test_load_in_4bit_without_a_gpu_is_refused_naming_the_key(train_config, tiny, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    with pytest.raises(C.ConfigError, match=r"model\.load_in_4bit.*CUDA GPU and bitsandbytes"):
        load_model_and_processor(tiny.student, load_in_4bit=True)
    cfg = train_config("q4", model={"path": str(tiny.student), "lora": LORA, "load_in_4bit": True})
    assert train_main(["--config", str(cfg)]) == 2
    assert "model.load_in_4bit" in capsys.readouterr().err
    assert not (Path(C.load_config(cfg).output_dir) / "final").exists()


def test_load_in_4bit_config_errors(tiny):
    base = {"model": {"path": str(tiny.student), "load_in_4bit": True}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}}
    with pytest.raises(C.ConfigError, match=r"'model\.lora'.*QLoRA"):
        C.load_config(overrides=base)
    with pytest.raises(C.ConfigError, match=r"'model\.load_in_4bit'.*backend torch"):
        C.load_config(overrides=C.deep_merge(base, {"model": {"lora": LORA},
                                                    "backend": {"name": "deepspeed", "ds_config": "x.json"}}))
    with pytest.raises(C.ConfigError, match=r"model\.bnb_4bit_quant_type"):
        C.load_config(overrides=C.deep_merge(base, {"model": {"lora": LORA, "bnb_4bit_quant_type": "int3"}}))


# ----------------------------------------------------------------------------- ReST filter
def S(key, completion):
    return {"key": key, "completion": completion}


def test_filter_samples_hand_worked():
    samples = [S("a", "x"), S("a", "x "), S("a", "y"), S("a", "z"), S("b", "x"), S("b", ""), S("b", "w")]
    rewards = [1.0, 1.0, 0.5, 2.0, 1.0, 5.0, 0.99]
    # threshold 1: a/x (its duplicate "x " dropped), a/z, b/x; a/y and b/w too low, b/"" empty
    kept = filter_samples(samples, rewards, 1.0)
    assert [(s["key"], s["completion"], s["reward"]) for s in kept] == [("a", "x", 1.0), ("a", "z", 2.0), ("b", "x", 1.0)]
    # at most one per prompt: the best of a is z
    kept = filter_samples(samples, rewards, 1.0, max_per_prompt=1)
    assert [(s["key"], s["completion"]) for s in kept] == [("a", "z"), ("b", "x")]
    # threshold 0.5, two per prompt: a has x(1), y(.5), z(2) -> z, x (kept in sample order); b has x(1), w(.99)
    kept = filter_samples(samples, rewards, 0.5, max_per_prompt=2)
    assert [(s["key"], s["completion"]) for s in kept] == [("a", "x"), ("a", "z"), ("b", "x"), ("b", "w")]
    # a duplicate keeps its best-scored copy; ties keep the first
    kept = filter_samples([S("a", "x"), S("a", "x"), S("a", "x")], [1.0, 3.0, 3.0], 1.0)
    assert len(kept) == 1 and kept[0]["reward"] == 3.0
    assert filter_samples(samples, rewards, 10.0) == []
    with pytest.raises(ValueError, match="7 samples but 2 rewards"):
        filter_samples(samples, [1.0, 1.0])


# ----------------------------------------------------------------------------- ReST runs
def rest_config(train_config, name, **rest):
    r = {"rounds": 2, "samples": 2, "rewards": {"test_has_e": 1.0}, "lrs": [1e-2, 5e-3], "steps_per_round": 2}
    r.update(rest)
    return train_config(name, method="rest", rollout={"max_new_tokens": 6}, rest=r, train={"batch_size": 4})


def test_rest_two_rounds(train_config, tiny, monkeypatch):
    cfg = rest_config(train_config, "rest")
    assert train_main(["--config", str(cfg)]) == 0
    out = Path(C.load_config(cfg).output_dir)
    summary = json.loads((out / "rest_summary.json").read_text())
    assert summary["rounds_done"] == 2 and summary["empty_rounds"] == 0 and not summary["stopped_by_budget"]
    for i, st in enumerate(summary["rounds"]):
        assert st["samples"] == 2 * len(tiny.rows) and 0 < st["kept"] <= st["samples"]
        assert st["kept_share"] == pytest.approx(st["kept"] / st["samples"]) and st["seconds"] > 0
        assert st["lr"] == [1e-2, 5e-3][i] and st["sft_steps"] == 2 and st["trained"]
        kept = [json.loads(x) for x in (out / f"round_{i}" / "kept.jsonl").read_text().splitlines()]
        assert len(kept) == st["kept"] and len({r["key"] for r in kept}) == len(kept)
        assert all("e" in r["completion"] and r["reward"] >= 1.0 for r in kept)
        pairs = [(r["prompt_key"], r["completion"]) for r in kept]
        assert len(set(pairs)) == len(pairs)
        sampled = [json.loads(x) for x in (out / f"round_{i}" / "samples.jsonl").read_text().splitlines()]
        assert st["reward"] == pytest.approx(sum(r["reward"] for r in sampled) / len(sampled))
        sft = C.load_config(out / f"round_{i}" / "config.yaml")
        assert sft.method == "sft" and sft.optim.lr == st["lr"] and sft.data.target_field == "completion"
    assert summary["rounds"][1]["model"] == summary["rounds"][0]["final_model"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("kept_share" in m for m in metrics)
    w, init = final_weights(out), load_file(str(tiny.student / "model.safetensors"))
    assert any(not torch.equal(w[k], init[k]) for k in w)
    assert all(torch.equal(w[k], v) for k, v in final_weights(out / "round_1").items())

    # resume: finished rounds are not redone
    import core.rest

    def no_grow(*a, **k):
        raise AssertionError("a finished round was sampled again")

    monkeypatch.setattr(core.rest, "grow", no_grow)
    again = core.rest.run(C.load_config(cfg))
    assert again["rounds_done"] == 2 and again["rounds"] == summary["rounds"]


def test_rest_round_that_keeps_nothing_skips_its_sft(train_config, tiny):
    from core.rest import run

    cfg = rest_config(train_config, "empty", rounds=1, lrs=[1e-2], rewards={"test_zero": 1.0})
    summary = run(C.load_config(cfg))
    out = Path(C.load_config(cfg).output_dir)
    assert summary["empty_rounds"] == 1 and summary["rounds"][0]["kept"] == 0
    assert not (out / "round_0" / "final").exists() and (out / "round_0" / "kept.jsonl").read_text() == ""
    w, init = final_weights(out), load_file(str(tiny.student / "model.safetensors"))
    assert all(torch.equal(w[k], init[k]) for k in w)


def test_rest_budget_stops_new_work(train_config):
    from core.rest import run

    cfg = rest_config(train_config, "budget")
    summary = run(C.load_config(cfg, overrides=["train.max_seconds=0.000001"]))
    assert summary["stopped_by_budget"] and summary["rounds_done"] == 0
    assert not (Path(C.load_config(cfg).output_dir) / "round_0" / "kept.jsonl").exists()


def test_rest_config_errors(tiny):
    base = {"method": "rest", "model": {"path": str(tiny.student)}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."},
            "rest": {"rounds": 2, "rewards": {"wer": 1.0}, "lrs": [1e-3]}}
    with pytest.raises(C.ConfigError, match=r"'rest\.lrs'.*rest\.rounds=2"):
        C.load_config(overrides=base)
    with pytest.raises(C.ConfigError, match=r"'rest\.rewards'"):
        C.load_config(overrides={**base, "rest": {"rounds": 2, "lrs": [1e-3, 1e-4]}})
    cfg = C.load_config(overrides=C.deep_merge(base, {"rest": {"lrs": ["1e-3", 5e-4]}}))  # YAML's 1e-3 is a string
    assert cfg.rest.lrs == [1e-3, 5e-4]
    with pytest.raises(Exception, match="core.rest"):
        Trainer(cfg)
