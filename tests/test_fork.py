"""`evertrain fork` on a real tiny run (single engine, in process): the fork is the same computation as a
run whose schedule had the cooldown from step 0, it resumes when stopped, its lease keeps retention off
its source checkpoint, it never writes into the main run, and bad requests are one-line errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from evertrain.launch.cli import main as cli_main
from evertrain.launch.fork import ForkError, batch_split
from evertrain.pretrain import engines, loop
from evertrain.pretrain.checkpoint import load_consolidated
from evertrain.pretrain.checkpoint.retention import active_pins, apply_retention
from evertrain.pretrain.config import load_config
from evertrain.pretrain.data.stream import TokenStream
from evertrain.pretrain.schedule import Cooldown, Schedule

from conftest import launcher, pretrain_tiny

REPO = Path(__file__).resolve().parents[1]
MAIN_STEPS, FORK_STEP, COOLDOWN = 30, 20, 10


def overrides(data: Path) -> list[str]:
    return [
        f"data.path={data}",
        "model.vocab_size=512",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.device=cpu",
        "engine.name=single",
        "eval.every_steps=0",
        "eval.batches=2",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=100",
    ]


def losses(path: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"
    }


def fingerprint(run_dir: Path) -> dict[str, str]:
    """Every file of the main run outside cooldowns/ and pins/, with its content hash."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "cooldowns" not in p.parts and "pins" not in p.parts
    }


@pytest.fixture(scope="module")
def main_run(tiny_data, tmp_path_factory):
    """The main run: pretrain.py (in process), 30 steps, a checkpoint every 5."""
    run_dir = tmp_path_factory.mktemp("fork") / "main"
    assert pretrain_tiny(run_dir, *overrides(tiny_data), f"train.max_steps={MAIN_STEPS}") == 0
    return run_dir


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """A run whose schedule has the cooldown from step FORK_STEP built in from step 0."""
    run_dir = tmp_path_factory.mktemp("fork") / "reference"
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", [*overrides(tiny_data), f"train.max_steps={FORK_STEP + COOLDOWN}"]
    )
    schedule = Schedule.from_config(cfg.optim, cooldown=Cooldown(FORK_STEP, COOLDOWN, "linear"))
    engine = engines.create(cfg, schedule)
    try:
        loop.train(cfg, run_dir, engine, TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed), None)
    finally:
        engine.close()
    return losses(run_dir / "metrics.jsonl")


def fork_argv(run_dir: Path, *extra: str) -> list[str]:
    return [
        "fork",
        "--run",
        str(run_dir),
        "--step",
        str(FORK_STEP),
        "--cooldown-steps",
        str(COOLDOWN),
        "--shape",
        "linear",
        "--eval-batches",
        "2",
        *extra,
    ]


