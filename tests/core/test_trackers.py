"""Experiment trackers (``logging.report_to``): Weights & Biases in offline mode and MLflow with a
local SQLite store, read back after logging through ``MetricsLogger`` and after a short real
training run; the config's tracker names checked; and a missing package named with its extra.

Nothing here touches the network: wandb runs offline (its stats, metadata, git and error reporting
off), MLflow writes a SQLite file under the test's folder, and both telemetries are off.
"""
from __future__ import annotations

import importlib.util
import json
import math
import struct
import time
from pathlib import Path

import pytest

from core import config as C
from core.utils import trackers as T
from core.utils.logging import MetricsLogger

# MLflow's SQLite store with SQLAlchemy 2.1 warns about a loader strategy of its own
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _offline_env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb_home"
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                 "WANDB_ERROR_REPORTING": "false", "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_META": "true",
                 "WANDB_X_DISABLE_MACHINE_INFO": "true", "WANDB_CONFIG_DIR": str(home / "config"),
                 "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
                 "WANDB_ARTIFACT_DIR": str(home / "artifacts"), "MLFLOW_DISABLE_TELEMETRY": "true",
                 "DO_NOT_TRACK": "true"}


_INHERITED = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY",
              "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def offline_trackers(tmp_path, monkeypatch):
    """wandb offline with its folders in tmp_path; no MLflow / wandb telemetry; no inherited URIs."""
    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    for k in _INHERITED:
        monkeypatch.delenv(k, raising=False)
    return tmp_path / "wandb_dir"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """The URI of an MLflow store made once per session by a MetricsLogger with no URI given: the
    default, SQLite under its output directory (creating one runs MLflow's schema migrations, several
    seconds, so the tests below share it and find their runs by id)."""
    pytest.importorskip("sqlalchemy")
    root = tmp_path_factory.mktemp("mlflow_default")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _offline_env(root).items():
            mp.setenv(k, v)
        for k in _INHERITED:
            mp.delenv(k, raising=False)
        lg = MetricsLogger(root / "run", report_to=["mlflow"], config={"method": "sft"})
        lg.log(1, {"loss": 1.0})
        lg.close()
    uri = tracker_state(root / "run")["mlflow"]["uri"]
    assert uri == T.default_mlflow_uri(root / "run") == f"sqlite:///{root / 'run' / 'mlflow.db'}"
    assert (root / "run" / "mlflow.db").is_file()
    return uri


# ----------------------------------------------------------------------------- reading back
def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (a LevelDB-style log: a 7-byte
    ``:W&B`` header, then 32 KiB blocks of chunks, each a 7-byte header -- crc32, length, type
    full/first/middle/last -- and its data)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a wandb transaction log"
    block, pos, records, parts = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def wandb_run(wandb_dir: Path, run_id: str) -> dict:
    """What an offline run stored: its name, project, config and history rows (``_step`` included)."""
    files = sorted(Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert files, f"no offline run {run_id} under {wandb_dir}/wandb: {list(Path(wandb_dir).rglob('*'))[:20]}"
    out = {"name": None, "project": None, "config": {}, "history": [], "folders": files}
    for f in files:
        # wandb's service process may still be writing the file when run.finish() returns: wait for
        # the run's last record ("exit")
        deadline = time.monotonic() + 60
        while True:
            records = read_wandb_records(f)
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert any(r.WhichOneof("record_type") == "run" for r in records), \
            f"{f}: no run record in {[r.WhichOneof('record_type') for r in records]}"
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["name"], out["project"] = rec.run.display_name, rec.run.project
                for it in rec.run.config.update:
                    out["config"][it.key] = json.loads(it.value_json)
            elif kind == "config":
                for it in rec.config.update:
                    out["config"][it.key] = json.loads(it.value_json)
            elif kind == "history":
                out["history"].append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                                       for it in rec.history.item})
    return out


def _value(v):  # wandb's config values are stored as {"value": ...}
    return v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} else v


def mlflow_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def tracker_state(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / T.STATE_FILE).read_text())


# ----------------------------------------------------------------------------- MetricsLogger
CONFIG = {"method": "sft", "output_dir": "exp/x", "optim": {"lr": 0.01, "betas": [0.9, 0.999]},
          "teacher": {"api_key": "sk-secret", "url": "http://h:8000"},
          "grpo": {"rewards": {"accuracy": 1.0}}, "model": {"lora": {}}, "data": {"prompt": "p" * 7000}}


