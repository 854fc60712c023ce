"""Atomic training checkpoints: ``<dir>/step_<k>`` written to a temp dir and renamed, a
``latest`` pointer file replaced atomically, the last K kept.

A checkpoint holds the model, optimizer and scheduler states, the Python / NumPy / torch RNG
states, the data position, the step and the resolved config, so a resumed CPU run matches an
uninterrupted one exactly. With DeepSpeed, the engine writes model and optimizer (each rank its
own shards) inside the same directory layout.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from core.utils import dist

LATEST = "latest"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    out = []
    for p in Path(ckpt_dir).glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ptr = Path(ckpt_dir) / LATEST
    if ptr.is_file():
        p = Path(ckpt_dir) / ptr.read_text().strip()
        if p.is_dir():
            return p
    cks = list_checkpoints(ckpt_dir)
    return cks[-1] if cks else None


def save(ckpt_dir: Path, step: int, *, engine, state: dict, keep_last: int = 2) -> Path:
    """Save ``state`` (plain dict: rng, data position, step, config ...) plus the engine's states."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".tmp_step_{step}"
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_state(tmp)
    if dist.is_main():
        torch.save(state, tmp / "trainer_state.pt")
    dist.barrier()
    if dist.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = ckpt_dir / (LATEST + ".tmp")
        ptr_tmp.write_text(final.name + "\n")
        os.replace(ptr_tmp, ckpt_dir / LATEST)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, *, engine) -> dict:
    engine.load_state(Path(path))
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
