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

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from core import config as C
from core.models import load_model_and_processor
from core.rewards import register_reward
from core.trainer import Trainer
from core.trainer import run as train_run

from conftest import QWEN2_AUDIO_4X_TEMPLATE, check_served_teacher, run_losses

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Transcribe the audio."



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
    losses = run_losses(tmp_path / method)
    assert losses and all(math.isfinite(x) for x in losses)
    whole = getattr(transformers, family.load_cls).from_pretrained(str(final))
    assert type(whole).__name__ == family.load_cls
    again, _ = load_model_and_processor(final)
    assert type(again).__name__ == family.cls


def test_served_prompt_logprobs_and_remote_opd(family, tmp_path):
    """The teacher behind our server: one ``prompt_logprobs`` request equals a plain forward of the
    prompt the chat template renders; a remote OPD run's losses equal the local run's."""
    def opd(out, teacher):
        return Trainer(_cfg(family, out, "opd", train={"max_steps": 3},
                            **({"teacher": teacher} if teacher else {}))).train()
    check_served_teacher(family.teacher, family.rows[0]["audio"], PROMPT, opd, tmp_path)
