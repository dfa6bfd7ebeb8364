"""The learning rate as pure tensor arithmetic on the optimizer's device step counter.

A run has no fixed end: warmup (linear from 0) then rsqrt or constant, neither of which needs the run's
length. cosine and linear decay to a fixed `horizon` are there as baselines to compare against. A
cooldown is an overlay added when a run is forked at step s0: the LR falls from lr(s0) to exactly 0
over c steps.

`schedule(step)` uses only torch ops on the step tensor (no `.item()`, no Python `if` on its value),
so reading the LR costs no host sync and a whole training step stays CUDA-graph capturable. Step s
is the s-th optimizer update (1-based): the update that makes step s uses lr(s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from evertrain.pretrain.config import COOLDOWN_SHAPES, DECAYS, ConfigError, OptimConfig


@dataclass(frozen=True)
class Cooldown:
    """From fork step `start_step` over `steps` steps: lr = lr(start_step) * f(x), x = (step-start)/steps,
    f = 1-x (linear), 1-sqrt(x), or (1+cos(pi x))/2 (cosine); exactly 0 from start_step + steps on."""

    start_step: int
    steps: int
    shape: str = "linear"

    def __post_init__(self):
        if not _is_int(self.start_step) or self.start_step < 0:
            raise ConfigError(f"cooldown start_step: must be an integer >= 0, got {self.start_step!r}")
        if not _is_int(self.steps) or self.steps <= 0:
            raise ConfigError(f"cooldown steps: must be an integer > 0, got {self.steps!r}")
        if self.shape not in COOLDOWN_SHAPES:
            raise ConfigError(
                f"cooldown shape: must be one of {'|'.join(COOLDOWN_SHAPES)}, got {self.shape!r}"
            )

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps


@dataclass(frozen=True)
class Schedule:
    """lr(step) for a device int64 step tensor; see the module docstring and design.md."""

    max_lr: float
    warmup_steps: int
    decay: str = "rsqrt"
    rsqrt_timescale: int | None = None  # tau; None = warmup_steps, giving exactly max_lr*sqrt(w/step)
    horizon: int | None = None  # end of the cosine/linear baselines
    min_lr_ratio: float = 0.0  # where cosine/linear end, as a fraction of max_lr
    cooldown: Cooldown | None = None
    cooldown_start_lr: float = field(init=False, repr=False, default=0.0)  # lr(s0), set below

    def __post_init__(self):
        # OptimConfig is validated already; a Schedule built by hand gets the same checks here, so
        # no schedule can ever produce a non-finite LR.
        if not (isinstance(self.max_lr, (int, float)) and math.isfinite(self.max_lr) and self.max_lr > 0):
            raise ConfigError(f"optim.max_lr: must be a finite number > 0, got {self.max_lr!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        if self.decay not in DECAYS:
            raise ConfigError(f"optim.decay: must be one of {'|'.join(DECAYS)}, got {self.decay!r}")
        if self.decay == "rsqrt" and not (_is_int(self.timescale) and self.timescale > 0):
            raise ConfigError(
                f"optim.rsqrt_timescale: must be an integer > 0 (defaults to optim.warmup_steps), "
                f"got {self.rsqrt_timescale!r}"
            )
        if self.decay in ("cosine", "linear"):
            if not _is_int(self.horizon) or self.horizon <= self.warmup_steps:
                raise ConfigError(
                    f"optim.horizon: decay={self.decay} needs a horizon > optim.warmup_steps, "
                    f"got {self.horizon!r}"
                )
            if not 0.0 <= self.min_lr_ratio <= 1.0:
                raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.cooldown is not None and not isinstance(self.cooldown, Cooldown):
            raise ConfigError(f"cooldown: expected a Cooldown, got {self.cooldown!r}")
        if self.cooldown is not None:
            # lr(s0) is a constant of the schedule: evaluated once here, never per step on the device
            start_lr = self._base(torch.tensor(float(self.cooldown.start_step), dtype=torch.float64)).item()
            object.__setattr__(self, "cooldown_start_lr", start_lr)  # frozen dataclass

    @classmethod
    def from_config(cls, optim_cfg: OptimConfig, cooldown: Cooldown | None = None) -> Schedule:
        return cls(
            max_lr=optim_cfg.max_lr,
            warmup_steps=optim_cfg.warmup_steps,
            decay=optim_cfg.decay,
            rsqrt_timescale=optim_cfg.rsqrt_timescale,
            horizon=optim_cfg.horizon,
            min_lr_ratio=optim_cfg.min_lr_ratio,
            cooldown=cooldown,
        )

    @property
    def timescale(self) -> int | None:
        return self.warmup_steps if self.rsqrt_timescale is None else self.rsqrt_timescale

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        """The LR at `step` (integer tensor, any shape) as float32 on the same device.

        Computed in float64 and rounded once: a few scalar ops, and the result is the float64 closed
        form to within float32 rounding (rel. error <= 6e-8), even at steps in the billions."""
        s = step.to(torch.float64)
        lr = self._base(s)
        if self.cooldown is not None:
            lr = torch.where(s >= self.cooldown.start_step, self._cooldown(s), lr)
        return lr.to(torch.float32)

    def _base(self, s: torch.Tensor) -> torch.Tensor:
        """Warmup, then the decay (rsqrt/constant/cosine/linear), without the cooldown overlay."""
        w, max_lr = self.warmup_steps, self.max_lr
        after = torch.clamp(s - w, min=0.0)  # steps since the warmup ended; clamped so no branch sees s < w
        if self.decay == "rsqrt":
            decayed = max_lr * torch.rsqrt(1.0 + after / self.timescale)
        elif self.decay == "constant":
            decayed = torch.full_like(s, max_lr)
        else:  # cosine / linear from max_lr at w to min_lr at the horizon, then flat
            progress = torch.clamp(after / (self.horizon - w), max=1.0)
            fall = 0.5 * (1.0 + torch.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
            min_lr = self.min_lr_ratio * max_lr
            decayed = min_lr + (max_lr - min_lr) * fall
        if w == 0:  # a config value, not the step: no warmup phase at all
            return decayed
        return torch.where(s < w, max_lr * s / w, decayed)

    def _cooldown(self, s: torch.Tensor) -> torch.Tensor:
        c = self.cooldown
        x = torch.clamp((s - c.start_step) / c.steps, 0.0, 1.0)
        if c.shape == "linear":
            f = 1.0 - x
        elif c.shape == "1-sqrt":
            f = 1.0 - torch.sqrt(x)
        else:
            f = 0.5 * (1.0 + torch.cos(math.pi * x))
        # f(1) is 0 up to rounding (cos(pi) in float64); the design promises exactly 0 after the end
        return torch.where(s >= c.end_step, 0.0, self.cooldown_start_lr * f)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
