"""The sweep's execution: check every config, claim OUT (sweep.json), run every unfinished job as its own
process (at most --parallel at once, each as soon as its checkpoint exists), log every invocation, and
write OUT/results.json from results.collect.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

from evertrain import safe_json
from evertrain.files import atomic_write_text
from evertrain.launch.sweep.plan import GRID_FIELDS, PRETRAIN, SweepError, SweepPlan, TrainJob, jobs_of
from evertrain.launch.sweep.results import collect
from evertrain.pretrain.config import config_hash, load_config


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
            raise SweepError(
                f"{path}: this directory holds a sweep with other settings "
                f"({', '.join(changed).replace('config_hash', 'the config')}); use another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1))


def run_jobs(
    plan: SweepPlan,
    out: Path,
    jobs,
    parallel: int = 2,
    poll_s: float = 1.0,
    echo=print,
    load_samples: list | None = None,
) -> None:
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
                    raise SweepError(
                        f"{job.name}: exited with status {proc.returncode} "
                        f"({last_line(Path(log.name))}); see {log.name}"
                    )
                echo(f"sweep: {job.name} done in {time.monotonic() - started:.0f} s")
            ready = [job for job in pending if job.ready(out)]
            if not running and pending and not ready:
                raise SweepError(f"{pending[0].name}: waits for a checkpoint that no run will write")
            for job in ready[: parallel - len(running)]:
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
        for proc in running:
            proc.terminate()
        for proc, (_, log, _) in running.items():
            proc.wait()
            log.close()


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else "no output"


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
            f.write(
                json.dumps(
                    {
                        "start": start_time,
                        "wall_s": time.monotonic() - started,
                        "parallel": parallel,
                        "cells": [c.name for c in plan.cells()],
                        "averages": averages,
                        "load_1min": load,
                    }
                )
                + "\n"
            )
    results = collect(plan, out, averages)
    text = safe_json.dumps(results, indent=1)
    atomic_write_text(out / "results.json", text)
    return json.loads(text)  # as a reader of results.json sees it: horizons as string keys
