"""W&B and MLflow get the same records as metrics.jsonl (tested with stand-ins for both packages injected
into sys.modules: neither is installed here); train records carry step time, MFU and peak memory, eval
records their time; model FLOPs per token match a count of the model's matmul weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

from evertrain.pretrain import engines, loop
from evertrain.pretrain.config import ConfigError, load_config
from evertrain.pretrain.data.stream import TokenStream
from evertrain.pretrain.model import hardware
from evertrain.pretrain.model.transformer import Transformer, flops_per_token, flops_per_token_torchtitan
from evertrain.pretrain.observe.loggers import scalars

REPO = Path(__file__).resolve().parents[1]


class FakeWandb(ModuleType):
    """wandb.init(...) -> a run with .id, .log(dict, step=), .finish(); every call recorded."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs["id"] or "run-abc123"

            def log(self, data, step):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        return Run()


def fake_mlflow() -> tuple[dict[str, ModuleType], SimpleNamespace]:
    """mlflow, mlflow.tracking (MlflowClient) and mlflow.entities (Metric, Param), recording calls."""
    calls = SimpleNamespace(clients=[], experiments=[], runs=[], metrics=[], params=[], terminated=[])

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.timestamp, self.step = key, value, timestamp, step

    class Param:
        def __init__(self, key, value):
            self.key, self.value = key, value

    class MlflowClient:
        def __init__(self, tracking_uri):
            calls.clients.append(tracking_uri)

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            calls.experiments.append(name)
            return "7"

        def create_run(self, experiment_id, run_name):
            calls.runs.append((experiment_id, run_name))
            return SimpleNamespace(info=SimpleNamespace(run_id="mlrun-1"))

        def log_batch(self, run_id, metrics=(), params=()):
            calls.metrics += [(run_id, m.step, m.key, m.value) for m in metrics]
            calls.params += [(p.key, p.value) for p in params]

        def set_terminated(self, run_id):
            calls.terminated.append(run_id)

    root, tracking, entities = (
        ModuleType("mlflow"),
        ModuleType("mlflow.tracking"),
        ModuleType("mlflow.entities"),
    )
    tracking.MlflowClient = MlflowClient
    entities.Metric, entities.Param = Metric, Param
    root.tracking, root.entities = tracking, entities
    return {"mlflow": root, "mlflow.tracking": tracking, "mlflow.entities": entities}, calls


def train_run(data: Path, run_dir: Path, steps: int, *extra: str) -> list[dict]:
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            "model.vocab_size=512",
            "train.micro_batch_size=2",
            "train.log_every=1",
            "eval.every_steps=2",
            "eval.batches=1",
            "checkpoint.every_steps=2",
            "engine.name=single",
            f"train.max_steps={steps}",
            *extra,
        ],
    )
    from evertrain.pretrain.checkpoint import CheckpointManager

    engine = engines.create(cfg)
    ckpt = CheckpointManager(run_dir, cfg, engine)
    try:
        loop.train(cfg, run_dir, engine, TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed), ckpt)
    finally:
        ckpt.close()
        engine.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_wandb_and_mlflow_get_the_metrics_records_and_resume_their_runs(tiny_data, tmp_path, monkeypatch):
    wandb = FakeWandb()
    modules, mlflow = fake_mlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    records = train_run(
        tiny_data, run_dir, 4, "logging.wandb=offline", "logging.mlflow=enabled", "logging.project=p"
    )

    expected = [(r["step"], scalars(r)) for r in records]
    assert (
        len(expected) == 6 and expected[0][1]["train/loss"] == records[0]["loss"]
    )  # 4 train + 2 eval records
    assert wandb.logged == expected and wandb.finished == 1
    init = wandb.inits[0]
    assert init["mode"] == "offline" and init["project"] == "p" and init["dir"] == str(run_dir)
    assert init["id"] is None and init["resume"] == "allow" and init["config"]["model"]["vocab_size"] == 512
    assert mlflow.clients == [f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"] and mlflow.experiments == [
        "p"
    ]
    assert mlflow.runs == [("7", "run")] and ("model.vocab_size", "512") in mlflow.params
    assert sorted(mlflow.metrics) == sorted(
        ("mlrun-1", step, key, value) for step, d in expected for key, value in d.items()
    )
    assert mlflow.terminated == ["mlrun-1"]

    # resumed from its step-4 checkpoint: the same tracker runs go on
    more = train_run(
        tiny_data, run_dir, 6, "logging.wandb=offline", "logging.mlflow=enabled", "logging.project=p"
    )
    assert wandb.inits[1]["id"] == "run-abc123" and len(mlflow.runs) == 1
    assert wandb.logged[6:] == [(r["step"], scalars(r)) for r in more[6:]] and [
        s for s, _ in wandb.logged[6:]
    ] == [5, 6, 6]


