"""`evertrain average` on a real tiny run (single engine, in process): one checkpoint's average is that
checkpoint (weights and val loss as the run scored it), K checkpoints' is their elementwise mean,
result.json says what it is, a rerun reads nothing, the sources are pinned while read, the result
exports to Hugging Face format, and bad requests are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evertrain.files import atomic_write_text
from evertrain.launch import average
from evertrain.launch.average import AverageError, average_checkpoints, average_dir_name
from evertrain.launch.cli import main as cli_main
from evertrain.pretrain.checkpoint import load_consolidated, store
from evertrain.pretrain.checkpoint.retention import apply_retention

from conftest import launcher, pretrain_tiny, run_ok

STEPS, EVERY = 30, 10


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """30 steps of the tiny model, a checkpoint and an eval every 10 steps, all checkpoints kept."""
    run_dir = tmp_path_factory.mktemp("average") / "main"
    assert (
        pretrain_tiny(
            run_dir,
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "engine.name=single",
            f"train.max_steps={STEPS}",
            f"eval.every_steps={EVERY}",
            "eval.batches=2",
            f"checkpoint.every_steps={EVERY}",
            "checkpoint.keep_last=100",
        )
        == 0
    )
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "main", ignore=shutil.ignore_patterns("averages")))


def evals(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_consolidated(step_dir)["model"]


def test_average_of_one_checkpoint_is_that_checkpoint(run, tmp_path):
    run_dir = copy_run(run, tmp_path)
    result = average_checkpoints(run_dir, [20])
    out = run_dir / "averages" / average_dir_name([20])
    source = weights(run_dir / "checkpoints" / store.step_dir_name(20))
    averaged = weights(out / "final")
    assert averaged.keys() == source.keys()
    assert all(torch.equal(averaged[name], source[name]) for name in source)
    assert result["val_loss"] == pytest.approx(evals(run_dir)[20], rel=1e-6)  # the run's own val windows


def test_average_of_k_checkpoints_is_their_elementwise_mean(run, tmp_path):
    run_dir = copy_run(run, tmp_path)
    assert cli_main(["average", "--run", str(run_dir), "--last", "3"]) == 0
    out = run_dir / "averages" / "avg_000000030_k3_10-20-30"
    assert out.name == average_dir_name([30, 10, 20])
    sources = [weights(run_dir / "checkpoints" / store.step_dir_name(s)) for s in (10, 20, 30)]
    averaged = weights(out / "final")
    for name, tensor in averaged.items():
        expected = torch.stack([s[name] for s in sources]).mean(0)
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    result = json.loads((out / "result.json").read_text())
    meta = store.read_meta(run_dir / "checkpoints" / store.step_dir_name(30))
    assert result["kind"] == "average" and result["steps"] == [10, 20, 30] and result["step"] == 30
    assert result["tokens"] == meta["tokens"] and result["eval_batches"] == 2
    assert result["eval_s"] > 0 and result["time"] > meta["created"]
    assert all(abs(result["val_loss"] - v) > 1e-3 for v in evals(run_dir).values())  # not any checkpoint's
    assert not list((run_dir / "averages").glob(".*tmp*"))
    assert not list((run_dir / "checkpoints").glob("step_*/pins/*.json"))  # leases released
    hf = tmp_path / "hf"
    assert cli_main(["export", "hf", "--run", str(run_dir), "--average", out.name, "--out", str(hf)]) == 0
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()


def test_rerun_reads_nothing(run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(run, tmp_path)
    first = average_checkpoints(run_dir, [10, 30])
    monkeypatch.setattr(average, "make_average", lambda *a, **k: pytest.fail("averaged again"))
    assert average_checkpoints(run_dir, [30, 10]) == first
    capsys.readouterr()
    assert cli_main(["average", "--run", str(run_dir), "--steps", "10,30"]) == 0
    assert "(done already)" in capsys.readouterr().out


def test_sources_are_pinned_while_read(run, tmp_path, monkeypatch):
    run_dir = copy_run(run, tmp_path)
    ckpts = run_dir / "checkpoints"
    real_read, seen = average.open_weights, []

    def read_beside_retention(step_dir, *args):  # the live run commits a checkpoint mid-average
        apply_retention(ckpts, keep_last=1, keep_every=0)
        seen.append(sorted(p.name for p in ckpts.glob("step_*")))
        return real_read(step_dir, *args)

    monkeypatch.setattr(average, "open_weights", read_beside_retention)
    average_checkpoints(run_dir, [10, 20])
    assert seen == [["step_000000010", "step_000000020", "step_000000030"]] * 2
    apply_retention(ckpts, keep_last=1, keep_every=0)  # released: now they may go
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000000030"]


def test_a_long_step_list_gets_a_short_name():
    name = average_dir_name(list(range(1000, 30000, 1000)))
    assert name.startswith("avg_000029000_k29_") and len(name) < 60
    assert name == average_dir_name(list(range(29000, 999, -1000)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--last", "4"], "--last 4: the run has 3 checkpoint(s) (10, 20, 30); keep at least 4"),
        (["--last", "0"], "--last: must be >= 1, got 0"),
        (["--steps", "10,15"], "--steps: no checkpoint at step 15 (available: 10, 20, 30)"),
        (["--steps", "10,10"], "--steps 10,10: a step is listed twice"),
        (["--last", "2", "--eval-batches", "0"], "--eval-batches: must be > 0, got 0"),
    ],
)
def test_bad_requests_are_one_line_errors(run, argv, message, capsys):
    assert cli_main(["average", "--run", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"evertrain average: error: {message}\n" or (message in err and err.count("\n") == 1), err
    assert not (run / "averages").exists()


def test_non_finite_and_mismatched_checkpoints_are_refused(run, tmp_path, capsys):
    run_dir = copy_run(run, tmp_path)
    step_dir = run_dir / "checkpoints" / store.step_dir_name(20)
    meta = store.read_meta(step_dir)
    bad = weights(step_dir)
    bad["norm.weight"][3] = float("nan")
    shutil.rmtree(
        step_dir
    )  # the same checkpoint with one NaN weight (weights only: the reader needs no more)
    average.write_weights(step_dir, bad, meta, [20])
    assert cli_main(["average", "--run", str(run_dir), "--last", "2"]) == 2
    assert "parameter 'norm.weight' has NaN/Inf weights" in capsys.readouterr().err
    meta = store.read_meta(step_dir)
    meta["model_hash"], meta["model"]["d_model"] = "other", 32
    atomic_write_text(step_dir / store.META, json.dumps(meta))
    with pytest.raises(AverageError, match="mismatched configs: .*d_model 32 vs 64"):
        average_checkpoints(run_dir, [10, 20])
    assert not list((run_dir / "averages").glob("avg_*"))


def test_forker_averages_every_checkpoint_once_k_exist(run, tmp_path):
    from evertrain.launch.forker import Forker, ForkerOptions, load_jobs
    from evertrain.launch.nodes import parse_pool

    run_dir = copy_run(run, tmp_path)
    by_hand = average_checkpoints(run_dir, [20, 30])  # the forker adopts it instead of averaging again
    lines = []
    options = ForkerOptions(run_dir, cooldown_fraction=None, average=2, once=True, poll_s=0.05)
    assert Forker(options, parse_pool("local:1"), log=lines.append).run() == 0
    jobs = load_jobs(run_dir / "forker" / "state.json", run_dir)
    assert {n: (j.kind, j.steps, j.status, j.attempts) for n, j in jobs.items()} == {
        "avg_000000020_k2_10-20": ("average", [10, 20], "done", 1),
        "avg_000000030_k2_20-30": ("average", [20, 30], "done", 0),
    }
    assert [line.split()[1] for line in lines if line.startswith("launched")] == ["avg_000000020_k2_10-20"]
    made = json.loads((run_dir / "averages" / "avg_000000020_k2_10-20" / "result.json").read_text())
    assert made["steps"] == [10, 20] and jobs["avg_000000020_k2_10-20"].val_loss == made["val_loss"]
    assert jobs["avg_000000030_k2_20-30"].val_loss == by_hand["val_loss"]
    assert not list((run_dir / "checkpoints").glob("step_*/pins/*.json"))  # every lease released
    lines.clear()  # a restarted forker has nothing left to do
    assert Forker(options, parse_pool("local:1"), log=lines.append).run() == 0
    assert not [line for line in lines if line.startswith(("queued", "launched"))]


def test_report_shows_averages_beside_the_cooldowns(run, tmp_path, capsys):
    from evertrain.launch.report import figure, load_run

    run_dir = copy_run(run, tmp_path)
    first, second = average_checkpoints(run_dir, [10, 20]), average_checkpoints(run_dir, [20, 30])
    cooled = run_dir / "cooldowns" / "from_000000030_linear_6"  # a finished cooldown from the same step
    cooled.mkdir(parents=True)
    (cooled / "result.json").write_text(
        json.dumps(
            {
                "from_step": 30,
                "cooldown_steps": 6,
                "shape": "linear",
                "tokens": 9216,
                "val_loss": 6.125,
                "val_ppl": 457.1,
            }
        )
    )
    assert cli_main(["report", "--run", str(run_dir), "--out", str(tmp_path / "r.png")]) == 0
    text = capsys.readouterr().out
    assert "checkpoint averages (no training)" in text
    rows = {
        cells[2]: cells
        for line in text.splitlines()
        if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 8
    }
    assert rows["20,30"] == [
        "30",
        "2",
        "20,30",
        "7.68K",
        f"{second['val_loss']:.4f}",
        f"{second['val_ppl']:.2f}",
        f"{evals(run_dir)[30]:.4f}",
        "6.1250 (linear, 6)",
    ]
    assert rows["10,20"][-1] == "-"  # no cooldown from step 20
    report = load_run(run_dir)
    marker = [
        line
        for line in figure(report, None, None).axes[0].get_lines()
        if line.get_label().startswith("average of the last 2 checkpoints")
    ]
    assert len(marker) == 1
    assert list(marker[0].get_xdata()) == [first["tokens"], second["tokens"]]
    assert list(marker[0].get_ydata()) == [first["val_loss"], second["val_loss"]]


def test_tail_and_ema_weightings_weigh_the_newest_checkpoints_most(run, tmp_path, capsys):
    assert average.checkpoint_weights(3, "tail") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert average.checkpoint_weights(3, "ema:0.5") == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert average.checkpoint_weights(2, "uniform") == [0.5, 0.5]
    run_dir = copy_run(run, tmp_path)
    assert cli_main(["average", "--run", str(run_dir), "--steps", "10,20,30", "--weighting", "tail"]) == 0
    out = run_dir / "averages" / "avg_000000030_k3_10-20-30_tail"
    sources = [weights(run_dir / "checkpoints" / store.step_dir_name(s)) for s in (10, 20, 30)]
    for name, tensor in weights(out / "final").items():
        expected = (sources[0][name] + 2 * sources[1][name] + 3 * sources[2][name]) / 6
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert json.loads((out / "result.json").read_text())["weighting"] == "tail"
    assert cli_main(["average", "--run", str(run_dir), "--last", "2", "--weighting", "ema:1.5"]) == 2
    assert "BETA must be in (0, 1)" in capsys.readouterr().err


AVERAGE_AND_PEAK = """
import re, sys
from pathlib import Path
from evertrain.launch.cli import main
code = main(sys.argv[1:])
print("peak_kib", re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
sys.exit(code)
"""


def average_peak_bytes(run_dir: Path) -> int:
    """Peak RSS of `evertrain average --last 3` (read, evaluate, write) in a process of its own, with
    a fixed mmap threshold so that freed buffers go back to the system (as test_export's export_peak_bytes)."""
    proc = subprocess.run(
        [sys.executable, "-c", AVERAGE_AND_PEAK, "average", "--run", str(run_dir), "--last", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("peak_kib")[1].split()[0]) * 1024


def test_average_memory_is_bounded_by_one_copy_of_the_weights(tiny_data, tmp_path):
    """A 116 MB model's last 3 checkpoints averaged and evaluated: the average's peak RSS over that of
    the same average of a tiny model stays under 1.6x the weights (one copy, accumulated parameter by
    parameter and evaluated in place; reading each checkpoint whole, or copying the sum into a model,
    holds two copies or more)."""
    from evertrain.pretrain.config import load_config
    from evertrain.pretrain.model.transformer import Transformer

    shape = ["model.n_layers=4", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=12"]
    base = [
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "model.seq_len=32",
        "train.micro_batch_size=1",
        "train.max_steps=3",
        "eval.every_steps=0",
        "eval.batches=1",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=3",
        "train.device=cpu",
        "engine.name=single",
    ]
    small, big = tmp_path / "small", tmp_path / "big"
    assert pretrain_tiny(small, *base) == 0 and pretrain_tiny(big, *base, *shape) == 0
    weights = Transformer(load_config(big / "config.yaml").model, init=False).num_params() * 4  # fp32 bytes
    assert weights > 100e6
    baseline, peak = average_peak_bytes(small), average_peak_bytes(big)
    assert (big / "averages" / "avg_000000003_k3_1-2-3" / "final").is_dir()
    assert peak - baseline < 1.6 * weights, (
        f"average added {(peak - baseline) / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
    )


@pytest.mark.slow
def test_a_two_rank_zero3_run_averages_on_its_own_val_windows(tiny_data, tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU ranks (global batch 2 x 4 windows): the average is read through the
    ZeRO slice reader and evaluated in one process on the run's 8-window batches, so one checkpoint's
    average scores what the 2-rank run logged at that step; two checkpoints' is their mean."""
    run_dir = tmp_path / "zero3"
    run_ok(
        [
            *launcher("deepspeed", 2),
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.max_steps=4",
            "checkpoint.every_steps=2",
            "eval.every_steps=2",
            "eval.batches=2",
            "engine.zero_stage=3",
        ],
        timeout=600,
    )
    assert store.read_meta(run_dir / "checkpoints" / store.step_dir_name(4))["world_size"] == 2
    assert average_checkpoints(run_dir, [4])["val_loss"] == pytest.approx(evals(run_dir)[4], rel=1e-5)
    average_checkpoints(run_dir, [2, 4])
    sources = [weights(run_dir / "checkpoints" / store.step_dir_name(s)) for s in (2, 4)]
    for name, tensor in weights(run_dir / "averages" / average_dir_name([2, 4]) / "final").items():
        torch.testing.assert_close(tensor, (sources[0][name] + sources[1][name]) / 2, rtol=0, atol=1e-6)
