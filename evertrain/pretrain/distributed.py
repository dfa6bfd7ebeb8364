"""Which launcher started this process, the device to train on, and the process group.

The launchers leave distinct marks in the environment of the processes they start:
- `deepspeed` (deepspeed/launcher/launch.py) exports CROSS_RANK / CROSS_SIZE / LOCAL_SIZE besides
  RANK / LOCAL_RANK / WORLD_SIZE, and passes `--local_rank=N` on the command line;
- `torchrun` (torch.distributed.elastic) exports TORCHELASTIC_RUN_ID (and other TORCHELASTIC_*).
Schedulers start every process themselves and leave their own variables instead:
- `srun` (Slurm): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID and the step's node list;
- `mpirun` (OpenMPI: OMPI_COMM_WORLD_*; MPICH and Intel MPI: PMI_RANK / PMI_SIZE / MPI_LOCALRANKID;
  MVAPICH: MV2_COMM_WORLD_*), which is also what `deepspeed --launcher openmpi|mpich|impi|mvapich`
  runs, as `deepspeed --launcher slurm` runs srun.
`adopt_scheduler_env` turns those into RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT at
start-up, before anything reads them (DeepSpeed's own MPI discovery would come too late for us and
needs mpi4py). A process started by none of these has no RANK / WORLD_SIZE and trains alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from evertrain.errors import EvertrainError


class LaunchError(EvertrainError):
    """A distributed engine was asked for without the launcher it needs."""


LAUNCH_HINTS = {
    "deepspeed": "launch it with `deepspeed --num_gpus N pretrain.py ...` "
    "(on CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus N pretrain.py ...`)",
    "fsdp": "launch it with `torchrun --nproc_per_node N pretrain.py --engine fsdp ...` "
    "(or `srun` / `mpirun` with N tasks)",
}


# (scheduler, rank, world size, local rank): MPI first, since an mpirun inside a Slurm allocation
# also sees the allocation's SLURM_PROCID=0
SCHEDULER_VARS = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),  # STEP_NUM_TASKS: srun steps only
)
DEFAULT_MASTER_PORT = 29500
LAUNCHED_BY = "EVERTRAIN_LAUNCHED_BY"  # set by adopt_scheduler_env: which scheduler started us


def scheduler_of(env: Mapping[str, str]) -> tuple[str, str, str, str] | None:
    """The SCHEDULER_VARS row of the scheduler that started this process with others, if any."""
    for row in SCHEDULER_VARS:
        if row[1] in env and row[2] in env and int(env[row[2]]) > 1:
            return row
    return None


def scheduler_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The torch.distributed variables a process started by srun or mpirun lacks ({} when it has
    them, or when it runs alone). MASTER_ADDR is the first host of the Slurm node list; MASTER_PORT
    29500 + the Slurm job id modulo 1000 (two jobs sharing a node do not share a port)."""
    row = None if "RANK" in env and "WORLD_SIZE" in env else scheduler_of(env)
    if row is None:
        return {}
    name, rank, world, local = row
    out = {"RANK": env[rank], "WORLD_SIZE": env[world], "LOCAL_RANK": env.get(local, "0"), LAUNCHED_BY: name}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(DEFAULT_MASTER_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000)
    return out


def adopt_scheduler_env(env=os.environ) -> None:
    """Export `scheduler_env` into this process (entry points call it first thing)."""
    env.update(scheduler_env(env))


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: `scontrol show hostnames` when Slurm is installed,
    else our parser of the same syntax (`gpu[01-03,7],login1`, `rack[1-2]-n[1-2]`)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to parsing it ourselves
    return parse_nodelist(nodelist)


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_nodelist(nodelist: str) -> list[str]:
    hosts = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_item(item, nodelist)
    if not hosts:
        raise LaunchError(f"Slurm node list {nodelist!r}: no hosts")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [item for item in items + [current] if item]


def _expand_item(item: str, whole: str) -> list[str]:
    """`pre[ranges]rest` -> every pre<n>rest, recursing into `rest` for further brackets."""
    if "[" not in item:
        if "]" in item:
            raise LaunchError(f"Slurm node list {whole!r}: unbalanced ']'")
        return [item]
    prefix, _, rest = item.partition("[")
    ranges, closed, suffix = rest.partition("]")
    if not closed:
        raise LaunchError(f"Slurm node list {whole!r}: unbalanced '['")
    numbers = []
    for part in ranges.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise LaunchError(f"Slurm node list {whole!r}: bad range {part!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise LaunchError(f"Slurm node list {whole!r}: range {part!r} runs backwards")
        numbers += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return [f"{prefix}{n}{tail}" for n in numbers for tail in _expand_item(suffix, whole)]


def detect_launcher(env: Mapping[str, str] = os.environ, local_rank_arg: int | None = None) -> str | None:
    """'deepspeed', 'torchrun', a scheduler ('slurm', 'openmpi', ...), or None when nothing started
    this process alongside others."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or local_rank_arg is not None:
        return "deepspeed"
    if LAUNCHED_BY in env:
        return env[LAUNCHED_BY]
    row = scheduler_of(env)
    return row[0] if row else None


def engine_for_launcher(launcher: str | None) -> str:
    """What `engine.name=auto` resolves to. Under srun or mpirun (also when `deepspeed --launcher
    slurm|openmpi` ran them) nothing tells DeepSpeed apart: FSDP2, unless engine.name says deepspeed
    (as configs/1b.yaml and 8b.yaml do)."""
    if launcher is None:
        return "single"
    return {"deepspeed": "deepspeed", "torchrun": "fsdp"}.get(launcher, "fsdp")


def require_launcher(engine_name: str, env: Mapping[str, str] = os.environ) -> None:
    """Distributed engines read their rank and rendezvous from the launcher's environment."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchError(
            f"engine.name={engine_name} needs a launcher ({', '.join(missing)} not set): "
            f"{LAUNCH_HINTS[engine_name]}"
        )


