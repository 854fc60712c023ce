"""The model families users bring, each as a tiny folder in its released layout, through every
path: decode, two steps of each method (sft, opd, grpo, rest; LoRA), export + reload in plain
transformers, our server answering one ``prompt_logprobs`` request equal to a local forward, and
a remote-teacher OPD run equal to the local one.

Families here (the others have their own files: Qwen3 text in ``test_text_models.py``, Qwen3-ASR
and Qwen3-Omni-MoE in ``test_family_qwen3_*.py``):
- ``qwen2_audio``: ``Qwen2AudioForConditionalGeneration`` with the released 30 s feature chunk
  (3000 mel frames, 1500 encoder positions) and the chat template the 7B-Instruct checkpoints
  carry when saved by transformers 4.x (audio parts found by their ``audio`` key);
- ``qwen2_5_omni``: a full Qwen2.5-Omni folder (thinker + talker + token2wav, ``thinker.``
  prefixes, ``spk_dict.pt``), trained as its thinker on audio prompts and exported whole.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import soundfile as sf
import torch

from core import config as C
from core.models import load_model_and_processor
from core.rewards import register_reward
from core.trainer import Trainer
from core.trainer import run as train_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Transcribe the audio."

# the template of Qwen2-Audio-7B-Instruct as transformers 4.x saved it (tests/core/test_serve.py)
QWEN2_AUDIO_4X_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or "
    "'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}Audio "
    "{{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@register_reward("test_family_length")
def _length_reward(completions, **kwargs):
    """Varies between samples, so GRPO groups and ReST's filter have a signal."""
    return [min(1.0, len(c) / 20.0) for c in completions]


def _qwen2_audio(tiny, root: Path) -> SimpleNamespace:
    from transformers import AutoProcessor

    from core.models import build_tiny_qwen2_audio
    dirs = {}
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        d = root / f"qwen2_audio_{name}"
        build_tiny_qwen2_audio(tiny.tokenizer, hidden=hidden, layers=1, heads=2, chunk_seconds=30,
                               max_position_embeddings=1024, seed=seed, out_dir=d)
        proc = AutoProcessor.from_pretrained(d)
        proc.chat_template = proc.tokenizer.chat_template = QWEN2_AUDIO_4X_TEMPLATE
        proc.save_pretrained(d)
        dirs[name] = d
    return SimpleNamespace(name="qwen2_audio", cls="Qwen2AudioForConditionalGeneration",
                           load_cls="Qwen2AudioForConditionalGeneration", **dirs)


def _qwen2_5_omni(tiny, root: Path) -> SimpleNamespace:
    from core.models import build_tiny_full_omni, build_tiny_omni_thinker, train_tokenizer
    tok = train_tokenizer(tiny.texts, 300, omni=True)
    build_tiny_omni_thinker(tok, hidden=32, layers=1, heads=2, audio_hidden=32, audio_layers=1, vision_hidden=32,
                            vision_depth=1, seed=0, out_dir=root / "omni_student_thinker")
    build_tiny_omni_thinker(tok, hidden=48, layers=1, heads=2, audio_hidden=32, audio_layers=1, vision_hidden=32,
                            vision_depth=1, seed=1, out_dir=root / "omni_teacher")
    student = build_tiny_full_omni(root / "omni_student_thinker", root / "Qwen2.5-Omni-tiny")
    return SimpleNamespace(name="qwen2_5_omni", student=student, teacher=root / "omni_teacher",
                           cls="Qwen2_5OmniThinkerForConditionalGeneration",
                           load_cls="Qwen2_5OmniForConditionalGeneration")


BUILDERS = {"qwen2_audio": _qwen2_audio, "qwen2_5_omni": _qwen2_5_omni}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    fam = BUILDERS[request.param](tiny, root)
    fam.rows = tiny.rows[:8]
    fam.manifest = root / "train.jsonl"
    fam.manifest.write_text("".join(json.dumps(r) + "\n" for r in fam.rows))
    return fam


def _cfg(fam, out: Path, method: str, **over) -> C.TrainConfig:
    base = {"method": method, "output_dir": str(out), "model": {"path": str(fam.student)},
            "data": {"train": str(fam.manifest), "prompt": PROMPT, "modality": "audio", "max_target_tokens": 16},
            "rollout": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            "grpo": {"rewards": {"test_family_length": 1.0}},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 4, "max_steps": 2, "resume": "never"}}
    if method == "opd":
        base["teacher"] = {"path": str(fam.teacher)}
        base["opd"] = {"form": "distribution", "divergence": "reverse_kl", "support": "teacher_topk", "top_k": 8}
    return C.load_config(overrides=C.deep_merge(base, over))