def test_train_and_eval_records_carry_time_mfu_and_memory(tiny_data, tmp_path):
    records = train_run(tiny_data, tmp_path / "a", 2, "train.peak_tflops=0.5")
    train = [r for r in records if r["kind"] == "train"]
    cfg_model = load_config(REPO / "configs" / "tiny.yaml", ["model.vocab_size=512"]).model
    for r in train:
        assert r["step_time_s"] > 0 and r["peak_mem_gib"] > 0.05  # CPU: the process's peak RSS
        assert r["mfu"] == pytest.approx(flops_per_token(cfg_model) * r["tokens_per_s"] / 0.5e12, rel=1e-9)
        assert r["mfu_torchtitan"] == pytest.approx(
            flops_per_token_torchtitan(cfg_model) * r["tokens_per_s"] / 0.5e12, rel=1e-9
        )
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    assert evaluation["eval_s"] > 0 and evaluation["time"] > 1.7e9
    no_peak = train_run(tiny_data, tmp_path / "b", 1)
    assert "mfu" not in no_peak[0] and "step_time_s" in no_peak[0]  # CPU, no train.peak_tflops: no MFU


@pytest.mark.parametrize("tie, n_kv", [(False, 2), (True, None)])
def test_flops_per_token_counts_every_matmul_weight(tie, n_kv):
    cfg = load_config(
        None,
        [
            "model.vocab_size=300",
            "model.d_model=48",
            "model.n_layers=3",
            "model.n_heads=4",
            f"model.n_kv_heads={n_kv if n_kv else 'null'}",
            f"model.tie_embeddings={str(tie).lower()}",
            "model.seq_len=64",
        ],
    ).model
    model = Transformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # a tied head counts
    assert flops_per_token(cfg) == 6 * linear + 6 * 3 * 64 * 48


@pytest.mark.parametrize("tie, n_kv", [(False, 2), (True, None)])
def test_flops_per_token_torchtitan_is_their_formula_on_the_built_model(tie, n_kv):
    cfg = load_config(
        None,
        [
            "model.vocab_size=300",
            "model.d_model=48",
            "model.n_layers=3",
            "model.n_heads=4",
            f"model.n_kv_heads={n_kv if n_kv else 'null'}",
            f"model.tie_embeddings={str(tie).lower()}",
            "model.seq_len=64",
        ],
    ).model
    model = Transformer(cfg)
    # torchtitan's get_nparams_and_flops: every parameter once, less nn.Embedding children's; 12*l*h*q*t
    nparams = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel() for m in model.children() if isinstance(m, nn.Embedding) for p in m.parameters()
    )
    assert flops_per_token_torchtitan(cfg) == 6 * (nparams - embedding) + 12 * 3 * 4 * (48 // 4) * 64


def test_peak_tflops_by_device_name(monkeypatch):
    assert hardware.peak_tflops(torch.device("cpu")) is None
    assert hardware.peak_tflops(torch.device("cpu"), 123.0) == 123.0
    for name, expected in [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA H800 PCIe", 756.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("AMD Instinct MI300X", 1307.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla V100-SXM2-32GB", None),
        ("Some New GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert hardware.peak_tflops(torch.device("cuda", 0)) == expected, name


def test_missing_tracker_packages_and_bad_values_are_one_line_config_errors(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(
        ConfigError, match=r"^logging.wandb: the wandb package is not installed \(pip install wandb\)$"
    ):
        train_run(tiny_data, tmp_path / "run", 1, "logging.wandb=online")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    for override, message in [
        ("logging.wandb=yes", "logging.wandb: expected a string, got True"),
        ("logging.wandb=cloud", "logging.wandb: must be one of disabled|online|offline"),
        ("logging.mlflow=offline", "logging.mlflow: must be one of disabled|enabled"),
        ("train.peak_tflops=0", "train.peak_tflops: must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


@pytest.mark.skipif(
    not os.environ.get("EVERTRAIN_TEST_TRACKERS"),
    reason="set EVERTRAIN_TEST_TRACKERS=1 (~30 s: MLflow creates its database)",
)
def test_mlflow_for_real_offline_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    from evertrain.pretrain.observe.loggers import MLflowSink

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, run_dir = load_config(None, ["logging.mlflow=enabled", "logging.project=real"]), tmp_path / "run"
    run_dir.mkdir()
    sink = MLflowSink(cfg, run_dir)
    sink.write({"kind": "train", "step": 1, "tokens": 64, "loss": 5.5, "time": 1.8e9})
    sink.close()
    again = MLflowSink(cfg, run_dir)  # a resumed run: the same MLflow run
    again.write(
        {"kind": "eval", "step": 2, "tokens": 128, "val_loss": 5.25, "eval_s": 0.5, "time": 1.8e9 + 1}
    )
    again.close()
    assert again.run_id == sink.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(sink.run_id, key)]
        for key in ("train/loss", "train/tokens", "eval/val_loss", "eval/eval_s")
    }
    assert history == {
        "train/loss": [(1, 5.5)],
        "train/tokens": [(1, 64.0)],
        "eval/val_loss": [(2, 5.25)],
        "eval/eval_s": [(2, 0.5)],
    }
    run = client.get_run(sink.run_id)
    assert run.info.run_name == "run" and run.data.params["model.vocab_size"] == "4096"
    assert client.get_experiment(run.info.experiment_id).name == "real"


def test_tf32_for_fp32_matmuls_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert hardware.use_tf32(torch.device("cpu")) is False and calls == []
    assert hardware.use_tf32(torch.device("cuda", 0)) is True
    assert calls == ["high"] and torch.backends.cudnn.allow_tf32 is True
