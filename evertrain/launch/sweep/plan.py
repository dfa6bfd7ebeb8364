"""`evertrain sweep`: open-ended runs with forked cooldowns vs cosine runs tuned to each horizon,
every way of training at its own best max_lr over a grid, over several seeds.

The horizon experiment: does one open-ended run plus a forked cooldown reach the loss of a cosine run
tuned to exactly that horizon, and does it lag without the cooldown?

For horizons T1 < T2 < ...: a cosine run to each T (optim.decay=cosine, optim.horizon=T); per
open-ended schedule (rsqrt, constant) one run to the last T with a checkpoint at every fork point;
from it, per cooldown shape, a cooldown of c = F*T steps forked at step T - c, so that it ends at
exactly step T (the cosine run's steps and tokens); the open-ended run's own val loss at T (no
cooldown); and with --average-last K the uniform average of its K checkpoints evenly spread over the
same window [T - c, T] (`evertrain average`, no training). All of that is one *cell*; the sweep runs
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

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain import safe_json
from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text
from evertrain.launch.runs import cooldown_dir_name, read_result
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.config import COOLDOWN_SHAPES, config_hash, load_config

PRETRAIN = Path(__file__).resolve().parents[3] / "pretrain.py"
OPEN_ENDED = ("rsqrt", "constant")

FULL_CONFIG = "configs/sweep.yaml"
FULL_HORIZONS = (200, 400, 800)
FULL_AVERAGE_LAST = 5  # checkpoints at 0.80, 0.85, 0.90, 0.95, 1.00 T: the cooldown's window
# --quick checks the pipeline, not the science: a one-layer model and tens of steps
QUICK_HORIZONS = (10, 20, 40)
QUICK_AVERAGE_LAST = 3
QUICK_OVERRIDES = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
                   "model.seq_len=32", "train.micro_batch_size=4", "eval.batches=2",
                   "optim.warmup_steps=4", "optim.rsqrt_timescale=8")
# the plan fields that only add runs (cells, open-ended runs, forks) and change none: they may grow
# in one OUT, reusing what is done (the cosine runs serve every schedule and shape)
GRID_FIELDS = ("max_lrs", "seeds", "schedules", "shapes")


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

    def __post_init__(self):
        h = self.horizons
        if not h or any(t <= 0 for t in h) or list(h) != sorted(set(h)):
            raise SweepError(f"--horizons: need increasing positive step counts, got {list(h)}")
        if not 0.0 < self.cooldown_fraction < 1.0:
            raise SweepError(f"--cooldown-fraction: must be in (0, 1), got {self.cooldown_fraction}")
        for t in h:
            if not 0 < self.cooldown_steps(t) < t:
                raise SweepError(f"--cooldown-fraction: {self.cooldown_fraction} of horizon {t} is "
                                 f"{self.cooldown_steps(t)} cooldown steps; use longer horizons")
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
        if self.average_last:
            k = self.average_last
            for t in h:
                c = self.cooldown_steps(t)
                if k < 2 or c % (k - 1):
                    raise SweepError(f"--average-last: {k} checkpoints cannot split the {c}-step window "
                                     f"before horizon {t} evenly (need K >= 2 and {c} divisible by K - 1)")

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
        return math.gcd(*(self.fork_step(t) for t in self.horizons),
                        *(s for t in self.horizons for s in self.average_steps(t)))

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
        return "_".join([*([f"lr{self.lr:g}"] if self.lr is not None else []),
                         *([f"seed{self.seed}"] if self.seed is not None else [])]) or "base"

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*((f"optim.max_lr={self.lr!r}",) if self.lr is not None else ()),
                *((f"train.seed={self.seed}",) if self.seed is not None else ()))


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
        return [sys.executable, str(PRETRAIN), "--config", plan.config, "--run-dir", str(out / self.name),
                "--engine", "single", *self.overrides]


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
        return [sys.executable, "-m", "evertrain.launch.fork", "--run", str(out / self.run),
                "--step", str(self.step), "--cooldown-steps", str(self.cooldown_steps),
                "--shape", self.shape, "--engine", "single"]


@dataclass(frozen=True)
class AverageJob:
    """One `evertrain average` of OUT/run's checkpoints at `steps` (evaluated, no training)."""

    run: str
    steps: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.run}_average_{self.steps[0]}-{self.steps[-1]}"

    def result_path(self, out: Path) -> Path:
        from evertrain.launch.average import average_dir_name

        return out / self.run / "averages" / average_dir_name(list(self.steps)) / "result.json"

    def done(self, out: Path) -> bool:
        return self.result_path(out).is_file()

    def ready(self, out: Path) -> bool:
        return all(checkpoint_ready(out, self.run, step) for step in self.steps)

    def command(self, plan: SweepPlan, out: Path) -> list[str]:
        return [sys.executable, "-m", "evertrain.launch.average", "--run", str(out / self.run),
                "--steps", ",".join(map(str, self.steps))]


