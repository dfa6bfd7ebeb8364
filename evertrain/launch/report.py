"""`evertrain report`: where a run stands, and whether training on is worth it.

Prints a table of the run's checkpoints and of its cooldown results (with the metrics of each fork's
eval hook) and, beside them, its checkpoint averages (evertrain average: val loss next to the run's
own eval and the best cooldown from the same step), plots the main run's train loss and LR against
tokens (log axis) with every cooldown branch drawn from its fork point to its validation-loss point
and each average as a diamond at its val loss, and, with at least three cooldown
results of one shape, fits the scaling law L(D) = E + B * D^-beta with a 95% band (scaling.py) and
ends with one decision line: training D more tokens, then cooling down, reaches L +- d, gaining g
nats, for h hours at the run's measured tokens/s. Console and plot show the same Projection.
Only reads the run directory (the PNG goes where --out says, by default runs/NAME/report.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from evertrain.errors import EvertrainError
from evertrain.files import atomic_open
from evertrain.launch.free_estimates import Recovery, recoveries
from evertrain.launch.scaling import MIN_FIT_POINTS, PowerLawFit, Projection, fit_power_law, project
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.retention import active_pins

THROUGHPUT_RECORDS = 20  # the run's tokens/s is the median over its last this many train records


class ReportError(EvertrainError, ValueError):
    """Nothing to report on, or a bad report argument."""


@dataclass
class Checkpoint:
    step: int
    tokens: int | None
    pinned_by: list[str]


@dataclass
class Cooldown:
    name: str
    from_step: int
    cooldown_steps: int
    shape: str
    result: dict | None  # result.json; None while the fork runs (or if it died)
    curve: list[dict] = field(default_factory=list)  # its train records
    data: str = "run"  # the mix it cooled down on ("run": the run's own stream; else fork's --data label)
    prediction: dict | None = None  # prediction.json: the loss model's forecast, made before it ran
    failure: str | None = (
        None  # why its last attempt failed (an eval hook, or the forker gave up); None: not failed
    )

    @property
    def final(self) -> bool:
        """The final cooldown the forker's stop rule launched."""
        return bool((self.result or {}).get("final"))

    @property
    def group(self) -> str:
        """Cooldowns that one scaling-law fit may pool: the same shape on the same data."""
        return self.shape if self.data == "run" else f"{self.shape} on {self.data}"

    @property
    def fork_tokens(self) -> float | None:
        """Tokens at the fork point (a fork keeps the main run's global batch: tokens per step are equal)."""
        if self.result is not None:
            return self.result["tokens"] * self.from_step / (self.from_step + self.cooldown_steps)
        if self.curve:
            return self.curve[-1]["tokens"] * self.from_step / self.curve[-1]["step"]
        return None

    @property
    def evals(self) -> dict:
        """The eval hook's metrics (result.json "evals"), flattened to name -> number."""
        return flat_numbers((self.result or {}).get("evals") or {})


@dataclass
class RunReport:
    run_dir: Path
    train: list[dict]
    evals: list[dict]
    checkpoints: list[Checkpoint]
    cooldowns: list[Cooldown]
    averages: list[dict] = field(default_factory=list)  # result.json of each finished average, by step

    @property
    def tokens_so_far(self) -> int | None:
        if self.train:
            return self.train[-1]["tokens"]
        known = [c.tokens for c in self.checkpoints if c.tokens is not None]
        return max(known) if known else None

    @property
    def tokens_per_s(self) -> float | None:
        rates = [r["tokens_per_s"] for r in self.train[-THROUGHPUT_RECORDS:] if r.get("tokens_per_s")]
        return float(np.median(rates)) if rates else None


# -- reading the run -----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics file; a line cut short by a crash (or being written right now), or one
    that is not a record (an object with a step), is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"hellaswag": {"acc": 0.3}} -> {"hellaswag/acc": 0.3}; non-numbers are left out."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def main_run_at(train: list[dict], step: int) -> dict | None:
    """The main run's tokens, loss and LR at `step`, linearly interpolated between its train records."""
    before = [r for r in train if r["step"] <= step]
    after = [r for r in train if r["step"] >= step]
    if not before or not after:
        return None
    lo, hi = before[-1], after[0]
    w = 0.0 if hi["step"] == lo["step"] else (step - lo["step"]) / (hi["step"] - lo["step"])
    return {key: lo[key] + w * (hi[key] - lo[key]) for key in ("tokens", "loss", "lr")}