def rank_and_world(env: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as the launcher exported them; (0, 0, 1) when alone."""
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`train.device`: auto = this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvertrainError("train.device=cuda, but torch sees no CUDA device")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def pin_deepspeed_device(device: torch.device, env=os.environ) -> None:
    """DeepSpeed takes LOCAL_RANK as its CUDA device ordinal (engine._set_distributed_vars,
    zero.Init's local_device, the device_id of its init_process_group), while the other engines use
    `local_rank % device_count`. Under `srun --gpus-per-task=1` every task sees one GPU, ordinal 0,
    whatever its local rank: DeepSpeed would fail with "invalid device ordinal". So LOCAL_RANK is
    pointed at the device we picked (evertrain read the real local rank before this)."""
    if device.type == "cuda":
        env["LOCAL_RANK"] = str(device.index)


def node_count(env: Mapping[str, str] = os.environ) -> int:
    """How many nodes the launcher spread this run over (1 when it does not say)."""
    for key in (
        "CROSS_SIZE",
        "SLURM_STEP_NUM_NODES",
        "SLURM_NNODES",
        "GROUP_WORLD_SIZE",
    ):  # deepspeed, srun, torchrun
        if env.get(key, "").isdigit():
            return int(env[key])
    world = int(env.get("WORLD_SIZE", 1))
    for key in (
        "LOCAL_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MV2_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
    ):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return -(-world // int(env[key]))
    return 1


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """NCCL between GPUs, gloo between CPU processes; rendezvous from the launcher's env vars.
    `timeout_s` (train.collective_timeout_s) bounds every collective: a rank that never arrives
    (stopped, or killed without the launcher noticing) fails the others' wait instead of hanging them."""
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def gloo_group(timeout_s: float) -> dist.ProcessGroup:
    """A CPU group over all ranks whose collectives give up after `timeout_s` (new groups do not
    inherit the default group's timeout)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def collective_failed(exc: BaseException) -> bool:
    """A collective that gave up: train.collective_timeout_s ran out, or a peer's connection closed."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


class MissingRankError(EvertrainError):
    """Some rank did not reach a point where all ranks wait for each other (roll_call.py names it)."""


class StopVote:
    """Agreement across ranks on "stop after this step" without stalling the accelerator.

    A signal reaches the ranks at different steps, and ranks that stop at different steps deadlock in
    the next collective. Each step starts an asynchronous MAX all-reduce of this rank's flag on a CPU
    (gloo) group, and the following step reads that result: every rank reads the same value at the
    same step, so all stop together, one step after the first rank saw the signal. Reading a CPU
    tensor is no device sync. Alone, the flag is simply returned.

    Its group's collectives give up after the roll call's timeout (train.collective_timeout_s);
    `check_ranks` then names the ranks that did not arrive (roll_call.py: through the rendezvous
    store, not the vote's group, which may hold a vote that never completes).
    """

    def __init__(self, roll_call):
        self.roll_call = roll_call  # roll_call.RollCall of the default group
        self.world_size = roll_call.world_size
        self.pending: tuple[dist.Work, torch.Tensor] | None = None
        with roll_call.guard("the stop vote's start-up"):  # a new group: every rank connects
            self.group = gloo_group(roll_call.timeout_s) if self.world_size > 1 else None

    def __call__(self, stop_here: bool) -> bool:
        if self.world_size == 1:
            return stop_here
        agreed = False
        if self.pending is not None:
            work, votes = self.pending
            work.wait()
            agreed = bool(votes.item())  # CPU tensor: no device sync
        votes = torch.tensor([int(stop_here)], dtype=torch.int32)
        work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, votes)
        return agreed

    def check_ranks(self, where: str, cause: BaseException | None = None) -> None:
        """Wait (at most the timeout) until every rank reaches this call; MissingRankError naming the
        ranks that did not. With a `cause` (a collective that failed), return quietly when all came:
        the caller re-raises the cause, which was not a missing rank."""
        self.roll_call.check(where, cause)

    def close(self) -> None:
        """Every rank issued the same votes, so the last one completes everywhere (after all ranks
        reached the end of the loop: one that never does is named, not waited for)."""
        self.check_ranks("the end of training")
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
