"""Experiment trackers behind :class:`core.utils.logging.MetricsLogger`: Weights & Biases and MLflow.

``logging.report_to`` names them as transformers' Trainer does: ``tensorboard``, ``wandb``,
``mlflow`` (``none`` or ``[]``: ``metrics.jsonl`` only). Each tracker gets the resolved config once
(wandb's run config; MLflow params, flattened to ``section.key``) and every finite numeric metric of
every logged step. Nothing here talks to a server unless the user's settings say so: wandb follows
``logging.wandb_mode`` / ``$WANDB_MODE`` (``offline`` writes the run under the output directory, to
``wandb sync`` later), and MLflow writes to a local SQLite store, ``<output_dir>/mlflow.db``, unless
``logging.mlflow_tracking_uri`` / ``$MLFLOW_TRACKING_URI`` name another.

The ids of the tracker runs are kept in ``<output_dir>/trackers.json``: a run that continues an
earlier one's ``metrics.jsonl`` (``train.resume: auto``) continues the same tracker runs too.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
# tracker -> (module to import, pip package, extra of this project that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard", None),
            "wandb": ("wandb", "wandb", "trackers"),
            "mlflow": ("mlflow", "mlflow-skinny", "trackers")}
DIST_NAME = "audio-posttrain"
STATE_FILE = "trackers.json"


class TrackerError(RuntimeError):
    """A tracker that is unknown, not installed, or could not start a run."""


def normalize_report_to(report_to) -> list[str]:
    """``report_to`` as a list of tracker names without repeats. Accepts a list, a string (one name, or
    several separated by commas or spaces), ``none`` / ``[]`` / ``None`` (no tracker). Raises
    :class:`TrackerError` naming the valid trackers for anything else."""
    if report_to is None:
        return []
    if isinstance(report_to, str):
        items = [s for s in re.split(r"[,\s]+", report_to) if s]
    elif isinstance(report_to, (list, tuple)):
        items = list(report_to)
    else:
        raise TrackerError(f"expected a list of tracker names, got {report_to!r}; valid: {', '.join(TRACKERS)} "
                           "(none or [] = metrics.jsonl only)")
    out: list[str] = []
    for it in items:
        name = it.strip().lower() if isinstance(it, str) else it
        if name == "none" and len(items) == 1:
            return []
        if name not in TRACKERS:
            raise TrackerError(f"{it!r} is not a tracker; valid: {', '.join(TRACKERS)} "
                               "(none or [] = metrics.jsonl only)")
        if name not in out:
            out.append(name)
    return out


def missing_package(name: str) -> str | None:
    """Why tracker ``name`` cannot run here (its package is not installed), else None."""
    module, package, extra = PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    how = f"pip install '{DIST_NAME}[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
    return f"{name} is named but its package '{package}' is not installed: {how}"


def check_installed(names) -> None:
    """Raise :class:`TrackerError` for the first tracker of ``names`` whose package is missing."""
    for n in names:
        why = missing_package(n)
        if why:
            raise TrackerError(why)


def finite_scalars(metrics: dict) -> dict:
    """The entries of ``metrics`` that trackers take: finite int/float values (bools excluded)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def flatten(d, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_SECRET = re.compile(r"(^|_)(api_?key|token|secret|password)$", re.I)


def redact(d):
    """``d`` with the values of secret-looking keys (``teacher.api_key``, ``*token*``, ...) replaced:
    the config goes to a tracker's server, and a key never should."""
    if isinstance(d, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) and isinstance(v, str) and v else redact(v))
                for k, v in d.items()}
    if isinstance(d, list):
        return [redact(v) for v in d]
    return d


def _read_state(out_dir: Path) -> dict:
    try:
        st = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
        return st if isinstance(st, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(out_dir: Path, state: dict) -> None:
    p = out_dir / STATE_FILE
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, p)


class WandbTracker:
    """One wandb run: ``wandb.init`` (its own run object, so several can be open in one process, e.g.
    a ReST run and its rounds), ``run.log(metrics, step=step)``, ``run.finish``."""
    name = "wandb"

    def __init__(self, out_dir: Path, *, project: str, run_name: str, config: dict | None, mode: str = "",
                 entity: str = "", resume_id: str | None = None):
        import wandb
        kw = dict(project=project or os.environ.get("WANDB_PROJECT") or DIST_NAME, name=run_name or None,
                  dir=os.environ.get("WANDB_DIR") or str(out_dir), config=config or {},
                  entity=entity or None, reinit="create_new")
        mode = mode or os.environ.get("WANDB_MODE") or None
        if mode:
            kw["mode"] = mode
        if resume_id:
            kw.update(id=resume_id, resume="allow")
        Path(kw["dir"]).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(**kw)
        except Exception as e:  # noqa: BLE001 - wandb raises its own types (no login, no network, ...)
            raise TrackerError(f"wandb could not start a run ({type(e).__name__}: {e}); to log without a "
                               "server set logging.wandb_mode=offline (or WANDB_MODE=offline) and "
                               "'wandb sync' the run later") from e
        self.id = self.run.id
        self.dir = getattr(self.run, "dir", None)

    def log(self, step: int, scalars: dict) -> None:
        if scalars:
            self.run.log(scalars, step=int(step))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def state(self) -> dict:
        return {"id": self.id}


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")


