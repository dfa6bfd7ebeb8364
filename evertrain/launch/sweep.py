"""`evertrain sweep`: open-ended runs with forked cooldowns vs cosine runs tuned to each horizon.

The horizon experiment: does one open-ended run plus a forked cooldown reach the loss of a cosine run
tuned to exactly that horizon?

For horizons T1 < T2 < ...: a cosine run to each T (optim.decay=cosine, optim.horizon=T); per
open-ended schedule (rsqrt, constant) one run to the last T with a checkpoint at every fork point;
from it, per cooldown shape, a cooldown of c = F*T steps forked at step T - c, so that it ends at
exactly step T (the cosine run's steps and tokens); and the open-ended run's own val loss at T (no
cooldown). Same model, data, seed, warmup and max_lr everywhere, and every eval scores the same
validation batches (same eval.batches and global batch).

Every run is its own process (pretrain.py, `python -m evertrain.launch.fork`), at most --parallel at a
time, with one thread each when several run at once. A run already finished is skipped, so rerunning
the same command resumes the sweep; a run killed mid-way resumes from its own checkpoint.

    OUT/sweep.json      the plan (a rerun with other settings into the same OUT is refused)
    OUT/logs/JOB.log    each process's output
    OUT/RUN/            run dirs: cosine_T<T>, rsqrt, constant (forks under RUN/cooldowns/)
    OUT/results.json    val losses, gaps and compute, written when every run is done
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain import safe_json
from evertrain.errors import EvertrainError
from evertrain.launch.fork import cooldown_dir_name, read_result
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.config import COOLDOWN_SHAPES, config_hash, load_config

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain.py"
OPEN_ENDED = ("rsqrt", "constant")

FULL_CONFIG = "configs/sweep.yaml"
FULL_HORIZONS = (150, 300, 600)
# --quick checks the pipeline, not the science: a one-layer model and tens of steps
QUICK_HORIZONS = (10, 20, 40)
QUICK_OVERRIDES = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
                   "model.seq_len=32", "train.micro_batch_size=4", "eval.batches=2",
                   "optim.warmup_steps=4", "optim.rsqrt_timescale=8")


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

    def cooldown_steps(self, horizon: int) -> int:
        return round(self.cooldown_fraction * horizon)

    def fork_step(self, horizon: int) -> int:
        return horizon - self.cooldown_steps(horizon)

    @property
    def eval_every(self) -> int:
        """Evals land on every horizon (the no-cooldown values) and every fork point (the curves)."""
        return math.gcd(*self.horizons, *(self.fork_step(t) for t in self.horizons))

    @property
    def checkpoint_every(self) -> int:
        """Checkpoints land on every fork point (and all of them are kept)."""
        return math.gcd(*(self.fork_step(t) for t in self.horizons))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SweepPlan:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
        """Its source checkpoint is committed (the main run may still be training past it)."""
        return (out / self.run / "checkpoints" / store.step_dir_name(self.step) / "meta.json").is_file()

    def command(self, plan: SweepPlan, out: Path) -> list[str]:
        return [sys.executable, "-m", "evertrain.launch.fork", "--run", str(out / self.run),
                "--step", str(self.step), "--cooldown-steps", str(self.cooldown_steps),
                "--shape", self.shape, "--engine", "single"]


def cosine_name(horizon: int) -> str:
    return f"cosine_T{horizon}"


def jobs_of(plan: SweepPlan) -> list[TrainJob | ForkJob]:
    """Every run of the sweep, in launch order: the long open-ended runs first, their forks as soon
    as a fork point is checkpointed, the cosine runs longest first."""
    last = plan.horizons[-1]
    common = (*plan.overrides, f"eval.every_steps={plan.eval_every}")
    open_ended = [TrainJob(decay, last, (*common, f"optim.decay={decay}", f"train.max_steps={last}",
                                         f"checkpoint.every_steps={plan.checkpoint_every}",
                                         f"checkpoint.keep_every={plan.checkpoint_every}"))
                  for decay in plan.schedules]
    forks = [ForkJob(decay, plan.fork_step(t), plan.cooldown_steps(t), shape)
             for t in plan.horizons for decay in plan.schedules for shape in plan.shapes]
    cosines = [TrainJob(cosine_name(t), t, (*common, "optim.decay=cosine", f"optim.horizon={t}",
                                             f"train.max_steps={t}", f"checkpoint.every_steps={plan.checkpoint_every}",
                                             "checkpoint.keep_last=1", "checkpoint.keep_every=0"))
               for t in reversed(plan.horizons)]
    return [*open_ended, *forks, *cosines]


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
    """OUT/sweep.json records the plan and its resolved config, so a different plan (or an edited
    config file) never mixes its runs into the same OUT."""
    path = out / "sweep.json"
    wanted = {**plan.to_dict(), "config_hash": config_hash(load_config(plan.config, plan.overrides))}
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            changed = sorted(k for k in wanted if existing.get(k) != wanted[k])
            raise SweepError(f"{path}: this directory holds a sweep with other settings "
                             f"({', '.join(changed).replace('config_hash', 'the config')}); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(path, json.dumps(wanted, indent=1))


def run_jobs(plan: SweepPlan, out: Path, jobs, parallel: int = 2, poll_s: float = 1.0, echo=print) -> None:
    """Run every unfinished job, at most `parallel` at once, each as soon as it is ready."""
    if parallel < 1:
        raise SweepError(f"--parallel: must be >= 1, got {parallel}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:  # side by side on a small CPU box: one core each, no oversubscription
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = [job for job in jobs if not job.done(out)]
    if len(pending) < len(jobs):
        echo(f"sweep: {len(jobs) - len(pending)} of {len(jobs)} runs finished already")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    running: dict = {}  # Popen -> (job, log file, start time)
    try:
        while pending or running:
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
                log = open(out / "logs" / f"{job.name}.log", "a")
                echo(f"sweep: start {job.name}")
                proc = subprocess.Popen(job.command(plan, out), stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (job, log, time.monotonic())
            time.sleep(poll_s if running else 0)
    finally:  # a failure or Ctrl-C: stop the others cleanly (they checkpoint on SIGTERM) and wait
        for proc, (job, log, _) in running.items():
            proc.terminate()
        for proc, (job, log, _) in running.items():
            proc.wait()
            log.close()


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


def collect(plan: SweepPlan, out: Path) -> dict:
    """The sweep's numbers: val loss at each horizon per way of getting there, gap to cosine, compute."""
    def at(run: str, step: int) -> float:
        evals = read_evals(out / run)
        if step not in evals:
            raise SweepError(f"{out / run / 'metrics.jsonl'}: no eval at step {step}")
        return evals[step]

    cosine = {t: at(cosine_name(t), t) for t in plan.horizons}
    rows = [{"label": "cosine (tuned to T)", "schedule": "cosine", "cooldown": None, "val_loss": cosine}]
    for decay in plan.schedules:
        for shape in plan.shapes:
            losses = {t: read_result(ForkJob(decay, plan.fork_step(t), plan.cooldown_steps(t), shape)
                                     .result_dir(out))["val_loss"] for t in plan.horizons}
            rows.append({"label": f"{decay} + {shape} cooldown", "schedule": decay, "cooldown": shape,
                         "val_loss": losses})
        rows.append({"label": f"{decay}, no cooldown", "schedule": decay, "cooldown": "none",
                     "val_loss": {t: at(decay, t) for t in plan.horizons}})
    for row in rows:
        row["gap_pct"] = {t: 100.0 * (row["val_loss"][t] - cosine[t]) / cosine[t] for t in plan.horizons}
    cooldown_total = sum(plan.cooldown_steps(t) for t in plan.horizons)
    compute = {"cosine_steps": sum(plan.horizons),
               "fork_steps_per_shape": plan.horizons[-1] + cooldown_total,
               "main_run_steps": plan.horizons[-1], "cooldown_steps": cooldown_total}
    compute["saving"] = 1.0 - compute["fork_steps_per_shape"] / compute["cosine_steps"]
    return {"plan": plan.to_dict(), "eval_every": plan.eval_every, "rows": rows, "compute": compute}


