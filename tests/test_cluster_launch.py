"""Cluster launches without a cluster: Slurm and MPI environments as variables, and fake `sbatch`,
`srun`, `ssh`, `deepspeed` and `sinfo` programs (tests/fakebin/) that record their arguments and run the
command here. Covered: ranks from srun/mpirun, Slurm node lists, the Slurm pool (a real fork on two
srun tasks), `deepspeed --launcher slurm` (a real DeepSpeed run on two srun tasks) and multi-host
hostfile forks (several at once, each with its own hostfile)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from evertrain.launch.forker import Forker, ForkerOptions
from evertrain.launch.nodes import NodePoolError, parse_pool
from evertrain.pretrain.checkpoint.store import read_meta
from evertrain.pretrain.distributed import (
    LaunchError,
    detect_launcher,
    engine_for_launcher,
    expand_nodelist,
    parse_nodelist,
    scheduler_env,
)

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
FAKEBIN = REPO / "tests" / "fakebin"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def cluster(tmp_path, monkeypatch) -> Path:
    """The fake programs first on PATH; returns the file they record their argv to (one JSON list a line)."""
    log = tmp_path / "cluster.jsonl"
    monkeypatch.setenv("PATH", f"{FAKEBIN}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CLUSTER_LOG", str(log))
    monkeypatch.setenv("FAKE_PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMI_"))]:
        monkeypatch.delenv(key)
    return log


def recorded(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


# -- node lists and ranks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,7],login1", ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[009-011]", ["a009", "a010", "a011"]),
    ],
)
def test_slurm_node_lists_expand(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("gpu[01-03", "unbalanced '['"),
        ("gpu01]", "unbalanced ']'"),
        ("gpu[3-1]", "runs backwards"),
        ("gpu[a-b]", "bad range 'a-b'"),
        ("", "no hosts"),
    ],
)
def test_bad_slurm_node_lists_are_one_line_errors(nodelist, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        parse_nodelist(nodelist)


def test_node_list_uses_scontrol_when_there_is_one(tmp_path, monkeypatch):
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho from-scontrol-1\necho from-scontrol-2\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert expand_nodelist("whatever[1-2]") == ["from-scontrol-1", "from-scontrol-2"]


SRUN_TASK = {
    "SLURM_PROCID": "5",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[07-10]",
    "SLURM_NTASKS": "8",
}


@pytest.mark.parametrize(
    "env, expected, launcher",
    [
        (
            SRUN_TASK,
            {
                "RANK": "5",
                "WORLD_SIZE": "8",
                "LOCAL_RANK": "1",
                "MASTER_ADDR": "gpu07",
                "MASTER_PORT": "29742",
            },
            "slurm",
        ),
        # mpirun inside a Slurm allocation (deepspeed --launcher openmpi): MPI's ranks, not the allocation's
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "4",
                "SLURM_JOB_NODELIST": "n[1-2]",
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            },
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
            "openmpi",
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MASTER_ADDR": "head"},
            {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "MASTER_PORT": "29500"},
            "mpich",
        ),
    ],
)
def test_ranks_come_from_the_scheduler(env, expected, launcher):
    adopted = scheduler_env(env)
    assert {k: v for k, v in adopted.items() if k != "EVERTRAIN_LAUNCHED_BY"} == expected
    assert detect_launcher({**env, **adopted}) == launcher and engine_for_launcher(launcher) == "fsdp"


@pytest.mark.parametrize(
    "env",
    [
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "4",
            "SLURM_JOB_NODELIST": "n[1-4]",
        },  # a batch script, not a task
        {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1"},  # srun -n 1: trains alone
        {**SRUN_TASK, "RANK": "0", "WORLD_SIZE": "8"},  # torchrun/deepspeed under srun: theirs win
    ],
)
def test_no_scheduler_ranks_where_none_apply(env):
    assert scheduler_env(env) == {}


# -- the Slurm pool ----------------------------------------------------------------------------------


class Reached(Exception):
    """Raised by a stand-in for deepspeed.init_distributed: the engine got that far."""


def test_deepspeed_engine_takes_its_gpu_as_local_rank_modulo_the_visible_gpus(monkeypatch):
    """`srun --gpus-per-task=1`: local rank 3 sees one GPU. The engine picks cuda:0, as FSDP2 would,
    and DeepSpeed (which reads LOCAL_RANK as a device ordinal) is handed 0 before it starts."""
    import deepspeed
    import torch

    from evertrain.pretrain.config import from_dict
    from evertrain.pretrain.engines.deepspeed import DeepSpeedEngine
    from evertrain.pretrain.schedule import Schedule

    for key, value in {
        "RANK": "3",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
        "CROSS_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    picked = []
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)

    def init_distributed(**kwargs):
        raise Reached(os.environ["LOCAL_RANK"])

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    cfg = from_dict({"train": {"device": "cuda"}, "engine": {"name": "deepspeed"}})
    with pytest.raises(Reached) as reached:
        DeepSpeedEngine(cfg, Schedule.from_config(cfg.optim))
    assert picked == [torch.device("cuda", 0)] and str(reached.value) == "0"


@pytest.mark.parametrize(
    "env, hostname_ip, warned",
    [
        (
            {"CROSS_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
            "10.0.0.5",
            ["MASTER_ADDR=127.0.0.1 is a loopback"],
        ),
        ({"SLURM_NNODES": "2", "MASTER_ADDR": "node1"}, "127.0.1.1", ["resolves to a loopback address"]),
        ({"SLURM_NNODES": "2", "MASTER_ADDR": "node1", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", []),
        (
            {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node1", "NCCL_SOCKET_IFNAME": "lo"},
            "10.0.0.5",
            ["NCCL_SOCKET_IFNAME=lo binds to the loopback"],
        ),
        (
            {
                "WORLD_SIZE": "16",
                "LOCAL_WORLD_SIZE": "8",
                "MASTER_ADDR": "node1",
                "NCCL_SOCKET_IFNAME": "^lo,docker",
            },
            "10.0.0.5",
            [],
        ),
        (
            {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1"},
            "127.0.1.1",
            [],
        ),  # one node
    ],
)
def test_preflight_warns_of_loopback_addresses_on_several_nodes(monkeypatch, env, hostname_ip, warned):
    import socket

    from evertrain.pretrain.run.preflight import check_network

    addresses = {"node1": "10.0.0.1", "127.0.0.1": "127.0.0.1", "this-host": hostname_ip}
    monkeypatch.setattr(socket, "gethostname", lambda: "this-host")
    monkeypatch.setattr(socket, "gethostbyname", addresses.__getitem__)
    lines = []
    check_network(env, lines.append)
    assert len(lines) == len(warned) and all(w in line for w, line in zip(warned, lines)), lines


def test_slurm_pool_builds_one_sbatch_job_per_fork(cluster, tmp_path):
    pool = parse_pool(
        "slurm:2", slurm_args="--partition gpu --account proj --time 2:00:00 --nodes 2 --gres=gpu:h100:8"
    )
    cmd = pool.command(pool.slots[1], "evertrain.launch.fork", ["--step", "5"], log=tmp_path / "fork.log")
    assert cmd[:3] == ["sbatch", "--wait", "--job-name=evertrain-slurm-1"]
    assert cmd[cmd.index("--partition") + 1] == "gpu" and "--ntasks-per-node=8" in cmd
    assert f"--output={tmp_path / 'fork.log'}" in cmd
    inner = shlex.split(cmd[cmd.index("--wrap") + 1])
    assert inner[:2] == ["srun", "--kill-on-bad-exit=1"] and inner[-4:] == [
        "-m",
        "evertrain.launch.fork",
        "--step",
        "5",
    ]
    given = parse_pool("slurm", slurm_args="--gpus-per-node=4 --ntasks-per-node=2")
    assert [o for o in given.command(given.slots[0], "m", []) if o.startswith("--ntasks")] == [
        "--ntasks-per-node=2"
    ]
    for args, message in (("--wrap 'x'", "must not hold --wrap"), ("--partition 'x", "--slurm-args")):
        with pytest.raises(NodePoolError, match=message):
            parse_pool("slurm", slurm_args=args)
    with pytest.raises(NodePoolError, match="only for --pool slurm"):
        parse_pool("local:1", slurm_args="--partition gpu")


@pytest.mark.slow
def test_forker_on_slurm_runs_a_real_fork_on_two_srun_tasks(cluster, tiny_data, tmp_path):
    """The forker submits the fork as a job; inside it srun starts 2 tasks that take their ranks from
    Slurm's variables and run FSDP2 (engine auto under srun) to result.json."""
    run_dir = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.max_steps=4",
            "checkpoint.every_steps=4",
            "eval.every_steps=0",
            "train.micro_batch_size=4",
            "--engine",
            "single",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    options = ForkerOptions(
        run_dir, cooldown_fraction=0.5, every=4, once=True, poll_s=0.2, eval_batches=1, engine="auto"
    )
    pool = parse_pool(
        "slurm:1", slurm_args="--partition cpu --account proj --time 10:00 --nodes 1 --ntasks-per-node 2"
    )
    lines = []
    assert Forker(options, pool, log=lines.append).run() == 0, lines
    out = run_dir / "cooldowns" / "from_000000004_1-sqrt_2"
    assert json.loads((out / "result.json").read_text())["from_step"] == 4
    meta = read_meta(out / "final")
    assert (meta["engine"], meta["world_size"]) == ("fsdp", 2)
    sbatch, srun = recorded(cluster)
    assert sbatch[0] == "sbatch" and ["--partition", "cpu"] == sbatch[sbatch.index("--partition") :][:2]
    assert srun[0] == "srun" and "evertrain.launch.fork" in srun