def _mlflow_key(k: str) -> str:
    return _MLFLOW_BAD.sub("_", k)[:250]


class MlflowTracker:
    """One MLflow run through an ``MlflowClient`` bound to the tracking URI (no global active run, so
    several can be open in one process): the flattened resolved config as params, each step's
    metrics with ``step=``, the run terminated on close."""
    name = "mlflow"

    def __init__(self, out_dir: Path, *, project: str, run_name: str, config: dict | None,
                 tracking_uri: str = "", resume: dict | None = None):
        from mlflow.tracking import MlflowClient
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(out_dir)
        if self.uri.startswith("sqlite:"):  # mlflow-skinny leaves out what a SQLite store needs
            lack = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
            if lack:
                raise TrackerError(f"mlflow: the store {self.uri} needs {' and '.join(lack)}, not installed: "
                                   f"pip install '{DIST_NAME}[trackers]' (or pip install {' '.join(lack)})")
        self.client = MlflowClient(tracking_uri=self.uri)
        exp_name = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DIST_NAME
        self.run_id = None
        if resume and resume.get("uri") == self.uri and resume.get("run_id"):
            try:
                self.client.get_run(resume["run_id"])
                self.run_id = resume["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception as e:  # noqa: BLE001 - the store was moved or cleaned: start a new run
                log.warning("mlflow: cannot continue run %s (%s); starting a new one", resume["run_id"], e)
                self.run_id = None
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
            tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "core.bin.train"}
            if os.environ.get("USER"):
                tags["mlflow.user"] = os.environ["USER"]
            run = self.client.create_run(exp_id, run_name=run_name or None, tags=tags)
            self.run_id = run.info.run_id
        if config:
            self._log_params(flatten(config))

    def _log_params(self, flat: dict) -> None:
        from mlflow.entities import Param
        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as max_len
        except ImportError:  # pragma: no cover - older MLflow
            max_len = 500
        have = self.client.get_run(self.run_id).data.params
        params, changed = [], []
        for k, v in flat.items():
            key = _mlflow_key(k)
            val = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            if len(val) > max_len:  # MLflow refuses longer values: keep the head, mark the cut
                val = val[: max_len - 3] + "..."
            if key in have:
                if have[key] != val:
                    changed.append(key)
                continue
            params.append(Param(key, val))
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if changed:  # a param cannot change in MLflow: the continued run keeps the first value
            log.warning("mlflow: run %s continues with changed config keys (first values kept): %s",
                        self.run_id, ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""))

    def log(self, step: int, scalars: dict) -> None:
        if not scalars:
            return
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, ts, int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def state(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id}


def default_mlflow_uri(out_dir: Path) -> str:
    """A local store under the output directory: the SQLite file ``<output_dir>/mlflow.db`` (MLflow 3
    refuses its older ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``)."""
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlflow.db').as_posix()}"


def start(names, out_dir: str | Path, *, config: dict | None = None, project: str = "", run_name: str = "",
          wandb_mode: str = "", wandb_entity: str = "", mlflow_tracking_uri: str = "",
          resume: bool = False) -> list:
    """Start a run in each of the trackers ``names`` (tensorboard excluded: MetricsLogger writes it);
    with ``resume``, continue the runs recorded in ``<out_dir>/trackers.json``."""
    out_dir = Path(out_dir)
    names = [n for n in names if n != "tensorboard"]
    if not names:
        return []
    check_installed(names)
    prev = _read_state(out_dir) if resume else {}
    config = redact(config) if config else config
    started: list = []
    try:
        for n in names:
            if n == "wandb":
                started.append(WandbTracker(out_dir, project=project, run_name=run_name, config=config,
                                            mode=wandb_mode, entity=wandb_entity,
                                            resume_id=(prev.get("wandb") or {}).get("id")))
            elif n == "mlflow":
                started.append(MlflowTracker(out_dir, project=project, run_name=run_name, config=config,
                                             tracking_uri=mlflow_tracking_uri, resume=prev.get("mlflow")))
    except BaseException:
        for t in started:
            try:
                t.close(failed=True)
            except Exception:  # noqa: BLE001
                pass
        raise
    _write_state(out_dir, {t.name: t.state() for t in started})
    return started