def run_sweep(plan: SweepPlan, out: str | Path, parallel: int = 2, echo=print) -> dict:
    """Run (or resume) the whole sweep and return its results (also written to OUT/results.json)."""
    out = Path(out)
    jobs = jobs_of(plan)
    check_configs(plan, jobs)
    claim_out_dir(plan, out)
    started = time.monotonic()
    run_jobs(plan, out, jobs, parallel=parallel, echo=echo)
    results = collect(plan, out)
    results["wall_s_this_invocation"] = time.monotonic() - started
    text = safe_json.dumps(results, indent=1)
    store.atomic_write_text(out / "results.json", text)
    return json.loads(text)  # as a reader of results.json sees it: horizons as string keys


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: val loss per way of training per horizon, with the gap to cosine in %."""
    horizons = results["plan"]["horizons"]
    header = ["schedule", *(f"T={t}" for t in horizons)]
    rows = []
    for row in results["rows"]:
        cells = []
        for t in horizons:
            loss, gap = row["val_loss"][str(t)], row["gap_pct"][str(t)]
            cells.append(f"{loss:.4f}" if row["cooldown"] is None else f"{loss:.4f} ({gap:+.2f}%)")
        rows.append([row["label"], *cells])
    return header, rows


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    horizons = tuple(args.horizons or (QUICK_HORIZONS if args.quick else FULL_HORIZONS))
    overrides = (*(QUICK_OVERRIDES if args.quick else ()), *args.overrides)
    return SweepPlan(config=args.config, horizons=horizons, cooldown_fraction=args.cooldown_fraction,
                     shapes=tuple(args.shapes), schedules=tuple(args.schedules), overrides=overrides)


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    table = Table(*header, title="val loss at each horizon (gap to cosine)")
    for row in rows:
        table.add_row(*row)
    c = results["compute"]
    console = Console()
    console.print(table)
    console.print(f"compute: cosine way {c['cosine_steps']} steps; fork way {c['fork_steps_per_shape']} steps "
                  f"per cooldown shape ({saving_words(c['saving'])})")


def saving_words(saving: float) -> str:
    """0.23 -> '23% fewer'; one horizon alone costs the fork way more than one cosine run."""
    return f"{100 * abs(saving):.0f}% {'fewer' if saving >= 0 else 'more'}"


def run_command(args: argparse.Namespace) -> int:
    results = run_sweep(plan_from_args(args), args.out, parallel=args.parallel)
    print_results(results)
    print(f"sweep: results in {Path(args.out) / 'results.json'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=FULL_CONFIG, help=f"model/data/optimizer config (default {FULL_CONFIG})")
    p.add_argument("--out", default="runs/horizon_sweep", help="sweep directory (default runs/horizon_sweep)")
    p.add_argument("--horizons", type=int, nargs="+",
                   help=f"increasing horizons in steps (default {' '.join(map(str, FULL_HORIZONS))}; "
                        f"--quick: {' '.join(map(str, QUICK_HORIZONS))})")
    p.add_argument("--cooldown-fraction", type=float, default=0.2,
                   help="cooldown length as a fraction of the horizon; it ends at the horizon (default 0.2)")
    p.add_argument("--shapes", nargs="+", default=["linear", "1-sqrt"], help="cooldown shapes (default linear 1-sqrt)")
    p.add_argument("--schedules", nargs="+", default=list(OPEN_ENDED), help="open-ended schedules (default rsqrt constant)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2, one thread each)")
    p.add_argument("--quick", action="store_true", help="tiny model and tens of steps: checks the pipeline only")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="rsqrt/constant + forked cooldowns vs cosine at several horizons",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run_command)
