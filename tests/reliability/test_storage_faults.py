"""Storage faults: a checkpoint that cannot be written (disk full, no permission, a file too large
for the process's limit, a file where the folder should be) stops the run with exit 1 and one
clear ``error:`` naming the checkpoint, the stage and the cause; its temp dir is removed; the
previous checkpoint stays intact, ``latest`` still names it, and a resumed run from it ends
bitwise equal to an uninterrupted run.

Disk full and no permission are simulated by making the writes fail with ENOSPC / EACCES (the
tests run as root, where permission bits do not stop writes, and mounting a small file system
needs privileges CI does not have). The file-size case is real: a child process runs with
``RLIMIT_FSIZE`` below the size of a checkpoint, so the kernel refuses the write (EFBIG).
"""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cpu_env
from core import config as C
from core.bin.train import main as train_main
from core.utils import checkpoint as ckpt
from reliability_util import assert_bitwise_equal, final_weights, run_in_process, step_rows

pytestmark = pytest.mark.usefixtures("one_thread")

SECTIONS = dict(train={"max_steps": 4, "save_every": 2, "keep_last": 2, "resume": "auto", "seed": 0},
                optim={"lr": 1e-2})


@pytest.fixture(scope="module")
def reference(write_config, tmp_path_factory, one_thread):
    cfg = write_config(tmp_path_factory.mktemp("storage_ref"), "ref", **SECTIONS)
    run_in_process(cfg)
    return Path(C.load_config(cfg).output_dir)


def _fail_writes_of(monkeypatch, name: str, err: int, partial: bool = True):
    """Writes of a file called ``name`` inside a checkpoint temp dir fail with ``err`` (after half
    the bytes when ``partial``)."""
    real_open = open

    def fake_open(file, mode="r", *a, **k):
        p = Path(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else None
        if p is not None and "w" in mode and p.name == name and p.parent.name.startswith(".tmp_step_"):
            if partial:
                with real_open(file, mode, *a, **k) as f:
                    f.write(b"\0" * 1000 if "b" in mode else "x" * 1000)
            raise OSError(err, os.strerror(err), str(p))
        return real_open(file, mode, *a, **k)

    import builtins
    monkeypatch.setattr(builtins, "open", fake_open)


def _check_intact_and_resume(cfg, out: Path, reference: Path, err: str, stage: str, cause: str):
    ckdir = out / "checkpoints"
    assert f"error: could not write checkpoint {ckdir / 'step_4'} ({stage}): {cause}" in err, err[-3000:]
    assert f"the previous checkpoint {ckdir / 'step_2'} is intact and 'latest' still names it" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_2"]  # no temp dir left
    assert ckpt.latest_checkpoint(ckdir) == ckdir / "step_2"
    assert not (out / "final").exists()
    # the previous checkpoint loads, and the resumed run ends as if nothing had happened
    torch.load(ckdir / "step_2" / "engine.pt", weights_only=True)
    run_in_process(cfg)
    assert_bitwise_equal(final_weights(reference), final_weights(out))
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("fault", ["disk_full_engine", "disk_full_state", "no_permission"])
def test_failed_checkpoint_write_keeps_the_previous_one(fault, train_config, reference, monkeypatch, capsys):
    cfg = train_config(fault, **SECTIONS)
    out = Path(C.load_config(cfg).output_dir)
    run_in_process(cfg, "train.stop_after_steps=2")  # step_2 written
    if fault == "disk_full_engine":
        _fail_writes_of(monkeypatch, "engine.pt", errno.ENOSPC)
        stage, cause = "writing the model and optimizer states", "the disk is full: [Errno 28] No space left on device"
    elif fault == "disk_full_state":
        _fail_writes_of(monkeypatch, "trainer_state.pt", errno.ENOSPC)
        stage, cause = "writing trainer_state.pt", "the disk is full: [Errno 28] No space left on device"
    else:
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if self.name.startswith(".tmp_step_"):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        stage, cause = "creating the temp dir", "no permission to write there: [Errno 13] Permission denied"
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    monkeypatch.undo()
    _check_intact_and_resume(cfg, out, reference, err, stage, cause)


def test_failed_latest_update_keeps_a_loadable_latest(train_config, reference, monkeypatch, capsys):
    """The disk fills up after step_4 is in place, while ``latest`` is rewritten: ``latest`` still
    names step_2 (complete), and step_4 is complete too."""
    cfg = train_config("pointer", **SECTIONS)
    out = Path(C.load_config(cfg).output_dir)
    run_in_process(cfg, "train.stop_after_steps=2")
    real_write = Path.write_text

    def write_text(self, *a, **k):
        if self.name == "latest.tmp" and "step_4" in a[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    monkeypatch.undo()
    ckdir = out / "checkpoints"
    assert "(updating 'latest'): the disk is full" in err, err[-2000:]
    assert ckpt.latest_checkpoint(ckdir) == ckdir / "step_2"
    assert ckpt.is_complete(ckdir / "step_4")
    run_in_process(cfg)  # resumes from step_2, as 'latest' says
    assert_bitwise_equal(final_weights(reference), final_weights(out))


def test_checkpoints_path_is_a_file(train_config, capsys):
    cfg = train_config("file_in_the_way", train={"max_steps": 2, "save_every": 1})
    out = Path(C.load_config(cfg).output_dir)
    out.mkdir(parents=True)
    (out / "checkpoints").write_text("not a folder\n")
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: could not write checkpoint {out / 'checkpoints' / 'step_1'} (creating the temp dir): " \
           f"a file is in the way" in err, err[-2000:]
    assert "no earlier checkpoint exists" in err
    assert (out / "checkpoints").read_text() == "not a folder\n"


def _limit_file_size(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_real_write_failure_file_size_limit(train_config, reference):
    """A child process whose files may not exceed 200 kB (a checkpoint is ~840 kB): the kernel
    refuses the write of step_4, the run stops with the cause, and step_2 stays usable."""
    cfg = train_config("fsize", **SECTIONS)
    out = Path(C.load_config(cfg).output_dir)
    run_in_process(cfg, "train.stop_after_steps=2")
    assert (out / "checkpoints" / "step_2" / "engine.pt").stat().st_size > 400_000
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=REPO,
                       env=cpu_env(torch.get_num_threads()), capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(200_000))
    assert p.returncode == 1, p.stderr[-3000:]
    _check_intact_and_resume(cfg, out, reference, p.stderr, "writing the model and optimizer states",
                             "a file is larger than allowed: [Errno 27] File too large")
