"""Every private torch API evertrain uses, each with a public fallback.

A GPU image ships whatever torch it was built with (e.g. 2.11), not the one our CI pins; private
names (a leading underscore) may move or vanish between releases without notice. Each function here
tries the private name *at call time* (so a test can hide it) and otherwise does the same work with
public torch: slower in places, never wrong. tests/test_torch_compat.py hides each private name and
checks the fallback against it.

    torch._fused_adamw_, torch._foreach_mul, torch._foreach_copy_    -> fused_adamw_, foreach_mul, foreach_copy_
    torch.distributed.tensor._utils.compute_local_shape_and_global_offset -> local_shape_and_offset
    torch.distributed.checkpoint._state_dict_stager.StateDictStager  -> state_dict_stager
    torch.distributed.checkpoint._traverse.set_element               -> set_element
    FileSystemReader._get_metadata_path                              -> dcp_metadata_path
    torch.ops.aten._scaled_dot_product_*  (op overloads by name)     -> aten_ops (absent ones left out)
    torch.distributed.distributed_c10d._get_default_store            -> default_store
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from datetime import timedelta
from pathlib import Path

import torch


def _private(module: str, name: str):
    """`module.name`, or None when this torch has no such module or attribute."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


# -- optimizer ops -------------------------------------------------------------------------------------


def foreach_mul(tensors: list[torch.Tensor], scalar: torch.Tensor) -> list[torch.Tensor]:
    """[t * scalar for t in tensors] (new tensors), in one launch where torch has the foreach op."""
    op = getattr(torch, "_foreach_mul", None)
    if op is not None:
        return op(tensors, scalar)
    return [t * scalar for t in tensors]


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    op = getattr(torch, "_foreach_copy_", None)
    if op is not None:
        op(dst, src)
        return
    for d, s in zip(dst, src):
        d.copy_(s)


def fused_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, weight_decay, eps, found_inf=None
) -> None:
    """torch's fused AdamW update (decoupled decay, bias correction, no amsgrad) of float32 tensors in
    place; `steps` are step-count tensors (not incremented here), `lr` a float or a device tensor,
    `found_inf` an optional float tensor: 1 skips the whole update. The fallback runs the same
    arithmetic with public tensor ops, one tensor at a time, and never reads a value on the host."""
    op = getattr(torch, "_fused_adamw_", None)
    if op is not None:
        op(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
            found_inf=found_inf,
        )
        return
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step = step.to(torch.float32)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, step))
        new_m = torch.lerp(m, g, 1 - beta1)
        new_v = v * beta2 + (1 - beta2) * g * g
        denom = new_v.sqrt() / bias_correction2_sqrt + eps
        new_p = p * (1 - lr * weight_decay) - (lr / bias_correction1) * new_m / denom
        if found_inf is not None:  # a skipped step leaves p, m and v as they were
            keep = found_inf != 0
            new_p, new_m, new_v = (
                torch.where(keep, old, new) for old, new in ((p, new_p), (m, new_m), (v, new_v))
            )
        p.copy_(new_p)
        m.copy_(new_m)
        v.copy_(new_v)


# -- DTensor layout ------------------------------------------------------------------------------------


def local_shape_and_offset(global_shape, mesh, placements) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's shard of a DTensor: (local shape, offset of its first element in the global tensor).

    The fallback follows DTensor's Shard semantics (torch.chunk: ceil-sized pieces, the last ones
    shorter or empty), placements applied from the first mesh dimension on; Replicate and Partial
    leave the shape alone."""
    op = _private("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset")
    if op is not None:
        return op(global_shape, mesh, placements)
    from torch.distributed.tensor import Shard

    shape, offset = list(global_shape), [0] * len(global_shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return tuple(0 for _ in shape), tuple(global_shape)
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, Shard):
            continue
        dim, parts, index = placement.dim, mesh.size(mesh_dim), coordinate[mesh_dim]
        piece = math.ceil(shape[dim] / parts) if shape[dim] else 0
        start = min(index * piece, shape[dim])
        size = max(0, min(shape[dim], start + piece) - start)
        offset[dim] += start
        shape[dim] = size
    return tuple(shape), tuple(offset)


# -- checkpoint helpers --------------------------------------------------------------------------------


def state_dict_stager(pin_memory: bool, share_memory: bool = False):
    """DCP's StateDictStager (host buffers kept between saves), or `CopyStager` with its interface."""
    stager = _private("torch.distributed.checkpoint._state_dict_stager", "StateDictStager")
    if stager is not None:
        return stager(pin_memory=pin_memory, share_memory=share_memory)
    return CopyStager(pin_memory=pin_memory)


