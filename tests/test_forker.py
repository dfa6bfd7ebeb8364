"""The side launcher: node pools and hostfiles, the queue/state machine with a fake fork (fast), and the
real thing beside a live tiny training run, restarted mid-way (each fork launched exactly once)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evertrain.launch.cli import main as cli_main
from evertrain.launch.forker import Forker, ForkerError, ForkerOptions, Job, process_start_time, save_jobs
from evertrain.launch.nodes import NodePoolError, parse_hostfile, parse_pool
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.retention import active_pins

REPO = Path(__file__).resolve().parents[1]

# Stands in for `python -m evertrain.launch.fork`: logs its start/end, sleeps (or waits for RUN/release),
# leaves result.json.
FAKE_FORK = """
import argparse, json, os, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
for a in ("--run", "--shape", "--engine", "--data", "--data-weights"):
    p.add_argument(a)
for a in ("--step", "--cooldown-steps", "--eval-batches"):
    p.add_argument(a, type=int)
a = p.parse_args()
name, data = f"from_{a.step:09d}_{a.shape}_{a.cooldown_steps}", None
if a.data or a.data_weights:  # imported only then: it imports torch, slow enough to skew the timings
    from evertrain.launch.fork import cooldown_data
    from evertrain.launch.runs import cooldown_dir_name
    data = cooldown_data(a.data, a.data_weights)
    name = cooldown_dir_name(a.step, a.shape, a.cooldown_steps, data)
events = Path(a.run) / "events.txt"
with open(events, "a") as f:
    f.write(f"start {name} {time.time()}\\n")
time.sleep(float(os.environ.get("FAKE_FORK_SLEEP", "0.3")))
while os.environ.get("FAKE_FORK_HOLD") and not (Path(a.run) / "release").exists():
    time.sleep(0.05)  # held until the test says go
if os.environ.get("FAKE_FORK_FAIL"):
    sys.exit(3)
result = {"from_step": a.step, "cooldown_steps": a.cooldown_steps, "shape": a.shape, "tokens": 1,
          "val_loss": 1.0 + 1.0 / a.step, "val_ppl": 3.0}
if data:
    result["data"] = {k: data[k] for k in ("path", "weights", "label")}
(Path(a.run) / "cooldowns" / name / "result.json").write_text(json.dumps(result))
with open(events, "a") as f:
    f.write(f"end {name} {time.time()}\\n")
