"""Kill and resume: an OPD run killed with SIGKILL three times still ends bitwise equal to an
uninterrupted one, and a checkpoint cut short is never taken as ``latest``.

``test_opd_killed_three_times_resumes_bitwise_equal``: ``python -m core.bin.train`` (OPD, local
teacher, a checkpoint every step) is killed at three different steps drawn at random (the seed is
printed; ``RELIABILITY_SEED`` replays one): twice by the test with SIGKILL as soon as the step's
metrics row appears, which lands in the step's checkpoint write or the next step's rollout, and
once by the process itself half-way through writing a checkpoint file (``kill_child.py``). After
each kill ``latest`` names a complete checkpoint no newer than the kill, the temp dir of the
interrupted write is never taken, and ``resume: auto`` goes on from there. The final weights
equal an uninterrupted run's bit for bit, and every step's metrics row appears exactly once with
the uninterrupted run's loss: no step is lost or done twice.

``test_a_crash_at_any_point_of_a_save_leaves_a_loadable_latest``: ``checkpoint.save`` is stopped
at each of its stages (engine state half written, trainer state half written, before the rename,
before and after the ``latest`` update, while re-saving a step that exists); each time
``latest_checkpoint`` gives a complete checkpoint that loads, and the next save cleans up.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cpu_env
from core import config as C
from core.utils import checkpoint as ckpt
from reliability_util import assert_bitwise_equal, final_weights, read_metrics, run_in_process, step_rows

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_STEPS = 10


def _spawn(args: list[str], threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=cpu_env(threads), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_at_step(cfg: Path, out: Path, step: int, threads: int, timeout: float = 240) -> str:
    """Run the CLI and SIGKILL it as soon as the metrics row of ``step`` is written."""
    p = _spawn(["-m", "core.bin.train", "--config", str(cfg)], threads)
    t0 = time.time()
    try:
        while True:
            rows = [r for r in _rows_safe(out) if r.get("step") == step and "event" not in r]
            if rows:
                p.send_signal(signal.SIGKILL)
                break
            if p.poll() is not None:
                raise AssertionError(f"the run ended (exit {p.returncode}) before step {step}:\n"
                                     f"{p.stderr.read()[-4000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"step {step} not reached within {timeout} s")
            time.sleep(0.005)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL, (p.returncode, err[-3000:])
    return err


def _rows_safe(out: Path) -> list[dict]:
    import json

    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def _latest_step(ckdir: Path) -> int:
    p = ckpt.latest_checkpoint(ckdir)
    assert p is not None and ckpt.is_complete(p), p
    # the files load as they are, with weights_only=True
    torch.load(p / "engine.pt", weights_only=True)
    torch.load(p / "trainer_state.pt", weights_only=True)
    return int(p.name.split("_")[1])


def test_opd_killed_three_times_resumes_bitwise_equal(train_config, tiny):
    seed = int(os.environ.get("RELIABILITY_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    # kill 1 at step k1; kill 2 inside the checkpoint write of step k2 > the checkpoint resumed from;
    # kill 3 at step k3 > k2
    k1, d2, d3 = rng.randint(2, 3), rng.randint(1, 2), rng.randint(1, 2)
    note = f"RELIABILITY_SEED={seed}: kill 1 at step {k1}"
    sections = dict(method="opd", rollout={"n": 2, "max_new_tokens": 6}, optim={"lr": 1e-2},
                    train={"batch_size": 2, "max_steps": MAX_STEPS, "save_every": 1, "keep_last": 2,
                           "resume": "auto", "seed": 0})
    full, part = train_config("full", **sections), train_config("part", **sections)
    out_full, out_part = Path(C.load_config(full).output_dir), Path(C.load_config(part).output_dir)
    ckdir = out_part / "checkpoints"
    threads = torch.get_num_threads()

    run_in_process(full)  # the uninterrupted reference

    # kill 1: SIGKILL from outside once step k1 is logged
    _kill_at_step(part, out_part, k1, threads)
    c1 = _latest_step(ckdir)
    assert k1 - 1 <= c1 <= 5, note  # the checkpoint before the logged step at least (later if the kill came late)
    k2 = c1 + d2
    k3 = k2 + d3
    note += f", kill 2 while writing checkpoint {k2}, kill 3 at step {k3}"
    print(note)

    # kill 2: the process kills itself half-way through writing checkpoint k2
    p = _spawn([str(REPO / "tests" / "reliability" / "kill_child.py"), str(k2), "--config", str(part)], threads)
    _, err = p.communicate(timeout=240)
    assert p.returncode == -signal.SIGKILL, (note, p.returncode, err[-3000:])
    assert f"resumed from {ckdir / f'step_{c1}'}" in err, note
    tmp = ckdir / f".tmp_step_{k2}"
    assert tmp.is_dir() and not ckpt.is_complete(tmp), note  # the cut-short write is there ...
    assert not (ckdir / f"step_{k2}").exists()
    c2 = _latest_step(ckdir)
    assert c2 == k2 - 1, note                                 # ... and never taken as latest
    assert (ckdir / "latest").read_text().strip() == f"step_{c2}"

    # kill 3: SIGKILL from outside once step k3 is logged
    _kill_at_step(part, out_part, k3, threads)
    c3 = _latest_step(ckdir)
    assert c3 >= k3 - 1 and c3 > c2, note
    assert not tmp.exists(), "the next save removes the temp dir left by the killed write"

    # the last run finishes
    p = _spawn(["-m", "core.bin.train", "--config", str(part)], threads)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, (note, err[-3000:])
    assert f"resumed from {ckdir / f'step_{c3}'}" in err, note

    assert_bitwise_equal(final_weights(out_full), final_weights(out_part))
    full_rows, part_rows = step_rows(out_full), step_rows(out_part)
    assert [r["step"] for r in part_rows] == list(range(1, MAX_STEPS + 1)), note  # each step once
    for a, b in zip(full_rows, part_rows):
        assert (a["loss"], a["lr"], a["kl_sampled"]) == (b["loss"], b["lr"], b["kl_sampled"]), (note, a["step"])
    assert all(r["skipped_steps"] == 0 for r in part_rows)
    assert len(read_metrics(out_part)) == MAX_STEPS


# ----------------------------------------------------------------------------- crash inside save
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except OSError`` catches it."""


