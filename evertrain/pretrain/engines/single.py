"""One process, CPU or one GPU: plain autograd, bf16 autocast when train.dtype=bfloat16."""

from __future__ import annotations

import torch

from evertrain.pretrain.config import Config
from evertrain.pretrain.distributed import pick_device
from evertrain.pretrain.engines.base import Engine, build_model, compute_dtype
from evertrain.pretrain.optim import build_optimizer


class SingleEngine(Engine):
    name = "single"

    def __init__(self, cfg: Config, schedule):
        device = pick_device(cfg.train.device)
        model = build_model(cfg, device)
        optimizer = build_optimizer(model, cfg.optim, schedule)
        super().__init__(
            model=model,
            raw_model=model,
            optimizer=optimizer,
            device=device,
            autocast_dtype=compute_dtype(cfg, device),
        )
        self.grad_clip = cfg.optim.grad_clip
        self.skip_nonfinite = cfg.train.on_nonfinite == "skip"

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), device=self.device)
        for windows in micro_batches:
            loss = self.forward_loss(windows)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        return self.clip_and_step(total, len(micro_batches))
