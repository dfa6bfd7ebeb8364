"""`evertrain sweep`: open-ended runs with forked cooldowns vs cosine runs tuned to each horizon,
every way of training at its own best max_lr over a grid, over several seeds.

The horizon experiment: does one open-ended run plus a forked cooldown reach the loss of a cosine run
tuned to exactly that horizon, and does it lag without the cooldown?

For horizons T1 < T2 < ...: a cosine run to each T (optim.decay=cosine, optim.horizon=T); per
open-ended schedule (rsqrt, constant) one run to the last T with a checkpoint at every fork point;
from it, per cooldown shape, a cooldown of c = F*T steps forked at step T - c, so that it ends at
exactly step T (the cosine run's steps and tokens); the open-ended run's own val loss at T (no
cooldown); with --average-last K the averages of its K checkpoints evenly spread over the same window
[T - c, T] (`evertrain average`, no training), one per --average-weightings (uniform, tail, ema); and
the loss model's prediction of each cooldown, fitted on what the open-ended run knew at the fork point
(results.py: computed when the table is made, no run). All of that is one *cell*; the sweep runs
one cell per (max_lr, seed) of the grid (--max-lrs, --seeds) into OUT/lr<LR>_seed<S>/. Same model,
data, warmup everywhere; every eval scores the same validation batches (same eval.batches and global
batch, and the validation windows do not depend on the seed).

The table (`aggregate`): every row (cosine; per schedule each cooldown shape, the average, no
cooldown) at each horizon is reported at the max_lr with the lowest mean val loss over the seeds, with
the mean over seeds, half the min-max range over seeds (for two seeds: mean +- that is exactly the two
values), the loss at every LR of the grid, and a flag when the best LR is at the edge of the grid. A
row is called lower/higher than cosine at T only when the seed ranges do not overlap (|difference of
means| > the sum of the two half-ranges); otherwise it is level (with one seed nothing is called).

Every run is its own process (pretrain.py, `python -m evertrain.launch.fork`, `python -m
evertrain.launch.average`), at most --parallel at a time, with one thread each when several run at
once; the cells run one after the other (seed by seed, so a cut-short sweep has whole seeds). A run
already finished is skipped, so rerunning the same command resumes the sweep; a run killed mid-way
resumes from its own checkpoint. The grid can grow: other --max-lrs/--seeds/--schedules/--shapes into
the same OUT add cells and runs and reuse the finished ones. --skip-averages runs everything but the averages (they need only
the open-ended runs' checkpoints, which are all kept, so a later run without it adds them).

    OUT/sweep.json           the plan's fixed part (a rerun with other settings into OUT is refused)
    OUT/logs/CELL/JOB.log    each process's output
    OUT/CELL/RUN/            run dirs: cosine_T<T>, rsqrt, constant (forks under RUN/cooldowns/,
                             averages under RUN/averages/)
    OUT/invocations.jsonl    wall time and load average of every invocation
    OUT/results.json         the table's numbers, written when every run is done
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.launch.runs import cooldown_dir_name, read_result
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.config import COOLDOWN_SHAPES

PRETRAIN = Path(__file__).resolve().parents[3] / "pretrain.py"
OPEN_ENDED = ("rsqrt", "constant")

FULL_CONFIG = "configs/sweep.yaml"
FULL_HORIZONS = (300, 600, 1200)
FULL_AVERAGE_LAST = 5  # checkpoints at 0.80, 0.85, 0.90, 0.95, 1.00 T: the cooldown's window
# --quick checks the pipeline, not the science: a one-layer model and tens of steps
QUICK_HORIZONS = (10, 20, 40)
QUICK_AVERAGE_LAST = 3
QUICK_WEIGHTINGS = ("uniform", "ema")
QUICK_OVERRIDES = (
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.seq_len=32",
    "train.micro_batch_size=4",
    "eval.batches=2",
    "optim.warmup_steps=4",
    "optim.rsqrt_timescale=8",
)
# the plan fields that only add runs (cells, open-ended runs, forks) and change none: they may grow
# in one OUT, reusing what is done (the cosine runs serve every schedule and shape)
GRID_FIELDS = ("max_lrs", "seeds", "schedules", "shapes", "average_weightings")
WEIGHTINGS = ("uniform", "tail", "ema")  # `evertrain average --weighting`: the free estimates compared


class SweepError(EvertrainError, ValueError):
    """A bad sweep request, or a run of the sweep that failed (the message names its log)."""


@dataclass(frozen=True)
class SweepPlan:
    config: str
    horizons: tuple[int, ...]
    cooldown_fraction: float = 0.2
    shapes: tuple[str, ...] = ("linear", "1-sqrt")
    schedules: tuple[str, ...] = OPEN_ENDED
    overrides: tuple[str, ...] = ()
    max_lrs: tuple[float, ...] = ()  # () = the config's optim.max_lr, one cell, no override
    seeds: tuple[int, ...] = ()  # () = the config's train.seed
    average_last: int = 0  # K checkpoints averaged over the cooldown window; 0 = no averaging row
    average_weightings: tuple[str, ...] = ("uniform",)  # one averaging row per weighting

    def __post_init__(self):
        h = self.horizons
        if not h or any(t <= 0 for t in h) or list(h) != sorted(set(h)):
            raise SweepError(f"--horizons: need increasing positive step counts, got {list(h)}")
        if not 0.0 < self.cooldown_fraction < 1.0:
            raise SweepError(f"--cooldown-fraction: must be in (0, 1), got {self.cooldown_fraction}")
        for t in h:
            if not 0 < self.cooldown_steps(t) < t:
                raise SweepError(
                    f"--cooldown-fraction: {self.cooldown_fraction} of horizon {t} is "
                    f"{self.cooldown_steps(t)} cooldown steps; use longer horizons"
                )
        for shape in self.shapes:
            if shape not in COOLDOWN_SHAPES:
                raise SweepError(f"--shapes: {shape!r} is not one of {'|'.join(COOLDOWN_SHAPES)}")
        for decay in self.schedules:
            if decay not in OPEN_ENDED:
                raise SweepError(f"--schedules: {decay!r} is not one of {'|'.join(OPEN_ENDED)}")
        if any(not lr > 0 for lr in self.max_lrs) or len(set(self.max_lrs)) != len(self.max_lrs):
            raise SweepError(f"--max-lrs: need distinct positive learning rates, got {list(self.max_lrs)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"--seeds: the seeds must differ, got {list(self.seeds)}")
        for weighting in self.average_weightings:
            if weighting.partition(":")[0] not in WEIGHTINGS:
                raise SweepError(f"--average-weightings: {weighting!r} is not one of {'|'.join(WEIGHTINGS)}")
        if len(set(self.average_weightings)) != len(self.average_weightings):
            raise SweepError(f"--average-weightings: listed twice in {list(self.average_weightings)}")
        if self.average_last:
            k = self.average_last
            for t in h:
                c = self.cooldown_steps(t)
                if k < 2 or c % (k - 1):
                    raise SweepError(
                        f"--average-last: {k} checkpoints cannot split the {c}-step window "
                        f"before horizon {t} evenly (need K >= 2 and {c} divisible by K - 1)"
                    )

    def cooldown_steps(self, horizon: int) -> int:
        return round(self.cooldown_fraction * horizon)

    def fork_step(self, horizon: int) -> int:
        return horizon - self.cooldown_steps(horizon)

    def average_steps(self, horizon: int) -> list[int]:
        """The K checkpoints averaged for horizon T: evenly from the fork point T - c to T."""
        c, k = self.cooldown_steps(horizon), self.average_last
        return [self.fork_step(horizon) + i * c // (k - 1) for i in range(k)] if k else []

    @property
    def eval_every(self) -> int:
        """Evals land on every horizon (the no-cooldown values) and every fork point (the curves)."""
        return math.gcd(*self.horizons, *(self.fork_step(t) for t in self.horizons))

    @property
    def checkpoint_every(self) -> int:
        """Checkpoints land on every fork point and every averaged step (and all of them are kept)."""
        return math.gcd(
            *(self.fork_step(t) for t in self.horizons),
            *(s for t in self.horizons for s in self.average_steps(t)),
        )

    def cells(self) -> list[Cell]:
        """One cell per (seed, max_lr), seed by seed."""
        return [Cell(lr, seed) for seed in (self.seeds or (None,)) for lr in (self.max_lrs or (None,))]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SweepPlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class Cell:
    """One (max_lr, seed) of the grid; None = the config's own value (no override)."""

    lr: float | None
    seed: int | None

    @property
    def name(self) -> str:
        return (
            "_".join(
                [
                    *([f"lr{self.lr:g}"] if self.lr is not None else []),
                    *([f"seed{self.seed}"] if self.seed is not None else []),
                ]
            )
            or "base"
        )

    @property
    def overrides(self) -> tuple[str, ...]:
        return (
            *((f"optim.max_lr={self.lr!r}",) if self.lr is not None else ()),
            *((f"train.seed={self.seed}",) if self.seed is not None else ()),
        )


