"""Metrics: one JSON object per line (``metrics.jsonl``), TensorBoard scalars, and a console log.

Only the main process writes. Values that are not finite numbers are kept in the JSONL as
strings ("nan", "inf") so that a bad step is visible, and skipped in TensorBoard and the other
trackers (Weights & Biases, MLflow: ``logging.report_to``, see ``core/utils/trackers.py``).
"""
from __future__ import annotations

import atexit
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
    """``metrics.jsonl`` always; TensorBoard, wandb and MLflow as ``report_to`` names them.

    ``report_to=None`` (callers that do not pass it) keeps JSONL + TensorBoard (``tensorboard=False``:
    JSONL only); a list or string of tracker names (``tensorboard``, ``wandb``, ``mlflow``; ``none`` or
    ``[]``: JSONL only) picks them. ``config`` (the resolved config as a dict) goes to wandb's run config
    and MLflow's params. A named tracker whose package is missing raises ``TrackerError`` naming the
    package and the pip extra. A logger that appends to an existing ``metrics.jsonl`` (a resumed run)
    continues the tracker runs recorded in ``trackers.json`` beside it.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 filename: str = "metrics.jsonl", *, report_to=None, config: dict | None = None,
                 project: str = "", run_name: str = "", wandb_mode: str = "", wandb_entity: str = "",
                 mlflow_tracking_uri: str = ""):
        from core.utils import trackers as T
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self.tb = None
        self.trackers: list = []
        if not enabled:
            return
        names = (["tensorboard"] if tensorboard else []) if report_to is None else T.normalize_report_to(report_to)
        T.check_installed([n for n in names if n != "tensorboard"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resume = self.path.is_file() and self.path.stat().st_size > 0
        self.trackers = T.start(names, out_dir, config=config, project=project,
                                run_name=run_name or str(out_dir), wandb_mode=wandb_mode,
                                wandb_entity=wandb_entity, mlflow_tracking_uri=mlflow_tracking_uri, resume=resume)
        if self.trackers:  # a run that dies before close() still ends its tracker runs, as failed
            atexit.register(self._close_at_exit)
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                logging.getLogger(__name__).warning("TensorBoard disabled: %s", e)

    @classmethod
    def from_config(cls, out_dir: str | Path, cfg, enabled: bool = True, filename: str = "metrics.jsonl"):
        """A logger for a training config (``core.config.TrainConfig``): its ``logging`` section picks the
        trackers, and the whole resolved config goes to them."""
        import dataclasses
        lg = getattr(cfg, "logging", None)
        get = lambda k, d="": getattr(lg, k, d) if lg is not None else d  # noqa: E731
        return cls(out_dir, enabled=enabled, filename=filename, report_to=get("report_to", ["tensorboard"]),
                   config=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
                   project=get("project"), run_name=get("run_name") or str(getattr(cfg, "output_dir", out_dir)),
                   wandb_mode=get("wandb_mode"), wandb_entity=get("wandb_entity"),
                   mlflow_tracking_uri=get("mlflow_tracking_uri"))

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
        if self.trackers:
            from core.utils.trackers import finite_scalars
            scalars = finite_scalars(metrics)
            for t in self.trackers:
                try:
                    t.log(step, scalars)
                except Exception as e:  # noqa: BLE001 - a tracker's server going away must not stop training
                    t.failures = getattr(t, "failures", 0) + 1
                    if t.failures in (1, 10, 100) or t.failures % 1000 == 0:
                        logging.getLogger(__name__).warning(
                            "%s: step %s not logged (%d failure(s) so far; metrics.jsonl has it): %s",
                            t.name, step, t.failures, e)

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

    def close(self, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(failed=failed)
            except Exception as e:  # noqa: BLE001 - one tracker failing to close must not hide the others
                logging.getLogger(__name__).warning("%s: closing the run failed: %s", t.name, e)
        if trackers:
            atexit.unregister(self._close_at_exit)

    def _close_at_exit(self) -> None:
        self.close(failed=True)