@pytest.mark.slow
def test_deepspeed_launcher_slurm_gets_ranks_right(cluster, tiny_data, tmp_path):
    """`deepspeed --launcher slurm` runs `srun -n 2 python -u pretrain.py`: two ranks of one
    DeepSpeed run (not two single-engine runs on rank 0 sharing a run dir)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    port = free_port()
    run_dir = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": port}
    # --force_multi: with one host in the hostfile DeepSpeed would otherwise start the ranks itself
    proc = subprocess.run(
        [
            str(VENV_BIN / "deepspeed"),
            "--force_multi",
            "--launcher",
            "slurm",
            "--hostfile",
            str(hostfile),
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.max_steps=2",
            "checkpoint.every_steps=2",
            "eval.every_steps=0",
            "train.micro_batch_size=4",
            "engine.name=deepspeed",
            "engine.zero_stage=3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_meta(run_dir / "checkpoints" / "step_000000002")
    assert (meta["engine"], meta["world_size"], meta["zero_stage"]) == ("deepspeed", 2, 3)
    srun = [argv for argv in recorded(cluster) if argv[0] == "srun"]
    assert srun and srun[0][1:3] == ["-n", "2"]


# -- multi-host forks ----------------------------------------------------------------------------------

FAKE_FORK = """
import argparse, json, os, time
from pathlib import Path
p = argparse.ArgumentParser()
for a in ("--run", "--shape", "--engine", "--step", "--cooldown-steps", "--eval-batches"):
    p.add_argument(a)
