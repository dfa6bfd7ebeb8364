"""`evertrain sweep`: open-ended runs with forked cooldowns vs cosine runs tuned to each horizon,
every way of training at its own best max_lr over a grid, over several seeds (the plan: plan.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evertrain.launch.sweep.execute import run_sweep
from evertrain.launch.sweep.plan import (
    FULL_AVERAGE_LAST,
    FULL_CONFIG,
    FULL_HORIZONS,
    OPEN_ENDED,
    QUICK_AVERAGE_LAST,
    QUICK_HORIZONS,
    QUICK_OVERRIDES,
    QUICK_WEIGHTINGS,
    WEIGHTINGS,
    SweepError,
    SweepPlan,
)
from evertrain.launch.sweep.tables import print_results
from evertrain.pretrain.config import load_config


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    horizons = tuple(args.horizons or (QUICK_HORIZONS if args.quick else FULL_HORIZONS))
    overrides = (*(QUICK_OVERRIDES if args.quick else ()), *args.overrides)
    average_last = (
        args.average_last
        if args.average_last is not None
        else (QUICK_AVERAGE_LAST if args.quick else FULL_AVERAGE_LAST)
    )
    seeds = ()
    if args.seeds is not None:
        if args.seeds < 1:
            raise SweepError(f"--seeds: must be >= 1, got {args.seeds}")
        if Path(args.config).is_file():  # a missing config is named by check_configs
            base = load_config(args.config, overrides).train.seed
            seeds = tuple(base + i for i in range(args.seeds))
    return SweepPlan(
        config=args.config,
        horizons=horizons,
        cooldown_fraction=args.cooldown_fraction,
        shapes=tuple(args.shapes),
        schedules=tuple(args.schedules),
        overrides=overrides,
        max_lrs=tuple(args.max_lrs or ()),
        seeds=seeds,
        average_last=average_last,
        average_weightings=tuple(args.average_weightings or (QUICK_WEIGHTINGS if args.quick else WEIGHTINGS)),
    )


def run_command(args: argparse.Namespace) -> int:
    results = run_sweep(
        plan_from_args(args), args.out, parallel=args.parallel, averages=not args.skip_averages
    )
    print_results(results)
    print(f"sweep: results in {Path(args.out) / 'results.json'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=FULL_CONFIG, help=f"model/data/optimizer config (default {FULL_CONFIG})"
    )
    p.add_argument("--out", default="runs/horizon_sweep", help="sweep directory (default runs/horizon_sweep)")
    p.add_argument(
        "--horizons",
        type=int,
        nargs="+",
        help=f"increasing horizons in steps (default {' '.join(map(str, FULL_HORIZONS))}; "
        f"--quick: {' '.join(map(str, QUICK_HORIZONS))})",
    )
    p.add_argument(
        "--max-lrs",
        type=float,
        nargs="+",
        help="grid of max_lr; every row is reported at its best (default: the config's max_lr)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="seeds per grid point: train.seed, +1, ... (default: the config's seed only)",
    )
    p.add_argument(
        "--cooldown-fraction",
        type=float,
        default=0.2,
        help="cooldown length as a fraction of the horizon; it ends at the horizon (default 0.2)",
    )
    p.add_argument(
        "--shapes", nargs="+", default=["linear", "1-sqrt"], help="cooldown shapes (default linear 1-sqrt)"
    )
    p.add_argument(
        "--schedules",
        nargs="+",
        default=list(OPEN_ENDED),
        help="open-ended schedules (default rsqrt constant)",
    )
    p.add_argument(
        "--average-last",
        type=int,
        help=f"average K checkpoints evenly over the cooldown window [T - c, T], 0 = no averaging "
        f"row (default {FULL_AVERAGE_LAST}; --quick: {QUICK_AVERAGE_LAST})",
    )
    p.add_argument(
        "--average-weightings",
        nargs="+",
        help=f"one averaging row per weighting ({'|'.join(WEIGHTINGS)}|ema:BETA; "
        f"default {' '.join(WEIGHTINGS)}; --quick: {' '.join(QUICK_WEIGHTINGS)})",
    )
    p.add_argument(
        "--skip-averages",
        action="store_true",
        help="run everything but the averages; a later run without it adds them (default: run them)",
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2, one thread each)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and tens of steps: checks the pipeline only (default: the full sweep)",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="rsqrt/constant + forked cooldowns vs cosine at several horizons",
        description=__doc__.splitlines()[0],
    )
    add_arguments(p)
    p.set_defaults(func=run_command)
