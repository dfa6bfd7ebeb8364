"""The stop rule: is training the main run on worth it, and if not, which cooldown ends it?

At the newest checkpoint step s, with the forks' cooldown fraction f (c(s) = round(f * s)) and a
stride d (how far "training on" looks ahead: the forker's fork interval):

    gain          = L(cool down from s for c(s)) - L(train to s + d, then cool down for c(s + d))
    hours         = the extra steps (d + c(s + d) - c(s)) at the run's measured tokens/s
    gain per hour = gain / hours, with the 95% band of the difference (fit.difference: the parameters'
                    uncertainty, correlated between the two predictions)

Verdict `stop` when any rule given says so:
    --min-gain-per-hour G   the band's upper end is below G: even the optimistic gain is not worth it
    --budget-tokens N       training on one more stride and cooling down would pass N tokens
    --budget-hours H        ... would pass H hours of the main run at its measured tokens/s
and the final cooldown starts at s, its length the shortest of the candidates (2% .. 50% of s, within
the token budget while it leaves room for one) whose predicted loss is within the 95% band of the
difference to the best one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from evertrain.launch.lossmodel.fit import LossModelFit
from evertrain.launch.lossmodel.observations import Observations

CANDIDATE_FRACTIONS = np.linspace(0.02, 0.5, 25)  # final cooldown lengths considered, as fractions of s


@dataclass(frozen=True)
class Rule:
    min_gain_per_hour: float | None = None  # nats per hour of the main run
    budget_tokens: float | None = None
    budget_hours: float | None = None
    cooldown_fraction: float = 0.2  # the forks': the cooldown a stop at any step would pay for
    shape: str = "linear"
    stride: int = 1  # steps of training on that a verdict weighs

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def cooldown_steps(rule: Rule, step: int) -> int:
    return max(round(rule.cooldown_fraction * step), 1)


def projected_gain(obs: Observations, fit: LossModelFit, rule: Rule, step: int) -> tuple[float, float]:
    """(gain in nats of training `rule.stride` more steps before cooling down, its 95% half-width)."""
    later = step + rule.stride
    c_now, c_later = cooldown_steps(rule, step), cooldown_steps(rule, later)
    now = (obs.areas_of(step + c_now, (step, c_now, rule.shape)), step + c_now)
    on = (obs.areas_of(later + c_later, (later, c_later, rule.shape)), later + c_later)
    return fit.difference(now, on)


def final_cooldown(obs: Observations, fit: LossModelFit | None, rule: Rule, step: int) -> dict:
    """The final cooldown from `step`: the shortest candidate within the band of the best (without a
    fit: the forks' own fraction), capped by the token budget."""
    shortest = max(round(CANDIDATE_FRACTIONS[0] * step), 1)
    cap, note = math.inf, None
    if rule.budget_tokens is not None:
        left = int(rule.budget_tokens // obs.tokens_per_step) - step
        if left >= shortest:
            cap = left
        else:  # decided too late (the run went on while forks ran): the best cooldown, as without a budget
            note = f"the token budget leaves {max(left, 0)} steps: the cooldown is chosen as without it"
    if fit is None:
        return {
            "step": step,
            "cooldown_steps": int(min(cooldown_steps(rule, step), cap)),
            "shape": rule.shape,
            "predicted": None,
            "interval": None,
            "note": note,
        }
    lengths = sorted({int(min(max(round(f * step), 1), cap)) for f in CANDIDATE_FRACTIONS})
    branches = [(obs.areas_of(step + c, (step, c, rule.shape)), step + c) for c in lengths]
    losses = [fit.val_loss(a, end)[0] for a, end in branches]
    best = int(np.argmin(losses))

    def within_band(i: int) -> bool:
        excess, band = fit.difference(branches[i], branches[best])
        return excess <= band

    chosen = next(i for i in range(len(lengths)) if within_band(i))  # the best itself always is
    value, half = fit.val_loss(*branches[chosen])
    return {
        "step": step,
        "cooldown_steps": lengths[chosen],
        "shape": rule.shape,
        "predicted": value,
        "interval": half,
        "best_cooldown_steps": lengths[best],
        "best_predicted": losses[best],
        "note": note,
    }


def evaluate(
    obs: Observations,
    fit: LossModelFit | None,
    rule: Rule,
    step: int,
    tokens_per_s: float | None,
    why_no_fit: str = "",
) -> dict:
    """One decisions.jsonl line: the projection at `step` and the verdict of every rule given."""
    tps = obs.tokens_per_step
    later = step + rule.stride
    end_later = later + cooldown_steps(rule, later)
    line = {
        "time": time.time(),
        "step": step,
        "tokens": step * tps,
        "rule": rule.given(),
        "tokens_per_s": tokens_per_s,
        "verdict": "continue",
        "why": [],
    }
    if fit is not None:
        gain, band = projected_gain(obs, fit, rule, step)
        line.update(gain=gain, gain_band=[gain - band, gain + band])
        if tokens_per_s:
            hours = (end_later - step - cooldown_steps(rule, step)) * tps / tokens_per_s / 3600.0
            line.update(
                hours=hours,
                gain_per_hour=gain / hours,
                gain_per_hour_band=[(gain - band) / hours, (gain + band) / hours],
            )
    else:
        line["why"].append(f"no fit: {why_no_fit}")
    stops = []
    if rule.min_gain_per_hour is not None:
        if "gain_per_hour" not in line:
            line["why"].append("min-gain-per-hour: no projection (no fit or no measured tokens/s)")
        elif line["gain_per_hour_band"][1] < rule.min_gain_per_hour:
            stops.append(
                f"min-gain-per-hour: at most {line['gain_per_hour_band'][1]:.4g} nats/hour "
                f"(95%) < {rule.min_gain_per_hour:g}"
            )
    if rule.budget_tokens is not None and end_later * tps > rule.budget_tokens:
        stops.append(
            f"budget-tokens: training on to step {later} and cooling down ends at "
            f"{end_later * tps:.4g} tokens > {rule.budget_tokens:.4g}"
        )
    if rule.budget_hours is not None:
        if not tokens_per_s:
            line["why"].append("budget-hours: the run has logged no tokens/s")
        elif end_later * tps / tokens_per_s / 3600.0 > rule.budget_hours:
            stops.append(
                f"budget-hours: training on to step {later} and cooling down ends at "
                f"{end_later * tps / tokens_per_s / 3600.0:.4g} hours > {rule.budget_hours:g}"
            )
    if stops:
        line["verdict"], line["why"] = "stop", line["why"] + stops
        line["final"] = final_cooldown(obs, fit, rule, step)
    return line
