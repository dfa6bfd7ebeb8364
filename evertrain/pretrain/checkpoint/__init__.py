"""Continuous checkpoints: asynchronous, atomic, retained, exactly resumable, reshardable.

    store.py       the on-disk layout: step dirs, meta.json, LATEST, the commit protocol (no torch)
    retention.py   which step dirs to keep; pins (leases) of readers (no torch)
    manager.py     CheckpointManager: stage, write in the background, commit, resume, load_consolidated
    dcp.py         engine state of `single` and `fsdp` through torch.distributed.checkpoint
    deepspeed.py   engine state of `deepspeed` through DeepSpeed's own layout
    slices.py      any checkpoint read by parameter slice: reshards and cross-engine loads

The manager's names are imported lazily, so light readers of the layout (the forker, the report,
the CLI) do not import torch just to read a meta.json.
"""

from __future__ import annotations

_MANAGER_NAMES = ("CheckpointManager", "SaveTimings", "load_consolidated", "check_model")
_STORE_NAMES = ("CheckpointError", "latest_checkpoint", "read_meta")
_RETENTION_NAMES = ("pin", "unpin", "is_pinned", "apply_retention")

__all__ = [*_MANAGER_NAMES, *_STORE_NAMES, *_RETENTION_NAMES]


def __getattr__(name: str):
    import importlib

    for module, names in (
        ("manager", _MANAGER_NAMES),
        ("store", _STORE_NAMES),
        ("retention", _RETENTION_NAMES),
    ):
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