def test_wandb_offline_gets_finite_metrics_and_the_config(tmp_path, offline_trackers):
    out = tmp_path / "run"
    lg = MetricsLogger(out, report_to=["wandb"], config=CONFIG, run_name="unit", project="proj")
    assert lg.tb is None and [t.name for t in lg.trackers] == ["wandb"]
    for step in (1, 2, 3):
        lg.log(step, {"loss": 1.0 / step, "lr": 0.01, "bad": float("nan") if step == 2 else 0.5,
                      "flag": True, "note": "text"})
    lg.close()
    run_id = tracker_state(out)["wandb"]["id"]
    run = wandb_run(offline_trackers, run_id)
    assert run["name"] == "unit" and run["project"] == "proj"
    assert _value(run["config"]["method"]) == "sft" and _value(run["config"]["optim"]) == CONFIG["optim"]
    assert _value(run["config"]["teacher"]) == {"api_key": "<redacted>", "url": "http://h:8000"}  # no secret sent
    hist = {int(r["_step"]): r for r in run["history"]}
    assert sorted(hist) == [1, 2, 3]
    assert [hist[s]["loss"] for s in (1, 2, 3)] == [1.0, 0.5, 1.0 / 3]
    assert "bad" not in hist[2] and hist[3]["bad"] == 0.5  # non-finite values are not sent
    assert not any("flag" in r or "note" in r for r in hist.values())
    # the JSONL keeps everything, as before
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["bad"] == "nan" and rows[0]["note"] == "text"

    # a run that continues this metrics.jsonl (train.resume: auto) continues the same wandb run
    lg = MetricsLogger(out, report_to="wandb", config=CONFIG, run_name="unit", project="proj")
    assert lg.trackers[0].id == run_id
    lg.log(4, {"loss": 0.25})
    lg.close()
    hist = {int(r["_step"]): r["loss"] for r in wandb_run(offline_trackers, run_id)["history"] if "loss" in r}
    assert hist == {1: 1.0, 2: 0.5, 3: 1.0 / 3, 4: 0.25}


