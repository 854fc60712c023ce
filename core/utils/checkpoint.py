"""Atomic training checkpoints: ``<dir>/step_<k>`` written to a temp dir and renamed, a
``latest`` pointer file replaced atomically, the last K kept.

A checkpoint holds the model, optimizer and scheduler states, the Python / NumPy / torch RNG
states, the data position, the step and the resolved config, so a resumed CPU run matches an
uninterrupted one exactly. With DeepSpeed, the engine writes model and optimizer (each rank its
own shards) inside the same directory layout.

Safety: every file is read back with ``torch.load(weights_only=True)`` (tensors and plain
containers only, no arbitrary pickled objects), so the NumPy RNG state is stored as a plain list.
A directory becomes ``step_<k>`` only once all its files are written, ``latest`` names a complete
checkpoint, and temp dirs left by a killed run are removed by the next save. A write that fails
(disk full, no permission) removes its temp dir and raises ``CheckpointError``; the checkpoints
already there stay as they were.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from core.utils import dist

LATEST = "latest"
STATE_FILE = "trainer_state.pt"  # written last: its presence marks a complete checkpoint


# what an earlier version's NumPy RNG state (a uint32 array) needs under weights_only=True; no
# object arrays, so still no arbitrary code
_NUMPY_RNG_GLOBALS = [getattr(getattr(np, "_core", None) or np.core, "multiarray")._reconstruct, np.ndarray,
                      np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or loaded; the message names the directory."""


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        # a run resumed with fewer visible GPUs restores the ones it has
        for i, st in enumerate(s["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st, i)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    out = []
    for p in Path(ckpt_dir).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def write_torch(obj, path) -> None:
    """``torch.save`` through a Python file, flushed and synced: a failed write (disk full, file
    too large) surfaces as the ``OSError`` behind torch's ``RuntimeError``."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _os_error(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def is_complete(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete ``step_<k>``; never a temp dir."""
    ptr = Path(ckpt_dir) / LATEST
    if ptr.is_file():
        name = ptr.read_text().strip()
        p = Path(ckpt_dir) / name
        if re.fullmatch(r"step_(\d+)", name) and p.is_dir() and is_complete(p):
            return p
    cks = [p for p in list_checkpoints(ckpt_dir) if is_complete(p)]
    return cks[-1] if cks else None


def save(ckpt_dir: Path, step: int, *, engine, state: dict, keep_last: int = 2) -> Path:
    """Save ``state`` (plain dict: rng, data position, step, config ...) plus the engine's states.

    Raises ``CheckpointError`` when a write fails (the temp dir is removed, earlier checkpoints
    and ``latest`` are left as they were).
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".tmp_step_{step}"
    stage, old = "creating the temp dir", None
    try:
        if dist.is_main():
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in list(ckpt_dir.glob(".tmp_step_*")) + list(ckpt_dir.glob(".old_step_*")):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
            tmp.mkdir(parents=True)
        dist.barrier()
        stage = "writing the model and optimizer states"
        engine.save_state(tmp)
        if dist.is_main():
            stage = f"writing {STATE_FILE}"
            write_torch(state, tmp / STATE_FILE)
        dist.barrier()
        if dist.is_main():
            stage = "moving it into place"
            if final.exists():  # set aside first: a step dir is never half deleted
                old = ckpt_dir / f".old_step_{step}"
                os.replace(final, old)
            os.replace(tmp, final)
            stage = f"updating '{LATEST}'"
            ptr_tmp = ckpt_dir / (LATEST + ".tmp")
            ptr_tmp.write_text(final.name + "\n")
            os.replace(ptr_tmp, ckpt_dir / LATEST)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                old = None
            for prev in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(prev, ignore_errors=True)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not final.exists():
                os.replace(old, final)  # the step dir set aside goes back
        prev = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        oe = _os_error(e)
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "a file is larger than allowed",
                errno.EEXIST: "a file is in the way", errno.ENOTDIR: "a file is in the way"
                }.get(getattr(oe, "errno", None), "the write failed")
        keep = (f"the previous checkpoint {prev} is intact and '{LATEST}' still names it" if prev is not None
                else "no earlier checkpoint exists")
        detail = f"{oe}" if oe is not None and oe is not e else f"{e}"
        raise CheckpointError(f"could not write checkpoint {final} ({stage}): {what}: {detail}; {keep}") from e
    dist.barrier()
    return final


def load(path: Path, *, engine) -> dict:
    """Load a checkpoint into ``engine``; returns the trainer state. Only tensors and plain
    containers are unpickled (``weights_only=True``); anything else raises ``CheckpointError``."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    why = "(written by an older version, damaged, or not a checkpoint)"
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):  # checkpoints of earlier versions
            state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: cannot be loaded with torch.load(weights_only=True) {why}: "
                              f"{e}") from e
    try:
        engine.load_state(path)
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: the engine state cannot be loaded with torch.load(weights_only=True) "
                              f"{why}: {e}") from e
    return state
