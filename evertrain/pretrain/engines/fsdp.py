"""FSDP2: `fully_shard` each transformer block, then the root; gloo on CPU, nccl on GPU; under torchrun.

Parameters, gradients and optimizer state are sharded DTensors. bf16 on GPU is FSDP2's mixed
precision policy (bf16 compute, fp32 gradient reduction and master weights), not autocast.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from evertrain.pretrain.config import Config
from evertrain.pretrain.distributed import init_process_group, pick_device, rank_and_world, require_launcher
from evertrain.pretrain.engines.base import Engine, build_model, clip_with_grad_scale, compute_dtype
from evertrain.pretrain.optim import build_optimizer


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg: Config, schedule):
        require_launcher("fsdp")
        rank, local_rank, world_size = rank_and_world()
        device = pick_device(cfg.train.device, local_rank)
        init_process_group(device)
        mesh = init_device_mesh(device.type, (world_size,))
        low_precision = compute_dtype(cfg, device)
        policy = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
        model = build_model(cfg, device)  # full and identical on every rank, then sharded
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
        optimizer = build_optimizer(model, cfg.optim, schedule)
        super().__init__(model=model, raw_model=model, optimizer=optimizer, device=device,
                         rank=rank, world_size=world_size)
        self.grad_clip = cfg.optim.grad_clip

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), device=self.device)
        for i, windows in enumerate(micro_batches):
            # reduce-scatter the gradients once, after the last micro-batch
            self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            loss = self.forward_loss(windows)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        grad_norm = clip_with_grad_scale(self.model, self.optimizer, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micro_batches), grad_norm