class CopyStager:
    """A host copy of a state dict: tensors to (pinned, on request) CPU memory, DTensors as DTensors
    over their host-copied local shard, containers rebuilt, anything else deep-copied. New buffers at
    each save (DCP's stager keeps them; that is a speed difference only)."""

    def __init__(self, pin_memory: bool = False):
        self.pin_memory = pin_memory

    def stage(self, state_dict, non_blocking: bool = False):
        return self._copy(state_dict, non_blocking)

    def _copy(self, obj, non_blocking: bool):
        from torch.distributed.tensor import DTensor

        if isinstance(obj, DTensor):
            local = self._copy(obj.to_local(), non_blocking)
            return DTensor.from_local(
                local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
            )
        if isinstance(obj, torch.Tensor):
            pin = self.pin_memory and obj.device.type != "cpu"
            out = torch.empty_like(obj.detach(), device="cpu", pin_memory=pin)
            out.copy_(obj.detach(), non_blocking=non_blocking and pin)
            return out
        if isinstance(obj, dict):
            return type(obj)((k, self._copy(v, non_blocking)) for k, v in obj.items())
        if isinstance(obj, list):
            return [self._copy(v, non_blocking) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, non_blocking) for v in obj)
        return copy.deepcopy(obj)

    def close(self) -> None:
        pass


def set_element(root: dict, path, value) -> None:
    """Put `value` at the object path `path` (keys and list indices) in `root`, making containers."""
    op = _private("torch.distributed.checkpoint._traverse", "set_element")
    if op is not None:
        op(root, path, value)
        return
    node = root
    for here, key in zip(path[:-1], path[1:]):
        empty = {} if type(key) is str else []
        if isinstance(node, dict):
            node = node.setdefault(here, empty)
        else:
            node.extend([None] * (here + 1 - len(node)))
            if node[here] is None:
                node[here] = empty
            node = node[here]
    last = path[-1]
    if type(last) is int:
        node.extend([None] * (last + 1 - len(node)))
    node[last] = value


def dcp_metadata_path(reader, rank: int | None = None) -> Path:
    """Where a FileSystemReader's checkpoint keeps its `.metadata` (per rank: `__<rank>.metadata`)."""
    op = getattr(reader, "_get_metadata_path", None)
    if op is not None:
        return op(rank) if rank is not None else op()
    return Path(reader.path) / (".metadata" if rank is None else f"__{rank}.metadata")


def aten_ops(names: list[str]) -> set:
    """The default overloads of the named aten ops this torch build has (a build may lack some)."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            found.add(packet.default)
    return found


# -- process group -------------------------------------------------------------------------------------


def default_store(timeout_s: float):
    """The store of the default process group (keys shared by all its ranks). The fallback connects
    a client of its own to the env:// rendezvous (MASTER_ADDR:MASTER_PORT, where every launcher
    evertrain supports rendezvouses) under the prefixes init_process_group gives the default group's
    store ("default_pg", then the group's name), so it reads and writes the same keys. `timeout_s`
    bounds the fallback's requests."""
    op = _private("torch.distributed.distributed_c10d", "_get_default_store")
    if op is not None:
        return op()
    import torch.distributed as dist

    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"{dist.group.WORLD.group_name}/", dist.PrefixStore("default_pg", client))