def data_versions(train: list[dict]) -> list[tuple[int, int, float]]:
    """(version, first step, its tokens) of each data dir version the main run trained on, in order: the
    run takes appended shards at a checkpoint, so a new version shows from the records after it."""
    changes: list[tuple[int, int, float]] = []
    for r in train:
        version = r.get("data_version")
        if version is not None and (not changes or changes[-1][0] != version):
            changes.append((version, r["step"], r["tokens"]))
    return changes


def data_version_at(train: list[dict], step: int) -> int | None:
    """The data version of the main run's last train record at or before `step`."""
    return next((r.get("data_version") for r in reversed(train) if r["step"] <= step), None)


def parse_cooldown_name(name: str) -> tuple[int, str, int] | None:
    """from_000001000_1-sqrt_200 -> (1000, "1-sqrt", 200); an @mix-<hash> suffix (another mix) is ignored."""
    name = name.partition("@")[0]
    head, _, rest = name.partition("_")
    step, _, rest = rest.partition("_")
    shape, _, steps = rest.rpartition("_")
    if head != "from" or not step.isdigit() or not steps.isdigit() or not shape:
        return None
    return int(step), shape, int(steps)


def load_run(run_dir: Path) -> RunReport:
    if not run_dir.is_dir():
        raise ReportError(f"--run {run_dir}: no such run directory")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    checkpoints = []
    for step_dir in store.complete_checkpoints(run_dir / "checkpoints"):
        try:
            tokens = json.loads((step_dir / store.META).read_text()).get("tokens")
        except (OSError, json.JSONDecodeError):
            continue  # deleted by retention while we looked
        checkpoints.append(
            Checkpoint(store.step_of(step_dir), tokens, [p["holder"] for p in active_pins(step_dir)])
        )
    cooldowns = []
    gave_up = forker_failures(run_dir)
    for path in sorted((run_dir / "cooldowns").glob("from_*")):
        parsed = parse_cooldown_name(path.name)
        if parsed is None or not path.is_dir():
            continue
        result = read_result_file(path / "result.json")
        curve = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("kind") == "train"]
        step, shape, steps = parsed
        failure = None if result is not None else (fork_failure(path) or gave_up.get(path.name))
        cooldowns.append(
            Cooldown(
                path.name,
                step,
                steps,
                shape,
                result=result,
                curve=curve,
                data=data_label(path, result),
                prediction=read_prediction(path),
                failure=failure,
            )
        )
    averages = load_averages(run_dir)
    if not metrics and not checkpoints and not cooldowns and not averages:
        raise ReportError(f"--run {run_dir}: nothing to report (no metrics.jsonl, checkpoints or cooldowns)")
    return RunReport(
        run_dir,
        [r for r in metrics if r.get("kind") == "train"],
        [r for r in metrics if r.get("kind") == "eval"],
        checkpoints,
        cooldowns,
        averages,
    )


