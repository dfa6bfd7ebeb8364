"""The sweep's numbers from its run dirs: each cell's val loss per row and horizon as flat records, the
table (`aggregate`: per row and horizon the best max_lr by mean over seeds, the half range over seeds,
the gap to cosine and the verdict), the regime (tokens per parameter, epochs) and the compute.

Rows are keyed (schedule, cooldown): cooldown None = the cosine run, a shape = the forked cooldown,
"none" = the open-ended run itself at T, "average" / "average-<weighting>" = an average of its
checkpoints (uniform has no suffix), "predicted-<shape>" = the loss model's prediction of that cooldown
made from what the open-ended run knew at the fork point: its records up to the fork step and the
cooldowns that had ended by then (the same fit `evertrain predict` makes there). The prediction is
computed here rather than read from the fork's prediction.json, which the fork wrote when it started:
in a sweep that moment depends on which processes ran first.
"""

from __future__ import annotations

import json
from pathlib import Path

from evertrain.launch.runs import read_result
from evertrain.launch.sweep.plan import AverageJob, Cell, ForkJob, SweepError, SweepPlan, cosine_name
from evertrain.pretrain.config import load_config


def read_evals(run_dir: Path) -> dict[int, float]:
    """{step: val_loss} of a run's metrics.jsonl (the last record wins for a step)."""
    evals = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "eval":
                evals[record["step"]] = record["val_loss"]
    return evals


PREDICTED = "predicted-"


def average_key(weighting: str) -> str:
    return "average" if weighting == "uniform" else f"average-{weighting}"


def weighting_of(cooldown: str) -> str:
    return cooldown.partition("-")[2] or "uniform"


def row_label(schedule: str, cooldown: str | None, average_last: int = 0) -> str:
    if cooldown is None:
        return "cosine (tuned to T)"
    if cooldown == "none":
        return f"{schedule}, no cooldown"
    if cooldown.startswith("average"):
        kind = {"uniform": "", "tail": "tail-weighted ", "ema": "EMA "}.get(weighting_of(cooldown), "")
        if weighting_of(cooldown).startswith("ema:"):
            kind = f"EMA ({weighting_of(cooldown)[4:]}) "
        return f"{schedule}, {kind}average of {average_last} ckpts"
    if cooldown.startswith(PREDICTED):
        return f"{schedule} + {cooldown[len(PREDICTED) :]} cooldown, predicted at the fork"
    return f"{schedule} + {cooldown} cooldown"


def row_keys(plan: SweepPlan, averages: bool = True) -> list[tuple[str, str | None]]:
    """(schedule, cooldown) of every row in table order (module docstring)."""
    keys = [("cosine", None)]
    for decay in plan.schedules:
        keys += [(decay, shape) for shape in plan.shapes]
        keys += [(decay, PREDICTED + shape) for shape in plan.shapes]
        if averages and plan.average_last:
            keys += [(decay, average_key(w)) for w in plan.average_weightings]
        keys.append((decay, "none"))
    return keys


def predicted_cooldown(run_dir: Path, step: int, cooldown_steps: int, shape: str) -> dict | None:
    """The loss model's prediction of a cooldown, fitted on what `run_dir` knew at `step` ({predicted,
    interval}); None when there is too little to fit yet."""
    from evertrain.launch.lossmodel.fit import fit_loss_model
    from evertrain.launch.lossmodel.observations import LossModelError, load_observations
    from evertrain.launch.lossmodel.predict import predict_cooldown

    try:
        obs = load_observations(run_dir, until_step=step)
        return predict_cooldown(obs, fit_loss_model(obs), step, cooldown_steps, shape)
    except LossModelError:
        return None


def collect_cell(plan: SweepPlan, out: Path, cell: Cell, averages: bool = True) -> list[dict]:
    """One cell's val loss per row and horizon, as flat records {schedule, cooldown, lr, seed,
    horizon, val_loss} (lr/seed as run: the config's when the cell has none); a prediction's record
    also has its 95% `interval`, and is left out where the model could not be fitted yet."""
    cfg = load_config(plan.config, (*plan.overrides, *cell.overrides))
    c = cell.name

    def at(run: str, step: int) -> float:
        evals = read_evals(out / c / run)
        if step not in evals:
            raise SweepError(f"{out / c / run / 'metrics.jsonl'}: no eval at step {step}")
        return evals[step]

    def loss(schedule: str, cooldown: str | None, t: int) -> dict | None:
        if cooldown is None:
            return {"val_loss": at(cosine_name(t), t)}
        if cooldown == "none":
            return {"val_loss": at(schedule, t)}
        if cooldown.startswith("average"):
            job = AverageJob(f"{c}/{schedule}", tuple(plan.average_steps(t)), weighting_of(cooldown))
            return {"val_loss": json.loads(job.result_path(out).read_text())["val_loss"]}
        if cooldown.startswith(PREDICTED):
            shape = cooldown[len(PREDICTED) :]
            made = predicted_cooldown(out / c / schedule, plan.fork_step(t), plan.cooldown_steps(t), shape)
            return made and {"val_loss": made["predicted"], "interval": made["interval"]}
        fork = ForkJob(f"{c}/{schedule}", plan.fork_step(t), plan.cooldown_steps(t), cooldown)
        return {"val_loss": read_result(fork.result_dir(out))["val_loss"]}

    records = []
    for schedule, cooldown in row_keys(plan, averages):
        for t in plan.horizons:
            value = loss(schedule, cooldown, t)
            if value is not None:
                records.append(
                    {
                        "schedule": schedule,
                        "cooldown": cooldown,
                        "lr": cfg.optim.max_lr,
                        "seed": cfg.train.seed,
                        "horizon": t,
                        **value,
                    }
                )
    return records


