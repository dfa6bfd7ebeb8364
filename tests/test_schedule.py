"""The on-device LR schedule against float64 closed forms written out here, independently of schedule.py."""

import math

import pytest
import torch

from evertrain.errors import EvertrainError
from evertrain.pretrain.config import ConfigError, OptimConfig
from evertrain.pretrain.schedule import Cooldown, Schedule

MAX_LR = 3e-4
W = 100
STEPS = [0, 1, 2, W // 2, W - 1, W, W + 1, W + 7, 2 * W, 10 * W, 12_345, 10**6, 10**9, 2**40]


def lr_at(schedule: Schedule, steps) -> list[float]:
    return schedule(torch.tensor(steps, dtype=torch.int64)).double().tolist()


def assert_close(got: list[float], want: list[float]) -> None:
    # float32 output of a float64 computation: one rounding, rel. error <= 2^-24 ~ 6e-8
    for step, g, w in zip(STEPS, got, want):
        assert abs(g - w) <= 1e-7 * abs(w) + 1e-30, (step, g, w)


def warmup(s: int, w: int = W) -> float:
    return MAX_LR * s / w


def test_rsqrt_is_the_seeds_max_lr_sqrt_w_over_step():
    want = [warmup(s) if s < W else MAX_LR * math.sqrt(W / s) for s in STEPS]
    assert_close(lr_at(Schedule(MAX_LR, W), STEPS), want)


def test_rsqrt_with_a_longer_timescale():
    tau = 2000
    want = [warmup(s) if s < W else MAX_LR / math.sqrt(1 + (s - W) / tau) for s in STEPS]
    assert_close(lr_at(Schedule(MAX_LR, W, rsqrt_timescale=tau), STEPS), want)
    # it decays more slowly than tau = w
    assert lr_at(Schedule(MAX_LR, W, rsqrt_timescale=tau), [1600]) > lr_at(Schedule(MAX_LR, W), [1600])


def test_rsqrt_without_warmup_starts_at_max_lr():
    want = [MAX_LR / math.sqrt(1 + s / 50) for s in STEPS]
    assert_close(lr_at(Schedule(MAX_LR, 0, rsqrt_timescale=50), STEPS), want)


def test_constant():
    want = [warmup(s) if s < W else MAX_LR for s in STEPS]
    assert_close(lr_at(Schedule(MAX_LR, W, decay="constant"), STEPS), want)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_fixed_horizon_baselines(decay, min_ratio):
    horizon, min_lr = 1000, min_ratio * MAX_LR

    def want(s):
        if s < W:
            return warmup(s)
        x = min(1.0, (s - W) / (horizon - W))
        fall = 0.5 * (1 + math.cos(math.pi * x)) if decay == "cosine" else 1 - x
        return min_lr + (MAX_LR - min_lr) * fall

    schedule = Schedule(MAX_LR, W, decay=decay, horizon=horizon, min_lr_ratio=min_ratio)
    got = lr_at(schedule, STEPS)
    for step, g, w in zip(STEPS, got, [want(s) for s in STEPS]):
        assert abs(g - w) <= 1e-7 * MAX_LR, (step, g, w)  # absolute near 0, where cosine ends
    assert lr_at(schedule, [horizon, horizon + 1, 10**9]) == pytest.approx([min_lr] * 3, abs=1e-12)


@pytest.mark.parametrize(
    "shape,f",
    [
        ("linear", lambda x: 1 - x),
        ("1-sqrt", lambda x: 1 - math.sqrt(x)),
        ("cosine", lambda x: 0.5 * (1 + math.cos(math.pi * x))),
    ],
)
@pytest.mark.parametrize("s0", [40, 1000])  # during the warmup, and on the rsqrt tail
def test_cooldown_overlay(shape, f, s0):
    c = 300
    base = Schedule(MAX_LR, W)
    cooled = Schedule(MAX_LR, W, cooldown=Cooldown(s0, c, shape))
    lr_s0 = warmup(s0) if s0 < W else MAX_LR * math.sqrt(W / s0)
    steps = [0, 1, s0 - 1, s0, s0 + 1, s0 + c // 3, s0 + c - 1]
    want = [base_lr if s < s0 else lr_s0 * f((s - s0) / c) for s, base_lr in zip(steps, lr_at(base, steps))]
    got = lr_at(cooled, steps)
    for step, g, w in zip(steps, got, want):
        assert abs(g - w) <= 1e-7 * abs(w) + 1e-30, (step, g, w)
    assert got[steps.index(s0)] == lr_at(base, [s0])[0]  # starts from lr(s0): no jump
    assert lr_at(cooled, [s0 + c, s0 + c + 1, 10**9]) == [0.0, 0.0, 0.0]  # exactly 0 from the end on
    assert all(a > b for a, b in zip(got[3:], got[4:]))  # falling all the way


def test_cooldown_on_a_fixed_horizon_baseline_starts_from_its_value():
    schedule = Schedule(1.0, 10, decay="linear", horizon=110, cooldown=Cooldown(60, 10, "linear"))
    assert lr_at(schedule, [60, 65, 70]) == pytest.approx([0.5, 0.25, 0.0], abs=1e-7)


def test_output_is_float32_on_the_steps_device_and_shape():
    lr = Schedule(MAX_LR, W)(torch.tensor(5, dtype=torch.int64))
    assert lr.dtype == torch.float32 and lr.shape == () and lr.device.type == "cpu"
    assert Schedule(MAX_LR, W)(torch.arange(6).reshape(2, 3)).shape == (2, 3)


def test_from_config_reads_the_optim_section():
    cfg = OptimConfig(max_lr=1e-2, warmup_steps=10, decay="cosine", horizon=50, min_lr_ratio=0.2)
    schedule = Schedule.from_config(cfg, cooldown=Cooldown(30, 5, "cosine"))
    assert (schedule.max_lr, schedule.warmup_steps, schedule.decay, schedule.horizon) == (
        1e-2,
        10,
        "cosine",
        50,
    )
    assert schedule.cooldown == Cooldown(30, 5, "cosine")
    assert Schedule.from_config(OptimConfig(warmup_steps=7)).timescale == 7


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(start_step=10, steps=0), "cooldown steps"),
        (dict(start_step=10, steps=-5), "cooldown steps"),
        (dict(start_step=10, steps=2.5), "cooldown steps"),
        (dict(start_step=-1, steps=5), "cooldown start_step"),
        (dict(start_step=10, steps=5, shape="exp"), "cooldown shape"),
    ],
)
def test_bad_cooldowns_name_the_argument(kwargs, names):
    with pytest.raises(ConfigError, match=names) as info:
        Cooldown(**kwargs)
    assert isinstance(info.value, EvertrainError) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(max_lr=float("nan"), warmup_steps=10), "optim.max_lr"),
        (dict(max_lr=float("inf"), warmup_steps=10), "optim.max_lr"),
        (dict(max_lr=0.0, warmup_steps=10), "optim.max_lr"),
        (dict(max_lr=1e-3, warmup_steps=-1), "optim.warmup_steps"),
        (dict(max_lr=1e-3, warmup_steps=10, decay="exp"), "optim.decay"),
        (dict(max_lr=1e-3, warmup_steps=0), "optim.rsqrt_timescale"),
        (dict(max_lr=1e-3, warmup_steps=10, decay="cosine"), "optim.horizon"),
        (dict(max_lr=1e-3, warmup_steps=10, decay="linear", horizon=10), "optim.horizon"),
        (
            dict(max_lr=1e-3, warmup_steps=10, decay="linear", horizon=20, min_lr_ratio=2.0),
            "optim.min_lr_ratio",
        ),
    ],
)
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        Schedule(**kwargs)
