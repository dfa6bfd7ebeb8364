"""A rank that stops answering does not leave the others waiting forever.

A real 2-rank torchrun of pretrain.py (FSDP2 on CPU, gloo) with train.collective_timeout_s=10: rank 1
is SIGSTOPped (what a launcher that signals only some ranks, or a hung host, leaves) once it trains,
or as it starts to load the checkpoint it resumes from, and rank 0 must fail on its own, with one line
naming rank 1 and the point, instead of hanging in its next collective.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launcher, launcher_env, run_ok, wait_for

TIMEOUT_S = 10


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` among `parent`'s children, once it exists."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def trained_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max((r["step"] for r in lines if r["kind"] == "train"), default=0)


def reap(proc: subprocess.Popen) -> None:
    """End the torchrun and its stopped rank 1 (torchrun's own SIGTERM waits while a worker is stopped)."""
    try:
        stopped = rank_pid(proc.pid, 1) if proc.poll() is None else None
        if stopped is not None:
            os.kill(stopped, signal.SIGKILL)
    except OSError:  # torchrun (or the rank) exited meanwhile
        pass
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def the_one_error_line(proc: subprocess.Popen, log: Path) -> str:
    """The run failed with exactly one `pretrain.py: error:` line, which names the timeout."""
    err = log.read_text()
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(errors) == 1, err[-3000:]
    assert f"train.collective_timeout_s={TIMEOUT_S}s" in errors[0]
    return errors[0]


@pytest.mark.slow
def test_a_stopped_rank_is_named_by_the_others_within_the_timeout(tiny_data, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr"
    cmd = [
        *launcher("fsdp", 2),
        "pretrain.py",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "train.log_every=1",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        f"train.collective_timeout_s={TIMEOUT_S}",
        "--engine",
        "fsdp",
    ]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: trained_steps(run_dir) >= 2, proc, log, "the run trained", timeout=300)
        stopped = rank_pid(proc.pid, 1)
        assert stopped is not None, "no torchrun worker with RANK=1"
        os.kill(stopped, signal.SIGSTOP)
        # rank 0 gives up on its collective after TIMEOUT_S and on the roll call after twice that;
        # the rest is slack for a loaded machine
        wait_for(lambda: "did not reach" in log.read_text(), proc, log, "rank 0's error", timeout=180)
    finally:
        reap(proc)
    error = the_one_error_line(proc, log)
    assert "rank(s) 1 did not reach step" in error, error


# Imported first thing by every Python process that has it on its path (site.py): torchrun's rank 1
# stops itself as it enters the checkpoint load, as a signal from outside could land there.
STOP_AT_LOAD = """
import os, signal
if os.environ.get("RANK") == "1" and "TORCHELASTIC_RUN_ID" in os.environ:
    from evertrain.pretrain.checkpoint import manager
    load = manager.CheckpointManager.load
    def stopped_load(self, step_dir):
        os.kill(os.getpid(), signal.SIGSTOP)
        return load(self, step_dir)
    manager.CheckpointManager.load = stopped_load
"""


@pytest.mark.slow
def test_a_rank_stopped_at_the_checkpoint_load_is_named(tiny_data, tmp_path):
    run_dir, log, hooks = tmp_path / "run", tmp_path / "stderr", tmp_path / "hooks"
    args = [
        "pretrain.py",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "eval.every_steps=0",
        "checkpoint.every_steps=2",
    ]
    run_ok([sys.executable, *args, "train.max_steps=2"], timeout=300)  # one process: a checkpoint
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(STOP_AT_LOAD)
    env = {**launcher_env(), "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}"}
    cmd = [
        *launcher("fsdp", 2),
        *args,
        "train.max_steps=4",
        f"train.collective_timeout_s={TIMEOUT_S}",
        "--engine",
        "fsdp",
    ]
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # rank 0 gives up on its collective after TIMEOUT_S and on the roll call after twice that
        wait_for(lambda: "did not reach" in log.read_text(), proc, log, "rank 0's error", timeout=400)
    finally:
        reap(proc)
    error = the_one_error_line(proc, log)
    assert "rank(s) 1 did not reach the load of checkpoint step_000000002" in error, error


def test_collective_timeout_must_be_positive():
    from evertrain.pretrain.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="train.collective_timeout_s: must be > 0"):
        from_dict({"train": {"collective_timeout_s": 0}})


@pytest.mark.parametrize("trained", [True, False])
def test_an_error_while_closing_down_is_one_line_once(tiny_data, tmp_path, monkeypatch, capsys, trained):
    """A rank found missing by the last wait at exit (the save in flight) exits 2 with one line: its
    own when training ended well, none more when an error line was printed already."""
    import pretrain
    from evertrain.errors import EvertrainError
    from evertrain.pretrain import loop
    from evertrain.pretrain.checkpoint.manager import CheckpointManager
    from evertrain.pretrain.distributed import MissingRankError

    def train(*args, **kwargs):
        if not trained:
            raise EvertrainError("rank(s) 1 did not reach step 3")

    def close(self):
        raise MissingRankError("rank(s) 1 did not reach the write of checkpoint step 2")

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(CheckpointManager, "close", close)
    argv = ["--config", str(REPO / "configs/tiny.yaml"), "--run-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*argv, f"data.path={tiny_data}", "model.vocab_size=512"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain.py: error:")]
    expected = "the write of checkpoint step 2" if trained else "did not reach step 3"
    assert len(errors) == 1 and expected in errors[0], errors


class FakeRollCall:
    """Records the roll call a failed wait takes; `missing` names ranks that did not come."""

    def __init__(self, missing: str | None):
        self.missing, self.calls = missing, []

    def guard(self, where):
        import contextlib

        return contextlib.nullcontext()

    def check(self, where, cause=None):
        from evertrain.pretrain.distributed import MissingRankError

        self.calls.append(where)
        if self.missing is not None:
            raise MissingRankError(f"rank(s) {self.missing} did not reach {where}")


@pytest.mark.parametrize("missing", ["2", None])
def test_a_checkpoint_write_whose_collective_failed_takes_the_roll_call(tmp_path, monkeypatch, missing):
    """The writer thread's collectives (DCP's group) gave up: the wait for it names the missing rank,
    or, when every rank came, says in one line that the write failed."""
    from test_checkpoint import config, toy_engine

    from evertrain.pretrain.checkpoint.manager import CheckpointError, CheckpointManager
    from evertrain.pretrain.distributed import MissingRankError

    engine = toy_engine()
    engine.roll_call = FakeRollCall(missing)
    ckpt = CheckpointManager(tmp_path, config(), engine)

    def write_and_commit(*args):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv")

    monkeypatch.setattr(ckpt, "_write_and_commit", write_and_commit)
    ckpt.save(3, {"tokens": 3, "data": {}})
    expected = MissingRankError if missing else CheckpointError
    with pytest.raises(expected) as error:
        ckpt.wait()
    assert engine.roll_call.calls == ["the write of checkpoint step 3"]
    if missing is None:
        assert "checkpoint write of step 3 failed ([gloo" in str(error.value)
        assert "\n" not in str(error.value)
    ckpt.close()