"""


# -- node pools ----------------------------------------------------------------------------------


def test_hostfile_parses_hosts_slots_and_comments(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# spare nodes\nnode1 slots=8\n\nnode2 slots=4  # half a node\n")
    assert parse_hostfile(path) == {"node1": 8, "node2": 4}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node1 slots=8\nnode2 slots\n", "hosts:2: expected 'HOST slots=N'"),
        ("node1 slots=8\nnode1 slots=4\n", "hosts:2: host 'node1' is listed twice"),
        ("node1 slots=0\n", "hosts:1: slots must be >= 1"),
        ("node1 slots=100000000000000000000\n", "hosts:1: slots must be >= 1 and <= 1024"),
        ("node1 slots=1e20\n", "hosts:1: expected 'HOST slots=N'"),
        ("# nothing\n\n", "lists no hosts"),
    ],
)
def test_broken_hostfile_names_the_line(tmp_path, text, expected):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(NodePoolError, match=expected):
        parse_pool(str(path))


def test_pool_commands(tmp_path, monkeypatch):
    local = parse_pool("local:2")
    assert [s.name for s in local.slots] == ["local:0", "local:1"]
    assert local.command(local.slots[1], "m", ["--x"]) == [sys.executable, "-m", "m", "--x"]

    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\nnode7 slots=4\n")
    pool = parse_pool(str(hostfile), gpus_per_job=2)
    assert [s.name for s in pool.slots] == ["localhost:0,1", "node7:0,1", "node7:2,3"]
    remote = pool.command(pool.slots[2], "evertrain.launch.fork", ["--step", "5"])
    assert remote[:5] == ["deepspeed", "--hostfile", str(hostfile.resolve()), "--include", "node7:2,3"]
    assert "--force_multi" in remote and remote[-4:] == ["--module", "evertrain.launch.fork", "--step", "5"]
    ports = {pool.command(s, "m", [])[remote.index("--master_port") + 1] for s in pool.slots[1:]}
    assert len(ports) == 2  # two forks on node7 rendezvous on different ports
    assert "--force_multi" not in pool.command(pool.slots[0], "m", [])  # localhost runs here
    assert [s.name for s in parse_pool(str(hostfile)).slots] == ["localhost:0,1", "node7:0,1,2,3"]

    for bad in ("local:0", "local:x", "slurm:-1"):
        with pytest.raises(NodePoolError, match="slot count"):
            parse_pool(bad)
    with pytest.raises(NodePoolError, match="hostfile not found"):
        parse_pool(str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NodePoolError, match="sbatch is not on PATH"):
        parse_pool("slurm")


# -- the queue with a fake fork -------------------------------------------------------------------


def fake_checkpoints(run_dir: Path, steps) -> None:
    for step in steps:
        step_dir = run_dir / "checkpoints" / f"step_{step:09d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "meta.json").write_text(json.dumps({"step": step}))


@pytest.fixture
def fake_fork(tmp_path, monkeypatch):
    """The module name of a fake fork importable by child processes; returns the run dir."""
    (tmp_path / "fakefork.py").write_text(FAKE_FORK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    return run_dir


def events(run_dir: Path) -> list[tuple[str, str, float]]:
    path = run_dir / "events.txt"
    lines = path.read_text().split("\n") if path.is_file() else []
    return [(kind, name, float(t)) for kind, name, t in (line.split() for line in lines if line)]


def max_concurrency(evts) -> int:
    running = peak = 0
    for kind, _, _ in sorted(evts, key=lambda e: e[2]):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def state(run_dir: Path) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads((run_dir / "forker" / "state.json").read_text())["jobs"]}


def test_once_forks_each_eligible_checkpoint_once_at_most_one_per_slot(fake_fork, monkeypatch):
    run_dir = fake_fork
    fake_checkpoints(run_dir, [10, 20, 30, 40, 60])
    options = ForkerOptions(run_dir, cooldown_fraction=0.25, every=20, at=(30,), once=True, poll_s=0.05)
    assert Forker(options, parse_pool("local:2"), fork_module="fakefork", log=lambda _: None).run() == 0
    jobs = state(run_dir)
    assert sorted(jobs) == [
        "from_000000020_1-sqrt_5",
        "from_000000030_1-sqrt_8",
        "from_000000040_1-sqrt_10",
        "from_000000060_1-sqrt_15",
    ]
    assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs.values())
    starts = [name for kind, name, _ in events(run_dir) if kind == "start"]
    assert sorted(starts) == sorted(jobs)
    assert max_concurrency(events(run_dir)) == 2
    assert not any(active_pins(p) for p in (run_dir / "checkpoints").iterdir())  # leases released
    assert (
        "attempt 1 on local:" in (run_dir / "cooldowns" / "from_000000020_1-sqrt_5" / "fork.log").read_text()
    )

    # run again: nothing new to do, nothing launched twice
    assert Forker(options, parse_pool("local:2"), fork_module="fakefork", log=lambda _: None).run() == 0
    assert len([e for e in events(run_dir) if e[0] == "start"]) == 4


def test_failing_fork_is_retried_then_reported(fake_fork, monkeypatch):
    run_dir = fake_fork
    fake_checkpoints(run_dir, [20])
    monkeypatch.setenv("FAKE_FORK_FAIL", "1")
    monkeypatch.setenv("FAKE_FORK_SLEEP", "0")
    lines = []
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=20, once=True, max_retries=1, poll_s=0.05)
    assert Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lines.append).run() == 1
    job = state(run_dir)["from_000000020_1-sqrt_10"]
    assert job["status"] == "failed" and job["attempts"] == 2 and job["exit_codes"] == [3, 3]
    assert len(events(run_dir)) == 2
    assert any(line.startswith("forker: failed from_000000020_1-sqrt_10") for line in lines)
    assert not active_pins(run_dir / "checkpoints" / "step_000000020")


def test_forker_passes_the_cooldown_mix_to_every_fork(fake_fork, capsys):
    """--data-weights reaches each fork's command line and names its cooldown dir (@mix-<hash>), so
    branches on the run's stream and on a mix live side by side; the report labels them."""
    from evertrain.launch import report

    run_dir = fake_fork
    fake_checkpoints(run_dir, [20])
    plain = ForkerOptions(run_dir, cooldown_fraction=0.5, every=20, once=True, poll_s=0.05)
    mixed = dataclasses.replace(plain, data_weights="hq=0.7,main=0.3")
    for options in (plain, mixed):
        assert Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lambda _: None).run() == 0
    jobs = state(run_dir)
    [tagged] = [name for name in jobs if name != "from_000000020_1-sqrt_10"]
    assert tagged.startswith("from_000000020_1-sqrt_10@mix-") and all(
        j["status"] == "done" for j in jobs.values()
    )
    assert jobs[tagged]["command"][-2:] == ["--data-weights", "hq=0.7,main=0.3"]
    labels = {c.name: c.data for c in report.load_run(run_dir).cooldowns}
    assert labels == {"from_000000020_1-sqrt_10": "run", tagged: "hq=0.7,main=0.3"}
    assert (
        cli_main(
            [
                "forker",
                "--run",
                str(run_dir),
                "--every",
                "20",
                "--cooldown-fraction",
                "0.5",
                "--once",
                "--data-weights",
                "hq",
            ]
        )
        == 2
    )
    assert "--data-weights 'hq': expected SOURCE=SHARE" in capsys.readouterr().err