@dataclass(frozen=True)
class TrainJob:
    """One pretrain.py run to `steps` into OUT/name."""

    name: str
    steps: int
    overrides: tuple[str, ...]

    def done(self, out: Path) -> bool:
        latest = store.latest_checkpoint(out / self.name / "checkpoints")
        return latest is not None and store.step_of(latest) >= self.steps

    def ready(self, out: Path) -> bool:
        return True

    def command(self, plan: SweepPlan, out: Path) -> list[str]:
        return [
            sys.executable,
            str(PRETRAIN),
            "--config",
            plan.config,
            "--run-dir",
            str(out / self.name),
            "--engine",
            "single",
            *self.overrides,
        ]


def checkpoint_ready(out: Path, run: str, step: int) -> bool:
    """The run's checkpoint at `step` is committed (the run may still be training past it)."""
    return (out / run / "checkpoints" / store.step_dir_name(step) / "meta.json").is_file()


@dataclass(frozen=True)
class ForkJob:
    """One `evertrain fork` of OUT/run at `step`, `cooldown_steps` long."""

    run: str
    step: int
    cooldown_steps: int
    shape: str

    @property
    def name(self) -> str:
        return f"{self.run}_{cooldown_dir_name(self.step, self.shape, self.cooldown_steps)}"

    def result_dir(self, out: Path) -> Path:
        return out / self.run / "cooldowns" / cooldown_dir_name(self.step, self.shape, self.cooldown_steps)

    def done(self, out: Path) -> bool:
        return read_result(self.result_dir(out)) is not None

    def ready(self, out: Path) -> bool:
        return checkpoint_ready(out, self.run, self.step)

    def command(self, plan: SweepPlan, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "evertrain.launch.fork",
            "--run",
            str(out / self.run),
            "--step",
            str(self.step),
            "--cooldown-steps",
            str(self.cooldown_steps),
            "--shape",
            self.shape,
            "--engine",
            "single",
        ]