def aggregate(records: list[dict], average_last: int = 0) -> list[dict]:
    """The table from flat records: per row (schedule, cooldown, in order of first appearance) and
    horizon, the LR with the lowest mean val loss over the seeds (a prediction: its cooldown's LR), and
    at it the mean, the half range over seeds, the mean at every LR, an edge flag, the gap to cosine
    and the verdict."""
    lrs = sorted({r["lr"] for r in records})
    horizons = sorted({r["horizon"] for r in records})
    keys = list(dict.fromkeys((r["schedule"], r["cooldown"]) for r in records))
    losses: dict = {}  # (schedule, cooldown, horizon, lr) -> [loss per seed]
    for r in records:
        losses.setdefault((r["schedule"], r["cooldown"], r["horizon"], r["lr"]), []).append(r["val_loss"])
    rows, chosen = [], {}  # chosen: (schedule, cooldown, horizon) -> the LR its cell reports
    for schedule, cooldown in keys:
        cells = {}
        for t in horizons:
            by_lr = [
                (lr, *mean_and_half_range(losses[schedule, cooldown, t, lr]))
                for lr in lrs
                if (schedule, cooldown, t, lr) in losses
            ]
            if not by_lr:  # a prediction the model could not make yet
                continue
            # a prediction is read at the LR its cooldown won: it forecasts those runs (its own lowest
            # forecast would pick the model's most optimistic error, not a way of training)
            is_prediction = cooldown is not None and cooldown.startswith(PREDICTED)
            follows = chosen.get((schedule, cooldown[len(PREDICTED) :], t)) if is_prediction else None
            if follows in {x[0] for x in by_lr}:
                best = next(i for i, x in enumerate(by_lr) if x[0] == follows)
            else:
                follows = None
                best = min(range(len(by_lr)), key=lambda i: by_lr[i][1])
            lr, mean, half = by_lr[best]
            chosen[schedule, cooldown, t] = lr
            edge = None  # a followed LR was not tuned: no edge to flag
            if follows is None and len(lrs) > 1 and lr == lrs[0]:
                edge = "low"
            elif follows is None and len(lrs) > 1 and lr == lrs[-1]:
                edge = "high"
            cells[str(t)] = {
                "lr": lr,
                "mean": mean,
                "half_range": half,
                "seeds": len(losses[schedule, cooldown, t, lr]),
                "by_lr": [{"lr": x, "mean": m, "half_range": h} for x, m, h in by_lr],
                "edge": edge,
            }
        rows.append(
            {
                "label": row_label(schedule, cooldown, average_last),
                "schedule": schedule,
                "cooldown": cooldown,
                "cells": cells,
            }
        )
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
    return {
        "params": params,
        "embedding_params": embedding,
        "tokens_per_step": per_step,
        "train_tokens": train_tokens,
        "horizons": {
            str(t): {
                "tokens": t * per_step,
                "tokens_per_param": t * per_step / params,
                "tokens_per_non_embedding_param": t * per_step / (params - embedding),
                "epochs": t * per_step / train_tokens,
            }
            for t in plan.horizons
        },
    }


def compute_of(plan: SweepPlan) -> dict:
    """Optimizer steps of the two ways for all horizons, in one cell. The fork way needs the
    open-ended run only up to the last fork point; the no-cooldown and averaging rows need it to the
    last T (the averages themselves train nothing)."""
    cooldown_total = sum(plan.cooldown_steps(t) for t in plan.horizons)
    main = plan.fork_step(plan.horizons[-1])
    compute = {
        "cosine_steps": sum(plan.horizons),
        "main_run_steps": main,
        "cooldown_steps": cooldown_total,
        "fork_steps_per_shape": main + cooldown_total,
        "open_ended_to_last_t": plan.horizons[-1],
    }
    compute["saving"] = 1.0 - compute["fork_steps_per_shape"] / compute["cosine_steps"]
    per_cell = sum(plan.horizons) + len(plan.schedules) * (
        plan.horizons[-1] + len(plan.shapes) * cooldown_total
    )
    compute["sweep_steps"] = per_cell * len(plan.cells())
    return compute


def collect(plan: SweepPlan, out: Path, averages: bool = True) -> dict:
    """The sweep's numbers: every cell's records, the table, the regime and the compute."""
    records = [r for cell in plan.cells() for r in collect_cell(plan, out, cell, averages)]
    return {
        "plan": plan.to_dict(),
        "eval_every": plan.eval_every,
        "records": records,
        "rows": aggregate(records, plan.average_last),
        "regime": regime(plan),
        "compute": compute_of(plan),
        "invocations": read_invocations(out),
    }


def read_invocations(out: Path) -> list[dict]:
    path = out / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
