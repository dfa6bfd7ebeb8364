"""Which launcher started this process, the device to train on, and the process group.

The launchers leave distinct marks in the environment of the processes they start:
- `deepspeed` (deepspeed/launcher/launch.py) exports CROSS_RANK / CROSS_SIZE / LOCAL_SIZE besides
  RANK / LOCAL_RANK / WORLD_SIZE, and passes `--local_rank=N` on the command line;
- `torchrun` (torch.distributed.elastic) exports TORCHELASTIC_RUN_ID (and other TORCHELASTIC_*).
A process started by neither has no RANK / WORLD_SIZE and trains alone.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from evertrain.errors import EvertrainError


class LaunchError(EvertrainError):
    """A distributed engine was asked for without the launcher it needs."""


LAUNCH_HINTS = {
    "deepspeed": "launch it with `deepspeed --num_gpus N pretrain.py ...` "
                 "(on CPU: `DS_ACCELERATOR=cpu deepspeed --num_gpus N pretrain.py ...`)",
    "fsdp": "launch it with `torchrun --nproc_per_node N pretrain.py --engine fsdp ...`",
}


def detect_launcher(env: Mapping[str, str] = os.environ, local_rank_arg: int | None = None) -> str | None:
    """'deepspeed', 'torchrun', or None when no launcher started this process."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or local_rank_arg is not None:
        return "deepspeed"
    return None


def engine_for_launcher(launcher: str | None) -> str:
    """What `engine.name=auto` resolves to."""
    return {"deepspeed": "deepspeed", "torchrun": "fsdp"}.get(launcher, "single")


def require_launcher(engine_name: str, env: Mapping[str, str] = os.environ) -> None:
    """Distributed engines read their rank and rendezvous from the launcher's environment."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LaunchError(f"engine.name={engine_name} needs a launcher ({', '.join(missing)} not set): "
                          f"{LAUNCH_HINTS[engine_name]}")


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


def init_process_group(device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes; rendezvous from the launcher's env vars."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


class StopVote:
    """Agreement across ranks on "stop after this step" without stalling the accelerator.

    A signal reaches the ranks at different steps, and ranks that stop at different steps deadlock in
    the next collective. Each step starts an asynchronous MAX all-reduce of this rank's flag on a CPU
    (gloo) group, and the following step reads that result: every rank reads the same value at the
    same step, so all stop together, one step after the first rank saw the signal. Reading a CPU
    tensor is no device sync. Alone, the flag is simply returned.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.pending: tuple[dist.Work, torch.Tensor] | None = None
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

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

    def close(self) -> None:
        """Every rank issued the same votes, so the last one completes everywhere."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