def copy_run(main_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "main"
    shutil.copytree(main_run, run_dir, ignore=shutil.ignore_patterns("cooldowns"))
    return run_dir


def test_fork_matches_a_run_with_the_cooldown_built_in(main_run, reference, capsys):
    before = fingerprint(main_run)
    assert cli_main(fork_argv(main_run)) == 0
    out = main_run / "cooldowns" / f"from_{FORK_STEP:09d}_linear_{COOLDOWN}"
    # the closing line names where the result lives, not the checkpoints the fork deletes once done
    closing = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evertrain: stopped")]
    assert closing == [
        (
            f"evertrain: stopped at step {FORK_STEP + COOLDOWN} (train.max_steps={FORK_STEP + COOLDOWN}); "
            f"its final state goes to {out / 'final'} once evaluated"
        )
    ]

    main_losses, fork_losses = losses(main_run / "metrics.jsonl"), losses(out / "metrics.jsonl")
    assert sorted(fork_losses) == list(range(FORK_STEP + 1, FORK_STEP + COOLDOWN + 1))
    for step, loss in fork_losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
    for step in range(1, FORK_STEP + 1):  # before the fork point the schedules agree
        assert main_losses[step] == pytest.approx(reference[step], abs=1e-5)
    assert fork_losses[FORK_STEP + COOLDOWN] != pytest.approx(main_losses[FORK_STEP + COOLDOWN], abs=1e-4)

    result = json.loads((out / "result.json").read_text())
    assert (
        result["from_step"] == FORK_STEP
        and result["cooldown_steps"] == COOLDOWN
        and result["shape"] == "linear"
    )
    assert result["tokens"] == (FORK_STEP + COOLDOWN) * 4 * 64
    assert math.isfinite(result["val_loss"]) and result["val_ppl"] == pytest.approx(
        math.exp(result["val_loss"])
    )
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert evals == {
        "kind": "eval",
        "step": FORK_STEP + COOLDOWN,
        "tokens": result["tokens"],
        "val_loss": result["val_loss"],
    }
    final = load_consolidated(out / "final")
    assert final["step"] == FORK_STEP + COOLDOWN and final["model"]
    assert all(t.isfinite().all() for t in final["model"].values())
    assert load_config(out / "config.yaml").train.max_steps == FORK_STEP + COOLDOWN
    assert json.loads((out / "fork.json").read_text())["global_windows"] == 4  # 4 windows x 1 rank
    assert not (out / "checkpoints").exists()  # its resume state is gone once final/ and result.json exist
    # the loss model's forecast, made before the fork: 30 steps, inside the skipped warmup, no val loss: none, and why
    prediction = json.loads((out / "prediction.json").read_text())
    assert prediction["predicted"] is None and "no losses to fit" in prediction["why"]
    assert "predicted" not in result and "prediction_error" not in result

    assert fingerprint(main_run) == before  # nothing of the main run was written
    assert not active_pins(main_run / "checkpoints" / f"step_{FORK_STEP:09d}")  # lease released
    capsys.readouterr()
    assert cli_main(fork_argv(main_run)) == 0  # rerun: done already, nothing trained
    assert "done already" in capsys.readouterr().out


def test_stopped_fork_resumes_from_its_own_checkpoint(main_run, reference, tmp_path, monkeypatch):
    run_dir = copy_run(main_run, tmp_path)
    real_train = loop.train

    def stopped_after_5_steps(cfg, *args, **kwargs):  # as if SIGTERM arrived at step FORK_STEP + 5
        cfg.train.max_steps = FORK_STEP + 5
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", stopped_after_5_steps)
    assert cli_main(fork_argv(run_dir)) == 130
    out = run_dir / "cooldowns" / f"from_{FORK_STEP:09d}_linear_{COOLDOWN}"
    assert (out / "checkpoints" / f"step_{FORK_STEP + 5:09d}" / "meta.json").is_file()
    assert not (out / "result.json").exists()

    monkeypatch.setattr(loop, "train", real_train)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{FORK_STEP:09d}")  # the source may be gone by now
    assert cli_main(fork_argv(run_dir)) == 0
    fork_losses = losses(out / "metrics.jsonl")
    assert sorted(fork_losses) == list(range(FORK_STEP + 1, FORK_STEP + COOLDOWN + 1))  # no step twice
    for step, loss in fork_losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step


def test_retention_never_deletes_the_source_of_a_running_fork(main_run, tmp_path, monkeypatch):
    run_dir = copy_run(main_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    real_train = loop.train
    seen = {}

    def train_beside_retention(*args, **kwargs):  # the main run commits a checkpoint mid-fork
        apply_retention(ckpts, keep_last=1, keep_every=0)
        seen["during"] = sorted(p.name for p in ckpts.glob("step_*"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", train_beside_retention)
    assert (
        cli_main(
            [
                "fork",
                "--run",
                str(run_dir),
                "--step",
                "10",
                "--cooldown-fraction",
                "0.5",
                "--shape",
                "cosine",
                "--eval-batches",
                "1",
            ]
        )
        == 0
    )
    assert seen["during"] == ["step_000000010", f"step_{MAIN_STEPS:09d}"]  # pinned + the newest
    assert (run_dir / "cooldowns" / "from_000000010_cosine_5" / "result.json").is_file()
    apply_retention(ckpts, keep_last=1, keep_every=0)  # lease released: now it may go
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{MAIN_STEPS:09d}"]


@pytest.fixture
def mix_data(tiny_data, tmp_path) -> Path:
    """The run's data (same tokenizer) as two sources: train shards 0-1 "hq", 2-5 "main"."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "mix"))
    manifest = json.loads((data / "manifest.json").read_text())
    for i, shard in enumerate(manifest["train"]):
        shard["source"] = "hq" if i < 2 else "main"
    manifest["weights"] = {"hq": 1.0, "main": 1.0}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_fork_cools_down_on_another_mix(main_run, mix_data, tmp_path, monkeypatch):
    """`--data PATH --data-weights hq=0.7,main=0.3`: the fork reads that mix's stream from its start
    (and nothing else), evaluates on the run's val split, records the mix in result.json under its own
    directory, and the report labels the branch with it."""
    from evertrain.launch import report

    run_dir = copy_run(main_run, tmp_path)
    read = []
    next_batch = TokenStream.next_batch

    def recorded(self, *args, **kwargs):
        batch = next_batch(self, *args, **kwargs)
        read.append((self.data_dir, self.mix, batch))
        return batch

    monkeypatch.setattr(TokenStream, "next_batch", recorded)
    assert cli_main(fork_argv(run_dir, "--data", str(mix_data), "--data-weights", "hq=0.7,main=0.3")) == 0
    monkeypatch.undo()
    [out] = (run_dir / "cooldowns").iterdir()
    assert out.name.startswith(f"from_{FORK_STEP:09d}_linear_{COOLDOWN}@mix-")
    result = json.loads((out / "result.json").read_text())
    assert result["data"] == {
        "path": str(mix_data.resolve()),
        "weights": {"hq": 0.7, "main": 0.3},
        "label": f"hq=0.7,main=0.3 of {mix_data}",
    }
    assert len(read) == COOLDOWN and {(d, str(m)) for d, m, _ in read} == {
        (mix_data, str({"hq": 0.7, "main": 0.3}))
    }
    cfg = load_config(out / "config.yaml")
    assert cfg.data.path == load_config(run_dir / "config.yaml").data.path  # eval on the run's val split
    fresh = TokenStream(mix_data, cfg.model.seq_len, cfg.train.seed, mix={"hq": 0.7, "main": 0.3})
    assert all(torch.equal(batch, fresh.next_batch(4)) for _, _, batch in read)
    [branch] = report.load_run(run_dir).cooldowns
    assert (branch.data, branch.from_step, branch.result["val_loss"]) == (
        f"hq=0.7,main=0.3 of {mix_data}",
        FORK_STEP,
        result["val_loss"],
    )


def test_bad_cooldown_mixes_are_one_line_errors(main_run, mix_data, capsys):
    assert (
        cli_main(fork_argv(main_run, "--data-weights", "hq=0.7,main=0.3")) == 2
    )  # the run's dir has only "main"
    assert "mix source 'hq' has no train windows" in capsys.readouterr().err
    assert cli_main(fork_argv(main_run, "--data-weights", "hq=0.7,main")) == 2
    assert "expected SOURCE=SHARE,..." in capsys.readouterr().err
    manifest = json.loads((mix_data / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (mix_data / "manifest.json").write_text(json.dumps(manifest))
    assert cli_main(fork_argv(main_run, "--data", str(mix_data))) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenized with another tokenizer than the run's" in err and len(err.splitlines()) == 1
    assert not list(main_run.glob("cooldowns/*@mix-*"))


@pytest.mark.slow
def test_fork_on_two_ranks_is_the_same_computation(main_run, reference, tmp_path):
    """torchrun + FSDP2 on 2 ranks from the single-process checkpoint: resharded on load, the run's
    global batch of 4 windows split 2 + 2, the same losses as the built-in reference."""
    run_dir = copy_run(main_run, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = launcher("fsdp", 2)
    fork = [
        "-m",
        "evertrain.launch.fork",
        "--run-dir",
        str(run_dir),
        "--step",
        str(FORK_STEP),
        "--cooldown-steps",
        str(COOLDOWN),
        "--shape",
        "linear",
        "--engine",
        "fsdp",
        "--eval-batches",
        "2",
    ]
    proc = subprocess.run(torchrun + fork, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "cooldowns" / f"from_{FORK_STEP:09d}_linear_{COOLDOWN}"
    fork_losses = losses(out / "metrics.jsonl")
    assert sorted(fork_losses) == list(range(FORK_STEP + 1, FORK_STEP + COOLDOWN + 1))
    for step, loss in fork_losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
    cfg = load_config(out / "config.yaml")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.engine.name) == (2, 1, "fsdp")
    assert json.loads((out / "fork.json").read_text())["global_windows"] == 4


def test_batch_split_keeps_the_global_batch():
    assert batch_split(8, 4, 1) == (4, 2)
    assert batch_split(8, 4, 2) == (4, 1)
    assert batch_split(8, 3, 2) == (2, 2)  # the largest micro-batch <= 3 that divides 4 windows per rank
    assert batch_split(8, 16, 8) == (1, 1)
    with pytest.raises(ForkError, match="global batch of 6 windows cannot be split over 4 ranks"):
        batch_split(6, 4, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--step", "99", "--cooldown-steps", "5"],
            "--step 99: unknown step (the run's checkpoints go up to step 30)",
        ),
        (
            ["--step", "12", "--cooldown-steps", "5"],
            "--step 12: no checkpoint at this step (available: 5, 10, 15",
        ),
        (["--step", "abc", "--cooldown-steps", "5"], "--step: expected a step number or 'latest'"),
        (["--step", "20", "--cooldown-steps", "0"], "--cooldown-steps: must be > 0, got 0"),
        (["--step", "20", "--cooldown-fraction", "1.5"], "--cooldown-fraction: must be in (0, 1], got 1.5"),
        (["--step", "20", "--cooldown-fraction", "0"], "--cooldown-fraction: must be in (0, 1], got 0.0"),
        (
            ["--step", "5", "--cooldown-fraction", "0.01"],
            "--cooldown-fraction: 0.01 of step 5 is 0 cooldown steps",
        ),
    ],
)
def test_bad_fork_requests_are_one_line_errors(main_run, capsys, argv, message):
    assert cli_main(["fork", "--run", str(main_run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_fork_of_something_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["fork", "--run", str(tmp_path), "--step", "latest", "--cooldown-steps", "5"]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err


def test_a_fork_checks_its_eval_batches_before_training(main_run, tmp_path, capsys):
    run_dir = copy_run(main_run, tmp_path)
    assert cli_main(fork_argv(run_dir)[:-2] + ["--eval-batches", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the val split has" in err and len(err.splitlines()) == 1
    trained = [p for p in (run_dir / "cooldowns").rglob("step_*") if p.is_dir()]
    assert trained == []  # refused before the cooldown, not after it