def _losses(out: Path) -> list[float]:
    files = [out / "metrics.jsonl"] + sorted(out.glob("round_*/metrics.jsonl"))  # ReST: its rounds' SFT
    rows = [json.loads(x) for f in files for x in f.read_text().splitlines() if x.strip()]
    return [float(r["loss"]) for r in rows if "loss" in r]


def test_loads_and_decodes(family, tmp_path):
    from core.bin.decode import decode
    model, proc = load_model_and_processor(family.student)
    assert type(model).__name__ == family.cls
    info = decode(str(family.student), str(family.manifest), str(tmp_path / "hyp.jsonl"), prompt=PROMPT,
                  max_new_tokens=4, device="cpu", modality="audio")
    assert info["samples"] == len(family.rows)
    assert len((tmp_path / "hyp.jsonl").read_text().splitlines()) == len(family.rows)


@pytest.mark.parametrize("method, over", [
    ("sft", {}), ("opd", {}), ("grpo", {}),
    ("rest", {"rest": {"rewards": {"test_family_length": 1.0}, "keep_min_reward": 0.0, "rounds": 1,
                       "samples": 2, "steps_per_round": 2, "lrs": [3e-3]}}),
    ("lora", {"model": {"lora": {"r": 4, "lora_alpha": 8}}}),
], ids=["sft", "opd", "grpo", "rest", "lora"])
def test_every_method_trains_and_exports(family, tmp_path, method, over):
    """Two steps (ReST: one round of two), then the export loads in plain transformers as the
    released class (a full Omni folder stays whole) and our loader reads it for the next stage."""
    import transformers
    res = train_run(_cfg(family, tmp_path / method, "sft" if method == "lora" else method, **over))
    final = Path(res["final_model"])
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    losses = _losses(tmp_path / method)
    assert losses and all(math.isfinite(x) for x in losses)
    whole = getattr(transformers, family.load_cls).from_pretrained(str(final))
    assert type(whole).__name__ == family.load_cls
    again, _ = load_model_and_processor(final)
    assert type(again).__name__ == family.cls


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def test_served_prompt_logprobs_and_remote_opd(family, tmp_path):
    """The teacher behind our server: one ``prompt_logprobs`` request equals a plain forward of the
    prompt the chat template renders; a remote OPD run's losses equal the local run's."""
    from core.serve.app import ServerThread, create_app
    prefill = "hello world<|im_end|>"
    row = family.rows[0]
    body = {"model": str(family.teacher), "max_tokens": 1, "temperature": 0, "prompt_logprobs": 3,
            "return_token_ids": True, "add_generation_prompt": False, "continue_final_message": True,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": _b64(row["audio"]), "format": "wav"}},
                {"type": "text", "text": PROMPT}]}, {"role": "assistant", "content": prefill}]}
    local = Trainer(_cfg(family, tmp_path / "local", "opd", train={"max_steps": 3})).train()
    with ServerThread(create_app(family.teacher, device="cpu")) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)
        remote = Trainer(_cfg(family, tmp_path / "remote", "opd", teacher={"kind": "remote", "url": s.url},
                              train={"max_steps": 3})).train()
    assert r.status_code == 200, r.text
    ids, plp = r.json()["prompt_token_ids"], r.json()["prompt_logprobs"]
    model, proc = load_model_and_processor(family.teacher)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "a"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": prefill}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    wav, _ = sf.read(row["audio"], dtype="float32")
    enc = proc(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")
    assert ids == enc["input_ids"][0].tolist()
    with torch.no_grad():
        logp = torch.log_softmax(model(**{k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}).logits[0], -1)
    for pos in range(1, len(ids)):
        for key, v in plp[pos].items():
            assert v["logprob"] == pytest.approx(float(logp[pos - 1, int(key)]), abs=1e-4)
    assert remote["steps"] == local["steps"] == 3 and remote["skipped_steps"] == 0
    a, b = _losses(tmp_path / "local"), _losses(tmp_path / "remote")
    assert all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-5) for x, y in zip(a, b)), (a, b)
