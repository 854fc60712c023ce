"""``python -m core.bin.train`` that SIGKILLs itself half-way through writing a checkpoint.

    python tests/reliability/kill_child.py STEP --config cfg.yaml [key=value ...]

The first file written into the temp dir of checkpoint ``STEP`` gets half of its bytes, is
flushed to disk, and the process sends itself SIGKILL: a crash in the middle of a checkpoint
write, at a known place. Everything else is the real CLI.
"""
from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

import torch


def main() -> int:
    step = int(sys.argv[1])
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
        if Path(str(name)).parent.name == f".tmp_step_{step}":
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(name, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from core.bin.train import main as train_main

    return train_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
