"""Loading safety: checkpoints are read with ``torch.load(weights_only=True)`` and models from
safetensors, so a file carrying a pickled payload runs no code; ``trust_remote_code`` stays off
unless a config (or the server's flag) turns it on.

Each payload below would create a marker file if it ran; the tests check that it never exists.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO
from core import config as C
from core.bin.train import main as train_main
from core.models import load_model_and_processor
from core.utils import checkpoint as ckpt
from reliability_util import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Pickles to ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_load_with_weights_only(train_config):
    cfg = train_config("safe", train={"max_steps": 2, "save_every": 1, "keep_last": 5})
    t, _ = run_in_process(cfg)
    for p in ckpt.list_checkpoints(Path(t.cfg.output_dir) / "checkpoints"):
        st = torch.load(p / "trainer_state.pt", weights_only=True)
        eng = torch.load(p / "engine.pt", weights_only=True)
        assert st["step"] in (1, 2) and set(eng) == {"model", "optimizer", "scheduler"}
    exported = sorted(f.name for f in (Path(t.cfg.output_dir) / "final").iterdir())
    assert "model.safetensors" in exported and not [f for f in exported if f.endswith((".bin", ".pt", ".pkl"))]


@pytest.mark.parametrize("which", ["trainer_state.pt", "engine.pt"])
def test_a_pickled_payload_in_a_checkpoint_is_refused(which, train_config, tmp_path, capsys):
    marker = tmp_path / "ran"
    cfg = train_config(f"evil_{which}", train={"max_steps": 3, "save_every": 1})
    run_in_process(cfg, "train.stop_after_steps=1")
    step1 = Path(C.load_config(cfg).output_dir) / "checkpoints" / "step_1"
    obj = torch.load(step1 / which, weights_only=True)
    obj["extra"] = Payload(marker)
    torch.save(obj, step1 / which)
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: {step1}" in err and "cannot be loaded with torch.load(weights_only=True)" in err, err[-2000:]
    assert not marker.exists()


def test_a_pickle_only_model_folder_runs_no_code(tiny, tmp_path):
    """A model folder with weights in a pickle (pytorch_model.bin) and no safetensors."""
    marker = tmp_path / "ran"
    model = tmp_path / "model"
    shutil.copytree(tiny.student, model)
    from safetensors.torch import load_file

    sd = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save({**sd, "evil": Payload(marker)}, model / "pytorch_model.bin")
    with pytest.raises(Exception, match="unsupported GLOBAL posix.system"):  # transformers: weights_only=True
        load_model_and_processor(model)
    assert not marker.exists()
    torch.save(sd, model / "pytorch_model.bin")  # the same weights without the payload load
    assert load_model_and_processor(model)[0] is not None


def _remote_code_model(root: Path, marker: Path) -> Path:
    d = root / "remote_code_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil_lm", "architectures": ["EvilLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"}}))
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return d


def test_remote_code_is_not_run_unless_asked(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    d = _remote_code_model(tmp_path, marker)
    with pytest.raises(Exception, match="trust_remote_code"):
        load_model_and_processor(d)
    assert not marker.exists()
    # the default of every entry point is off
    assert C.TrainConfig().model.trust_remote_code is False
    from core.bin.serve_teacher import main as serve_main
    seen = {}

    def fake_create_app(model, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr("core.serve.app.create_app", fake_create_app)
    assert serve_main(["--model", str(d)]) == 2  # refused before the server starts
    assert not seen and not marker.exists()
    with pytest.raises(SystemExit):
        serve_main(["--model", str(d), "--trust-remote-code"])
    assert seen["trust_remote_code"] is True and seen["trust_request_chat_template"] is False


def test_trust_remote_code_from_the_config_reaches_from_pretrained(tiny, train_config, monkeypatch):
    """With model.trust_remote_code: true the flag reaches transformers, for student and teacher."""
    import transformers

    seen = []
    real = transformers.Qwen2AudioForConditionalGeneration.from_pretrained.__func__

    def spy(cls, path, *a, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(cls, path, *a, **kw)

    monkeypatch.setattr(transformers.Qwen2AudioForConditionalGeneration, "from_pretrained", classmethod(spy))
    cfg = C.load_config(train_config("trc", method="opd", model={"trust_remote_code": True}))
    from core.trainer import Trainer
    Trainer(cfg)
    assert seen == [True, True]
    seen.clear()
    Trainer(C.load_config(train_config("no_trc", method="opd")))
    assert seen == [False, False]


def test_no_unsafe_loading_in_the_code():
    """No ``weights_only=False`` and no hard-coded ``trust_remote_code=True`` in core/, tools/ or recipes/."""
    bad = []
    for folder in ("core", "tools", "recipes"):
        for f in (REPO / folder).rglob("*.py"):
            text = f.read_text(encoding="utf-8", errors="replace")
            for pat in (r"weights_only\s*=\s*False", r"trust_remote_code\s*=\s*True", r"pickle\.loads?\("):
                bad += [f"{f.relative_to(REPO)}: {m.group(0)}" for m in re.finditer(pat, text)]
    for f in (REPO / "recipes").rglob("conf/*.yaml"):
        if re.search(r"trust_remote_code:\s*true", f.read_text(), re.I):
            bad.append(f"{f.relative_to(REPO)}: trust_remote_code: true")
    assert not bad, bad
