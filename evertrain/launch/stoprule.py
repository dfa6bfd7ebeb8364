"""The forker's stop rule (--min-gain-per-hour, --budget-tokens, --budget-hours, --stop-main): when to
evaluate it, where its verdicts go, and what a `stop` does. The arithmetic is lossmodel/decision.py.

After each new fork result or average (a job done since the last evaluation) the forker fits the loss
model, evaluates the rule at the newest checkpoint and appends one line to runs/NAME/decisions.jsonl.
On `stop`, in this order, each step safe to repeat:
  1. with --stop-main, runs/NAME/STOP: the trainer stops at its next checkpoint step (as on SIGTERM,
     with a checkpoint) and removes the file;
  2. the decision line, with the final cooldown it chose;
  3. the final cooldown, queued like any fork (pinned), with --final (result.json `final: true`).
A restarted forker reads decisions.jsonl: a `stop` there is never decided again; its final cooldown is
queued if state.json lacks it, and nothing new is forked.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evertrain import safe_json
from evertrain.launch.lossmodel.decision import Rule, evaluate
from evertrain.launch.lossmodel.observations import LossModelError

DECISIONS = "decisions.jsonl"
STOP_FILE = "STOP"  # the trainer's request file (evertrain/pretrain/run/stopping.py StopFile)
THROUGHPUT_RECORDS = 20  # tokens/s: the median of the main run's last this many train records


@dataclass(frozen=True)
class StopOptions:
    rule: Rule
    stop_main: bool = False


def read_decisions(run_dir: Path) -> list[dict]:
    path = run_dir / DECISIONS
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed forker
        if isinstance(line, dict):
            lines.append(line)
    return lines


def append_decision(run_dir: Path, line: dict) -> None:
    with open(run_dir / DECISIONS, "a") as f:
        f.write(safe_json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def request_stop(run_dir: Path) -> None:
    from evertrain.pretrain.checkpoint.store import atomic_write_text

    atomic_write_text(run_dir / STOP_FILE, "requested by evertrain forker: the stop rule said stop\n")


def measured_tokens_per_s(run_dir: Path) -> float | None:
    from evertrain.launch.report import read_jsonl

    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    rates = [r["tokens_per_s"] for r in train[-THROUGHPUT_RECORDS:] if r.get("tokens_per_s")]
    return float(np.median(rates)) if rates else None


class StopRule:
    """The forker's side of the rule; `poll` is called once per forker poll, after reaping."""

    def __init__(self, options: StopOptions, run_dir: Path, log=print):
        self.options, self.run_dir, self.log = options, run_dir, log
        lines = read_decisions(run_dir)
        self.decided = next((line for line in lines if line.get("verdict") == "stop"), None)
        self.evaluated = max((line.get("results", 0) for line in lines), default=0)

    def poll(self, results: int, newest_step: int | None) -> dict | None:
        """Evaluate when there are more finished results (forks, averages) than at the last evaluation;
        returns the final cooldown ({step, cooldown_steps, shape, ...}) once decided, else None."""
        if self.decided is not None:
            return self.decided["final"]
        if results <= self.evaluated or newest_step is None:
            return None
        try:
            line = {**self.evaluate(newest_step), "results": results}
        except LossModelError as exc:  # e.g. no train record yet: look again after the next result
            self.log(f"decision: not yet: {exc}")
            return None
        self.evaluated = results
        if line["verdict"] == "stop" and self.options.stop_main:
            request_stop(self.run_dir)
            line["stop_main"] = True
        append_decision(self.run_dir, line)
        self.log(f"decision at step {line['step']}: {line['verdict']}" + describe(line))
        if line["verdict"] == "stop":
            self.decided = line
            return line["final"]
        return None

    def evaluate(self, step: int) -> dict:
        from evertrain.launch.lossmodel.fit import fit_loss_model
        from evertrain.launch.lossmodel.observations import load_observations

        obs = load_observations(self.run_dir)
        rule = self.options.rule
        if not rule.stride:  # training on is weighed one checkpoint interval ahead
            from evertrain.pretrain.config import load_config

            stride = load_config(self.run_dir / "config.yaml").checkpoint.every_steps or 1
            rule = dataclasses.replace(rule, stride=stride)
        try:
            fit, why = fit_loss_model(obs), ""
        except (LossModelError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            fit, why = None, str(exc)
        return evaluate(obs, fit, rule, step, measured_tokens_per_s(self.run_dir), why)


def describe(line: dict) -> str:
    parts = []
    if "gain_per_hour" in line:
        lo, hi = line["gain_per_hour_band"]
        parts.append(f"gain {line['gain_per_hour']:.4g} nats/hour (95% {lo:.4g} .. {hi:.4g})")
    parts += line["why"]
    if "final" in line:
        final = line["final"]
        parts.append(
            f"final cooldown from step {final['step']} over {final['cooldown_steps']} steps"
            + (
                f", predicted {final['predicted']:.4f} +- {final['interval']:.4f}"
                if final.get("predicted") is not None
                else ""
            )
        )
    return (": " + "; ".join(parts)) if parts else ""
