"""A stop fits the launcher's grace: SIGTERM, then SIGKILL 5 s later, leaves a resumable run.

pretrain.py runs with a commit that hangs from step 8 on (a stuck filesystem) and sends itself
SIGTERM as it starts hanging; the test sends SIGKILL 5 s after that. With
checkpoint.stop_budget_s=2 the run abandons the stuck save and exits on its own before the SIGKILL,
and a rerun resumes from the last committed checkpoint (step 4) with the very same losses.

The same when the SIGTERM comes while a routine save (step 12) is blocked waiting for the stuck
write of step 8: that wait is held to the budget too.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evertrain.pretrain.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 5.0

HANG_AND_TERM_IN_COMMIT = """
import os, runpy, signal, sys, time
from pathlib import Path
from evertrain.pretrain.checkpoint import store

flag = Path(sys.argv[1])
sys.argv = sys.argv[2:]
commit = store.commit

def commit_or_hang(tmp_dir, meta):
    if meta["step"] >= 8:
        flag.write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's stop, while this save is stuck
        time.sleep(3600)
    return commit(tmp_dir, meta)

store.commit = commit_or_hang
runpy.run_path(sys.argv[0], run_name="__main__")
"""

HANG_IN_COMMIT_TERM_IN_NEXT_SAVE = """
import os, runpy, signal, sys, threading, time
from pathlib import Path
from evertrain.pretrain.checkpoint import manager, store

flag = Path(sys.argv[1])
sys.argv = sys.argv[2:]
commit, save = store.commit, manager.CheckpointManager.save

def commit_or_hang(tmp_dir, meta):
    if meta["step"] >= 8:
        time.sleep(3600)  # a stuck filesystem; no signal yet
    return commit(tmp_dir, meta)

def terminate():
    flag.write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's stop, while the save below waits for step 8's

def save_then_term(self, step, extra, **kw):
    if step >= 12:
        threading.Timer(0.5, terminate).start()
    return save(self, step, extra, **kw)

store.commit = commit_or_hang
manager.CheckpointManager.save = save_then_term
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def pretrain(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "pretrain.py",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        f"data.path={data}",
        "model.vocab_size=512",
        "train.log_every=1",
        "eval.every_steps=0",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=10",
        "--engine",
        "single",
        *overrides,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize(
    "wrapper",
    [HANG_AND_TERM_IN_COMMIT, HANG_IN_COMMIT_TERM_IN_NEXT_SAVE],
    ids=["term-in-stuck-save", "term-while-routine-save-waits"],
)
def test_sigterm_then_sigkill_leaves_a_resumable_run(tiny_data, tmp_path, wrapper):
    run_dir, flag = tmp_path / "run", tmp_path / "hanging"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-c",
        wrapper,
        str(flag),
        *pretrain(tiny_data, run_dir, "checkpoint.stop_budget_s=2"),
    ]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not flag.is_file():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its SIGTERM"
            time.sleep(0.01)
        try:
            code = proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)  # what the launcher does after its grace
            code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (tmp_path / "stderr").read_text()
    assert code == 0, f"not out within {GRACE_S}s of SIGTERM (exit {code}): {err[-2000:]}"
    assert "stop budget of 2s ran out; abandoned the save in flight" in err
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000000004"
    first = losses(run_dir)
    stopped = max(first)
    if wrapper is HANG_IN_COMMIT_TERM_IN_NEXT_SAVE:
        assert stopped == 12  # stopped in the routine save of step 12, not after another step
    metrics = run_dir / "metrics.jsonl"  # tag the old records: a resumed run keeps those up to its step
    metrics.write_text(
        "".join(
            json.dumps({**json.loads(line), "old": True}) + "\n" for line in metrics.read_text().splitlines()
        )
    )

    subprocess.run(
        [sys.executable, *pretrain(tiny_data, run_dir, f"train.max_steps={stopped}")],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train if r.get("old")] == [1, 2, 3, 4]  # resumed from step 4, not from 0
    assert [r["step"] for r in train if not r.get("old")] == list(range(5, stopped + 1))
    assert all(r["loss"] == first[r["step"]] for r in train)  # single engine on CPU: bitwise


def test_stop_budget_must_be_positive():
    with pytest.raises(ConfigError, match="checkpoint.stop_budget_s: must be > 0, got 0.0"):
        from_dict({"checkpoint": {"stop_budget_s": 0}})
