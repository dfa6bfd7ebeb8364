"""The training loop (single engine, in process) and pretrain.py: metrics and eval records, no host sync
on steady steps, checkpoint boundaries, stopping on a signal, resuming, and clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evertrain.pretrain import engines
from evertrain.pretrain.config import load_config
from evertrain.pretrain.data.stream import TokenStream
from evertrain.pretrain.loop import train
from evertrain.pretrain.observe.metrics import Metrics, drop_records_after
from evertrain.pretrain.run.resume import refresh_data

from conftest import load_pretrain

REPO = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {
    "kind",
    "step",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "peak_mem_gib",
    "time",
    "data_version",
    "nonfinite_steps",
}  # and "mfu" where the device's peak is known (not on CPU)
EVAL_KEYS = {"kind", "step", "tokens", "val_loss", "eval_s", "time"}


def tiny_config(data: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "engine.name=single",
            *overrides,
        ],
    )


def engine_and_stream(cfg):
    return engines.create(cfg), TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


class FakeCheckpoints:
    """Records saves; resumes from a given extra. The real manager is tested in test_checkpoint.py."""

    def __init__(self, resume_from: dict | None = None):
        self.resume_from, self.saves, self.waited = resume_from, [], False

    def resume(self):
        return self.resume_from

    def save(
        self, step, extra, stop=None
    ):  # `stop`: the budget of a routine save's wait (test_stop_budget.py)
        self.saves.append((step, json.loads(json.dumps(extra))))
        return True

    def wait(self):
        self.waited = True

    def save_before(self, step, extra, deadline):  # the stop's save (budget: tests/test_stop_budget.py)
        self.save(step, extra)
        return True

    def latest(self):
        return None


@pytest.fixture(scope="module")
def forty_steps(tiny_data, tmp_path_factory):
    """One 40-step run shared by the record/eval/loss assertions."""
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    cfg = tiny_config(
        tiny_data, "train.max_steps=40", "train.log_every=5", "eval.every_steps=20", "eval.batches=2"
    )
    engine, stream = engine_and_stream(cfg)
    ckpt = FakeCheckpoints()
    last = train(cfg, run_dir, engine, stream, ckpt)
    return cfg, run_dir, last, ckpt


def test_train_records_follow_the_design(forty_steps):
    cfg, run_dir, last, ckpt = forty_steps
    assert last == 40
    train_rows = records(run_dir, "train")
    assert [r["step"] for r in train_rows] == list(range(5, 41, 5))
    assert all(set(r) == TRAIN_KEYS for r in train_rows)
    assert [r["tokens"] for r in train_rows] == [s * 4 * 64 for s in range(5, 41, 5)]
    assert all(
        r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and isinstance(r["data_version"], int)
        for r in train_rows
    )
    max_lr, warmup = cfg.optim.max_lr, cfg.optim.warmup_steps  # tiny.yaml: 3e-3, 20 steps, rsqrt, tau = w
    assert (max_lr, warmup, cfg.optim.decay, cfg.optim.rsqrt_timescale) == (3e-3, 20, "rsqrt", None)
    for r in train_rows:  # the LR of the update that made the step, against the closed form
        s = r["step"]
        expected = max_lr * s / warmup if s <= warmup else max_lr * (warmup / s) ** 0.5
        assert r["lr"] == pytest.approx(expected, rel=1e-6), (s, r["lr"], expected)


def test_eval_records_and_loss_falls_on_the_real_corpus(forty_steps):
    _, run_dir, _, _ = forty_steps
    evals = records(run_dir, "eval")
    assert [(set(r), r["step"], r["tokens"]) for r in evals] == [
        (EVAL_KEYS, 20, 20 * 256),
        (EVAL_KEYS, 40, 40 * 256),
    ]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert losses[-1] < losses[0] - 0.5, losses


def test_final_checkpoint_and_tensorboard(forty_steps):
    _, run_dir, _, ckpt = forty_steps
    assert [step for step, _ in ckpt.saves] == [20, 40] and ckpt.waited  # tiny.yaml: every 20 steps
    assert ckpt.saves[-1][1]["tokens"] == 40 * 256 and "cursor" in json.dumps(ckpt.saves[-1][1]["data"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


SYNCING_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "to")


def _to_host(tensor: torch.Tensor, args, kwargs) -> bool:
    """Whether Tensor.to(...) copies a device tensor to the CPU (a no-op .to(cpu) of a CPU tensor, as
    torch's clip_grad does, is no transfer; .cpu() and .numpy() count always: they ask for the host)."""
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        target = target.device
    return (
        isinstance(target, (str, torch.device))
        and torch.device(target).type == "cpu"
        and tensor.device.type != "cpu"
    )


def test_no_host_sync_on_steps_that_do_not_log(tiny_data, tmp_path, monkeypatch):
    """Counts every way a value reaches the host (item/tolist/bool/float/int/index, and copies to the
    CPU by .cpu()/.numpy()/.to("cpu")) per training step, in the loop's thread. The input batches are
    excluded by storage: they are host data by design (prefetched and copied to the device)."""
    import threading

    cfg = tiny_config(
        tiny_data, "train.max_steps=12", "train.log_every=4", "eval.every_steps=0", "checkpoint.every_steps=0"
    )
    engine, stream = engine_and_stream(cfg)
    step = {"now": 0}
    syncs: dict[int, list[str]] = {}
    inputs: set[int] = set()  # storages of the batches the stream handed out

    next_batch = stream.next_batch

    def recording_next_batch(*args, **kwargs):
        batch = next_batch(*args, **kwargs)
        inputs.add(batch.untyped_storage().data_ptr())
        return batch

    monkeypatch.setattr(stream, "next_batch", recording_next_batch)

    train_step = engine.train_step

    def counting_train_step(*args, **kwargs):
        step["now"] += 1
        return train_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", counting_train_step)

    main = threading.current_thread()
    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if (
                threading.current_thread() is main
                and (_name != "to" or _to_host(self, args, kwargs))
                and self.untyped_storage().data_ptr() not in inputs
            ):
                syncs.setdefault(step["now"], []).append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    train(cfg, tmp_path / "run", engine, stream, ckpt=None)
    monkeypatch.undo()
    assert step["now"] == 12
    assert set(syncs) <= {4, 8, 12}, {s: syncs[s] for s in sorted(syncs)}
    assert all(syncs.get(s) for s in (4, 8, 12))  # the counters do see the log steps' one pull


def test_sigterm_finishes_the_step_and_checkpoints(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(
        tiny_data,
        "train.max_steps=null",
        "train.log_every=10",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    )
    engine, stream = engine_and_stream(cfg)
    train_step, calls = engine.train_step, {"n": 0}

    def signalling_train_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of step 3
        return train_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", signalling_train_step)
    ckpt = FakeCheckpoints()
    previous_handler = signal.getsignal(signal.SIGTERM)

    assert train(cfg, tmp_path / "run", engine, stream, ckpt) == 3
    assert [step for step, _ in ckpt.saves] == [3]
    assert records(tmp_path / "run", "train")[-1]["step"] == 3  # the stop step is logged
    assert signal.getsignal(signal.SIGTERM) is previous_handler


def test_checkpoint_boundaries_refresh_the_data_first(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_data, "train.max_steps=10", "checkpoint.every_steps=4", "eval.every_steps=0")
    engine, stream = engine_and_stream(cfg)
    events = []
    refresh = stream.refresh
    monkeypatch.setattr(stream, "refresh", lambda: events.append("refresh") or refresh())
    ckpt = FakeCheckpoints()
    save = ckpt.save
    ckpt.save = lambda step, extra, **kw: events.append(step) or save(step, extra, **kw)

    train(cfg, tmp_path / "run", engine, stream, ckpt)
    assert events == ["refresh", 4, "refresh", 8, "refresh", 10]
    assert [extra["tokens"] for _, extra in ckpt.saves] == [4 * 256, 8 * 256, 10 * 256]
    assert ckpt.saves[-1][1]["data"] == json.loads(json.dumps(stream.state_dict()))


def test_resume_continues_the_stream_and_rewrites_later_records(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        tiny_data, "train.max_steps=10", "train.log_every=1", "checkpoint.every_steps=6", "eval.every_steps=0"
    )
    first = FakeCheckpoints()
    train(cfg, run_dir, *engine_and_stream(cfg), first)
    extra_at_6 = {"step": 6, **first.saves[0][1]}

    engine, stream = engine_and_stream(cfg)
    second = FakeCheckpoints(resume_from=extra_at_6)
    assert train(cfg, run_dir, engine, stream, second) == 10
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, 11))  # 7..10 once, from the resume
    assert records(run_dir, "train")[-1]["tokens"] == 10 * 256
    assert second.saves[-1][1]["data"] == first.saves[-1][1]["data"]  # same windows consumed


