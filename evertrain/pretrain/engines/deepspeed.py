"""DeepSpeed (ZeRO stage 0-3) with our AdamW as the client optimizer; bf16 when asked, nccl on GPU, gloo on CPU.

Started by the `deepspeed` launcher. DeepSpeed does the gradient averaging, accumulation boundaries,
ZeRO partitioning and clipping (`gradient_clipping`); we generate its config from ours and merge the
user's JSON (`engine.deepspeed_config`) under it, refusing values that contradict ours.

With ZeRO-3 the model is built inside `deepspeed.zero.Init`, which partitions each module's
parameters as it is constructed, and is then initialised one gathered parameter at a time (rank 0
fills it from the seed, DeepSpeed scatters it back): no rank holds the whole model. With ZeRO 0-2
every rank keeps the full weights anyway; they are built on the meta device and filled once.

bf16 training: DeepSpeed's defaults accumulate gradients in bf16 and reduce them in bf16. We set fp32
gradient accumulation (`data_types.grad_accum_dtype`, ZeRO stages 1-3; stage 0 has no fp32 path in
DeepSpeed) and fp32 reduction (`communication_data_type`), so the numerics match FSDP2's
(fp32 reduce_dtype, fp32 sharded gradients) and do not drift with the number of micro-batches.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch

from evertrain.pretrain.config import Config, ConfigError
from evertrain.pretrain.distributed import pick_device, pin_deepspeed_device, rank_and_world, require_launcher
from evertrain.pretrain.engines.base import Engine, build_model, compute_dtype, initial_state
from evertrain.pretrain.model.transformer import Transformer
from evertrain.pretrain.optim import build_optimizer
from evertrain.pretrain.roll_call import RollCall

# Sections of a DeepSpeed config that would replace what evertrain owns.
FORBIDDEN_SECTIONS = {
    "optimizer": "evertrain passes its own AdamW",
    "scheduler": "the LR schedule runs on device inside our AdamW",
    "fp16": "train.dtype=float16 is not supported (no loss scaling); use bfloat16",
}

# DeepSpeed's own reporting, off unless the user's JSON sets the key: we log throughput and loss on our
# log steps with one host sync, whereas its throughput timer synchronizes the device around every step
# and its per-step lines and wall-clock breakdown add more syncs and noise to the console.
QUIET_DEFAULTS = {
    "steps_per_print": 2**62,
    "wall_clock_breakdown": False,
    "timers": {"throughput": {"enabled": False, "synchronized": False}},
}


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict:
    """Our settings merged over the user's JSON; a user value that contradicts ours is an error."""
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,  # ours is a torch.optim.Optimizer DeepSpeed doesn't know
        "bf16": {"enabled": bf16},
    }
    if bf16:
        ours["communication_data_type"] = "fp32"
        if cfg.engine.zero_stage >= 1:
            ours["data_types"] = {"grad_accum_dtype": "fp32"}
    path = cfg.engine.deepspeed_config
    user = _read_json(path) if path else {}
    for section, why in FORBIDDEN_SECTIONS.items():
        if section in user and not (section == "fp16" and user[section].get("enabled") is False):
            raise ConfigError(f"engine.deepspeed_config: {path} sets '{section}', but {why}; remove it")
    quiet = {key: value for key, value in QUIET_DEFAULTS.items() if key not in user}  # the user's win
    return _merge({**user, **quiet}, ours, path, prefix="")


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"engine.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"engine.deepspeed_config: {path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return data


def _merge(user: dict, ours: dict, path: str, prefix: str) -> dict:
    merged = dict(user)
    for key, value in ours.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            merged[key] = _merge(user.get(key) or {}, value, path, prefix=f"{name}.")
        elif key in user and user[key] != value:
            raise ConfigError(
                f"engine.deepspeed_config: {path} sets {name}={user[key]!r}, "
                f"but the evertrain config gives {value!r}; set it in one place"
            )
        else:
            merged[key] = value
    return merged


def build_partitioned(cfg: Config, config: dict, device: torch.device, rank: int) -> Transformer:
    """ZeRO-3: construct partitioned, then fill each parameter from the seed while it is gathered
    (peak: one full parameter). The weights equal the other engines' on the same device type."""
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Transformer(cfg.model, init=False)
    model.rope_cos = model.rope_cos.to(device)  # buffers are not partitioned; zero.Init may leave them
    model.rope_sin = model.rope_sin.to(device)
    model.init_buffers()
    source = initial_state(cfg)  # model.init_from: every rank reads (and checks) it, as the other engines do
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                model.init_parameter(name, p, cfg.train.seed, None if source is None else source[name])
    return model


def undo_init_step(ds_optimizer, optimizer) -> None:
    """ZeRO-0 with bf16 wraps our AdamW in DeepSpeed's FP16_UnfusedOptimizer, whose constructor
    (runtime/fp16/unfused_optimizer.py, initialize_optimizer_states) runs one optimizer step on zero
    gradients to create the state. For our AdamW that is a real step: the step counter (so the LR
    schedule and the bias corrections) runs one ahead, and the fp32 masters are decayed once. Undo
    both: the masters again equal the bf16 weights they were copied from, which that step left alone."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(ds_optimizer, FP16_UnfusedOptimizer):
        return
    with torch.no_grad():
        for lps, hps in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups):
            for lp, hp in zip(lps, hps):
                hp.copy_(lp)
    optimizer.set_step(0)


def not_untested_optimizer(record) -> bool:
    """DeepSpeed calls every optimizer but its own list "untested" under ZeRO; ours is tested under ZeRO 1-3
    against the single-process engine (tests/test_engines.py), so the warning says nothing true."""
    return "untested optimizer" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Drop two messages every DeepSpeed start prints that do not apply to a user of ours (narrowly: by
    message, so every other warning still shows)."""
    import warnings

    from deepspeed.utils import logger

    logger.addFilter(not_untested_optimizer)  # the same function object: adding it again is a no-op
    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which torch 2.13 deprecates: not the user's to fix
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, schedule):
        require_launcher("deepspeed")
        if cfg.train.on_nonfinite == "skip":
            # ZeRO calls our optimizer per partition, after its own clipping: there is no global
            # "this step is bad" flag to hand it without a host sync, so a skip cannot be exact.
            raise ConfigError(
                "train.on_nonfinite=skip: not supported by the deepspeed engine; use stop "
                "(or the single/fsdp engines)"
            )
        rank, local_rank, world_size = rank_and_world()
        device = pick_device(cfg.train.device, local_rank)  # local_rank % device_count, as the other engines
        pin_deepspeed_device(device)
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed picks its accelerator
        import deepspeed

        quiet_deepspeed()
        # nccl on GPU, gloo on CPU (ccl if oneCCL is installed); a rank that never arrives fails the wait
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)
        deepspeed.init_distributed(verbose=False, timeout=timeout)
        roll_call = RollCall.for_default_group(cfg.train.collective_timeout_s)
        with roll_call.guard("the engine's start-up"):
            config = deepspeed_config(cfg, world_size, bf16=compute_dtype(cfg, device) is not None)
            if cfg.engine.zero_stage == 3:
                if cfg.train.compile:
                    # ZeRO-3 gathers weights in hooks on every Linear inside a block, which a compiled
                    # block would have to trace; DeepSpeed has its own compiler for that (deepcompile).
                    raise ConfigError(
                        "train.compile: not supported with DeepSpeed ZeRO-3; use engine.name=fsdp "
                        "or engine.zero_stage<=2"
                    )
                model = build_partitioned(cfg, config, device, rank)
            else:
                model = build_model(cfg, device)
            optimizer = build_optimizer(model, cfg.optim, schedule)
            self.ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        undo_init_step(self.ds_engine.optimizer, optimizer)
        super().__init__(
            model=self.ds_engine.module,
            raw_model=self.ds_engine.module,
            optimizer=optimizer,
            device=device,
            rank=rank,
            world_size=world_size,
            roll_call=roll_call,
        )
        # Without ZeRO or bf16, DeepSpeed clips with a helper that does not keep the norm: measure it
        # ourselves once the boundary backward has all-reduced the gradients.
        self.own_grad_norm = (
            self.ds_engine.zero_optimization_stage() == 0 and not self.ds_engine.bfloat16_enabled()
        )

    def forward_loss(self, windows: torch.Tensor) -> torch.Tensor:
        # Through the DeepSpeed engine's forward: it arms the hooks that its backward relies on
        # (accumulation scaling, ZeRO reduction), which calling the module's loss() would skip.
        windows = windows.to(self.device, non_blocking=True)
        return self.ds_engine(windows[:, :-1], windows[:, 1:])

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), device=self.device)
        grad_norm = None
        for windows in micro_batches:
            loss = self.forward_loss(windows)
            self.ds_engine.backward(loss)  # divides by gradient_accumulation_steps itself
            total += loss.detach()
            if self.own_grad_norm and self.ds_engine.is_gradient_accumulation_boundary():
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in self.model.parameters() if p.grad is not None]
                )
            self.ds_engine.step()  # a no-op until the accumulation boundary
        if grad_norm is None:
            grad_norm = torch.as_tensor(self.ds_engine.get_global_grad_norm(), device=self.device)
        return total / len(micro_batches), grad_norm

    def close(self) -> None:
        self.ds_engine.destroy()
        super().close()
