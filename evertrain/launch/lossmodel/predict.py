"""`evertrain predict`: the final val loss a cooldown would reach, with a 95% interval, before it runs;
and prediction.json, the same prediction written into a fork's directory before the fork starts.

    evertrain predict --run runs/NAME [--step S|latest] (--cooldown-steps C | --cooldown-fraction F)
                      [--shape linear|1-sqrt|cosine] [--at-tokens N]

--at-tokens N predicts the cooldown that starts after the main run has trained N more tokens (its
own schedule carried on) than at --step. The fit (fit.py) uses everything the run has logged.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from evertrain import safe_json
from evertrain.launch.lossmodel.fit import NAMES, LossModelFit, fit_loss_model
from evertrain.launch.lossmodel.observations import LossModelError, Observations, load_observations

PREDICTION = "prediction.json"


def predict_cooldown(
    obs: Observations, fit: LossModelFit, step: int, cooldown_steps: int, shape: str
) -> dict:
    """The prediction record of a `shape` cooldown of `cooldown_steps` steps from `step`."""
    if step <= 0 or cooldown_steps <= 0:
        raise LossModelError(
            f"a cooldown needs a step > 0 and > 0 steps, got step {step}, {cooldown_steps} steps"
        )
    end = step + cooldown_steps
    branch = obs.areas_of(end, (step, cooldown_steps, shape))
    if not fit.annealing_seen and branch.s2[end - 1] > 0:
        raise LossModelError(
            f"{obs.run_dir}: the curves hold no annealing yet (a constant LR and no finished cooldown), so "
            "the gain of a cooldown cannot be predicted; finish one cooldown first"
        )
    value, half = fit.val_loss(branch, end)
    return {
        "from_step": step,
        "cooldown_steps": cooldown_steps,
        "shape": shape,
        "tokens": end * obs.tokens_per_step,
        "predicted": value,
        "interval": half,
        "low": value - half,
        "high": value + half,
        "fit": fit_record(obs, fit),
        "time": time.time(),
    }


def fit_record(obs: Observations, fit: LossModelFit) -> dict:
    """What the prediction was made from: the parameters, their standard errors, the data."""
    return {
        "params": {n: float(v) for n, v in zip(NAMES, fit.params)},
        "stderr": {n: fit.stderr(n) for n in NAMES},
        "sigma_val": fit.sigma_val,
        "decay": fit.decay,
        "plausible_decays": [f.decay for f in fit.plausible],
        "points": fit.points,
        "cooldowns": len(obs.branches) - 1,
        "main_step": obs.last_step,
        "warnings": fit.warnings,
    }


def ensure_prediction(
    run_dir: Path, out: Path, step: int, cooldown_steps: int, shape: str, log=print
) -> dict | None:
    """Write out/prediction.json unless it exists (the first prediction of a fork is the one that counts:
    made before it ran). A run the model cannot fit yet gets {"predicted": null, "why": ...}: a fork
    never fails for want of a prediction. Returns the record."""
    path = out / PREDICTION
    if path.is_file():
        return read_prediction(out)
    try:
        obs = load_observations(run_dir)
        record = predict_cooldown(obs, fit_loss_model(obs), step, cooldown_steps, shape)
    except (LossModelError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        record = {
            "from_step": step,
            "cooldown_steps": cooldown_steps,
            "shape": shape,
            "predicted": None,
            "why": str(exc),
            "time": time.time(),
        }
    out.mkdir(parents=True, exist_ok=True)
    from evertrain.pretrain.checkpoint.store import atomic_write_text

    atomic_write_text(path, safe_json.dumps(record, indent=1))
    if record["predicted"] is not None:
        log(f"prediction: {out.name}: val loss {record['predicted']:.4f} +- {record['interval']:.4f} (95%)")
    return record


def read_prediction(out: Path) -> dict | None:
    try:
        record = json.loads((out / PREDICTION).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def scored(result: dict, prediction: dict | None) -> dict:
    """result.json's fields for the prediction: `predicted`, `prediction_interval`, `prediction_error`
    (actual - predicted); nothing when there was no prediction."""
    if not prediction or not isinstance(prediction.get("predicted"), (int, float)):
        return {}
    return {
        "predicted": prediction["predicted"],
        "prediction_interval": prediction.get("interval"),
        "prediction_error": result["val_loss"] - prediction["predicted"],
    }


# -- CLI -----------------------------------------------------------------------------------------


def run_predict(args: argparse.Namespace) -> int:
    from evertrain.launch.runs import RunError, cooldown_length

    obs = load_observations(Path(args.run))
    step = obs.last_step if args.step in (None, "latest") else parse_step(args.step)
    if args.at_tokens is not None:
        if not args.at_tokens > 0:
            raise LossModelError(f"--at-tokens: must be > 0, got {args.at_tokens}")
        step += round(args.at_tokens / obs.tokens_per_step)
    try:
        cooldown_steps = cooldown_length(step, args.cooldown_steps, args.cooldown_fraction)
    except RunError as exc:
        raise LossModelError(str(exc)) from None
    fit = fit_loss_model(obs)
    record = predict_cooldown(obs, fit, step, cooldown_steps, args.shape)
    print(
        f"fit ({fit.points} points: the main run to step {obs.last_step} and {len(obs.branches) - 1} "
        f"finished cooldown(s)): {fit.formula()}"
    )
    for warning in fit.warnings:
        print(f"warning: {warning}")
    print(
        f"predicted val loss of a {args.shape} cooldown from step {step} over {cooldown_steps} steps "
        f"(ending at step {step + cooldown_steps}, {record['tokens']:.4g} tokens): "
        f"{record['predicted']:.4f} +- {record['interval']:.4f} (95%: {record['low']:.4f} .. {record['high']:.4f})"
    )
    return 0


def parse_step(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LossModelError(f"--step: expected a step number or 'latest', got {text!r}") from None


def register(subparsers) -> None:
    from evertrain.pretrain.config import COOLDOWN_SHAPES, DEFAULT_COOLDOWN_SHAPE

    p = subparsers.add_parser(
        "predict",
        help="predict a cooldown's final val loss before it runs",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="the run's directory, e.g. runs/NAME"
    )
    p.add_argument("--step", help="the fork step (default: the main run's newest logged step)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--cooldown-steps", type=int, help="cooldown length C in steps (this or --cooldown-fraction required)"
    )
    length.add_argument(
        "--cooldown-fraction",
        type=float,
        help="cooldown length as a fraction of the step, C = F * S (this or --cooldown-steps required)",
    )
    p.add_argument("--shape", choices=COOLDOWN_SHAPES, default=DEFAULT_COOLDOWN_SHAPE, help="cooldown shape")
    p.add_argument(
        "--at-tokens",
        type=float,
        help="fork after the main run has trained N more tokens than at --step (default: fork at --step itself)",
    )
    p.set_defaults(func=run_predict)