def cosine_name(horizon: int) -> str:
    return f"cosine_T{horizon}"


def cell_jobs(plan: SweepPlan, cell: Cell, averages: bool = True) -> list[TrainJob | ForkJob | AverageJob]:
    """Every run of one cell, in launch order: the long open-ended runs first, their forks as soon
    as a fork point is checkpointed, the cosine runs longest first, the averages last."""
    last, c = plan.horizons[-1], cell.name
    common = (*plan.overrides, *cell.overrides, f"eval.every_steps={plan.eval_every}")
    open_ended = [TrainJob(f"{c}/{decay}", last,
                           (*common, f"optim.decay={decay}", f"train.max_steps={last}",
                            f"checkpoint.every_steps={plan.checkpoint_every}",
                            f"checkpoint.keep_every={plan.checkpoint_every}"))
                  for decay in plan.schedules]
    forks = [ForkJob(f"{c}/{decay}", plan.fork_step(t), plan.cooldown_steps(t), shape)
             for t in plan.horizons for decay in plan.schedules for shape in plan.shapes]
    cosines = [TrainJob(f"{c}/{cosine_name(t)}", t,
                        (*common, "optim.decay=cosine", f"optim.horizon={t}", f"train.max_steps={t}",
                         f"checkpoint.every_steps={plan.eval_every}", "checkpoint.keep_last=1",
                         "checkpoint.keep_every=0"))
               for t in reversed(plan.horizons)]
    averaged = [AverageJob(f"{c}/{decay}", tuple(plan.average_steps(t)))
                for t in plan.horizons for decay in plan.schedules] if averages and plan.average_last else []
    return [*open_ended, *forks, *cosines, *averaged]


def jobs_of(plan: SweepPlan, averages: bool = True) -> list[TrainJob | ForkJob | AverageJob]:
    """Every run of the sweep, cell after cell (run_jobs starts the first ready ones first)."""
    return [job for cell in plan.cells() for job in cell_jobs(plan, cell, averages)]


def check_configs(plan: SweepPlan, jobs) -> None:
    """Every run's config is loaded here first, so a bad key fails before anything starts."""
    if not Path(plan.config).is_file():
        raise SweepError(f"--config {plan.config}: config file not found")
    if not PRETRAIN.is_file():
        raise SweepError(f"{PRETRAIN}: not found; `evertrain sweep` runs from a source checkout")
    for job in jobs:
        if isinstance(job, TrainJob):
            load_config(plan.config, job.overrides)


