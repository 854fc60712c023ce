"""Numerical faults: NaN or inf injected into the gradients (with a finite loss) or into an OPD loss
skips the step and counts it; several in a row stop the run with a clear message and exit 1; no
checkpoint ever holds a NaN or inf weight, even when the weights themselves go bad.

(tests/core/test_trainer.py covers NaN in the SFT loss and an absurd learning rate without
checkpoints; these add the gradients, inf, OPD, the CLI and the checkpoints.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import config as C
from core.backends import TorchEngine
from core.bin.train import main as train_main
from core.methods import METHODS
from core.utils import checkpoint as ckpt
from reliability_util import all_finite, read_metrics, run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


def _poison_grads(monkeypatch, calls: set[int], value: float) -> list[int]:
    """After the backward of the chosen micro-batches, one gradient element becomes ``value``."""
    real = TorchEngine.backward
    counter = [0]

    def backward(self, loss):
        real(self, loss)
        counter[0] += 1
        if counter[0] in calls:
            p = next(p for p in self.module.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = value

    monkeypatch.setattr(TorchEngine, "backward", backward)
    return counter


def _poison_loss(monkeypatch, method: str, calls: set[int], value: float) -> list[int]:
    real = type(METHODS[method]).loss
    counter = [0]

    def loss(ctx, exp, norm=None):
        counter[0] += 1
        out, m = real(METHODS[method], ctx, exp, norm)
        return (out * value if counter[0] in calls else out), m

    monkeypatch.setattr(METHODS[method], "loss", loss)
    return counter


def _checkpoints_finite(out_dir) -> int:
    cks = ckpt.list_checkpoints(Path(out_dir) / "checkpoints")
    for p in cks:
        assert all_finite(torch.load(p / "engine.pt", weights_only=True)["model"]), p
    return len(cks)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step_and_counts_it(train_config, monkeypatch, value):
    counter = _poison_grads(monkeypatch, {2, 4}, value)
    cfg = train_config("grad", train={"max_steps": 5, "max_bad_steps": 2, "save_every": 1, "keep_last": 10})
    t, summary = run_in_process(cfg)
    assert counter[0] == 5
    assert summary["skipped_steps"] == 2 and summary["steps"] == 5 and not summary["interrupted"]
    rows = read_metrics(t.cfg.output_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 2]
    assert rows[1]["grad_norm"] in ("nan", "inf") and rows[3]["grad_norm"] in ("nan", "inf")
    # the optimizer stepped on the 3 good steps only; the weights stayed finite
    assert {int(s["step"]) for s in t.engine.optimizer.state.values()} == {3}
    assert all_finite(dict(t.engine.module.named_parameters()))
    # the checkpoints of the skipped steps hold the weights of the step before: equal, finite
    out = Path(t.cfg.output_dir) / "checkpoints"
    w = {s: torch.load(out / f"step_{s}" / "engine.pt", weights_only=True)["model"] for s in (1, 2, 3, 4)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1]) and all(torch.equal(w[3][k], w[4][k]) for k in w[3])
    assert any(not torch.equal(w[2][k], w[3][k]) for k in w[2])
    assert _checkpoints_finite(t.cfg.output_dir) == 5


def test_inf_opd_loss_is_skipped_and_counted(train_config, monkeypatch):
    counter = _poison_loss(monkeypatch, "opd", {2}, float("inf"))
    cfg = train_config("opd_inf", method="opd", rollout={"n": 2, "max_new_tokens": 6},
                       train={"batch_size": 2, "max_steps": 3, "max_bad_steps": 2})
    t, summary = run_in_process(cfg)
    assert counter[0] == 3
    assert summary["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in read_metrics(t.cfg.output_dir)] == [0, 1, 1]
    assert {int(s["step"]) for s in t.engine.optimizer.state.values()} == {2}


def test_several_bad_steps_in_a_row_stop_the_cli_clearly(train_config, monkeypatch, capsys):
    counter = _poison_grads(monkeypatch, set(range(3, 100)), float("nan"))
    cfg = train_config("stop", train={"max_steps": 20, "max_bad_steps": 3, "save_every": 1, "keep_last": 20})
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "error: 3 consecutive non-finite steps (limit train.max_bad_steps=3); stopping." in err
    assert counter[0] == 5  # two good steps, three bad ones, then the stop
    out = Path(C.load_config(cfg).output_dir)
    # rows of steps 1-4 (the 5th stops the run before its row and its checkpoint)
    assert [r["skipped_steps"] for r in read_metrics(out)] == [0, 0, 1, 2]
    assert not (out / "final").exists() and not (out / "train_summary.json").exists()
    assert _checkpoints_finite(out) == 4
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_4"


def test_a_checkpoint_never_holds_nan_weights(train_config, monkeypatch, capsys):
    """The weights themselves go NaN after the optimizer step of step 3 (as an overflow would):
    the checkpoint of step 3 is refused, step 2 stays the latest, and it loads."""
    real = TorchEngine.step
    counter = [0]

    def step(self):
        info = real(self)
        counter[0] += 1
        if counter[0] == 3:
            with torch.no_grad():
                next(p for p in self.module.parameters() if p.requires_grad).view(-1)[0] = float("nan")
        return info

    monkeypatch.setattr(TorchEngine, "step", step)
    cfg = train_config("nanw", train={"max_steps": 6, "save_every": 1, "keep_last": 10})
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "error: step 3: the weights hold NaN or inf" in err and "checkpoint step_3 not written" in err
    out = Path(C.load_config(cfg).output_dir)
    assert f"{out / 'checkpoints' / 'step_2'} stays the latest" in err
    assert _checkpoints_finite(out) == 2
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_2"
    monkeypatch.undo()
    # resumable: the run goes on from step 2 and finishes
    t, summary = run_in_process(cfg)
    assert summary["steps"] == 6 and not summary["interrupted"]
    assert all_finite(dict(t.engine.module.named_parameters()))


def test_absurd_learning_rate_leaves_only_finite_checkpoints(train_config):
    cfg = train_config("lr", optim={"lr": 1e30, "scheduler": "constant"},
                       train={"max_steps": 20, "max_bad_steps": 3, "save_every": 1, "keep_last": 20})
    assert train_main(["--config", str(cfg)]) == 1
    out = Path(C.load_config(cfg).output_dir)
    _checkpoints_finite(out)
    assert not (out / "final").exists()
