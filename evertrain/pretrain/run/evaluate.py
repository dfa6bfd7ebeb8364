"""Validation loss on a fixed slice of the val split, the same for every run with the same global batch.

The val set is `eval.batches` global batches of the training batch shape (micro_batch_size *
grad_accum * world_size windows), so changing how a batch is spread over ranks and accumulation steps
does not change which windows are scored. Each rank scores its slice in micro-batches, so evaluation
needs no more memory than training.
"""

from __future__ import annotations

import math

import torch

from evertrain.pretrain.config import Config
from evertrain.pretrain.data.stream import val_batches
from evertrain.pretrain.engines.base import Engine


def load_val_batches(cfg: Config, engine: Engine) -> list[torch.Tensor]:
    t = cfg.train
    global_windows = t.micro_batch_size * t.grad_accum * engine.world_size
    batches = val_batches(
        cfg.data.path, cfg.model.seq_len, cfg.eval.batches, global_windows, engine.rank, engine.world_size
    )
    return [micro for batch in batches for micro in batch.split(t.micro_batch_size)]


def evaluate(engine: Engine, batches: list[torch.Tensor]) -> dict:
    """{"val_loss", "val_ppl"} as host floats (one sync: evaluation is a logging point)."""
    val_loss = engine.eval_loss(batches).item()
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
