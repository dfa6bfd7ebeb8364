"""Engines: one small adapter per way of running the same training step (see base.py)."""

from __future__ import annotations

import os

from evertrain.pretrain.config import Config, ConfigError
from evertrain.pretrain.distributed import detect_launcher, engine_for_launcher, rank_and_world
from evertrain.pretrain.engines.base import Engine


def resolve_name(cfg: Config, launcher: str | None) -> str:
    """`engine.name`, with auto resolved by the launcher that started this process."""
    name = cfg.engine.name if cfg.engine.name != "auto" else engine_for_launcher(launcher)
    world_size = rank_and_world()[2]
    if name == "single" and world_size > 1:
        raise ConfigError(
            f"engine.name=single, but the launcher started {world_size} processes; "
            "use engine.name=deepspeed or fsdp (or auto)"
        )
    return name


def create(cfg: Config, schedule=None, launcher: str | None = None) -> Engine:
    """Build the engine (model, optimizer, process group) that `cfg` asks for.

    `schedule` defaults to the config's; forks pass one with a cooldown. `launcher` defaults to the
    one detected from the environment (pretrain.py also passes DeepSpeed's --local_rank into it).
    Engine modules are imported on demand: importing deepspeed alone takes seconds.
    """
    from evertrain.pretrain.schedule import Schedule

    if launcher is None:
        launcher = detect_launcher(os.environ)
    name = resolve_name(cfg, launcher)
    if schedule is None:
        schedule = Schedule.from_config(cfg.optim)
    if name == "deepspeed":
        from evertrain.pretrain.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, schedule)
    if name == "fsdp":
        from evertrain.pretrain.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, schedule)
    from evertrain.pretrain.engines.single import SingleEngine

    return SingleEngine(cfg, schedule)