def test_forker_on_a_mix_restarts_from_its_own_state(fake_fork):
    """A forker with --data-weights names its jobs ...@mix-<hash>; a restarted one reads them back
    (and launches nothing twice) instead of refusing its own state.json."""
    run_dir = fake_fork
    fake_checkpoints(run_dir, [20])
    options = ForkerOptions(
        run_dir, cooldown_fraction=0.5, every=20, once=True, poll_s=0.05, data_weights="hq=0.7,main=0.3"
    )
    for _ in range(2):
        assert Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lambda _: None).run() == 0
    [job] = state(run_dir).values()
    assert "@mix-" in job["name"] and job["status"] == "done" and job["attempts"] == 1
    assert len([e for e in events(run_dir) if e[0] == "start"]) == 1


def test_average_of_more_checkpoints_than_the_run_keeps_is_refused_at_start(fake_fork, capsys):
    from evertrain.pretrain.config import dump_yaml, load_config

    run_dir = fake_fork
    fake_checkpoints(run_dir, [10, 20])
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(None, ["checkpoint.keep_last=2"])))
    argv = ["forker", "--run", str(run_dir), "--average", "3", "--once"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "--average 3: " in err
        and "keeps only its newest 2 checkpoint(s)" in err
        and len(err.splitlines()) == 1
    )
    (run_dir / "config.yaml").write_text(
        dump_yaml(load_config(None, ["checkpoint.keep_last=2", "checkpoint.keep_every=10"]))
    )
    options = ForkerOptions(run_dir, cooldown_fraction=None, average=3, once=True, poll_s=0.05)
    assert Forker(options, parse_pool("local:1"), log=lambda _: None).run() == 0  # keep_every keeps more


def test_arguments_a_remote_shell_would_refuse_are_refused_at_start(fake_fork, tmp_path):
    """An --eval-cmd with spaces cannot cross DeepSpeed's remote shell: a hostfile pool with a remote
    host says so before anything is queued or pinned, not at every job's first launch."""
    from evertrain.launch.evals import EvalHooks

    run_dir = fake_fork
    fake_checkpoints(run_dir, [10])
    hostfile = tmp_path / "hosts"
    hooks = EvalHooks(eval_cmd="python score.py {hf_dir} {out_json}")
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=10, once=True, poll_s=0.05, hooks=hooks)
    hostfile.write_text("node-1.cluster slots=1\n")
    with pytest.raises(NodePoolError, match="argument 'python score.py .* would reach the remote shell"):
        Forker(options, parse_pool(str(hostfile)), fork_module="fakefork", log=lambda _: None).run()
    assert not (run_dir / "forker" / "state.json").exists() and not active_pins(
        run_dir / "checkpoints" / "step_000000010"
    )
    hostfile.write_text("localhost slots=1\n")  # no remote shell there: any argument goes
    parse_pool(str(hostfile)).check_remote_arguments("fakefork", ["--eval-cmd", hooks.eval_cmd])


