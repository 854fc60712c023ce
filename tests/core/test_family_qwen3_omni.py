"""Qwen3-Omni-MoE (``qwen3_omni_moe``, Qwen3-Omni-30B-A3B) as a tiny folder in its released layout,
through every path: the thinker (a MoE text model with four tiny experts, audio encoder, vision
encoder with a deepstack merger) on audio and audio + video prompts (real wav / mp4 clips made with
ffmpeg).

Checks:
- the builders: a thinker folder (``qwen3_omni_moe_thinker``) and a full folder (``qwen3_omni_moe``:
  ``thinker_config`` / ``talker_config`` / ``code2wav_config``, weights prefixed ``thinker.`` /
  ``talker.`` / ``code2wav.``) both load as the same thinker with its ``Qwen3OmniMoeProcessor``;
  ``output_router_logits`` is turned off at load; LoRA's default targets are the text model's
  attention projections only (never an encoder, the fused experts or the router), and peft's
  ``target_parameters`` adapts the experts and merges into a plain folder;
- the AV collator's inputs (16 video tokens per 8 frames of 64 x 64, one ``video_second_per_grid``
  per clip, audio tokens as the encoder counts them) and the refusal of a frame cap below one
  32 x 32 merged patch;
- the training forward: sharing the encoders (``encoders_once``) or the whole prompt (KV cache) gives
  the plain forward's logits and every gradient, the encoders running once per distinct prompt; the
  sliced LM head gives a plain ``model(...)``'s logits;
- MoE: an expert no token is routed to still gets a (zero) gradient tensor, so gradient all-reduce
  over ranks sees the same tensors; two forward/backward passes are bitwise equal; one DeepSpeed
  ZeRO-3 process (the experts partitioned, the vision encoder without a gradient on audio prompts)
  gives the PyTorch run's losses and gradient norms;
- sampling: our KV-cached loop samples exactly ``generate``'s tokens and log-probs (audio and AV,
  sampled and greedy, into a static cache), the same twice under one seed, and its log-probs equal
  the training forward's;
- ``core.bin.decode`` on audio and video manifests; two steps of sft, opd, grpo, rest and LoRA
  through the trainer, each export loading in plain transformers and in our loader;
- a full folder trains and exports whole (talker and code2wav bitwise as released, thinker
  trained, ``Qwen3OmniMoeForConditionalGeneration.from_pretrained`` loads it), or the thinker
  alone with ``model.export: thinker``; ``export_full_omni`` writes shards and refuses another thinker;
- the teacher behind our server answers a ``prompt_logprobs`` request equal to a local forward, and
  a remote-teacher OPD run's losses equal the local run's.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import config as C
from core.data.collate import AudioPromptCollator, AVPromptCollator
from core.forward import completion_logits, shared_encoders, token_logp
from core.models import (apply_lora, build_tiny_full_qwen3_omni, build_tiny_qwen3_omni_thinker,
                         load_model_and_processor, lora_target_modules, special_token_ids, train_tokenizer)
from core.rewards import register_reward
from core.sampling import generate_completions
from core.trainer import Trainer
from core.trainer import run as train_run

from conftest import check_served_teacher, run_losses, safetensors_of

pytestmark = pytest.mark.usefixtures("one_thread")

THINKER = "Qwen3OmniMoeThinkerForConditionalGeneration"
TEXTS = ["a red square", "a blue circle", "two beeps", "one low tone", "what do you see", "what do you hear",
         "hello world", "the cat sat on the mat"]
AV_PROMPT = "Question: {question}"
AUDIO_PROMPT = "Transcribe the audio."


@register_reward("test_qwen3_omni_length")
def _length_reward(completions, **kwargs):
    """Varies between samples, so GRPO groups and ReST's filter have a signal."""
    return [min(1.0, len(c) / 20.0) for c in completions]


def _run_ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, capture_output=True)


def _mp4(path: Path, seconds: float, freq: int) -> Path:
    """A 64x64, 8 fps test pattern of ``seconds`` with a sine track."""
    _run_ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x64:rate=8:duration={seconds}", "-f", "lavfi", "-i",
                f"sine=frequency={freq}:sample_rate=16000:duration={seconds}", "-c:a", "aac", "-shortest",
                "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    return path


