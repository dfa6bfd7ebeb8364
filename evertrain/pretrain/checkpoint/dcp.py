"""Model and optimizer state of the `single` and `fsdp` engines, through torch.distributed.checkpoint.

Both engines write the same format: DCP's `.metadata` + `__<rank>_0.distcp` files holding
`model.<param name>` and `optim.<param name>.exp_avg|exp_avg_sq`, keyed by the parameter's name in our
Transformer (FSDP2 keeps the names). So one reader serves both, a checkpoint written with N ranks
loads with M (DCP reshards from the metadata), and `single` <-> `fsdp` needs no conversion.

The single engine uses DCP without a process group too, rather than torch.save, for exactly that:
a laptop run resumes under torchrun and back, and `load_consolidated` has one reader instead of two.

A save gathers the state dict in the caller's thread and hands it to checkpoint/staging.py, which
copies it to host memory without the caller waiting (the next optimizer step is what waits); the
manager's writer thread then waits for the copy and runs `dcp.save` on it, through files that hash
their bytes as they are written (`HashingFileSystem`), so meta.json's hashes need no second pass. The stager lives as long
as the manager: it keeps its host buffers (pinned on CUDA) and copies into them again at the next
save, so staging is a memcpy into warm memory rather than a fresh allocation. With FSDP the writes
coordinate over collectives, so they run on a gloo group of their own (created once, in the main
thread): the training collectives never share a group with a background thread.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from evertrain import torch_compat
from evertrain.pretrain.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, first_line
from evertrain.pretrain.checkpoint.staging import BackgroundStager
from evertrain.pretrain.checkpoint.store import CheckpointError, HashingFile
from evertrain.pretrain.distributed import collective_failed, gloo_group

DCP_METADATA = ".metadata"
# We pass no_dist=True on purpose (one process); DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class DcpState:
    """Saves and loads one engine's model + optimizer state as a DCP checkpoint."""

    def __init__(self, engine, timeout_s: float):
        self.engine = engine
        # FSDP2 state dicts (DTensors) come from the fully_shard'ed module; plain ones from our model
        self.module = engine.model if engine.name == "fsdp" else engine.raw_model
        self.distributed = engine.name == "fsdp" and engine.world_size > 1
        self.group = gloo_group(timeout_s) if self.distributed else None
        self.stager = BackgroundStager(engine.device, engine.optimizer)

    def _dcp_args(self) -> dict:
        return {"process_group": self.group} if self.distributed else {"no_dist": True}

    def stage(self, tmp_dir: Path) -> tuple[Future, Callable[[dict], None]]:
        """Start copying this rank's state to host memory: (a Future of the copy, the function that
        writes it, for the writer thread)."""
        state = {
            "model": get_model_state_dict(self.module),
            "optim": get_optimizer_state_dict(self.module, self.engine.optimizer)["state"],
        }
        return self.stager.stage(state), lambda staged: self._write(staged, tmp_dir)

    def _write(self, staged: dict, tmp_dir: Path) -> dict[str, dict]:
        """dcp.save through files that hash what is written: {file name: digest} of this rank's files."""
        digests: dict[str, dict] = {}
        writer = FileSystemWriter(str(tmp_dir))  # one file per rank, one thread, fsynced: DCP's defaults
        writer.fs = HashingFileSystem(digests)
        try:
            dcp.save(staged, storage_writer=writer, **self._dcp_args())
        except dcp.CheckpointException as exc:
            # DCP wraps every rank's error (a full disk's OSError included) in one multi-line
            # BaseException: hand the manager the OSError itself, which it reports in one line
            cause = wrapped_error(exc)
            if isinstance(cause, OSError) or collective_failed(cause):  # the manager names a missing rank
                raise cause from None
            raise CheckpointError(f"{tmp_dir}: checkpoint write failed: {first_line(exc)}") from None
        return digests

    def own_files(self, tmp_dir: Path) -> list[str]:
        """Files this rank wrote (DCP names them `__<rank>_<i>.distcp`; `.metadata` is rank 0's)."""
        rank = self.engine.rank if self.distributed else 0
        names = [p.name for p in Path(tmp_dir).glob(f"__{rank}_*.distcp")]
        return sorted(names + ([DCP_METADATA] if rank == 0 else []))

    def load(self, step_dir: Path) -> None:
        """Load a DCP checkpoint written by either engine at any world size into this engine."""
        # On a fresh optimizer this runs one zero-gradient step to create the state tensors;
        # everything it touches (weights, moments, step count) is overwritten below.
        optim_sd = get_optimizer_state_dict(self.module, self.engine.optimizer)
        state = {"model": get_model_state_dict(self.module), "optim": optim_sd["state"]}
        reader = SafeFileSystemReader(step_dir)  # never torch's own: it unpickles without an allow-list
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), **self._dcp_args())
        except dcp.CheckpointException as exc:
            raise CheckpointError(f"{step_dir}: cannot load: {first_line(exc)}") from None
        set_model_state_dict(self.module, state["model"])
        # param_groups (hyperparameters) come from this run's config, never from the checkpoint
        set_optimizer_state_dict(
            self.module,
            self.engine.optimizer,
            {"state": state["optim"], "param_groups": optim_sd["param_groups"]},
        )

    def load_slices(self, reader, source: Path) -> None:
        """Fill this engine from another engine's checkpoint, reading only this rank's rows of each
        parameter (all of them for `single`): see checkpoint/slices.py."""
        from evertrain.pretrain.checkpoint.slices import KEYS, Slice

        if not reader.has_moments:
            raise CheckpointError(
                f"{source}: has no optimizer moments; resume it with the engine that wrote it"
            )
        get_optimizer_state_dict(self.module, self.engine.optimizer)  # creates the state on a fresh optimizer
        targets, slices = [], []
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if name not in reader.shapes or reader.shapes[name] != p.shape:
                raise CheckpointError(f"{source}: has no parameter '{name}' of shape {tuple(p.shape)}")
            state = self.engine.optimizer.state[p]
            local, first_row = local_rows(p)
            start = first_row * math.prod(p.shape[1:])
            for key in KEYS:
                targets.append(_local(p if key == "weight" else state[key]))
                slices.append(Slice(name, key, start, start + local.numel()))
        with torch.no_grad():
            for target, values in zip(targets, reader.read(slices)):
                target.copy_(values.view(target.shape))

    def close(self) -> None:
        self.stager.close()


def wrapped_error(exc: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (`failures`: {rank: (error,
    stack)}), else `exc` itself."""
    failures = getattr(exc, "failures", None) or {}
    for rank in sorted(failures):
        error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(error, BaseException):
            return error
    return exc


class HashingFileSystem(FileSystem):
    """DCP's local filesystem, whose files opened for writing hash their bytes as they are written
    (store.HashingFile): the writer needs no second pass over the files to fill meta.json."""

    def __init__(self, digests: dict[str, dict]):
        super().__init__()
        self.digests = digests

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with HashingFile(Path(path), self.digests) as stream:
            yield stream

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)  # DCP writes `.metadata.tmp`, then renames it
        self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's piece of a parameter and the global index of its first row (FSDP2 shards dim 0)."""
    if not isinstance(p, DTensor):
        return p, 0
    shape, offset = torch_compat.local_shape_and_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), offset[0] if shape[0] else 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