def claim_out_dir(plan: SweepPlan, out: Path) -> None:
    """OUT/sweep.json records the plan (less the grid, which may grow) and its resolved config, so a
    different plan (or an edited config file) never mixes its runs into the same OUT."""
    path = out / "sweep.json"
    fixed = {k: v for k, v in plan.to_dict().items() if k not in GRID_FIELDS}
    wanted = {**fixed, "config_hash": config_hash(load_config(plan.config, plan.overrides))}
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            changed = sorted(k for k in wanted if existing.get(k) != wanted[k])
            raise SweepError(f"{path}: this directory holds a sweep with other settings "
                             f"({', '.join(changed).replace('config_hash', 'the config')}); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1))


def run_jobs(plan: SweepPlan, out: Path, jobs, parallel: int = 2, poll_s: float = 1.0, echo=print,
             load_samples: list | None = None) -> None:
    """Run every unfinished job, at most `parallel` at once, each as soon as it is ready; the 1-min
    load average goes into `load_samples` about once a minute (the box is shared)."""
    if parallel < 1:
        raise SweepError(f"--parallel: must be >= 1, got {parallel}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:  # side by side on a small CPU box: one core each, no oversubscription
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = [job for job in jobs if not job.done(out)]
    if len(pending) < len(jobs):
        echo(f"sweep: {len(jobs) - len(pending)} of {len(jobs)} runs finished already")
    running: dict = {}  # Popen -> (job, log file, start time)
    sampled = -math.inf
    previous = signal.signal(signal.SIGTERM, interrupted)  # `kill PID` stops the runs too, not orphans them
    try:
        while pending or running:
            if load_samples is not None and time.monotonic() - sampled >= 60:
                sampled = time.monotonic()
                load_samples.append(os.getloadavg()[0])
            for proc, (job, log, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[proc]
                if proc.returncode != 0 or not job.done(out):
                    raise SweepError(f"{job.name}: exited with status {proc.returncode} "
                                     f"({last_line(Path(log.name))}); see {log.name}")
                echo(f"sweep: {job.name} done in {time.monotonic() - started:.0f} s")
            ready = [job for job in pending if job.ready(out)]
            if not running and pending and not ready:
                raise SweepError(f"{pending[0].name}: waits for a checkpoint that no run will write")
            for job in ready[:parallel - len(running)]:
                pending.remove(job)
                log_path = out / "logs" / f"{job.name}.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "a")
                echo(f"sweep: start {job.name}")
                proc = subprocess.Popen(job.command(plan, out), stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (job, log, time.monotonic())
            time.sleep(poll_s if running else 0)
    finally:  # a failure, Ctrl-C or SIGTERM: stop the others cleanly (they checkpoint on SIGTERM) and wait
        signal.signal(signal.SIGTERM, previous)
        for proc, (job, log, _) in running.items():
            proc.terminate()
        for proc, (job, log, _) in running.items():
            proc.wait()
            log.close()


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else "no output"


def read_evals(run_dir: Path) -> dict[int, float]:
    """{step: val_loss} of a run's metrics.jsonl (the last record wins for a step)."""
    evals = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "eval":
                evals[record["step"]] = record["val_loss"]
    return evals


def row_label(schedule: str, cooldown: str | None, average_last: int = 0) -> str:
    if cooldown is None:
        return "cosine (tuned to T)"
    if cooldown == "none":
        return f"{schedule}, no cooldown"
    if cooldown == "average":
        return f"{schedule}, average of {average_last} ckpts"
    return f"{schedule} + {cooldown} cooldown"


def row_keys(plan: SweepPlan, averages: bool = True) -> list[tuple[str, str | None]]:
    """(schedule, cooldown) of every row in table order; cooldown None = cosine, "none" = the
    open-ended run itself at T, "average" = the average of its checkpoints."""
    keys = [("cosine", None)]
    for decay in plan.schedules:
        keys += [(decay, shape) for shape in plan.shapes]
        keys += [(decay, "average")] if averages and plan.average_last else []
        keys.append((decay, "none"))
    return keys


def collect_cell(plan: SweepPlan, out: Path, cell: Cell, averages: bool = True) -> list[dict]:
    """One cell's val loss per row and horizon, as flat records {schedule, cooldown, lr, seed,
    horizon, val_loss} (lr/seed as run: the config's when the cell has none)."""
    cfg = load_config(plan.config, (*plan.overrides, *cell.overrides))
    c = cell.name

    def at(run: str, step: int) -> float:
        evals = read_evals(out / c / run)
        if step not in evals:
            raise SweepError(f"{out / c / run / 'metrics.jsonl'}: no eval at step {step}")
        return evals[step]

    def loss(schedule: str, cooldown: str | None, t: int) -> float:
        if cooldown is None:
            return at(cosine_name(t), t)
        if cooldown == "none":
            return at(schedule, t)
        if cooldown == "average":
            return json.loads(AverageJob(f"{c}/{schedule}", tuple(plan.average_steps(t)))
                              .result_path(out).read_text())["val_loss"]
        return read_result(ForkJob(f"{c}/{schedule}", plan.fork_step(t), plan.cooldown_steps(t), cooldown)
                           .result_dir(out))["val_loss"]

    return [{"schedule": schedule, "cooldown": cooldown, "lr": cfg.optim.max_lr, "seed": cfg.train.seed,
             "horizon": t, "val_loss": loss(schedule, cooldown, t)}
            for schedule, cooldown in row_keys(plan, averages) for t in plan.horizons]


def aggregate(records: list[dict], average_last: int = 0) -> list[dict]:
    """The table from flat records: per row (schedule, cooldown, in order of first appearance) and
    horizon, the LR with the lowest mean val loss over the seeds, and at it the mean, the half range
    over seeds, the mean at every LR, an edge flag, the gap to cosine and the verdict."""
    lrs = sorted({r["lr"] for r in records})
    horizons = sorted({r["horizon"] for r in records})
    keys = list(dict.fromkeys((r["schedule"], r["cooldown"]) for r in records))
    losses: dict = {}  # (schedule, cooldown, horizon, lr) -> [loss per seed]
    for r in records:
        losses.setdefault((r["schedule"], r["cooldown"], r["horizon"], r["lr"]), []).append(r["val_loss"])
    rows = []
    for schedule, cooldown in keys:
        cells = {}
        for t in horizons:
            by_lr = [(lr, *mean_and_half_range(losses[schedule, cooldown, t, lr]))
                     for lr in lrs if (schedule, cooldown, t, lr) in losses]
            best = min(range(len(by_lr)), key=lambda i: by_lr[i][1])
            lr, mean, half = by_lr[best]
            edge = None
            if len(lrs) > 1 and lr == lrs[0]:
                edge = "low"
            elif len(lrs) > 1 and lr == lrs[-1]:
                edge = "high"
            cells[str(t)] = {"lr": lr, "mean": mean, "half_range": half,
                             "seeds": len(losses[schedule, cooldown, t, lr]),
                             "by_lr": [{"lr": x, "mean": m, "half_range": h} for x, m, h in by_lr], "edge": edge}
        rows.append({"label": row_label(schedule, cooldown, average_last), "schedule": schedule,
                     "cooldown": cooldown, "cells": cells})
    cosine = next((row for row in rows if row["cooldown"] is None), None)
    for row in rows:
        for t, cell in row["cells"].items():
            if cosine is None:
                cell["gap_pct"] = cell["verdict"] = None
                continue
            ref = cosine["cells"][t]
            cell["gap_pct"] = 100.0 * (cell["mean"] - ref["mean"]) / ref["mean"]
            cell["verdict"] = None if row is cosine else verdict(cell, ref)
        row["verdict"] = None if row is cosine or cosine is None else verdict_words(row["cells"])
    return rows


def mean_and_half_range(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


def verdict(cell: dict, ref: dict) -> str | None:
    """'lower'/'higher' than the reference only when the seed ranges do not overlap; 'level'
    otherwise; None with one seed (no spread to compare against)."""
    if min(cell["seeds"], ref["seeds"]) < 2:
        return None
    diff = cell["mean"] - ref["mean"]
    if abs(diff) <= cell["half_range"] + ref["half_range"]:
        return "level"
    return "lower" if diff < 0 else "higher"


def verdict_words(cells: dict) -> str:
    """{'400': {'verdict': 'lower'}, ...} -> 'lower at T=400, level at T=800 1600'."""
    groups: dict = {}
    for t, cell in cells.items():
        groups.setdefault(cell["verdict"] or "not called (one seed)", []).append(t)
    return ", ".join(f"{v} at T={' '.join(ts)}" for v, ts in groups.items())


def model_size(config: str, overrides: tuple[str, ...]) -> tuple[int, int]:
    """(all parameters, of which the token embedding): tied, it is also the output head."""
    from evertrain.pretrain.model.transformer import Transformer

    from evertrain.pretrain.run.preflight import resolve_auto

    model = Transformer(resolve_auto(load_config(config, overrides)).model)
    return sum(p.numel() for p in model.parameters()), model.embed_tokens.weight.numel()


def regime(plan: SweepPlan) -> dict:
    """Tokens per parameter and epochs of the training split at each horizon."""
    from evertrain.pretrain.data.stream import load_manifest

    cfg = load_config(plan.config, plan.overrides)
    params, embedding = model_size(plan.config, plan.overrides)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len
    train_tokens = sum(s.tokens for s in load_manifest(cfg.data.path).train)
    return {"params": params, "embedding_params": embedding, "tokens_per_step": per_step,
            "train_tokens": train_tokens,
            "horizons": {str(t): {"tokens": t * per_step, "tokens_per_param": t * per_step / params,
                                  "tokens_per_non_embedding_param": t * per_step / (params - embedding),
                                  "epochs": t * per_step / train_tokens} for t in plan.horizons}}


def compute_of(plan: SweepPlan) -> dict:
    """Optimizer steps of the two ways for all horizons, in one cell. The fork way needs the
    open-ended run only up to the last fork point; the no-cooldown and averaging rows need it to the
    last T (the averages themselves train nothing)."""
    cooldown_total = sum(plan.cooldown_steps(t) for t in plan.horizons)
    main = plan.fork_step(plan.horizons[-1])
    compute = {"cosine_steps": sum(plan.horizons), "main_run_steps": main, "cooldown_steps": cooldown_total,
               "fork_steps_per_shape": main + cooldown_total, "open_ended_to_last_t": plan.horizons[-1]}
    compute["saving"] = 1.0 - compute["fork_steps_per_shape"] / compute["cosine_steps"]
    per_cell = (sum(plan.horizons) + len(plan.schedules) * (plan.horizons[-1] + len(plan.shapes) * cooldown_total))
    compute["sweep_steps"] = per_cell * len(plan.cells())
    return compute


def collect(plan: SweepPlan, out: Path, averages: bool = True) -> dict:
    """The sweep's numbers: every cell's records, the table, the regime and the compute."""
    records = [r for cell in plan.cells() for r in collect_cell(plan, out, cell, averages)]
    return {"plan": plan.to_dict(), "eval_every": plan.eval_every, "records": records,
            "rows": aggregate(records, plan.average_last), "regime": regime(plan), "compute": compute_of(plan),
            "invocations": read_invocations(out)}


def read_invocations(out: Path) -> list[dict]:
    path = out / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def run_sweep(plan: SweepPlan, out: str | Path, parallel: int = 2, echo=print, averages: bool = True) -> dict:
    """Run (or resume) the whole sweep and return its results (also written to OUT/results.json);
    averages=False runs every job but the averages and leaves their row out."""
    out = Path(out)
    jobs = jobs_of(plan, averages)
    check_configs(plan, jobs)
    claim_out_dir(plan, out)
    started, start_time, load = time.monotonic(), time.time(), []
    try:
        run_jobs(plan, out, jobs, parallel=parallel, echo=echo, load_samples=load)
    finally:  # the wall time and load of every invocation, finished or not, for the page
        with open(out / "invocations.jsonl", "a") as f:
            f.write(json.dumps({"start": start_time, "wall_s": time.monotonic() - started, "parallel": parallel,
                                "cells": [c.name for c in plan.cells()], "averages": averages,
                                "load_1min": load}) + "\n")
    results = collect(plan, out, averages)
    text = safe_json.dumps(results, indent=1)
    atomic_write_text(out / "results.json", text)
    return json.loads(text)  # as a reader of results.json sees it: horizons as string keys


def lr_text(lr: float) -> str:
    """0.015 -> '1.5e-2', 0.03 -> '3e-2' (two significant digits: a grid's points stay distinct)."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per horizon the mean val loss over seeds +- half their range, the LR it was
    won at (edge of the grid flagged), the gap to cosine in %; and the row's verdict."""
    horizons = results["plan"]["horizons"]
    header = ["schedule", *(f"T={t}" for t in horizons), "vs cosine (seed ranges)"]
    rows = []
    for row in results["rows"]:
        cells = []
        for t in horizons:
            cell = row["cells"][str(t)]
            text = f"{cell['mean']:.4f} ±{cell['half_range']:.4f} @{lr_text(cell['lr'])}"
            text += f" (edge: {cell['edge']})" if cell["edge"] else ""
            text += f" ({cell['gap_pct']:+.2f}%)" if row["cooldown"] is not None else ""
            cells.append(text)
        rows.append([row["label"], *cells, row["verdict"] or "(reference)"])
    return header, rows


def lr_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per horizon the mean val loss at every LR of the grid, low to high (the
    row's best in bold), so the neighbours of the winner are visible."""
    lrs = sorted({r["lr"] for r in results["records"]})
    grid = " / ".join(lr_text(lr) for lr in lrs)
    header = ["schedule", *(f"T={t}: lr {grid}" for t in results["plan"]["horizons"])]
    rows = []
    for row in results["rows"]:
        cells = []
        for t in results["plan"]["horizons"]:
            cell = row["cells"][str(t)]
            means = {entry["lr"]: entry["mean"] for entry in cell["by_lr"]}
            cells.append(" / ".join((f"**{means[lr]:.4f}**" if lr == cell["lr"] else f"{means[lr]:.4f}")
                                    if lr in means else "-" for lr in lrs))
        rows.append([row["label"], *cells])
    return header, rows


PAIRS = (("none", "cooldown", "no cooldown - cooldown"), ("average", "cooldown", "average - cooldown"),
         ("none", "average", "no cooldown - average"))


def paired_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: within one open-ended run (same LR, same seed) the difference of two of its
    ways at T, min / mean / max over every (LR, seed) of the grid. The run's own noise cancels in a
    pair, so these are sharper than the table's across-seed comparison to cosine. The first cooldown
    shape stands for "cooldown"."""
    plan = results["plan"]
    loss = {(r["schedule"], r["cooldown"], r["lr"], r["seed"], r["horizon"]): r["val_loss"] for r in results["records"]}
    pairs = [(a, b, label) for a, b, label in PAIRS
             if "average" not in (a, b) or any(key[1] == "average" for key in loss)]
    header = ["schedule", "T", *(f"{label}: min / mean / max" for _, _, label in pairs), "runs"]
    rows = []
    for decay in plan["schedules"]:
        for t in plan["horizons"]:
            cells, n = [], 0
            for a, b, _ in pairs:
                a, b = (plan["shapes"][0] if x == "cooldown" else x for x in (a, b))
                diffs = [loss[key] - loss[(decay, b, *key[2:])] for key in loss
                         if key[:2] == (decay, a) and key[4] == t and (decay, b, *key[2:]) in loss]
                n = len(diffs)
                cells.append(f"{min(diffs):+.4f} / {sum(diffs) / n:+.4f} / {max(diffs):+.4f}" if diffs else "-")
            rows.append([decay, str(t), *cells, str(n)])
    return header, rows


def regime_lines(results: dict) -> list[str]:
    r = results["regime"]
    lines = [f"model {r['params']:,} parameters, of which {r['embedding_params']:,} the tied token embedding "
             f"(also the output head; counted): {r['tokens_per_step']} tokens per step, "
             f"training split {r['train_tokens']:,} tokens"]
    for t, h in r["horizons"].items():
        lines.append(f"T={t}: {h['tokens']:,} tokens = {h['tokens_per_param']:.1f} per parameter "
                     f"({h['tokens_per_non_embedding_param']:.0f} per non-embedding parameter), "
                     f"{h['epochs']:.2f} epochs")
    return lines


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    horizons = tuple(args.horizons or (QUICK_HORIZONS if args.quick else FULL_HORIZONS))
    overrides = (*(QUICK_OVERRIDES if args.quick else ()), *args.overrides)
    average_last = args.average_last if args.average_last is not None else (
        QUICK_AVERAGE_LAST if args.quick else FULL_AVERAGE_LAST)
    seeds = ()
    if args.seeds is not None:
        if args.seeds < 1:
            raise SweepError(f"--seeds: must be >= 1, got {args.seeds}")
        if Path(args.config).is_file():  # a missing config is named by check_configs
            base = load_config(args.config, overrides).train.seed
            seeds = tuple(base + i for i in range(args.seeds))
    return SweepPlan(config=args.config, horizons=horizons, cooldown_fraction=args.cooldown_fraction,
                     shapes=tuple(args.shapes), schedules=tuple(args.schedules), overrides=overrides,
                     max_lrs=tuple(args.max_lrs or ()), seeds=seeds, average_last=average_last)


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header, rows = table_rows(results)
    table = Table(*header, title="val loss at each horizon: mean ±half range over seeds @best max_lr (gap to cosine)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    header, rows = lr_table_rows(results)
    table = Table(*header, title="mean val loss at every max_lr of the grid (** = best)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in regime_lines(results):
        console.print(line)
    c = results["compute"]
    console.print(f"compute per cell: cosine way {c['cosine_steps']} steps; fork way {c['fork_steps_per_shape']} "
                  f"steps per cooldown shape (open-ended run to the last fork point; "
                  f"{saving_words(c['saving'])})")


def saving_words(saving: float) -> str:
    """0.23 -> '23% fewer'; one horizon alone costs the fork way more than one cosine run."""
    return f"{100 * abs(saving):.0f}% {'fewer' if saving >= 0 else 'more'}"


def run_command(args: argparse.Namespace) -> int:
    results = run_sweep(plan_from_args(args), args.out, parallel=args.parallel, averages=not args.skip_averages)
    print_results(results)
    print(f"sweep: results in {Path(args.out) / 'results.json'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=FULL_CONFIG, help=f"model/data/optimizer config (default {FULL_CONFIG})")
    p.add_argument("--out", default="runs/horizon_sweep", help="sweep directory (default runs/horizon_sweep)")
    p.add_argument("--horizons", type=int, nargs="+",
                   help=f"increasing horizons in steps (default {' '.join(map(str, FULL_HORIZONS))}; "
                        f"--quick: {' '.join(map(str, QUICK_HORIZONS))})")
    p.add_argument("--max-lrs", type=float, nargs="+",
                   help="grid of max_lr; every row is reported at its best (default: the config's max_lr)")
    p.add_argument("--seeds", type=int,
                   help="seeds per grid point: train.seed, +1, ... (default: the config's seed only)")
    p.add_argument("--cooldown-fraction", type=float, default=0.2,
                   help="cooldown length as a fraction of the horizon; it ends at the horizon (default 0.2)")
    p.add_argument("--shapes", nargs="+", default=["linear", "1-sqrt"], help="cooldown shapes (default linear 1-sqrt)")
    p.add_argument("--schedules", nargs="+", default=list(OPEN_ENDED), help="open-ended schedules (default rsqrt constant)")
    p.add_argument("--average-last", type=int,
                   help=f"average K checkpoints evenly over the cooldown window [T - c, T], 0 = no averaging "
                        f"row (default {FULL_AVERAGE_LAST}; --quick: {QUICK_AVERAGE_LAST})")
    p.add_argument("--skip-averages", action="store_true",
                   help="run everything but the averages; a later run without it adds them (default: run them)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2, one thread each)")
    p.add_argument("--quick", action="store_true", help="tiny model and tens of steps: checks the pipeline only (default: the full sweep)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="rsqrt/constant + forked cooldowns vs cosine at several horizons",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run_command)