def _wav(path: Path, seconds: float, freq: int) -> Path:
    _run_ffmpeg("-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=16000:duration={seconds}", str(path))
    return path


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is needed to make the test clips (bash run.sh setup installs it)")
    root = tmp_path_factory.mktemp("qwen3_omni")
    videos = [_mp4(root / "short.mp4", 2, 440), _mp4(root / "long.mp4", 3, 880)]
    wavs = [_wav(root / f"a{i}.wav", s, f) for i, (s, f) in enumerate([(1.2, 300), (2.3, 500), (1.7, 700),
                                                                        (0.9, 900)])]
    tok = train_tokenizer(TEXTS, 300, omni=True)
    small = dict(audio_layers=1, vision_depth=1, experts=4, experts_per_tok=2, moe_intermediate=16)
    build_tiny_qwen3_omni_thinker(tok, hidden=32, heads=2, kv_heads=1, seed=0, out_dir=root / "student", **small)
    build_tiny_qwen3_omni_thinker(tok, hidden=48, heads=3, kv_heads=1, seed=1, out_dir=root / "teacher", **small)
    full = build_tiny_full_qwen3_omni(root / "student", root / "Qwen3-Omni-tiny")
    av_rows = [{"key": f"v{i}", "video": str(videos[i % 2]), "task": "av_qa", "question": q, "text": t}
               for i, (q, t) in enumerate([("what do you see", "a red square"), ("what do you hear", "two beeps"),
                                           ("what do you see", "a blue circle"), ("what do you hear", "one low tone")])]
    audio_rows = [{"key": f"a{i}", "audio": str(w), "task": "asr", "text": t}
                  for i, (w, t) in enumerate(zip(wavs, ["hello world", "two beeps", "one low tone", "a red square"]))]
    av_manifest, audio_manifest = root / "av.jsonl", root / "audio.jsonl"
    av_manifest.write_text("".join(json.dumps(r) + "\n" for r in av_rows))
    audio_manifest.write_text("".join(json.dumps(r) + "\n" for r in audio_rows))
    model, proc = load_model_and_processor(root / "student")
    return SimpleNamespace(root=root, student=root / "student", teacher=root / "teacher", full=full, tok=tok,
                           model=model.eval(), proc=proc, av_rows=av_rows, audio_rows=audio_rows,
                           av_manifest=av_manifest, audio_manifest=audio_manifest)


@pytest.fixture(scope="module")
def av_batch(q3):
    return AVPromptCollator(q3.proc, AV_PROMPT).prompts(q3.av_rows[:2])


@pytest.fixture(scope="module")
def audio_batch(q3):
    return AudioPromptCollator(q3.proc, AUDIO_PROMPT).prompts(q3.audio_rows[:2])


def _cfg(q3, out: Path, method: str, *, av: bool = True, **over) -> C.TrainConfig:
    base = {"method": method, "output_dir": str(out), "model": {"path": str(q3.student)},
            "data": {"train": str(q3.av_manifest if av else q3.audio_manifest),
                     "prompt": AV_PROMPT if av else AUDIO_PROMPT, "modality": "av" if av else "audio",
                     "max_target_tokens": 16},
            "rollout": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            "grpo": {"rewards": {"test_qwen3_omni_length": 1.0}},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 2, "max_steps": 2, "resume": "never"},
            "backend": {"dist_backend": "gloo"}}
    if method == "opd":
        base["teacher"] = {"path": str(q3.teacher)}
        base["opd"] = {"form": "distribution", "divergence": "reverse_kl", "support": "teacher_topk", "top_k": 8}
    return C.load_config(overrides=C.deep_merge(base, over))