class TinyEngine:
    """What ``checkpoint.save`` / ``load`` need of an engine: one tensor in ``engine.pt``."""

    def __init__(self, value: float):
        self.w = torch.full((4,), value)

    def save_state(self, d):
        torch.save({"model": {"w": self.w}}, Path(d) / "engine.pt")

    def load_state(self, d):
        self.w = torch.load(Path(d) / "engine.pt", weights_only=True)["model"]["w"]


STAGES = ["engine_half_written", "state_half_written", "before_rename", "before_pointer",
          "pointer_tmp_written", "resave_set_aside"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_point_of_a_save_leaves_a_loadable_latest(tmp_path, monkeypatch, stage):
    ckdir = tmp_path / "checkpoints"
    for s in (1, 2):
        ckpt.save(ckdir, s, engine=TinyEngine(float(s)), state={"step": s}, keep_last=3)
    real_save, real_replace, real_write = torch.save, os.replace, Path.write_text

    def half_save(obj, f, *a, **k):
        target = {"engine_half_written": "engine.pt", "state_half_written": "trainer_state.pt"}.get(stage)
        name = Path(f if isinstance(f, (str, os.PathLike)) else f.name)
        if name.name == target:
            name.write_bytes(b"PK\x03\x04 half a zip")
            raise Killed()
        return real_save(obj, f, *a, **k)

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if stage == "before_rename" and dst.name.startswith("step_"):
            raise Killed()
        if stage == "before_pointer" and dst.name == "latest":
            raise Killed()
        if stage == "resave_set_aside" and src.name.startswith(".tmp_step_"):
            raise Killed()  # the existing step_2 moved aside, the new one not yet in place
        return real_replace(src, dst)

    def write_text(self, *a, **k):
        n = real_write(self, *a, **k)
        if stage == "pointer_tmp_written" and self.name == "latest.tmp":
            raise Killed()
        return n

    monkeypatch.setattr(torch, "save", half_save)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "write_text", write_text)
    step = 2 if stage == "resave_set_aside" else 3
    with pytest.raises(Killed):
        ckpt.save(ckdir, step, engine=TinyEngine(float(step)), state={"step": step}, keep_last=3)
    monkeypatch.undo()

    latest = ckpt.latest_checkpoint(ckdir)
    assert latest is not None and ckpt.is_complete(latest), sorted(p.name for p in ckdir.iterdir())
    assert not latest.name.startswith("."), latest
    eng = TinyEngine(0.0)
    st = ckpt.load(latest, engine=eng)
    assert torch.equal(eng.w, torch.full((4,), float(st["step"])))   # model and state belong together
    want = {"engine_half_written": 2, "state_half_written": 2, "before_rename": 2, "before_pointer": 2,
            "pointer_tmp_written": 2, "resave_set_aside": 1}[stage]
    assert st["step"] == want, (stage, st["step"])
    # the next save succeeds and removes what the crash left
    ckpt.save(ckdir, 4, engine=TinyEngine(4.0), state={"step": 4}, keep_last=3)
    assert ckpt.latest_checkpoint(ckdir).name == "step_4"
    assert not [p for p in ckdir.iterdir() if p.name.startswith((".tmp_", ".old_"))]
