"""The memory and FLOPs plan of one training rank: what `evertrain plan` prints and what the FSDP2
engine uses to choose how to accumulate gradients.

Everything is counted from the model's parameter shapes (a meta-device Transformer: no memory) and
the config; the formulas are the engines' actual layouts, and tests check them against measurement:
shard sizes against a real `fully_shard` under a 64-rank fake process group, saved activation bytes
against saved-tensor hooks on a small model (tests/test_scale.py).

Per-rank device memory, FSDP2 (world W, `engine.replicate` R, shard group S = W / R):
  parameters, gradients     fp32 shards: rows of dim 0 split over S, padded to a multiple of S
  optimizer moments         two fp32 tensors per parameter shard (our AdamW)
  gathered parameters       the root (embeddings, final norm, head: not resharded after forward) and
                            two blocks (the running one and the prefetched one), in the compute dtype
  gradient buffers          two blocks' unsharded gradients, compute dtype + the fp32 reduce-scatter copy
  root gradients            the root's unsharded gradients (it is not resharded after forward, so its
                            embedding and head gradients are whole until reduce-scattered), likewise
  accumulation              `engine.accumulate=unsharded` only: every parameter's full fp32 gradient
                            between micro-batches (FSDP2's no-sync accumulation)
  activations               saved tensors of one micro-batch under model.activation_checkpointing,
                            plus one block's full set while it is recomputed in backward
  logits                    one loss chunk: compute-dtype logits, their fp32 copy and its gradient
Host memory per rank: the checkpoint staging buffers (a copy of the rank's fp32 parameter and
optimizer-moment shards, kept between saves by checkpoint/dcp.py).

What the plan counts is tensors. A GPU needs more: the CUDA context, cuBLAS/cuBLASLt and NCCL
workspaces, the backward's transient tensors, and the caching allocator's fragmentation. The plan
keeps a reserve for them, RESERVE_SHARE of the GPU + RESERVE_FIXED, and a plan fits (and
`engine.accumulate=auto` picks unsharded accumulation) only within what is left. On CPU the peak
resident set of a small run is 1.0-2.0x the plan's total (tests/test_plan_rss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from evertrain.errors import EvertrainError
from evertrain.pretrain.config import Config

GIB = 1024**3
# Usable memory as nvidia-smi reports it (MiB), per GPU.
GPUS = {"h100": 81559 * 2**20, "h200": 143771 * 2**20}
# Kept free on every GPU (see the module docstring): 15% of it for the caching allocator's fragmentation
# (FSDP2's all-gather and reduce-scatter buffers change size block to block) and the backward's transient
# activation gradients, plus 2 GiB for the CUDA context and cuBLAS/NCCL workspaces. A judgment, not a
# measurement: bench/gpu_check.py prints the plan beside the measured peak so a GPU run can correct it.
RESERVE_SHARE = 0.15
RESERVE_FIXED = 2 * GIB
ROOT_PREFIXES = ("embed_tokens.", "norm.", "lm_head.")


class PlanError(EvertrainError):
    """A plan that cannot be made (engine, world size or GPU that do not fit together)."""


@dataclass
class Plan:
    engine: str
    world_size: int
    shard_group: int  # ranks a parameter is split over
    replicate: int
    gpu: str
    capacity: int  # bytes per GPU
    accumulate: str  # how gradients wait between micro-batches (FSDP2: sharded | unsharded)
    device: dict[str, int] = field(default_factory=dict)  # component -> bytes per rank
    host: dict[str, int] = field(default_factory=dict)
    n_params: int = 0
    flops_per_token: float = 0.0
    tokens_per_step: int = 0

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def reserve(self) -> int:
        return reserve_bytes(self.capacity)

    @property
    def usable(self) -> int:
        return self.capacity - self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def reserve_bytes(capacity: int) -> int:
    """What a plan leaves free on a device of `capacity` bytes: RESERVE_SHARE of it + RESERVE_FIXED."""
    return int(RESERVE_SHARE * capacity) + RESERVE_FIXED


def parameter_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter (tied tensors once), from a meta-device model."""
    import torch

    from evertrain.pretrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model, init=False)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_numel(shape: tuple[int, ...], group: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 is split in `group` chunks of ceil(rows / group) rows
    (FSDP2 pads every rank to that size; rank 0's shard has exactly that many rows)."""
    rows = math.ceil(shape[0] / group)
    return rows * math.prod(shape[1:])


def block_activation_bytes(cfg: Config, mode: str, dtype_bytes: int) -> int:
    """Bytes one block saves for backward per token, with activations in `dtype_bytes` (RMSNorm's
    inverse RMS and attention's log-sum-exp stay fp32).

    none: per RMSNorm its input, normalised input and output (3d) + inverse RMS; attention q, k, v,
    output and log-sum-exp per head; SwiGLU gate, up, silu(gate) and the product (4 ffn).
    full: the block input only. op: the input plus the outputs of the matmuls and of attention."""
    m = cfg.model
    d, heads = m.d_model, m.n_heads
    kv = (m.n_kv_heads or heads) * (d // heads)
    from evertrain.pretrain.model.transformer import ffn_hidden_size

    f = ffn_hidden_size(m)
    if mode == "none":
        return dtype_bytes * (2 * 3 * d + 2 * d + 2 * kv + 4 * f) + 4 * (2 + heads)
    if mode == "full":
        return dtype_bytes * d
    if mode == "op":
        return dtype_bytes * (d + (3 * d + 2 * kv + 2 * f) + d) + 4 * heads
    raise PlanError(f"unknown block checkpointing mode {mode!r}")


def activation_bytes_per_token(cfg: Config, dtype_bytes: int) -> int:
    """All blocks' saved bytes per token under model.activation_checkpointing, plus the final norm's
    (input, output, inverse RMS) and the head's input."""
    from evertrain.pretrain.model.transformer import block_checkpointing

    m = cfg.model
    blocks = sum(
        block_activation_bytes(
            cfg,
            block_checkpointing(m.activation_checkpointing, m.activation_checkpointing_every, i),
            dtype_bytes,
        )
        for i in range(m.n_layers)
    )
    return blocks + dtype_bytes * 2 * m.d_model + 4


def make_plan(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    engine: str | None = None,
    gpu: str = "h200",
    accumulate: str | None = None,
) -> Plan:
    """The per-rank plan for `cfg` on nodes x gpus_per_node GPUs of kind `gpu`."""
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if gpu not in GPUS:
        raise PlanError(f"--gpu: must be one of {'|'.join(GPUS)}, got {gpu!r}")
    world = nodes * gpus_per_node
    engine = engine or cfg.engine.name
    if engine == "auto":
        engine = "fsdp"
    if engine == "single" and world > 1:
        raise PlanError(f"engine single runs one process, not {world}; use fsdp or deepspeed")
    if engine not in ("single", "fsdp", "deepspeed"):
        raise PlanError(f"--engine: must be fsdp, deepspeed or single, got {engine!r}")
    shapes = parameter_shapes(cfg)
    b = 2 if cfg.train.dtype == "bfloat16" else 4
    from evertrain.pretrain.model.transformer import flops_per_token

    t, m = cfg.train, cfg.model
    tokens = t.micro_batch_size * m.seq_len
    chunk = tokens if m.loss_chunk_tokens == 0 else min(m.loss_chunk_tokens, tokens)
    block0 = [s for name, s in shapes.items() if name.startswith("layers.0.")]
    block_numel = sum(math.prod(s) for s in block0)
    root = {n: s for n, s in shapes.items() if n.startswith(ROOT_PREFIXES)}
    n_params = sum(math.prod(s) for s in shapes.values())
    activations = tokens * activation_bytes_per_token(cfg, b)
    if m.activation_checkpointing != "none":  # one block's full set while it is recomputed
        activations += tokens * block_activation_bytes(cfg, "none", b)
    device = {}
    replicate = cfg.engine.replicate if engine == "fsdp" else 1
    if engine == "fsdp":
        if world % replicate:
            raise PlanError(f"engine.replicate={replicate} does not divide the {world} ranks")
        group = world // replicate
        shard = sum(shard_numel(s, group) for s in shapes.values())
        device["parameters"] = 4 * shard
        device["gradients"] = 4 * shard
        device["optimizer"] = 8 * shard
        device["gathered parameters"] = b * (sum(math.prod(s) for s in root.values()) + 2 * block_numel)
        device["gradient buffers"] = (b + 4) * 2 * block_numel
        device["root gradients"] = (b + 4) * sum(math.prod(s) for s in root.values())
        host_state = 12 * shard
    elif engine == "deepspeed":
        group, stage = world, cfg.engine.zero_stage
        part = math.ceil(n_params / world)
        master = 4 * part if b == 2 else 0  # bf16 training keeps an fp32 master partition
        device["parameters"] = b * (part if stage == 3 else n_params) + master
        device["gradients"] = 4 * (part if stage >= 2 else n_params)
        device["optimizer"] = 8 * (part if stage >= 1 else n_params)
        if stage == 3:
            largest_root = max(math.prod(s) for s in root.values())
            device["gathered parameters"] = b * (largest_root + 2 * block_numel)
        device["gradient buffers"] = (b + 4) * block_numel
        host_state = 12 * (part if stage >= 1 else n_params)
    else:
        group = 1
        device["parameters"] = 4 * n_params
        device["gradients"] = 4 * n_params
        device["optimizer"] = 8 * n_params
        host_state = 12 * n_params
    device["activations"] = activations
    device["logits"] = chunk * m.vocab_size * (b + 4 + 4)
    plan = Plan(
        engine=engine,
        world_size=world,
        shard_group=group,
        replicate=replicate,
        gpu=gpu,
        capacity=GPUS[gpu],
        accumulate="sharded",
        device=device,
        host={"checkpoint staging": host_state},
        n_params=n_params,
        flops_per_token=flops_per_token(cfg.model),
        tokens_per_step=tokens * t.grad_accum * world,
    )
    if engine == "fsdp" and t.grad_accum > 1:
        plan.accumulate = choose_accumulate(plan, accumulate or cfg.engine.accumulate, n_params)
        if plan.accumulate == "unsharded":
            device["accumulation"] = 4 * n_params
    return plan


def choose_accumulate(plan: Plan, requested: str, n_params: int) -> str:
    """auto: keep full fp32 gradients between micro-batches (one reduce-scatter per step) when they
    fit next to everything else, else reduce-scatter after every micro-batch."""
    if requested != "auto":
        return requested
    return "unsharded" if plan.total + 4 * n_params <= plan.usable else "sharded"


def format_plan(plan: Plan, cfg: Config) -> str:
    """The table `evertrain plan` prints."""
    m = cfg.model
    layout = (
        f"HSDP {plan.replicate} x {plan.shard_group}"
        if plan.replicate > 1
        else f"sharded over {plan.shard_group}"
        if plan.engine != "single"
        else "one process"
    )
    if plan.engine == "deepspeed":
        layout = f"ZeRO-{cfg.engine.zero_stage} over {plan.world_size}"
    lines = [
        f"model: {plan.n_params / 1e9:.2f}B parameters, {m.n_layers} layers, d_model {m.d_model}, "
        f"vocab {m.vocab_size}, seq_len {m.seq_len}",
        f"engine: {plan.engine} on {plan.world_size} x {plan.gpu} ({layout}), dtype {cfg.train.dtype}, "
        f"activation_checkpointing {m.activation_checkpointing}, loss chunk {m.loss_chunk_tokens or 'off'}"
        + (f", accumulate {plan.accumulate}" if plan.engine == "fsdp" else ""),
        "",
        f"{'per-rank GPU memory':<28}{'GiB':>10}",
    ]
    for name, value in plan.device.items():
        lines.append(f"  {name:<26}{value / GIB:>10.2f}")
    lines += [
        f"  {'total':<26}{plan.total / GIB:>10.2f}",
        f"  {'reserve':<26}{plan.reserve / GIB:>10.2f}  ({RESERVE_SHARE:.0%} + {RESERVE_FIXED / GIB:.0f} GiB: "
        "workspaces, transients, fragmentation)",
        f"  {'usable on ' + plan.gpu:<26}{plan.usable / GIB:>10.2f}  (of {plan.capacity / GIB:.1f})",
        f"fits: {'yes' if plan.fits else 'NO'}",
        "",
        f"{'per-rank host memory':<28}{'GiB':>10}",
    ]
    for name, value in plan.host.items():
        lines.append(f"  {name:<26}{value / GIB:>10.2f}")
    lines += [
        "",
        f"model FLOPs per token: {plan.flops_per_token:.3e}",
        f"tokens per step: {plan.tokens_per_step:,} ({cfg.train.micro_batch_size} x {m.seq_len} x "
        f"{cfg.train.grad_accum} accumulation x {plan.world_size} ranks)",
    ]
    return "\n".join(lines)