def _completions(q3, rows: int, T: int = 5, seed: int = 0):
    """Random completions of ordinary tokens; one ends early (pad after its mask)."""
    g = torch.Generator().manual_seed(seed)
    specials = set(special_token_ids(q3.proc)) | {q3.tok.eos_token_id}
    normal = torch.tensor([i for i in range(len(q3.tok)) if i not in specials])
    ids = normal[torch.randint(len(normal), (rows, T), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, T - 2:] = 0
    ids[1, T - 2:] = q3.tok.pad_token_id
    return ids, mask


# ----------------------------------------------------------------------------- builders, loading, LoRA
def test_builders_load_as_the_thinker_from_either_folder(q3, tmp_path):
    from transformers import AutoConfig
    assert json.loads((q3.student / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"
    cfg = json.loads((q3.full / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_omni_moe"
    assert {"thinker_config", "talker_config", "code2wav_config"} <= cfg.keys()
    assert {"text_config", "code_predictor_config"} <= cfg["talker_config"].keys()
    assert {"text_config", "audio_config", "vision_config"} <= cfg["thinker_config"].keys()
    assert type(AutoConfig.from_pretrained(q3.full)).__name__ == "Qwen3OmniMoeConfig"
    assert {k.split(".")[0] for k in safetensors_of(q3.full)} == {"thinker", "talker", "code2wav"}
    full, proc = load_model_and_processor(q3.full)
    assert type(full).__name__ == type(q3.model).__name__ == THINKER
    assert type(proc).__name__ == type(q3.proc).__name__ == "Qwen3OmniMoeProcessor"
    a, b = q3.model.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = q3.model.config.get_text_config()
    assert text.num_experts == 4 and text.num_experts_per_tok == 2 and text.output_router_logits is False
    assert q3.model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert q3.model.lm_head.weight is not q3.model.get_input_embeddings().weight
    assert q3.model.generation_config.eos_token_id == q3.tok.eos_token_id
    assert q3.model.config.vision_start_token_id == q3.tok.vision_bos_token_id
    # a checkpoint asking for the router's load-balancing loss is loaded without it
    shutil.copytree(q3.student, tmp_path / "aux")
    c = json.loads((tmp_path / "aux" / "config.json").read_text())
    c["text_config"]["output_router_logits"] = True
    (tmp_path / "aux" / "config.json").write_text(json.dumps(c))
    assert load_model_and_processor(tmp_path / "aux")[0].config.get_text_config().output_router_logits is False


def test_lora_targets_attention_only_and_experts_on_request(q3, av_batch, tmp_path):
    import re

    from core.models import adapter_state_dict, save_merged_lora
    rx = lora_target_modules(q3.model)
    hit = [n for n, _ in q3.model.named_modules() if re.fullmatch(rx, n)]
    assert {n.rsplit(".", 1)[-1] for n in hit} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(n.startswith("model.language_model.layers.") for n in hit)
    pm = apply_lora(copy.deepcopy(q3.model), {"r": 2, "lora_alpha": 4})
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and ".self_attn." in n for n in trainable)
    assert not any(k in n for n in trainable for k in ("audio_tower", "visual", "experts", "mlp.gate"))
    # the experts on request (peft's target_parameters): trained, then merged into a plain folder
    pm = apply_lora(copy.deepcopy(q3.model), {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                                              "target_parameters": ["mlp.experts.gate_up_proj"]})
    assert any(".mlp.experts." in n for n, p in pm.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_merged_lora(adapter_state_dict(pm), pm.peft_config["default"],
                     lambda: load_model_and_processor(q3.student)[0], q3.proc, tmp_path / "merged")
    merged, _ = load_model_and_processor(tmp_path / "merged")
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, q3.model.state_dict()[k])}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in changed)
    assert not any(k.startswith(("model.audio_tower", "model.visual")) or k.endswith("mlp.gate.weight")
                   for k in changed)
    ids, mask = _completions(q3, 2)
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(completion_logits(merged, av_batch, ids, mask),
                                   completion_logits(pm, av_batch, ids, mask), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- collator, training forward
def test_av_collator_inputs(q3, av_batch, audio_batch):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
    inp = av_batch.inputs
    assert "num_audio_tokens" not in inp
    assert inp["video_grid_thw"].tolist() == [[4, 4, 4], [4, 4, 4]]  # 8 frames of 64x64, 16-pixel patches
    assert ((inp["input_ids"] == q3.tok.video_token_id).sum(1) == 16).all()  # 2 x 2 merge
    torch.testing.assert_close(inp["video_second_per_grid"], torch.tensor([2 / 4.0, 2 / (8 / 3)]))
    for b in (av_batch, audio_batch):
        frames = b.inputs["feature_attention_mask"].sum(1)
        want = _get_feat_extract_output_lengths(frames, 50)
        assert torch.equal((b.inputs["input_ids"] == q3.tok.audio_token_id).sum(1), want)
    text = av_batch.texts[0]
    assert text.index("<|vision_bos|><|VIDEO|><|vision_eos|>") < text.index("<|audio_bos|><|AUDIO|><|audio_eos|>")
    with pytest.raises(ValueError, match=r"video_max_pixels 900 .*32x32"):
        AVPromptCollator(q3.proc, AV_PROMPT, video_max_pixels=900)


def _forward_backward(model, batch, ids, mask, share, w):
    model.zero_grad(set_to_none=True)
    logits = completion_logits(model, batch, ids, mask, share=share)
    (token_logp(logits, ids) * mask * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def test_shared_encoders_and_prompts_equal_the_plain_forward(q3, av_batch):
    """Rows that copy a prompt: the encoders once per distinct prompt (``encoders``), or the whole
    prompt once (``prompts``), give the plain forward's logits and every gradient; the plain
    forward's sliced LM head gives a plain ``model(...)``'s logits."""
    model = copy.deepcopy(q3.model).train()
    rep = av_batch.repeat(3)
    ids, mask = _completions(q3, len(rep))
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    assert [type(e).__name__ for e in shared_encoders(model)] == ["Qwen3OmniMoeAudioEncoder",
                                                                  "Qwen3OmniMoeVisionEncoder"]
    items: dict[str, list[int]] = {}

    def count(mod, args, kwargs, out):
        a = inspect.signature(mod.forward).bind(*args, **kwargs).arguments
        n = a["feature_lens"] if "feature_lens" in a else a["grid_thw"]
        items.setdefault(type(mod).__name__, []).append(int(n.shape[0]))

    handles = [e.register_forward_hook(count, with_kwargs=True) for e in shared_encoders(model)]
    try:
        res = {}
        for share in ("none", "encoders", "prompts"):
            items.clear()
            res[share] = _forward_backward(model, rep, ids, mask, share, w)
            want = 6 if share == "none" else 2
            assert items == {"Qwen3OmniMoeAudioEncoder": [want], "Qwen3OmniMoeVisionEncoder": [want]}, share
    finally:
        for h in handles:
            h.remove()
    plain, g_plain = res["none"]
    assert len(g_plain) == sum(1 for p in model.parameters() if p.requires_grad)  # every weight, experts included
    for share in ("encoders", "prompts"):
        logits, grads = res[share]
        torch.testing.assert_close(logits[mask.bool()], plain[mask.bool()], atol=1e-5, rtol=0)
        assert grads.keys() == g_plain.keys()
        for n, g in g_plain.items():
            torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=n)
    # the LM head on the completion positions only = the head over every position of a plain forward
    with torch.no_grad():
        inp = rep.inputs
        full = model(input_ids=torch.cat([inp["input_ids"], ids], 1),
                     attention_mask=torch.cat([inp["attention_mask"], mask], 1),
                     **{k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}).logits
    P = inp["input_ids"].shape[1]
    torch.testing.assert_close(plain[mask.bool()], full[:, P - 1: P - 1 + ids.shape[1]][mask.bool()].float(),
                               atol=1e-5, rtol=0)


def test_moe_grads_exist_for_unrouted_experts_and_are_deterministic(q3, audio_batch):
    """An expert that no token is routed to still gets a gradient tensor (zeros), so every rank
    all-reduces the same tensors; a forward/backward is bitwise the same twice."""
    model = copy.deepcopy(q3.model).train()

    def never_expert_3(router, args, out):  # the router's own top-k, expert 3 left out
        logits = out[0].masked_fill(torch.arange(out[0].shape[-1]) == 3, float("-inf"))
        top, idx = torch.topk(torch.softmax(logits, -1, dtype=torch.float), router.top_k, dim=-1)
        return out[0], (top / top.sum(-1, keepdim=True)).to(out[1].dtype), idx

    handles = [layer.mlp.gate.register_forward_hook(never_expert_3) for layer in model.model.language_model.layers]
    ids, mask = _completions(q3, len(audio_batch))
    w = torch.ones(ids.shape)
    try:
        _, g1 = _forward_backward(model, audio_batch, ids, mask, "none", w)
        _, g2 = _forward_backward(model, audio_batch, ids, mask, "none", w)
    finally:
        for h in handles:
            h.remove()
    for i in range(len(model.model.language_model.layers)):
        for kind in ("gate_up_proj", "down_proj"):
            g = g1[f"model.language_model.layers.{i}.mlp.experts.{kind}"]
            assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[:3]) > 0
        assert f"model.language_model.layers.{i}.mlp.gate.weight" in g1
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("media, kw, eos_bias", [("av", {}, 3.0), ("av", {"do_sample": False}, 0.0),
                                                  ("audio", {"top_k": 20, "top_p": 0.95}, 1.0)],
                         ids=["av-sampled", "av-greedy", "audio-topk-topp"])
def test_our_loop_samples_what_generate_samples(q3, av_batch, audio_batch, media, kw, eos_bias, monkeypatch):
    """Our KV-cached loop (3-D rotary positions: the prompt forward's offsets, then text
    positions on all three axes) with ``generate``'s own draw samples ``generate``'s tokens, into
    a static cache; the same twice under a seed; its log-probs equal the training forward's."""
    import core.sampling as R
    batch = av_batch if media == "av" else audio_batch
    assert R.own_loop_ok(q3.model, batch)
    static = []
    real_static = R._static_cache
    monkeypatch.setattr(R, "_static_cache", lambda *a, **k: static.append(real_static(*a, **k)) or static[-1])
    monkeypatch.setattr(R, "draw", lambda probs: torch.multinomial(probs, 1).squeeze(1))
    model = copy.deepcopy(q3.model)
    if eos_bias:  # EOS made likely, so completions end at different lengths
        bias = torch.zeros(model.lm_head.out_features)
        bias[q3.tok.eos_token_id] = eos_bias
        model.lm_head.bias = torch.nn.Parameter(bias)
    args = dict(n=3, max_new_tokens=8, seed=11, suppress_ids=special_token_ids(q3.proc),
                eos_ids=[q3.tok.eos_token_id], **kw)
    rep, ours = generate_completions(model, batch, q3.tok, **args)
    _, again = generate_completions(model, batch, q3.tok, **args)
    _, hf = generate_completions(model, batch, q3.tok, engine="hf", **args)
    assert len(static) == 2 and all(s is not None for s in static), "the thinker should decode into a static cache"
    assert torch.equal(ours.ids, hf.ids) and torch.equal(ours.mask, hf.mask) and ours.ids.shape[1] > 1
    assert torch.equal(ours.ids, again.ids) and torch.equal(ours.logp, again.logp)
    torch.testing.assert_close(ours.logp, hf.logp, atol=1e-5, rtol=0)
    with torch.no_grad():
        lp = token_logp(completion_logits(model, rep, ours.ids, ours.mask, share="none"), ours.ids) * ours.mask
    torch.testing.assert_close(ours.logp, lp, atol=1e-5, rtol=0)
    if kw.get("do_sample", True):
        assert len(set(ours.mask.sum(1).tolist())) > 1, "completions should end at different lengths"


# ----------------------------------------------------------------------------- decode, every method
def test_decode_audio_and_video_manifests(q3, tmp_path):
    from core.bin.decode import decode
    info = decode(str(q3.full), str(q3.audio_manifest), str(tmp_path / "a.jsonl"), prompt=AUDIO_PROMPT,
                  max_new_tokens=4, device="cpu")
    assert info["samples"] == len(q3.audio_rows) and info["modality"] == "audio"
    info = decode(str(q3.student), str(q3.av_manifest), str(tmp_path / "v.jsonl"), prompt=AV_PROMPT,
                  max_new_tokens=4, device="cpu", batch_size=3)
    assert info["samples"] == len(q3.av_rows) and info["modality"] == "av"
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == len(q3.av_rows)


@pytest.mark.parametrize("method, av, over", [
    ("sft", True, {}), ("opd", True, {}), ("grpo", True, {}),
    ("rest", False, {"rest": {"rewards": {"test_qwen3_omni_length": 1.0}, "keep_min_reward": 0.0, "rounds": 1,
                              "samples": 2, "steps_per_round": 2, "lrs": [3e-3]}}),
    ("lora", True, {"model": {"lora": {"r": 4, "lora_alpha": 8}}}),
], ids=["sft", "opd", "grpo", "rest", "lora"])
def test_every_method_trains_and_exports(q3, tmp_path, method, av, over):
    """Two steps (ReST: one round of two) on the thinker folder; the export loads in plain
    transformers and in our loader. LoRA leaves the encoders, experts and routers as they were."""
    import transformers
    res = train_run(_cfg(q3, tmp_path / method, "sft" if method == "lora" else method, av=av, **over))
    final = Path(res["final_model"])
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    losses = run_losses(tmp_path / method)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    plain = getattr(transformers, THINKER).from_pretrained(str(final))
    again, _ = load_model_and_processor(final)
    assert type(again).__name__ == THINKER
    before, after = q3.model.state_dict(), plain.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".language_model.layers." in k for k in changed)
    if method == "lora":
        assert changed and all(".self_attn." in k and k.endswith("_proj.weight") for k in changed)


def test_deepspeed_zero3_matches_the_torch_run(q3, tmp_path, run_train_cli):
    """One DeepSpeed ZeRO-3 process (CPU, gloo; every tensor partitioned, the fused experts
    included) on audio prompts, where the vision encoder gets no gradient at all: the losses and
    gradient norms of the plain PyTorch run."""
    pytest.importorskip("deepspeed")
    ds = tmp_path / "ds_zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 1000000,
                              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    cfg = _cfg(q3, tmp_path / "torch", "sft", av=False)
    Trainer(cfg).train()
    path = tmp_path / "ds.yaml"
    C.dump_config(cfg, path)
    run_train_cli(path, f"output_dir={tmp_path / 'ds'}", "backend.name=deepspeed", f"backend.ds_config={ds}",
                  threads=torch.get_num_threads())
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("torch", "ds")]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4) and math.isclose(a["grad_norm"], b["grad_norm"],
                                                                                  rel_tol=1e-4), (a, b)
    assert json.loads((tmp_path / "ds" / "final" / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"


# ----------------------------------------------------------------------------- full folders
def test_a_full_folder_trains_and_exports_whole(q3, tmp_path):
    """From the released layout (thinker + talker + code2wav): ``final/`` is that folder with the
    trained thinker put back (talker and code2wav bitwise the source's; plain transformers loads
    the whole model), or, with ``model.export: thinker``, the thinker alone."""
    from transformers import Qwen3OmniMoeForConditionalGeneration
    src = safetensors_of(q3.full)
    # no raw memory in the built folder (NaN there made torch.equal fail by chance)
    assert all(torch.isfinite(v.float()).all() for v in src.values())
    tr = Trainer(_cfg(q3, tmp_path / "full", "sft", model={"path": str(q3.full)}))
    final = Path(tr.train()["final_model"])
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_omni_moe"
    out = safetensors_of(final)
    assert out.keys() == src.keys()
    assert all(torch.equal(out[k], src[k]) for k in src if not k.startswith("thinker."))
    changed = [k for k in src if k.startswith("thinker.") and not torch.equal(out[k], src[k])]
    assert any(".mlp.experts." in k for k in changed) and any(".self_attn." in k for k in changed)
    whole = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(final))
    assert whole.has_talker and type(whole.code2wav).__name__ == "Qwen3OmniMoeCode2Wav"
    trained = {n: p.detach() for n, p in tr.model.named_parameters()}
    assert torch.equal(whole.thinker.lm_head.weight, trained["lm_head.weight"])
    again, _ = load_model_and_processor(final)  # the next stage reads it as its thinker
    assert type(again).__name__ == THINKER and torch.equal(again.lm_head.weight, trained["lm_head.weight"])
    cfg = _cfg(q3, tmp_path / "thinker_only", "sft", av=False, model={"path": str(q3.full), "export": "thinker"},
               train={"max_steps": 1})
    final = Path(Trainer(cfg).train()["final_model"])
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen3_omni_moe_thinker"
    assert not any(k.startswith(("talker.", "code2wav.")) for k in safetensors_of(final))


def test_export_full_omni_in_shards_and_refusing_another_thinker(q3, tmp_path):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from core.models import export_full_omni
    counts = export_full_omni(q3.full, q3.student, tmp_path / "out", shard_bytes=200_000)
    assert counts["shards"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    src, out = safetensors_of(q3.full), safetensors_of(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not match|has shape"):
        export_full_omni(q3.full, q3.teacher, tmp_path / "other")  # another width
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- the teacher server
def test_served_prompt_logprobs_and_remote_opd(q3, tmp_path):
    """The teacher behind our server: one ``prompt_logprobs`` request equals a plain forward of the
    prompt the chat template renders; a remote OPD run's losses equal the local run's."""
    def opd(out, teacher):
        return Trainer(_cfg(q3, out, "opd", av=False, **({"teacher": teacher} if teacher else {}))).train()
    ids, _ = check_served_teacher(q3.teacher, q3.audio_rows[1]["audio"], AUDIO_PROMPT, opd, tmp_path)
    assert q3.tok.audio_token_id in ids


def test_parameters_left_as_raw_memory_are_drawn_again():
    """``core.models._fill_uninitialised``: a parameter holding NaN / Inf (raw memory a constructor
    left) is redrawn from the seed; finite ones are kept."""
    from core.models import _fill_uninitialised
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    bias, n = m.bias.clone(), _fill_uninitialised(m, 0)
    assert n == 1 and torch.isfinite(m.weight).all() and torch.equal(m.bias, bias)
    again = torch.nn.Linear(3, 2)
    with torch.no_grad():
        again.weight.fill_(float("inf"))
    _fill_uninitialised(again, 0)
    assert torch.equal(again.weight, m.weight)   # the same seed, the same draw
