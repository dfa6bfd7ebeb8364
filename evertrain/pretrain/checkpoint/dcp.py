"""Model and optimizer state of the `single` and `fsdp` engines, through torch.distributed.checkpoint.

Both engines write the same format: DCP's `.metadata` + `__<rank>_0.distcp` files holding
`model.<param name>` and `optim.<param name>.exp_avg|exp_avg_sq`, keyed by the parameter's name in our
Transformer (FSDP2 keeps the names). So one reader serves both, a checkpoint written with N ranks
loads with M (DCP reshards from the metadata), and `single` <-> `fsdp` needs no conversion.

The single engine uses DCP without a process group too, rather than torch.save, for exactly that:
a laptop run resumes under torchrun and back, and `load_consolidated` has one reader instead of two.

`async_save` stages (copies to CPU memory) in the caller's thread and writes in its own thread.
The stager lives as long as the manager: it keeps its CPU buffers and copies into them again at the
next save (the previous write has finished by then), so staging is a memcpy into warm memory rather
than a fresh allocation. With FSDP the writes coordinate over collectives, so they run on a gloo
group of their own (created once, in the main thread): the training collectives never share a group
with a background thread.
"""
from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from evertrain.pretrain.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, first_line
from evertrain.pretrain.checkpoint.store import CheckpointError

DCP_METADATA = ".metadata"
# We pass no_dist=True on purpose (one process); DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class DcpState:
    """Saves and loads one engine's model + optimizer state as a DCP checkpoint."""

    def __init__(self, engine):
        self.engine = engine
        # FSDP2 state dicts (DTensors) come from the fully_shard'ed module; plain ones from our model
        self.module = engine.model if engine.name == "fsdp" else engine.raw_model
        self.distributed = engine.name == "fsdp" and engine.world_size > 1
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.stager = reusable_stager(engine.device)

    def _dcp_args(self) -> dict:
        return {"process_group": self.group} if self.distributed else {"no_dist": True}

    def stage(self, tmp_dir: Path) -> Future:
        """Copy this rank's state to CPU memory; the returned future completes when it is on disk."""
        state = {"model": get_model_state_dict(self.module),
                 "optim": get_optimizer_state_dict(self.module, self.engine.optimizer)["state"]}
        return dcp.async_save(state, checkpoint_id=str(tmp_dir), async_stager=self.stager, **self._dcp_args())

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
        set_optimizer_state_dict(self.module, self.engine.optimizer,
                                 {"state": state["optim"], "param_groups": optim_sd["param_groups"]})

    def load_full(self, full: dict, source: Path) -> None:
        """Fill this engine from an engine-neutral consolidated state (see read_full_state)."""
        missing = [name for name, p in self.module.named_parameters() if p.requires_grad and name not in full["optim"]]
        if missing:
            raise CheckpointError(f"{source}: has no optimizer state by parameter name for '{missing[0]}' "
                                  f"({len(missing)} parameters); resume it with the engine that wrote it")
        load_full_into_module(self.module, self.engine.optimizer, full)

    def close(self) -> None:
        self.stager.close()


def reusable_stager(device: torch.device) -> DefaultStager:
    """Synchronous staging into CPU buffers kept between saves (pinned when copying from a GPU)."""
    return DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def load_full_into_module(module: torch.nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Full (unsharded) tensors by parameter name -> a plain or FSDP2 module and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    optim_sd = get_optimizer_state_dict(module, optimizer)  # creates the state on a fresh optimizer
    set_model_state_dict(module, full["model"], options=options)
    set_optimizer_state_dict(module, optimizer, {"state": full["optim"], "param_groups": optim_sd["param_groups"]},
                             options=options)


def read_full_state(step_dir: Path) -> dict:
    """The whole DCP checkpoint in this process as full CPU tensors:
    {"model": {name: tensor}, "optim": {name: {"exp_avg": tensor, "exp_avg_sq": tensor}}}."""
    reader = SafeFileSystemReader(step_dir)
    metadata = reader.metadata
    flat = {key: torch.empty(item.size, dtype=item.properties.dtype)
            for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    dcp.load(flat, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    full: dict = {"model": {}, "optim": {}}
    for key, tensor in flat.items():
        path = metadata.planner_data[key]  # the nested path DCP flattened, e.g. ("optim", name, "exp_avg")
        if path[0] == "model":
            full["model"][path[1]] = tensor
        elif path[0] == "optim":
            full["optim"].setdefault(path[1], {})[path[2]] = tensor
    return full