def test_mlflow_local_store_gets_metrics_and_flattened_params(tmp_path, monkeypatch, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)  # the session's store, made with the default URI
    out = tmp_path / "run"
    lg = MetricsLogger(out, report_to=["mlflow"], config=CONFIG, run_name="unit", project="proj")
    assert not (out / "mlflow.db").exists()
    for step in (1, 2, 3):
        lg.log(step, {"loss": 1.0 / step, "dev/wer": 0.5, "bad": float("inf") if step == 2 else 0.5,
                      "flag": False, "note": "text"})
    lg.close()
    state = tracker_state(out)["mlflow"]
    assert state["uri"] == mlflow_store
    client, run = mlflow_run(mlflow_store, state["run_id"])
    assert run.info.run_name == "unit" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    hist = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(hist) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "bad")) == [1, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dev/wer")] == [1, 2, 3]
    assert "flag" not in run.data.metrics and "note" not in run.data.metrics
    p = run.data.params
    assert p["method"] == "sft" and float(p["optim.lr"]) == 0.01 and json.loads(p["optim.betas"]) == [0.9, 0.999]
    assert p["grpo.rewards.accuracy"] == "1.0" and p["model.lora"] == "{}"
    assert p["teacher.api_key"] == "<redacted>" and p["teacher.url"] == "http://h:8000"
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    assert len(p["data.prompt"]) == MAX_PARAM_VAL_LENGTH and p["data.prompt"].endswith("...")  # cut to the limit

    # a continued metrics.jsonl continues the MLflow run; a changed config key keeps its first value
    lg = MetricsLogger(out, report_to="mlflow", config=dict(CONFIG, method="grpo"), run_name="unit", project="proj")
    assert lg.trackers[0].run_id == state["run_id"]
    lg.log(4, {"loss": 0.25})
    lg.close()
    _, run = mlflow_run(mlflow_store, state["run_id"])
    assert run.data.params["method"] == "sft" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    # a fresh metrics.jsonl starts a new run
    (out / "metrics.jsonl").unlink()
    lg = MetricsLogger(out, report_to="mlflow", config=CONFIG)
    assert lg.trackers[0].run_id != state["run_id"]
    lg.close()


def test_existing_callers_keep_jsonl_and_tensorboard(tmp_path):
    lg = MetricsLogger(tmp_path / "a")
    assert lg.tb is not None and lg.trackers == []
    lg.log(1, {"loss": 1.0})
    lg.close()
    assert list((tmp_path / "a" / "tensorboard").iterdir()) and not (tmp_path / "a" / T.STATE_FILE).exists()
    lg = MetricsLogger(tmp_path / "b", tensorboard=False)
    assert lg.tb is None and lg.trackers == []
    lg.close()
    for none in ("none", [], None, "NONE"):
        lg = MetricsLogger(tmp_path / "c", report_to=none if none is not None else [])
        assert lg.tb is None and lg.trackers == []
        lg.close()
    lg = MetricsLogger(tmp_path / "d", enabled=False, report_to=["wandb", "mlflow"])  # not the main process
    assert lg.trackers == [] and not (tmp_path / "d").exists()
    lg.log(1, {"loss": 1.0})
    lg.close()


def test_a_failing_tracker_does_not_stop_logging(tmp_path, caplog):
    class Down:
        name = "mlflow"
        closed = None

        def log(self, step, scalars):
            raise ConnectionError("server gone")

        def close(self, failed=False):
            self.closed = failed

    lg = MetricsLogger(tmp_path, report_to=[])
    down = Down()
    lg.trackers = [down]
    for step in (1, 2):
        lg.log(step, {"loss": 1.0})
    lg.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert down.failures == 2 and down.closed is False and "server gone" in caplog.text


# ----------------------------------------------------------------------------- config and packages
BASE = ["model.path=m", "data.train=t.jsonl", "data.prompt=p"]


def test_report_to_config_names_are_checked():
    cfg = C.load_config(overrides=BASE)
    assert cfg.logging.report_to == ["tensorboard"]
    for given, want in (("none", []), ("[]", []), ("wandb", ["wandb"]), ("'wandb, mlflow'", ["wandb", "mlflow"]),
                        ("[tensorboard, WandB, mlflow, wandb]", ["tensorboard", "wandb", "mlflow"])):
        assert C.load_config(overrides=BASE + [f"logging.report_to={given}"]).logging.report_to == want
    for bad in ("[tensorboard, wandbb]", "comet", "[none, wandb]", "3"):
        with pytest.raises(C.ConfigError) as e:
            C.load_config(overrides=BASE + [f"logging.report_to={bad}"])
        msg = str(e.value)
        assert "'logging.report_to'" in msg and "tensorboard, wandb, mlflow" in msg, msg
    with pytest.raises(C.ConfigError, match="logging.wandb_mode"):
        C.load_config(overrides=BASE + ["logging.wandb_mode=offlin"])
    cfg = C.TrainConfig()  # built in code, then validated: the same check
    cfg.model.path, cfg.data.train, cfg.data.prompt, cfg.logging.report_to = "m", "t", "p", ["mlflw"]
    with pytest.raises(C.ConfigError, match="logging.report_to"):
        C.validate(cfg)


def test_train_cli_refuses_an_unknown_tracker(tmp_path, capsys):
    from core.bin.train import main
    out = tmp_path / "out"
    assert main(BASE + [f"output_dir={out}", "logging.report_to=[tensorboard, wandbb]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config key 'logging.report_to': 'wandbb' is not a tracker")
    assert not out.exists()


@pytest.mark.parametrize("tracker,package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_package_is_named_with_its_extra(tmp_path, monkeypatch, tracker, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(overrides=BASE + [f"logging.report_to=[tensorboard, {tracker}]"])
    msg = str(e.value)
    assert "'logging.report_to'" in msg and f"'{package}' is not installed" in msg
    assert "pip install 'audio-posttrain[trackers]'" in msg, msg
    with pytest.raises(T.TrackerError, match=r"audio-posttrain\[trackers\]"):
        MetricsLogger(tmp_path / "x", report_to=[tracker])
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_rest_rounds_log_into_the_rest_runs_store_under_their_own_names():
    from core.rest import round_config
    cfg = C.load_config(overrides=BASE + ["method=rest", "output_dir=exp/r", "rest.rewards={wer: 1.0}", "rest.rounds=2",
                                          "rest.lrs=[0.1, 0.1]", "logging.report_to=[wandb, mlflow]",
                                          "logging.run_name=mine"])
    rc = round_config(cfg, 1, Path("kept.jsonl"), "m", 3, 0.0)
    assert rc.logging.run_name == "mine/round_1" and rc.output_dir == str(Path("exp/r") / "round_1")
    assert rc.logging.mlflow_tracking_uri == T.default_mlflow_uri(Path("exp/r"))
    assert cfg.logging.run_name == "mine" and cfg.logging.mlflow_tracking_uri == ""


# ----------------------------------------------------------------------------- a real training run
def test_training_run_reports_the_loss_to_every_tracker(train_config, tiny, tmp_path, offline_trackers, one_thread,
                                                       mlflow_store):
    from core.bin.train import main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = train_config("trk", train={"batch_size": 2, "max_steps": 3, "seed": 0, "log_every": 1},
                       logging={"report_to": ["tensorboard", "wandb", "mlflow"], "run_name": "tiny-sft",
                                "mlflow_tracking_uri": mlflow_store})
    assert main(["--config", str(cfg)]) == 0
    out = tmp_path / "trk"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(loss) == [1, 2, 3] and all(math.isfinite(v) for v in loss.values())
    state = tracker_state(out)

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(tb) == [1, 2, 3] and all(math.isclose(tb[s], loss[s], rel_tol=1e-6) for s in loss)

    run = wandb_run(offline_trackers, state["wandb"]["id"])
    wb = {int(r["_step"]): r["loss"] for r in run["history"] if "loss" in r}
    assert wb == loss and run["name"] == "tiny-sft"
    assert _value(run["config"]["method"]) == "sft" and _value(run["config"]["train"])["max_steps"] == 3

    assert state["mlflow"]["uri"] == mlflow_store
    client, mrun = mlflow_run(mlflow_store, state["mlflow"]["run_id"])
    ml = {m.step: m.value for m in client.get_metric_history(mrun.info.run_id, "loss")}
    assert ml == loss and mrun.info.status == "FINISHED" and mrun.info.run_name == "tiny-sft"
    assert mrun.data.params["method"] == "sft" and mrun.data.params["train.max_steps"] == "3"
    assert mrun.data.params["logging.report_to"] == json.dumps(["tensorboard", "wandb", "mlflow"])
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(mrun.data.metrics)


def test_rest_run_and_its_rounds_report_to_the_trackers(train_config, tiny, tmp_path, offline_trackers, one_thread,
                                                        mlflow_store):
    from core.bin.train import main
    cfg = train_config("rest", method="rest", rollout={"max_new_tokens": 6}, train={"batch_size": 4},
                       rest={"rounds": 1, "samples": 2, "rewards": {"wer": 1.0}, "lrs": [1e-2], "steps_per_round": 2,
                             "keep_min_reward": -1e9},
                       logging={"report_to": ["wandb", "mlflow"], "run_name": "rest-run",
                                "mlflow_tracking_uri": mlflow_store})
    assert main(["--config", str(cfg)]) == 0
    out = tmp_path / "rest"
    top, rnd = tracker_state(out), tracker_state(out / "round_0")
    assert top["wandb"]["id"] != rnd["wandb"]["id"] and top["mlflow"]["run_id"] != rnd["mlflow"]["run_id"]
    assert top["mlflow"]["uri"] == rnd["mlflow"]["uri"] == mlflow_store
    client, run = mlflow_run(mlflow_store, top["mlflow"]["run_id"])
    assert run.info.run_name == "rest-run" and run.data.params["method"] == "rest"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kept_share")] == [1]
    _, sft = mlflow_run(mlflow_store, rnd["mlflow"]["run_id"])
    assert sft.info.run_name == "rest-run/round_0" and sft.data.params["method"] == "sft"
    assert sorted(m.step for m in client.get_metric_history(sft.info.run_id, "loss")) == [1, 2]
    assert wandb_run(offline_trackers, top["wandb"]["id"])["name"] == "rest-run"
    wb = wandb_run(offline_trackers, rnd["wandb"]["id"])
    assert wb["name"] == "rest-run/round_0" and sorted(int(r["_step"]) for r in wb["history"] if "loss" in r) == [1, 2]
