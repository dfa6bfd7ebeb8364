"""FSDP2: built on the meta device, `fully_shard` each transformer block, then the root; gloo on CPU,
nccl on GPU; under torchrun.

No rank ever holds the whole model: the model is built on the meta device, sharded, materialised
with `to_empty` (each rank allocates only its shards) and initialised shard by shard
(Transformer.init_weights: one full parameter at a time, sliced), so the weights equal the single
engine's for any world size. Parameters, gradients and optimizer state are sharded DTensors. With
train.dtype=bfloat16 (GPU or CPU), bf16 is FSDP2's mixed precision policy (bf16 compute, fp32
gradient reduction and master weights), not autocast.

As torchtitan does: blocks reshard after forward except the last (its backward starts right away),
the root (embeddings, final norm, head) keeps its gathered weights from forward to backward, and each
block explicitly prefetches the next block's all-gather (previous block's, in backward).
`engine.replicate=R` is HSDP: a 2-D mesh of R replica groups, each sharding over world / R ranks
(all-gathers stay within a group, e.g. a node; gradients are all-reduced across groups).
Between micro-batches, gradients either stay as full fp32 tensors and are reduce-scattered once
(`engine.accumulate=unsharded`, the least communication) or are reduce-scattered into the fp32
shards after every micro-batch (`sharded`, the least memory); `auto` takes the first when the plan
(evertrain/pretrain/model/plan.py) says it fits.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from evertrain.pretrain.config import Config, ConfigError
from evertrain.pretrain.distributed import init_process_group, pick_device, rank_and_world, require_launcher
from evertrain.pretrain.engines.base import Engine, compute_dtype, initial_state, meta_model
from evertrain.pretrain.model.transformer import Transformer
from evertrain.pretrain.optim import build_optimizer
from evertrain.pretrain.roll_call import RollCall


def fsdp_mesh(device_type: str, world_size: int, replicate: int) -> DeviceMesh:
    """1-D (shard) mesh, or with engine.replicate > 1 the 2-D (replicate, shard) mesh of HSDP."""
    if world_size % replicate:
        raise ConfigError(f"engine.replicate: {replicate} does not divide the world size {world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


def shard_model(model: Transformer, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """fully_shard blocks then the root, with torchtitan's reshard and explicit prefetch policy."""
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for before, after in zip(blocks, blocks[1:]):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])


def build_sharded(
    cfg: Config, mesh: DeviceMesh, device: torch.device, policy: MixedPrecisionPolicy
) -> Transformer:
    """Meta build -> fully_shard -> to_empty (this rank's shards only) -> seed-only init per shard."""
    model = meta_model(cfg)
    shard_model(model, mesh, policy)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed, initial_state(cfg))
    return model


def device_capacity(device: torch.device) -> int:
    """Bytes this rank may plan for: its GPU, or on CPU the host memory split over the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // local


def resolve_accumulate(cfg: Config, world_size: int, capacity: int) -> str:
    """engine.accumulate with auto decided by the memory plan on this machine's capacity."""
    from evertrain.pretrain.model.plan import Plan, choose_accumulate, make_plan

    if cfg.engine.accumulate != "auto" or cfg.train.grad_accum == 1:
        return cfg.engine.accumulate if cfg.engine.accumulate != "auto" else "unsharded"
    plan = make_plan(cfg, 1, world_size, engine="fsdp", accumulate="sharded")
    sized = Plan(**{**plan.__dict__, "capacity": capacity})
    return choose_accumulate(sized, "auto", plan.n_params)


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, cfg: Config, schedule):
        require_launcher("fsdp")
        rank, local_rank, world_size = rank_and_world()
        device = pick_device(cfg.train.device, local_rank)
        init_process_group(device, cfg.train.collective_timeout_s)
        roll_call = RollCall.for_default_group(cfg.train.collective_timeout_s)
        with roll_call.guard("the engine's start-up"):
            mesh = fsdp_mesh(device.type, world_size, cfg.engine.replicate)
            low_precision = compute_dtype(cfg, device)
            policy = MixedPrecisionPolicy(param_dtype=low_precision, reduce_dtype=torch.float32)
            model = build_sharded(cfg, mesh, device, policy)
            optimizer = build_optimizer(model, cfg.optim, schedule)
        super().__init__(
            model=model,
            raw_model=model,
            optimizer=optimizer,
            device=device,
            rank=rank,
            world_size=world_size,
            roll_call=roll_call,
        )
        self.grad_clip = cfg.optim.grad_clip
        self.accumulate = resolve_accumulate(cfg, world_size, device_capacity(device))
        self.skip_nonfinite = cfg.train.on_nonfinite == "skip"

    @property
    def layout(self) -> str:
        """What the banner shows: the mesh the parameters are really sharded on (read from their
        DTensors, not the config) and how gradients accumulate."""
        mesh = next(self.model.parameters()).device_mesh
        dims = " x ".join(f"{name} {size}" for name, size in zip(mesh.mesh_dim_names, mesh.shape))
        kind = "HSDP" if mesh.ndim == 2 else "FSDP"
        return f"{kind} {dims}, accumulate {self.accumulate}"

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), device=self.device)
        for i, windows in enumerate(micro_batches):
            # unsharded: reduce-scatter (and HSDP all-reduce) once, after the last micro-batch
            last = i == len(micro_batches) - 1
            self.model.set_requires_gradient_sync(last or self.accumulate == "sharded")
            loss = self.forward_loss(windows)
            (loss / len(micro_batches)).backward()
            total += loss.detach()
        return self.clip_and_step(total, len(micro_batches))
