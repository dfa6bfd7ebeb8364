"""What a run logged, as the loss model sees it: branches (the main run and each finished cooldown on
the run's own data), each with the LR of every step and its observed losses.

A train record's loss is the mean over the steps since the record before it (records.LogWindow), so
it is kept as a window (first step, last step, mean loss); a val loss is the loss at one step. The
main run's first `skip_steps` steps (default: twice the warmup) are left out: the law describes the
loss after the warmup, not the fall from the initial log(vocab).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from evertrain.errors import EvertrainError
from evertrain.launch.lossmodel.areas import DECAY, Areas, areas, at_decay, branch_lrs


class LossModelError(EvertrainError, ValueError):
    """Not enough of a run to fit, or a bad prediction request."""


@dataclass
class Branch:
    name: str  # "main" or the cooldown's dir name
    areas: Areas  # S1, S2 after every step 1..end of this branch (S2 at Observations.decay)
    train: list[tuple[int, int, float]] = field(default_factory=list)  # (first step, last step, mean loss)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)


@dataclass
class Observations:
    run_dir: Path
    optim: object  # the run's OptimConfig: the schedule of every branch
    branches: list[Branch]
    tokens_per_step: float  # of the main run (a fork keeps its global batch)
    last_step: int  # the main run's newest logged step (within until_step)
    cooldowns: list[dict] = field(default_factory=list)  # result.json of the branches' cooldowns
    decay: float = DECAY  # lambda of the branches' annealing areas

    def lrs(self, end_step: int, cooldown: tuple[int, int, str] | None = None) -> np.ndarray:
        return branch_lrs(self.optim, end_step, cooldown)

    def areas_of(self, end_step: int, cooldown: tuple[int, int, str] | None = None) -> Areas:
        return areas(self.lrs(end_step, cooldown), self.optim.max_lr, self.decay)

    def with_decay(self, decay: float) -> Observations:
        """The same observations with every branch's annealing area at momentum `decay`."""
        branches = [Branch(b.name, at_decay(b.areas, decay), b.train, b.val) for b in self.branches]
        return replace(self, branches=branches, decay=decay)


def windows(records: list[dict], first_step: int) -> list[tuple[int, int, float]]:
    """(first, last, loss) of each train record; a record's window starts after the one before it."""
    out, previous = [], first_step
    for r in records:
        if r["step"] > previous and isinstance(r.get("loss"), (int, float)) and np.isfinite(r["loss"]):
            out.append((previous + 1, r["step"], float(r["loss"])))
        previous = r["step"]
    return out


def load_observations(
    run_dir: Path, until_step: int | None = None, skip_steps: int | None = None
) -> Observations:
    """The run's branches as logged; with `until_step`, only what was known when the main run was at
    that step (its records up to it, the cooldowns that ended by then: a fork of c steps finishes about
    when the main run has done c more): for backtests."""
    from evertrain.launch.report import parse_cooldown_name, read_jsonl
    from evertrain.pretrain.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LossModelError(f"--run {run_dir}: not a run directory (no config.yaml)")
    optim = load_config(run_dir / "config.yaml").optim
    skip = 2 * optim.warmup_steps if skip_steps is None else skip_steps
    metrics = [
        r for r in read_jsonl(run_dir / "metrics.jsonl") if until_step is None or r["step"] <= until_step
    ]
    train = [r for r in metrics if r.get("kind") == "train"]
    if not train:
        raise LossModelError(f"--run {run_dir}: the main run has logged no train losses yet")
    last = train[-1]["step"]
    tokens_per_step = train[-1]["tokens"] / last
    # an eval may come after the last logged train window (train.log_every does not divide its step)
    newest = max([last] + [r["step"] for r in metrics if r.get("kind") == "eval"])
    main = Branch(
        "main",
        areas(branch_lrs(optim, newest), optim.max_lr),
        train=[w for w in windows(train, 0) if w[0] > skip],
        val=[
            (r["step"], float(r["val_loss"]))
            for r in metrics
            if r.get("kind") == "eval" and r["step"] > skip and np.isfinite(r.get("val_loss", np.nan))
        ],
    )
    branches, results = [main], []
    for path in sorted((run_dir / "cooldowns").glob("from_*/result.json")):
        parsed = parse_cooldown_name(path.parent.name)
        result = read_result(path)
        if parsed is None or result is None or result.get("data") or "@" in path.parent.name:
            continue  # another mix is another loss curve: not this run's law
        step, shape, steps = parsed
        if until_step is not None and step + steps > until_step:
            continue
        curve = [r for r in read_jsonl(path.parent / "metrics.jsonl") if r.get("kind") == "train"]
        end = step + steps
        branches.append(
            Branch(
                path.parent.name,
                areas(branch_lrs(optim, end, (step, steps, shape)), optim.max_lr),
                train=windows(curve, step),
                val=[(end, float(result["val_loss"]))],
            )
        )
        results.append({**result, "name": path.parent.name})
    return Observations(run_dir, optim, branches, tokens_per_step, last, results)


def read_result(path: Path) -> dict | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("val_loss"), (int, float)) else None