# `evertrain forker ...` as a process, launching the fake fork
FORKER_WITH_FAKE_FORK = """
import sys
from evertrain.errors import EvertrainError
from evertrain.launch import cli, forker, nodes
args = cli.build_parser().parse_args(sys.argv[1:])
try:
    sys.exit(forker.Forker(forker.options_from_args(args), nodes.parse_pool(args.pool), fork_module="fakefork",
                           log=lambda line: print(line, flush=True)).run())
except EvertrainError as exc:
    sys.exit(f"error: {exc}")
"""


def forker_cli(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        FORKER_WITH_FAKE_FORK,
        "forker",
        "--run",
        str(run_dir),
        "--every",
        "10",
        "--cooldown-fraction",
        "0.5",
        "--pool",
        "local:2",
        "--poll-s",
        "0.1",
        "--max-retries",
        "0",
        *extra,
    ]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_forker_restarts_and_adopts_running_forks(fake_fork, monkeypatch):
    """SIGKILL the forker while its forks run; the next one adopts them and launches nothing twice."""
    run_dir = fake_fork
    fake_checkpoints(run_dir, [10, 20, 30])
    monkeypatch.setenv("FAKE_FORK_HOLD", "1")
    first = subprocess.Popen(forker_cli(run_dir, "--once"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def both_slots_busy():
            jobs = state(run_dir).values() if (run_dir / "forker" / "state.json").is_file() else []
            running = [j for j in jobs if j["status"] == "running" and j["pid"] is not None]
            return running if len(running) == 2 else None

        running = wait_for(both_slots_busy, 60, "two running forks")
        # a second forker on the same run is refused while the first holds the lock
        second = subprocess.run(forker_cli(run_dir, "--once"), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another forker is already running" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert all(process_start_time(j["pid"]) == j["pid_started"] for j in running)  # alive, orphaned

    restarted = subprocess.Popen(
        forker_cli(run_dir, "--once"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: (
                json.loads((run_dir / "forker" / "state.json").read_text())["forker_pid"] == restarted.pid
            ),
            60,
            "the restarted forker",
        )
        assert {j["name"] for j in running} <= {
            n for n, j in state(run_dir).items() if j["status"] == "running"
        }
        (run_dir / "release").touch()
        stdout, stderr = restarted.communicate(timeout=120)
    finally:
        restarted.kill()
    assert restarted.returncode == 0, stderr
    jobs = state(run_dir)
    assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs.values())
    starts = sorted(name for kind, name, _ in events(run_dir) if kind == "start")
    assert starts == sorted(jobs) and len(starts) == 3
    assert "launched from_000000030_1-sqrt_15" in stdout
    assert not any(f"launched {j['name']}" in stdout for j in running)  # adopted, not relaunched


def test_launch_interrupted_before_its_pid_was_recorded(fake_fork, monkeypatch):
    """A forker killed between writing a launch and its pid: the next one finds the process by its
    command line if it started, else requeues the job without counting the attempt."""
    run_dir = fake_fork
    fake_checkpoints(run_dir, [10, 20])
    monkeypatch.setenv("FAKE_FORK_SLEEP", "1")
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=10, once=True, poll_s=0.05)
    pool = parse_pool("local:2")
    jobs = {}
    for step, slot in ((10, pool.slots[0]), (20, pool.slots[1])):
        name = f"from_{step:09d}_1-sqrt_{step // 2}"
        (run_dir / "cooldowns" / name).mkdir(parents=True)
        command = pool.command(
            slot,
            "fakefork",
            [
                "--run",
                str(run_dir.resolve()),
                "--step",
                str(step),
                "--cooldown-steps",
                str(step // 2),
                "--shape",
                "1-sqrt",
            ],
        )
        jobs[name] = Job(
            name,
            step,
            step // 2,
            "1-sqrt",
            status="running",
            attempts=1,
            slot=slot.name,
            command=command,
            log=str(run_dir / "cooldowns" / name / "fork.log"),
        )
    started = subprocess.Popen(jobs["from_000000010_1-sqrt_5"].command)  # this launch happened
    (run_dir / "forker").mkdir()
    save_jobs(run_dir / "forker" / "state.json", jobs)
    lines = []
    try:
        assert Forker(options, pool, fork_module="fakefork", log=lines.append).run() == 0
    finally:
        started.wait()
    assert f"adopted  from_000000010_1-sqrt_5 (pid {started.pid})" in lines
    assert not any(line.startswith("launched from_000000010") for line in lines)
    assert any(line.startswith("launched from_000000020_1-sqrt_10") for line in lines)
    assert {n: (j["status"], j["attempts"]) for n, j in state(run_dir).items()} == {
        "from_000000010_1-sqrt_5": ("done", 1),
        "from_000000020_1-sqrt_10": ("done", 1),
    }
    assert sorted(name for kind, name, _ in events(run_dir) if kind == "start") == sorted(jobs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--every", "10", "--cooldown-fraction", "0"], "--cooldown-fraction: must be in (0, 1]"),
        (["--cooldown-fraction", "0.2"], "give --every N and/or --at"),
        (["--every", "10"], "--cooldown-fraction: required to fork (--every/--at)"),
        (["--average", "-1"], "--average: must be >= 1 (0: no averages), got -1"),
        (["--every", "10", "--cooldown-fraction", "0.2", "--pool", "local:0"], "slot count"),
        (["--every", "10", "--cooldown-fraction", "0.2", "--max-retries", "-1"], "--max-retries"),
    ],
)
def test_bad_forker_arguments(fake_fork, capsys, argv, message):
    assert cli_main(["forker", "--run", str(fake_fork), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_forker_run_dir_must_be_a_directory_or_appear_within_wait_s(tmp_path, capsys):
    argv = ["--every", "10", "--cooldown-fraction", "0.2", "--poll-s", "0.05"]
    assert cli_main(["forker", "--run", str(tmp_path / "no" / "run"), "--wait-s", "0", *argv]) == 2
    assert capsys.readouterr().err.strip().endswith("no such directory")
    assert cli_main(["forker", "--run-dir", str(tmp_path / "no" / "run"), "--wait-s", "0.2", *argv]) == 2
    out, err = capsys.readouterr()
    assert "waiting up to 0.2 s for the training run to create" in out
    assert "no such directory after waiting 0.2 s" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    assert cli_main(["forker", "--run", str(tmp_path / "file"), *argv]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_forker_started_before_the_run_dir_exists_waits_for_it(fake_fork, tmp_path):
    """Like scripts/demo.sh on a fresh clone: not even runs/ exists when the forker starts."""
    run_dir = tmp_path / "runs" / "new"
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=10, once=True, poll_s=0.05, wait_s=60)
    lines = []
    fake_checkpoints(tmp_path / "staged", [10])

    def start_run():  # runs/ and the run dir appear together, the checkpoint complete
        run_dir.parent.mkdir()
        os.rename(tmp_path / "staged", run_dir)

    creator = threading.Timer(0.3, start_run)
    creator.start()
    try:
        assert Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lines.append).run() == 0
    finally:
        creator.join()
    assert lines[0].startswith("forker: waiting up to 60 s")
    assert state(run_dir)["from_000000010_1-sqrt_5"]["status"] == "done"


def test_unreadable_state_file_is_an_error(fake_fork):
    (fake_fork / "forker").mkdir()
    (fake_fork / "forker" / "state.json").write_text("{not json")
    options = ForkerOptions(fake_fork, cooldown_fraction=0.5, every=10, once=True)
    with pytest.raises(ForkerError, match="state.json: not a forker state file"):
        Forker(options, parse_pool("local:1"), fork_module="fakefork").run()


# -- the real thing ------------------------------------------------------------------------------


@pytest.mark.slow
def test_forker_beside_a_live_run_restarted_midway_launches_each_fork_once(tiny_data, tmp_path):
    """pretrain.py trains 200 steps; the forker (local:2) forks every 50th checkpoint, is SIGKILLed once
    a fork runs, and restarted: 4 forks, each started exactly once, each with a result."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    trainer = subprocess.Popen(
        [
            sys.executable,
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "train.max_steps=200",
            "train.log_every=10",
            "eval.every_steps=0",
            "checkpoint.every_steps=10",
            "checkpoint.keep_last=1",
            "checkpoint.keep_every=50",
            "engine.name=single",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    forker = [
        sys.executable,
        "-m",
        "evertrain.launch.cli",
        "forker",
        "--run",
        str(run_dir),
        "--every",
        "50",
        "--cooldown-fraction",
        "0.1",
        "--pool",
        "local:2",
        "--poll-s",
        "0.2",
        "--until-step",
        "200",
        "--eval-batches",
        "1",
        "--max-retries",
        "0",
    ]
    try:
        # started at once, like scripts/demo.sh: it waits for the run dir to appear
        first = subprocess.Popen(forker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            running = wait_for(
                lambda: (
                    (run_dir / "forker" / "state.json").is_file()
                    and [n for n, j in state(run_dir).items() if j["status"] == "running" and j.get("pid")]
                ),
                120,
                "a running fork",
            )
        finally:
            first.kill()
            first.wait()
        restarted = subprocess.run(forker, env=env, capture_output=True, text=True, timeout=300)
        assert not any(f"launched {name}" in restarted.stdout for name in running)  # adopted
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()[-2000:]
    finally:
        trainer.kill()
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr

    jobs = state(run_dir)
    assert sorted(jobs) == [f"from_{s:09d}_1-sqrt_{s // 10}" for s in (50, 100, 150, 200)]
    for name, job in jobs.items():
        assert job["status"] == "done" and job["attempts"] == 1, job
        log = (run_dir / "cooldowns" / name / "fork.log").read_text()
        assert log.count("=== evertrain forker: attempt") == 1 and log.count("fork: step ") == 1, log
        assert (
            json.loads((run_dir / "cooldowns" / name / "result.json").read_text())["val_loss"]
            == job["val_loss"]
        )
    main_steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert main_steps == list(range(10, 201, 10))  # the main run went on untouched
    assert not any(active_pins(p) for p in (run_dir / "checkpoints").glob("step_*"))


def test_max_queued_bounds_the_pinned_backlog(fake_fork, monkeypatch):
    """One slot, forks held running, --max-queued 1: of five new checkpoints one runs, one waits
    pinned and three are deferred unpinned; one deleted meanwhile is skipped; a restarted forker
    (the deferred ones are not in state.json: it finds them on disk again) forks the rest."""
    run_dir = fake_fork
    monkeypatch.setenv("FAKE_FORK_HOLD", "1")
    fake_checkpoints(run_dir, [10, 20, 30, 40, 50])
    lines = []
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=10, poll_s=0.05, max_queued=1, until_step=0)
    forker = Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lines.append)
    forker.state_path.parent.mkdir()
    forker.discover()
    forker.launch()
    forker.discover()
    pinned = sorted(store.step_of(p) for p in (run_dir / "checkpoints").glob("step_*") if active_pins(p))
    assert pinned == [10, 20]  # the running fork's checkpoint and the one waiting
    assert forker.deferred == {30, 40, 50}
    assert sum("deferred step(s) 20, 30, 40, 50: 1 fork(s) already wait" in line for line in lines) == 1
    forker.save()
    for proc in forker.children.values():  # the held fork ends without a result; it is retried later
        proc.kill()
        proc.wait()
    shutil.rmtree(run_dir / "checkpoints" / "step_000000030")  # retention took it meanwhile
    forker.discover()
    assert any("skipped  step 30: deleted by retention" in line for line in lines)
    assert forker.deferred == {40, 50}

    (run_dir / "release").write_text("")  # forks now finish
    monkeypatch.delenv("FAKE_FORK_HOLD")
    monkeypatch.setenv("FAKE_FORK_SLEEP", "0")
    options.once = True
    options.until_step = None
    lines.clear()
    assert Forker(options, parse_pool("local:1"), fork_module="fakefork", log=lines.append).run() == 0
    assert sorted(j["step"] for j in state(run_dir).values() if j["status"] == "done") == [10, 20, 40, 50]
    assert not any(active_pins(p) for p in (run_dir / "checkpoints").glob("step_*"))