def test_a_fork_starts_where_it_is_told(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "train.max_steps=8", "train.log_every=1", "eval.every_steps=0")
    engine, stream = engine_and_stream(cfg)
    source = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    source.next_batch(5 * 4, 0, 1)
    train(
        cfg,
        tmp_path / "fork",
        engine,
        stream,
        None,
        start={"step": 5, "tokens": 1280, "data": source.state_dict()},
    )
    assert [(r["step"], r["tokens"]) for r in records(tmp_path / "fork", "train")] == [
        (6, 1536),
        (7, 1792),
        (8, 2048),
    ]


# -- metrics ---------------------------------------------------------------------------------------


def test_drop_records_after_keeps_earlier_lines_and_drops_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    drop_records_after(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    before = path.read_text()
    drop_records_after(path, 5)  # nothing to drop: the file is left alone
    assert path.read_text() == before


def test_metrics_on_other_ranks_write_nothing(tmp_path):
    metrics = Metrics(tmp_path / "run", enabled=False, start_step=0, max_steps=10)
    metrics.advance()
    metrics.write({"kind": "train", "step": 1, "loss": 1.0})
    metrics.close()
    assert not (tmp_path / "run").exists()


class FakeRankEngine:
    """Two ranks where this one read the manifest before an append the other already saw."""

    def __init__(self, other_version: int):
        self.other_version = other_version

    def min_max_over_ranks(self, value):
        return min(value, self.other_version), max(value, self.other_version)


class FakeStream:
    def __init__(self, versions):
        self.versions, self.manifest_version = list(versions), None

    def refresh(self):
        self.manifest_version = self.versions.pop(0)
        return True


def test_ranks_behind_on_the_manifest_catch_up():
    stream = FakeStream([3, 4])
    refresh_data(stream, FakeRankEngine(other_version=4))
    assert stream.manifest_version == 4 and stream.versions == []


# -- pretrain.py -----------------------------------------------------------------------------------


def base_args(data: Path, run_dir: Path) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.path={data}",
        "model.vocab_size=512",
        "train.max_steps=2",
        "eval.every_steps=0",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.n_heads=3"], "model.n_heads: 3 does not divide model.d_model=64"),
        (["model.seq_len=100000"], "seq_len"),
        (["--engine", "deepspeed"], "deepspeed --num_gpus"),
        (["--engine", "fsdp"], "torchrun --nproc_per_node"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    assert load_pretrain().main(base_args(tiny_data, run_dir) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pretrain.py: error: ") and message in err, err
    assert not (run_dir / "checkpoints").exists()


def test_config_is_written_and_another_model_is_refused(tiny_data, tmp_path, capsys):
    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    assert pretrain.main(base_args(tiny_data, run_dir) + ["--engine", "single"]) == 0
    written = load_config(run_dir / "config.yaml")
    assert (
        written.model.vocab_size == 512 and written.train.max_steps == 2 and written.engine.name == "single"
    )
    assert pretrain.main(base_args(tiny_data, run_dir) + ["model.d_model=128"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "use another --run-dir" in err
    assert load_config(run_dir / "config.yaml").model.d_model == 64  # left as it was


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_no_fixed_end_after_a_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = base_args(tiny_data, run_dir) + [
        "train.max_steps=null",
        "train.log_every=1",
        "checkpoint.every_steps=0",
    ]
    proc = subprocess.Popen(
        [sys.executable, "pretrain.py", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ((run_dir / "metrics.jsonl").is_file() and len(records(run_dir)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    last = records(run_dir, "train")[-1]["step"]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{last:09d}"


@pytest.mark.parametrize("when", ["after the loop", "while the engine closes"])
def test_a_second_ctrl_c_after_the_stop_checkpoint_is_committed_exits_0(
    tiny_data, tmp_path, monkeypatch, when
):
    """The first SIGINT stops the run with a checkpoint; a second one (a launcher's forward, an impatient
    user) while the process closes down loses nothing, so it exits 0 as the first one would."""
    from evertrain.pretrain import engines, loop

    pretrain, run_dir = load_pretrain(), tmp_path / "run"
    create, train = engines.create, loop.train  # pretrain.py imports both in main(), after its arguments

    def engine_that_is_interrupted(*args, **kwargs):
        engine = create(*args, **kwargs)
        step, close = engine.train_step, engine.close

        def train_step(batches):
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a clean stop after this step
            return step(batches)

        def interrupted_close():
            if when == "while the engine closes":
                os.kill(os.getpid(), signal.SIGINT)  # the default handler again: KeyboardInterrupt here
            close()

        engine.train_step, engine.close = train_step, interrupted_close
        return engine

    def train_then_interrupted(*args, **kwargs):
        last = train(*args, **kwargs)
        if when == "after the loop":
            os.kill(os.getpid(), signal.SIGINT)
        return last

    monkeypatch.setattr(engines, "create", engine_that_is_interrupted)
    monkeypatch.setattr(loop, "train", train_then_interrupted)
    args = base_args(tiny_data, run_dir) + [
        "train.max_steps=null",
        "checkpoint.every_steps=0",
        "--engine",
        "single",
    ]
    try:
        code = pretrain.main(args)
    except KeyboardInterrupt:  # (not out of pytest: that would end the session)
        code = "KeyboardInterrupt"
    assert code == 0
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000000001"