@dataclass(frozen=True)
class AverageJob:
    """One `evertrain average` of OUT/run's checkpoints at `steps` (evaluated, no training)."""

    run: str
    steps: tuple[int, ...]
    weighting: str = "uniform"

    @property
    def name(self) -> str:
        suffix = "" if self.weighting == "uniform" else f"_{self.weighting.replace(':', '')}"
        return f"{self.run}_average_{self.steps[0]}-{self.steps[-1]}{suffix}"

    def result_path(self, out: Path) -> Path:
        from evertrain.launch.average import average_dir_name

        return (
            out / self.run / "averages" / average_dir_name(list(self.steps), self.weighting) / "result.json"
        )

    def done(self, out: Path) -> bool:
        return self.result_path(out).is_file()

    def ready(self, out: Path) -> bool:
        return all(checkpoint_ready(out, self.run, step) for step in self.steps)

    def command(self, plan: SweepPlan, out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "evertrain.launch.average",
            "--run",
            str(out / self.run),
            "--steps",
            ",".join(map(str, self.steps)),
            "--weighting",
            self.weighting,
        ]


def cosine_name(horizon: int) -> str:
    return f"cosine_T{horizon}"


def cell_jobs(plan: SweepPlan, cell: Cell, averages: bool = True) -> list[TrainJob | ForkJob | AverageJob]:
    """Every run of one cell, in launch order: the long open-ended runs first, their forks as soon
    as a fork point is checkpointed, the cosine runs longest first, the averages last."""
    last, c = plan.horizons[-1], cell.name
    common = (*plan.overrides, *cell.overrides, f"eval.every_steps={plan.eval_every}")
    open_ended = [
        TrainJob(
            f"{c}/{decay}",
            last,
            (
                *common,
                f"optim.decay={decay}",
                f"train.max_steps={last}",
                f"checkpoint.every_steps={plan.checkpoint_every}",
                f"checkpoint.keep_every={plan.checkpoint_every}",
            ),
        )
        for decay in plan.schedules
    ]
    forks = [
        ForkJob(f"{c}/{decay}", plan.fork_step(t), plan.cooldown_steps(t), shape)
        for t in plan.horizons
        for decay in plan.schedules
        for shape in plan.shapes
    ]
    cosines = [
        TrainJob(
            f"{c}/{cosine_name(t)}",
            t,
            (
                *common,
                "optim.decay=cosine",
                f"optim.horizon={t}",
                f"train.max_steps={t}",
                f"checkpoint.every_steps={plan.eval_every}",
                "checkpoint.keep_last=1",
                "checkpoint.keep_every=0",
            ),
        )
        for t in reversed(plan.horizons)
    ]
    averaged = (
        [
            AverageJob(f"{c}/{decay}", tuple(plan.average_steps(t)), weighting)
            for t in plan.horizons
            for decay in plan.schedules
            for weighting in plan.average_weightings
        ]
        if averages and plan.average_last
        else []
    )
    return [*open_ended, *forks, *cosines, *averaged]


def jobs_of(plan: SweepPlan, averages: bool = True) -> list[TrainJob | ForkJob | AverageJob]:
    """Every run of the sweep, cell after cell (run_jobs starts the first ready ones first)."""
    return [job for cell in plan.cells() for job in cell_jobs(plan, cell, averages)]