def fork_failure(cooldown_dir: Path) -> str | None:
    """The error of a fork whose eval hooks failed (fork.py's failed.json; gone once it is rerun)."""
    try:
        return str(json.loads((cooldown_dir / "failed.json").read_text())["error"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return "failed (unreadable failed.json)"


def forker_failures(run_dir: Path) -> dict[str, str]:
    """Forks the forker gave up on after its retries (forker/state.json): name -> its error."""
    try:
        jobs = json.loads((run_dir / "forker" / "state.json").read_text())["jobs"]
        return {j["name"]: j.get("error") or "failed" for j in jobs if j.get("status") == "failed"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no forker, or a state file the forker itself will complain about


def read_result_file(path: Path) -> dict | None:
    """A cooldown's result.json; None (with one line on stderr) when it is not one, e.g. cut short by
    a copy: that cooldown shows as unfinished and the rest of the report stands."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        result = exc
    if isinstance(result, dict) and isinstance(result.get("val_loss"), (int, float, type(None))):
        return result
    print(f"warning: {path}: not a cooldown result (half-written?); shown as unfinished", file=sys.stderr)
    return None


def load_averages(run_dir: Path) -> list[dict]:
    """result.json of every finished checkpoint average (averages/avg_*/: a directory there is complete),
    by newest step, then K."""
    found = []
    for path in (run_dir / "averages").glob("avg_*/result.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and result.get("kind") == "average":
            found.append(result)
    return sorted(found, key=lambda r: (r["step"], len(r["steps"]), r["steps"]))


def read_prediction(cooldown_dir: Path) -> dict | None:
    """prediction.json with a number in it, else None."""
    try:
        record = json.loads((cooldown_dir / "prediction.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("predicted"), (int, float)) else None


def data_label(cooldown_dir: Path, result: dict | None) -> str:
    """The mix a cooldown trained on: result.json's `data`, or while it runs fork.json's; "run" if none."""
    spec = result
    if spec is None and (cooldown_dir / "fork.json").is_file():
        try:
            spec = json.loads((cooldown_dir / "fork.json").read_text())
        except (OSError, json.JSONDecodeError):
            spec = None
    data = (spec or {}).get("data")
    return data["label"] if data else "run"


# -- the scaling-law fit -------------------------------------------------------------------------


@dataclass
class FitResult:
    fit: PowerLawFit | None
    why_not: str  # a sentence when there is no fit
    cooldown_fraction: float = 0.0  # of the fitted cooldowns (median C / S)


def fit_cooldowns(cooldowns: list[Cooldown]) -> FitResult:
    """Fit the shape (on one data mix) with the most finished cooldowns."""
    done = [c for c in cooldowns if c.result is not None]
    if not done:
        return FitResult(
            None, "no finished cooldowns yet: nothing to fit (run `evertrain fork` or the forker)"
        )
    shape, _ = Counter(c.group for c in done).most_common(1)[0]
    fitted = [c for c in done if c.group == shape]
    points = sorted((c.result["tokens"], c.result["val_loss"]) for c in fitted)
    if len({t for t, _ in points}) < MIN_FIT_POINTS:
        return FitResult(
            None,
            f"only {len({t for t, _ in points})} cooldown result(s) at distinct token counts "
            f"(shape {shape}): the fit of L(D) = E + B*D^-beta needs {MIN_FIT_POINTS}",
        )
    fit = fit_power_law([t for t, _ in points], [loss for _, loss in points], shape)
    if fit is None:
        return FitResult(None, f"the {shape} cooldown losses do not decrease with tokens: no projection")
    fraction = float(np.median([c.cooldown_steps / c.from_step for c in fitted]))
    return FitResult(fit, "", fraction)


def run_projection(report: RunReport, result: FitResult, extra_tokens: float | None) -> Projection:
    fit = result.fit
    now = report.tokens_so_far or max(c.fork_tokens for c in report.cooldowns if c.result)
    extra = extra_tokens if extra_tokens is not None else now
    return project(fit, now, extra, result.cooldown_fraction, report.tokens_per_s)


# -- output --------------------------------------------------------------------------------------


def fmt_tokens(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def eval_names(cooldowns: list[Cooldown]) -> list[str]:
    return sorted({name for c in cooldowns for name in c.evals})


def tables(report: RunReport) -> list[Table]:
    ckpts = Table(title=f"checkpoints of {report.run_dir}")
    for column in ("step", "tokens", "data", "pinned"):
        ckpts.add_column(column, justify="right" if column != "pinned" else "left")
    for c in report.checkpoints:
        version = data_version_at(report.train, c.step)
        ckpts.add_row(
            str(c.step),
            fmt_tokens(c.tokens),
            f"v{version}" if version is not None else "-",
            ", ".join(c.pinned_by) or "-",
        )
    cools = Table(title="cooldowns")
    names = eval_names(report.cooldowns)
    for column in ("from step", "shape", "C", "data", "tokens", "val loss", "ppl", *names):
        cools.add_column(column, justify="left" if column in ("shape", "data") else "right")
    for c in sorted(report.cooldowns, key=lambda c: (c.from_step, c.shape, c.cooldown_steps, c.data)):
        r = c.result
        status = "failed" if c.failure else "running" if c.curve else "queued"
        evals = c.evals
        cools.add_row(
            str(c.from_step) + (" final" if c.final else ""),
            c.shape,
            str(c.cooldown_steps),
            c.data,
            fmt_tokens(r["tokens"] if r else (c.curve[-1]["tokens"] if c.curve else None)),
            f"{r['val_loss']:.4f}" if r else status,
            f"{r['val_ppl']:.2f}" if r else "-",
            *[f"{evals[n]:.4g}" if n in evals else "-" for n in names],
        )
    predicted = [c for c in report.cooldowns if c.prediction]
    recovered = gain_recoveries(report)
    return (
        [ckpts, cools]
        + ([predictions_table(predicted)] if predicted else [])
        + ([averages_table(report)] if report.averages else [])
        + ([recoveries_table(recovered)] if recovered else [])
    )


def gain_recoveries(report: RunReport) -> list[Recovery]:
    ends = [
        (c.name, c.from_step + c.cooldown_steps, c.result["val_loss"])
        for c in report.cooldowns
        if c.result and c.data == "run"
    ]
    return recoveries({r["step"]: r["val_loss"] for r in report.evals}, ends, report.averages)


def recoveries_table(rows: list[Recovery]) -> Table:
    """Per fork: the fraction of its gain over the main run that each checkpoint average recovers."""
    table = Table(title="free estimates: fraction of each cooldown's gain recovered by checkpoint averages")
    for column in ("cooldown", "end step", "main run", "cooldown", "gain", "average", "avg loss", "fraction"):
        table.add_column(column, justify="left" if column in ("cooldown", "average") else "right")
    for r in rows:
        table.add_row(
            r.cooldown,
            str(r.end_step),
            f"{r.main_loss:.4f}",
            f"{r.cooldown_loss:.4f}",
            f"{r.gain:+.4f}",
            f"{r.weighting} k{r.k}",
            f"{r.average_loss:.4f}",
            "-" if r.fraction is None else f"{r.fraction:.2f}",
        )
    return table


def predictions_table(cooldowns: list[Cooldown]) -> Table:
    """The loss model's forecast of each fork (prediction.json, made before it ran) beside its result."""
    table = Table(title="predicted vs actual (loss model, 95% intervals)")
    for column in ("cooldown", "predicted", "actual", "error", "inside"):
        table.add_column(column, justify="left" if column == "cooldown" else "right")
    for c in sorted(cooldowns, key=lambda c: (c.from_step, c.cooldown_steps, c.name)):
        p, r = c.prediction, c.result
        error = r["val_loss"] - p["predicted"] if r else None
        table.add_row(
            c.name + (" (final)" if c.final else ""),
            f"{p['predicted']:.4f} +- {p['interval']:.4f}",
            f"{r['val_loss']:.4f}" if r else ("running" if c.curve else "queued"),
            f"{error:+.4f}" if r else "-",
            ("yes" if abs(error) <= p["interval"] else "no") if r else "-",
        )
    return table


def prediction_summary(cooldowns: list[Cooldown]) -> str | None:
    """`prediction MAE: X nats over N forks; K of N inside their 95% intervals`, or None."""
    scored = [
        (c.result["val_loss"] - c.prediction["predicted"], c.prediction["interval"])
        for c in cooldowns
        if c.prediction and c.result
    ]
    if not scored:
        return None
    mae = float(np.mean([abs(e) for e, _ in scored]))
    inside = sum(abs(e) <= half for e, half in scored)
    return (
        f"prediction MAE: {mae:.4f} nats over {len(scored)} fork(s); {inside} of {len(scored)} inside their "
        f"95% intervals"
    )


def averages_table(report: RunReport) -> Table:
    """Each average beside what the run had at its newest step: the run's own val loss there (if it
    evaluated that step) and the best finished cooldown forked from that step."""
    table = Table(title="checkpoint averages (no training)")
    for column in ("step", "K", "steps", "tokens", "val loss", "ppl", "run val loss", "best cooldown"):
        table.add_column(column, justify="left" if column in ("steps", "best cooldown") else "right")
    run_val = {r["step"]: r["val_loss"] for r in report.evals}
    for a in report.averages:
        cooled = [c for c in report.cooldowns if c.result and c.from_step == a["step"]]
        best = min(cooled, key=lambda c: c.result["val_loss"], default=None)
        k = str(len(a["steps"])) + (
            "" if a.get("weighting", "uniform") == "uniform" else f" {a['weighting']}"
        )
        table.add_row(
            str(a["step"]),
            k,
            ",".join(map(str, a["steps"])),
            fmt_tokens(a["tokens"]),
            f"{a['val_loss']:.4f}",
            f"{a['val_ppl']:.2f}",
            f"{run_val[a['step']]:.4f}" if a["step"] in run_val else "-",
            f"{best.result['val_loss']:.4f} ({best.shape}, {best.cooldown_steps})" if best else "-",
        )
    return table


def summary(fit: PowerLawFit, proj: Projection) -> list[str]:
    """The console's fit, warnings and decision lines."""
    lines = [
        f"fit ({fit.points} {fit.shape} cooldowns): {fit.formula()} (rmse {fit.rmse:.2g}), "
        f"D = tokens trained by the end of a cooldown"
    ]
    lines += [f"warning: degenerate fit: {w}" for w in fit.warnings]
    lines.append(
        f"cooling down now (at {fmt_tokens(proj.now)} tokens, ending at {fmt_tokens(proj.now_end)}): "
        f"~{proj.loss_now:.4f}; after another {fmt_tokens(proj.extra)} (ending at "
        f"{fmt_tokens(proj.target)}): ~{proj.loss_text()} (95% band), asymptote E = {fit.E:.4f}"
    )
    lines.append("decision: " + proj.decision(fmt_tokens))
    return lines


def figure(report: RunReport, fit: PowerLawFit | None, proj: Projection | None):
    """Loss and LR over tokens (log axis), plus the eval hook's metrics per fork when there are any."""
    import matplotlib  # here, not at the top: every `evertrain` command imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = eval_names(report.cooldowns)
    ratios = (3, 1.3, 1.5) if names else (3, 1.3)
    fig, axes = plt.subplots(
        len(ratios), 1, sharex=True, figsize=(9, 7 + 2 * bool(names)), height_ratios=ratios
    )
    ax_loss, ax_lr = axes[0], axes[1]
    if report.train:
        tokens = [r["tokens"] for r in report.train]
        ax_loss.plot(tokens, [r["loss"] for r in report.train], color="0.35", lw=1, label="main run (train)")
        ax_lr.plot(tokens, [r["lr"] for r in report.train], color="0.35", lw=1)
    if report.evals:
        ax_loss.plot(
            [r["tokens"] for r in report.evals],
            [r["val_loss"] for r in report.evals],
            "o",
            color="0.6",
            ms=3,
            label="main run (val)",
        )
    colors = plt.get_cmap("viridis")
    done = sorted((c for c in report.cooldowns if c.curve or c.result), key=lambda c: c.from_step)
    for i, c in enumerate(done):
        color = colors(i / max(len(done) - 1, 1))
        branch = list(c.curve)
        start = main_run_at(report.train, c.from_step)
        if start is not None:  # a branch leaves the main run at its fork point (loss and LR)
            branch.insert(0, start)
        if branch:
            tokens = [r["tokens"] for r in branch]
            ax_loss.plot(tokens, [r["loss"] for r in branch], color=color, lw=1.2)
            ax_lr.plot(tokens, [r["lr"] for r in branch], color=color, lw=1.2)
        if c.result:
            ax_loss.plot(
                [c.result["tokens"]],
                [c.result["val_loss"]],
                "*",
                color=color,
                ms=11,
                mec="k",
                mew=0.5,
                label=f"cooldown from {c.from_step} ({c.shape}, {c.cooldown_steps}"
                f"{'' if c.data == 'run' else ', ' + c.data}): "
                f"{c.result['val_loss']:.3f}",
            )
    by_k: dict[tuple[int, str], list[dict]] = {}
    for a in report.averages:
        by_k.setdefault((len(a["steps"]), a.get("weighting", "uniform")), []).append(a)
    for i, ((k, weighting), averages) in enumerate(
        sorted(by_k.items())
    ):  # one legend entry per K and weighting
        ax_loss.plot(
            [a["tokens"] for a in averages],
            [a["val_loss"] for a in averages],
            "D:",
            ms=5,
            lw=0.8,
            color=("darkorange", "saddlebrown", "goldenrod", "firebrick")[i % 4],
            mec="k",
            mew=0.4,
            label=f"{'' if weighting == 'uniform' else weighting + ' '}average of the last {k} "
            "checkpoints (no training): "
            f"{averages[-1]['val_loss']:.3f} at step {averages[-1]['step']}",
        )
    if fit is not None and proj is not None:
        points = [c.result["tokens"] for c in report.cooldowns if c.result and c.group == fit.shape]
        grid = np.geomspace(min(points) * 0.8, proj.target * 1.15, 200)
        ax_loss.plot(
            grid,
            fit(grid),
            "--",
            color="crimson",
            lw=1,
            label=f"fit {fit.formula()}" + (" (degenerate)" if fit.degenerate else ""),
        )
        band = fit.band(grid)
        if np.all(np.isfinite(band)):
            ax_loss.fill_between(
                grid, fit(grid) - band, fit(grid) + band, color="crimson", alpha=0.12, lw=0, label="95% band"
            )
        if not math.isnan(proj.band):
            ax_loss.errorbar(
                [proj.target],
                [proj.loss],
                yerr=[[proj.band], [proj.band]],
                fmt="none",
                ecolor="crimson",
                capsize=3,
            )
        ax_loss.plot(
            [proj.target],
            [proj.loss],
            "x",
            color="crimson",
            ms=8,
            label=f"train {fmt_tokens(proj.extra)} more, cool down: {proj.loss_text()} "
            f"at {fmt_tokens(proj.target)}",
        )
        ax_loss.plot(
            [proj.now_end],
            [proj.loss_now],
            "+",
            color="crimson",
            ms=9,
            label=f"cool down now: {proj.loss_now:.4f} at {fmt_tokens(proj.now_end)}",
        )
    for version, step, tokens in data_versions(report.train)[1:]:  # where appended data joined the run
        for ax in (ax_loss, ax_lr):
            ax.axvline(tokens, color="teal", ls=":", lw=1)
        ax_loss.annotate(
            f"data v{version} (step {step})",
            (tokens, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            color="teal",
            ha="right",
            va="bottom",
        )
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{report.run_dir.name}: train loss, cooldown branches and their val loss")
    ax_loss.grid(alpha=0.3, which="both")
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7, loc="upper right")
    ax_lr.set_ylabel("LR")
    ax_lr.grid(alpha=0.3, which="both")
    if names:
        ax_ev = axes[2]
        for j, name in enumerate(names):
            pts = sorted((c.result["tokens"], c.evals[name]) for c in report.cooldowns if name in c.evals)
            ax_ev.plot(
                [t for t, _ in pts],
                [v for _, v in pts],
                "o-",
                ms=4,
                lw=1,
                label=name,
                color=plt.get_cmap("tab10")(j % 10),
            )
        ax_ev.set_ylabel("fork evals")
        ax_ev.grid(alpha=0.3, which="both")
        ax_ev.legend(fontsize=7, loc="best")
    if any(ax.has_data() for ax in axes):
        axes[-1].set_xscale("log")
    axes[-1].set_xlabel("tokens (log)")
    fig.tight_layout()
    return fig


def plot(report: RunReport, fit: PowerLawFit | None, proj: Projection | None, out: Path) -> Path:
    """The figure as a PNG, written under a temporary name and renamed (a viewer never sees half a PNG)."""
    import matplotlib.pyplot as plt

    fig = figure(report, fit, proj)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot write ({exc.strerror})") from None
    finally:
        plt.close(fig)
    return out


def run_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.extra_tokens is not None and not args.extra_tokens > 0:
        raise ReportError(f"--extra-tokens: must be > 0, got {args.extra_tokens}")
    out = Path(args.out) if args.out else run_dir / "report.png"
    if out.suffix.lower() != ".png":
        raise ReportError(f"--out {out}: must be a .png file")
    report = load_run(run_dir)
    console = Console()
    if not console.is_terminal:  # into a log or a pipe: wide enough for every eval column, never squeezed
        console = Console(width=200)
    for table in tables(report):
        console.print(table)
    if (line := prediction_summary(report.cooldowns)) is not None:
        console.print(line, highlight=False)
    for c in report.cooldowns:
        if c.failure:
            console.print(f"failed: {c.name}: {c.failure}", highlight=False, style="red", soft_wrap=True)
    versions = data_versions(report.train)
    if len(versions) > 1:  # data appended while it trained
        console.print("data: " + ", ".join(f"v{v} from step {s}" for v, s, _ in versions), highlight=False)
    result = fit_cooldowns(report.cooldowns)
    proj = run_projection(report, result, args.extra_tokens) if result.fit else None
    for line in summary(result.fit, proj) if result.fit else [result.why_not]:
        console.print(line, highlight=False, style="yellow" if line.startswith("warning") else None)
    console.print(f"plot: {plot(report, result.fit, proj, out)}", highlight=False)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="checkpoints, cooldown results, plot and 'should we keep going?'",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="the run's directory, e.g. runs/NAME"
    )
    p.add_argument("--out", help="PNG to write (default RUN/report.png)")
    p.add_argument(
        "--extra-tokens",
        type=float,
        help="project training this many more tokens before cooling down (default: the tokens so far, "
        "i.e. doubling)",
    )
    p.set_defaults(func=run_report)
