"""Metrics: one JSON object per line (``metrics.jsonl``), TensorBoard scalars, and a console log.

Only the main process writes. Values that are not finite numbers are kept in the JSONL as
strings ("nan", "inf") so that a bad step is visible, and skipped in TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path


def setup_console(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=False)
    # one INFO line per HTTP request (a remote teacher sends one per sample) would bury the log
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


class MetricsLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                logging.getLogger(__name__).warning("TensorBoard disabled: %s", e)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = float(v)
                row[k] = v if math.isfinite(v) else str(v)
                if self.tb is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            else:
                row[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (a resumed run does them again; event rows such as a
        teacher failure stay) and any line cut short by a kill; the file is replaced atomically."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and ("event" in row or not isinstance(row.get("step"), int)
                                          or row["step"] <= step):
                keep.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