a = p.parse_args()
out = Path(a.run) / "cooldowns" / f"from_{int(a.step):09d}_{a.shape}_{a.cooldown_steps}"
with open(Path(a.run) / "events.txt", "a") as f:
    f.write(f"start {out.name} {time.time()}\\n")
time.sleep(1.0)
(out / "result.json").write_text(json.dumps({"from_step": int(a.step), "val_loss": 1.0}))
with open(Path(a.run) / "events.txt", "a") as f:
    f.write(f"end {out.name} {time.time()}\\n")
"""


def test_multi_host_forks_get_their_own_hostfiles_and_run_at_once(cluster, tmp_path, monkeypatch):
    (tmp_path / "fakefork.py").write_text(FAKE_FORK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=8\nn2 slots=8\nn3 slots=8\nn4 slots=8\nn5 slots=8\n")
    run_dir = tmp_path / "run"
    for step in (10, 20):
        (run_dir / "checkpoints" / f"step_{step:09d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step_{step:09d}" / "meta.json").write_text(json.dumps({"step": step}))
    pool = parse_pool(str(hostfile), hosts_per_job=2)
    assert [s.name for s in pool.slots] == ["n1+n2", "n3+n4"]  # n5 alone cannot host a 2-host fork
    options = ForkerOptions(run_dir, cooldown_fraction=0.5, every=10, once=True, poll_s=0.05)
    assert Forker(options, pool, fork_module="fakefork", log=lambda _: None).run() == 0
    launches = [argv for argv in recorded(cluster) if argv[0] == "deepspeed"]
    assert len(launches) == 2
    written = {}
    for argv in launches:
        fork_hostfile = Path(argv[argv.index("--hostfile") + 1])
        written[fork_hostfile.parent.name] = fork_hostfile.read_text()
        assert argv[argv.index("--master_addr") + 1] == fork_hostfile.read_text().split()[0]
    assert sorted(written.values()) == ["n1 slots=8\nn2 slots=8\n", "n3 slots=8\nn4 slots=8\n"]
    starts = sorted(
        float(t)
        for kind, _, t in (line.split() for line in (run_dir / "events.txt").read_text().splitlines())
        if kind == "start"
    )
    ends = sorted(
        float(t)
        for kind, _, t in (line.split() for line in (run_dir / "events.txt").read_text().splitlines())
        if kind == "end"
    )
    assert starts[1] < ends[0]  # both forks ran at the same time
    with pytest.raises(NodePoolError, match="fewer than --hosts-per-fork 6"):
        parse_pool(str(hostfile), hosts_per_job=6)
    with pytest.raises(NodePoolError, match="takes whole hosts"):
        parse_pool(str(hostfile), gpus_per_job=4, hosts_per_job=2)
