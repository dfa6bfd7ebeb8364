"""The surface every engine shares (see docs/architecture.md, "engines/").

An engine owns the model, the optimizer and the process group, and turns a list of micro-batches into
one optimizer step. It never touches files: checkpoint/ reads and writes its state through
`model` / `raw_model` / `optimizer` / `ds_engine`. Everything it returns stays on the device, so the
training loop decides when to pay for a host sync.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from evertrain.pretrain.config import Config, ConfigError
from evertrain.pretrain.model.transformer import Transformer
from evertrain.pretrain.roll_call import RollCall


class Engine:
    name: str = "base"
    ds_engine = None  # DeepSpeed only

    def __init__(
        self,
        *,
        model: nn.Module,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        autocast_dtype: torch.dtype | None = None,
        roll_call: RollCall | None = None,
    ):
        self.model = model  # what forward runs through (FSDP2: the fully_shard'ed module)
        self.raw_model = raw_model  # our Transformer
        self.optimizer = optimizer  # our AdamW (the inner one when DeepSpeed wraps it)
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.autocast_dtype = autocast_dtype
        # names the ranks missing from a failed wait (roll_call.py); alone, every roll call passes
        self.roll_call = roll_call if roll_call is not None else RollCall(None, rank, 1, 0.0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate gradients over the micro-batches, clip, step. Returns (mean loss of this rank,
        global grad norm before clipping), both device tensors."""
        raise NotImplementedError

    def clip_and_step(self, loss_sum: torch.Tensor, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The end of train_step for the engines that clip themselves (single, FSDP2; they set
        `grad_clip` and `skip_nonfinite`): clip, step, zero the gradients. Returns (mean loss over the
        `micro_batches`, global grad norm before clipping), both device tensors."""
        grad_norm = clip_with_grad_scale(self.model, self.optimizer, self.grad_clip, self.skip_nonfinite)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / micro_batches, grad_norm

    def forward_loss(self, windows: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.loss(windows.to(self.device, non_blocking=True))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def eval_loss(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """Mean loss over this rank's batches, averaged over ranks (ranks hold equal numbers)."""
        self.model.eval()
        try:
            loss = torch.stack([self.forward_loss(b).float() for b in batches]).mean()
        finally:
            self.model.train()
        return self.all_reduce_mean(loss)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        return value / self.world_size

    def min_max_over_ranks(self, value: int) -> tuple[int, int]:
        """(smallest, largest) of a host integer over all ranks; a host sync when distributed."""
        if self.world_size == 1:
            return value, value
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        largest, neg_smallest = t.tolist()
        return -neg_smallest, largest

    def barrier(self, where: str = "a barrier") -> None:
        """Wait for every rank; one that does not come within train.collective_timeout_s is named."""
        if self.world_size > 1:
            with self.roll_call.guard(where):
                dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def clip_with_grad_scale(
    model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, skip_nonfinite: bool = False
) -> torch.Tensor:
    """Global L2 grad norm, and the clip coefficient handed to the optimizer instead of rescaling the
    gradients in place: min(1, max_norm / (norm + 1e-6)), computed on device (no host sync).
    With `skip_nonfinite` the optimizer also gets found_inf = "the norm is NaN/Inf", so it drops this
    step's update on the device (train.on_nonfinite=skip); the norm is global, so all ranks agree.

    With FSDP2 the gradients are sharded DTensors: their norm is a partial result that
    `full_tensor()` all-reduces into the global norm.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        optimizer.grad_scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0).reshape(1)
    if skip_nonfinite:
        optimizer.found_inf = (~torch.isfinite(norm)).float().reshape(1)
    return norm


def build_model(cfg: Config, device: torch.device) -> Transformer:
    """The full model on `device`, for engines that keep every parameter on every rank (single,
    DeepSpeed ZeRO 0-2). Built on the meta device and initialised in place, so start-up holds one
    copy of the weights (not a CPU copy plus a device copy); the weights depend only on the seed, or
    with `model.init_from: hf:PATH` are the Hugging Face checkpoint's."""
    model = meta_model(cfg)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed, initial_state(cfg))
    return model


def meta_model(cfg: Config) -> Transformer:
    """The model's structure without memory; blocks compiled when `train.compile` is set (before any
    sharding wraps them, as torchtitan does)."""
    with torch.device("meta"):
        model = Transformer(cfg.model, init=False)
    if cfg.train.compile:
        model.compile_blocks()
    return model


def initial_state(cfg: Config) -> dict[str, torch.Tensor] | None:
    """`model.init_from: hf:PATH`: the checkpoint's full tensors (read on every rank, before any
    sharding, so each engine takes its own slices), else None (initialise from the seed)."""
    if cfg.model.init_from is None:
        return None
    from evertrain.pretrain.model.hf_llama import load_llama

    return load_llama(cfg.model.init_from, cfg.model)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype to compute in, or None for float32. bfloat16 is honoured on CPU too
    (torch autocast, FSDP2's mixed precision and DeepSpeed's CPU accelerator all run it there), so
    CPU runs and tests take the same bf16 paths as a GPU run."""
    if cfg.train.dtype == "float16":
        raise ConfigError(
            "train.dtype: float16 needs loss scaling, which evertrain does not do; use bfloat16"
        )
    if cfg.train.dtype == "bfloat16":
        return torch.bfloat16
    return None
