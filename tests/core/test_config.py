"""Config validation and the bad inputs the trainer must reject at start-up, before any step:
unknown or mistyped keys, a missing model path, a teacher with another vocabulary, a training
manifest that points at missing audio.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core import config as C
from core.bin.train import main as train_main
from core.data.manifest import ManifestError
from core.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal(tiny) -> dict:
    return {"model": {"path": str(tiny.student)}, "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}}


# ----------------------------------------------------------------------------- keys and types
def test_a_valid_config_loads_with_overrides(tiny, tmp_path):
    path = _yaml(tmp_path / "ok.yaml", {**_minimal(tiny), "optim": {"lr": 3}, "train": {"batch_size": 4}})
    cfg = C.load_config(path, ["optim.lr=1e-4", "train.max_steps=7", "opd.divergence=jsd"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 4 and cfg.train.max_steps == 7 and cfg.opd.divergence == "jsd"
    assert cfg.model.path == str(tiny.student)
    assert C.load_config(path).optim.lr == 3.0  # an int where a float is expected is accepted


@pytest.mark.parametrize("data, key", [
    ({"optim": {"lrr": 1e-3}}, "optim.lrr"),
    ({"train": {"batch_szie": 2}}, "train.batch_szie"),
    ({"opd": {"divergence": "jsd", "temprature": 2.0}}, "opd.temprature"),
    ({"modle": {"path": "x"}}, "modle"),
])
def test_unknown_key_is_named(tiny, tmp_path, data, key):
    path = _yaml(tmp_path / "bad.yaml", {**_minimal(tiny), **data})
    with pytest.raises(C.ConfigError) as ei:
        C.load_config(path)
    msg = str(ei.value)
    assert f"'{key}'" in msg and "unknown" in msg
    assert str(path) in msg
    # the same key given as an override
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(_yaml(tmp_path / "ok.yaml", _minimal(tiny)), [f"{key}=1"])


def test_unknown_key_lists_the_valid_ones(tiny, tmp_path):
    with pytest.raises(C.ConfigError) as ei:
        C.load_config(_yaml(tmp_path / "c.yaml", {**_minimal(tiny), "optim": {"lrr": 1}}))
    assert "lr" in str(ei.value).split("valid keys here:")[1]


@pytest.mark.parametrize("data, key", [
    ({"train": {"batch_size": "four"}}, "train.batch_size"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"data": {"skip_bad": "yes"}}, "data.skip_bad"),
    ({"optim": {"betas": 0.9}}, "optim.betas"),
    ({"optim": 3}, "optim"),
])
def test_wrong_type_is_named(tiny, tmp_path, data, key):
    merged = C.deep_merge(_minimal(tiny), data)
    with pytest.raises(C.ConfigError) as ei:
        C.load_config(_yaml(tmp_path / "bad.yaml", merged))
    assert key in str(ei.value)


def test_missing_model_path(tiny, tmp_path):
    with pytest.raises(C.ConfigError, match=r"model\.path"):
        C.load_config(_yaml(tmp_path / "c.yaml", {"data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}}))


@pytest.mark.parametrize("data, key", [
    ({"method": "dpo"}, "method"),
    ({"method": "opd"}, "teacher.path"),
    ({"method": "grpo"}, "grpo.rewards"),
    ({"method": "calibrate", "teacher": {"path": "t"}}, "data.dev"),
    ({"backend": {"name": "deepspeed"}}, "backend.ds_config"),
    ({"rollout": {"n": 0}}, "rollout.n"),
])
def test_inconsistent_settings_are_named(tiny, tmp_path, data, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(_yaml(tmp_path / "c.yaml", C.deep_merge(_minimal(tiny), data)))


def test_cli_reports_a_bad_key_and_exits_2(tiny, tmp_path, capsys):
    path = _yaml(tmp_path / "c.yaml", _minimal(tiny))
    assert train_main(["--config", str(path), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- start-up checks
def _nothing_trained(out: Path):
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    assert not (out / "final").exists()


@pytest.fixture(scope="module")
def foreign_teachers(tiny, tmp_path_factory):
    """Teachers whose tokenizers differ from the student's: in size, and in ids at equal size."""
    from core.models import build_tiny_qwen2_audio, train_tokenizer

    root = tmp_path_factory.mktemp("foreign")
    other_size = train_tokenizer(tiny.texts, 280)
    other_ids = train_tokenizer([t.upper() + " zebra quartz" for t in tiny.texts], len(tiny.tokenizer))
    assert len(other_ids) == len(tiny.tokenizer) and other_ids.get_vocab() != tiny.tokenizer.get_vocab()
    build_tiny_qwen2_audio(other_size, hidden=32, layers=1, heads=2, seed=3, out_dir=root / "size")
    build_tiny_qwen2_audio(other_ids, hidden=32, layers=1, heads=2, seed=3, out_dir=root / "ids")
    return {"size": root / "size", "ids": root / "ids"}


@pytest.mark.parametrize("which", ["size", "ids"])
@pytest.mark.parametrize("method", ["opd", "calibrate"])
def test_teacher_vocabulary_mismatch_fails_at_start_up(train_config, tiny, foreign_teachers, which, method,
                                                        monkeypatch):
    from core.methods import METHODS

    def never(*a, **k):
        raise AssertionError("a training step ran before the vocabulary check")

    for m in METHODS.values():
        monkeypatch.setattr(m, "experience", never)
    cfg = C.load_config(train_config("mismatch", method=method, teacher={"path": str(foreign_teachers[which])},
                                     data={"dev": str(tiny.manifest)}))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Trainer(cfg).train()
    _nothing_trained(Path(cfg.output_dir))


def test_missing_audio_names_file_and_line_before_training(train_config, tiny, tmp_path):
    rows = [dict(r) for r in tiny.rows[:4]]
    rows[2]["audio"] = str(tmp_path / "gone.wav")
    rows[3]["audio"] = "also_gone.wav"
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = C.load_config(train_config("missing_audio", data={"train": str(manifest)}))
    with pytest.raises(ManifestError) as ei:
        Trainer(cfg)  # the data are checked when the trainer is built, before train()
    msg = str(ei.value)
    assert f"{manifest}:3: audio" in msg and "gone.wav" in msg
    assert f"{manifest}:4: audio" in msg and "also_gone.wav" in msg
    assert f"{manifest}:1" not in msg and f"{manifest}:2" not in msg
    _nothing_trained(Path(cfg.output_dir))


def test_sft_needs_the_target_field(train_config, tiny, tmp_path):
    rows = [dict(r) for r in tiny.rows[:3]]
    del rows[1]["text"]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = C.load_config(train_config("no_text", data={"train": str(manifest)}))
    with pytest.raises(ManifestError, match=rf"{manifest}:2: text"):
        Trainer(cfg)
    _nothing_trained(Path(cfg.output_dir))
