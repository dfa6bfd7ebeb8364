"""Experiment trackers: Weights & Biases and MLflow get the same records as metrics.jsonl.

Both are optional packages, both disabled by default (config `logging`):
  logging.wandb: online | offline   wandb.init in RUN_DIR/wandb; offline needs no network (`wandb sync`
                                     uploads it later). The run id is kept in RUN_DIR/wandb_run_id, so a
                                     resumed run continues the same W&B run.
  logging.mlflow: enabled            an MlflowClient on logging.mlflow_uri, else $MLFLOW_TRACKING_URI,
                                     else the SQLite store RUN_DIR/mlflow.db (no server, no network;
                                     MLflow 3 refuses its old ./mlruns file store by default).
                                     The run id is kept in RUN_DIR/mlflow_run_id likewise.
A record {"kind": "train", "step": 10, "loss": 5.1, ...} is logged as `train/loss` etc. at step 10,
the names TensorBoard gets. Only the main rank opens trackers (metrics.py). A tracker asked for but not
installed is a one-line config error at start, not a crash mid-run.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

from evertrain.pretrain.config import Config, ConfigError, to_dict

WANDB_ID_FILE = "wandb_run_id"
MLFLOW_ID_FILE = "mlflow_run_id"


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record under TensorBoard-style names: {"train/loss": 5.1, ...}."""
    kind = record["kind"]
    return {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key not in ("kind", "step", "time")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def _require(module: str, key: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}: the {package} package is not installed (pip install {package})") from None


def _flat_config(cfg: Config) -> dict[str, str]:
    """The config as `section.key` -> string, the form MLflow params take."""
    return {
        f"{section}.{key}": json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        for section, values in to_dict(cfg).items()
        for key, value in values.items()
    }


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path):
        wandb = _require("wandb", "logging.wandb", "wandb")
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.logging.project,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            mode=cfg.logging.wandb,
            dir=str(run_dir),
            config=to_dict(cfg),
        )
        if run_id is None:
            id_file.write_text(self.run.id + "\n")

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MLflowSink:
    def __init__(self, cfg: Config, run_dir: Path):
        tracking = _require("mlflow.tracking", "logging.mlflow", "mlflow")
        entities = _require("mlflow.entities", "logging.mlflow", "mlflow")
        self.Metric = entities.Metric
        uri = (
            cfg.logging.mlflow_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        )
        self.client = tracking.MlflowClient(tracking_uri=uri)
        id_file = run_dir / MLFLOW_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        experiment = self.client.get_experiment_by_name(cfg.logging.project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.logging.project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        # MLflow's limit
        params = [entities.Param(key, value[:500]) for key, value in _flat_config(cfg).items()]
        self.client.log_batch(self.run_id, params=params)
        id_file.write_text(self.run_id + "\n")

    def write(self, record: dict) -> None:
        ms = int(record.get("time", time.time()) * 1000)
        metrics = [self.Metric(key, value, ms, record["step"]) for key, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def check_installed(cfg: Config) -> None:
    """On every rank before training: a missing tracker package is the same one-line error everywhere
    (only the main rank opens trackers, and a lone failing rank would leave the others waiting)."""
    if cfg.logging.wandb != "disabled":
        _require("wandb", "logging.wandb", "wandb")
    if cfg.logging.mlflow != "disabled":
        _require("mlflow.tracking", "logging.mlflow", "mlflow")


def open_sinks(cfg: Config, run_dir: Path) -> list:
    """The trackers `cfg.logging` asks for (call on the main rank only)."""
    sinks = []
    if cfg.logging.wandb != "disabled":
        sinks.append(WandbSink(cfg, run_dir))
    if cfg.logging.mlflow != "disabled":
        sinks.append(MLflowSink(cfg, run_dir))
    return sinks
