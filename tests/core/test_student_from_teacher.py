"""A student made of its teacher's own layers (``core.models.student_from_teacher``), and stage 1 of
the recipes (``tools.build_models``) making it when only ``teacher_dir`` is set: the pair shares
tokenizer and processor, so distillation starts without a vocabulary error."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from core import config as C
from core.data.collate import AudioPromptCollator
from core.models import (build_tiny_qwen2_audio, check_vocab_match, load_model_and_processor,
                         student_from_teacher)
from core.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher4(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher4") / "teacher"
    build_tiny_qwen2_audio(tiny.tokenizer, hidden=32, layers=4, heads=2, audio_hidden=32, audio_layers=4,
                           seed=5, out_dir=out)
    return out


def test_every_kth_layer_initialised_from_the_teacher(teacher4, tiny, tmp_path):
    info = student_from_teacher(teacher4, tmp_path / "s", keep_every=2, audio_keep_every=2)
    assert info["decoder_layers"] == [0, 2] and info["audio_layers"] == [0, 2]
    assert info["parameters"] < info["teacher_parameters"]
    t, tp = load_model_and_processor(teacher4)
    s, sp = load_model_and_processor(tmp_path / "s")
    assert s.config.get_text_config().num_hidden_layers == 2 and s.config.audio_config.encoder_layers == 2
    ts, ss = t.state_dict(), s.state_dict()
    for j, i in enumerate([0, 2]):
        for kind in ("language_model", "audio_tower"):
            for k in ss:
                head = f"model.{kind}.layers.{j}."
                if k.startswith(head):
                    assert torch.equal(ss[k], ts[f"model.{kind}.layers.{i}." + k[len(head):]]), k
    for k in ("lm_head.weight", "model.language_model.embed_tokens.weight", "model.language_model.norm.weight"):
        assert torch.equal(ss[k], ts[k])
    assert check_vocab_match(sp, tp, student_model=s, teacher_model=t) is None
    assert sp.tokenizer.get_vocab() == tp.tokenizer.get_vocab()


def test_keeping_every_layer_is_the_teacher(teacher4, tiny, tmp_path):
    """keep_every 1: the same network, so the same logits (the index mapping is right)."""
    student_from_teacher(teacher4, tmp_path / "same", keep_every=1)
    t, tp = load_model_and_processor(teacher4)
    s, _ = load_model_and_processor(tmp_path / "same")
    b = AudioPromptCollator(tp, "Transcribe the audio.").prompts(tiny.rows[:2])
    with torch.no_grad():
        torch.testing.assert_close(s(**b.inputs).logits, t(**b.inputs).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep_every must be >= 1"):
        student_from_teacher(teacher4, tmp_path / "bad", keep_every=0)


def test_build_models_with_only_a_teacher_dir_then_opd(teacher4, tiny, tmp_path, write_config):
    from tools.build_models import main as build_main
    conf = tmp_path / "models.yaml"
    conf.write_text(yaml.safe_dump({"teacher_dir": str(teacher4), "student_dir": "",
                                    "tokenizer": {"vocab_size": 400}, "student_from_teacher": {"keep_every": 2}}))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(tiny.texts) + "\n")
    exp = tmp_path / "exp"
    assert build_main(["--conf", str(conf), "--text", str(text), "--exp", str(exp)]) == 0
    info = json.loads((exp / "models.json").read_text())
    assert info["teacher"]["built"] is False and info["student"]["built"] is True
    assert info["student"]["from_teacher"]["decoder_layers"] == [0, 2]
    assert not (exp / "tokenizer").exists()  # the teacher's tokenizer is the student's
    cfg = write_config(tmp_path, "opd", method="opd", model={"path": str(exp / "student_init")},
                       teacher={"path": str(exp / "teacher_init")}, train={"batch_size": 2, "max_steps": 2})
    res = Trainer(C.load_config(str(cfg))).train()
    assert res["steps"] == 2 and res["skipped_steps"] == 0
    # an unknown key of the section is refused by name
    conf.write_text(yaml.safe_dump({"teacher_dir": str(teacher4), "student_from_teacher": {"every": 2}}))
    with pytest.raises(SystemExit, match="student_from_teacher: unknown keys \\['every'\\]"):
        build_main(["--conf", str(conf), "--text", str(text), "--exp", str(exp)])
