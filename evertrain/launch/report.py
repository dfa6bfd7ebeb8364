"""`evertrain report`: where a run stands, and whether training on is worth it.

Prints a table of the run's checkpoints and of its cooldown results, plots the main run's train loss
and LR against tokens with every cooldown branch as a curve ending in its validation-loss point, and,
with at least three cooldown results of one shape, fits the scaling law L(D) = E + B * D^-beta to them
and projects the loss gained by training on for another X tokens before cooling down.
Only reads the run directory (the PNG goes where --out says, by default runs/NAME/report.png).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from evertrain.errors import EvertrainError
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.retention import active_pins

MIN_FIT_POINTS = 3


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


@dataclass
class RunReport:
    run_dir: Path
    train: list[dict]
    evals: list[dict]
    checkpoints: list[Checkpoint]
    cooldowns: list[Cooldown]

    @property
    def tokens_so_far(self) -> int | None:
        if self.train:
            return self.train[-1]["tokens"]
        known = [c.tokens for c in self.checkpoints if c.tokens is not None]
        return max(known) if known else None


@dataclass
class PowerLawFit:
    """L(D) = E + B * D^-beta, fitted to (tokens, val loss) points of one cooldown shape."""
    E: float
    B: float
    beta: float
    rmse: float
    points: int
    shape: str

    def __call__(self, tokens):
        return self.E + self.B * np.power(np.asarray(tokens, dtype=np.float64), -self.beta)


# -- reading the run -----------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics file; a line cut short by a crash (or being written right now) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def parse_cooldown_name(name: str) -> tuple[int, str, int] | None:
    """from_000001000_1-sqrt_200 -> (1000, "1-sqrt", 200)."""
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
        checkpoints.append(Checkpoint(store.step_of(step_dir), tokens,
                                      [p["holder"] for p in active_pins(step_dir)]))
    cooldowns = []
    for path in sorted((run_dir / "cooldowns").glob("from_*")):
        parsed = parse_cooldown_name(path.name)
        if parsed is None or not path.is_dir():
            continue
        result_path = path / "result.json"
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        curve = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("kind") == "train"]
        step, shape, steps = parsed
        cooldowns.append(Cooldown(path.name, step, steps, shape, result=result, curve=curve))
    if not metrics and not checkpoints and not cooldowns:
        raise ReportError(f"--run {run_dir}: nothing to report (no metrics.jsonl, checkpoints or cooldowns)")
    return RunReport(run_dir, [r for r in metrics if r.get("kind") == "train"],
                     [r for r in metrics if r.get("kind") == "eval"], checkpoints, cooldowns)


# -- the scaling-law fit -------------------------------------------------------------------------

def fit_power_law(tokens, losses, shape: str = "", betas=np.linspace(0.02, 3.0, 600)) -> PowerLawFit | None:
    """Least squares fit of L(D) = E + B * D^-beta with E >= 0, B > 0.

    For a fixed beta the model is linear in (E, B), so the fit is a 1-d search over beta of an exact
    linear solve: a grid finds the best basin (no local minimum to get stuck in, no scipy), a golden-
    section search then polishes beta inside it. D is scaled by its largest value so D^-beta stays well
    conditioned. None when the points admit no decreasing curve (the loss did not fall with tokens)."""
    d = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(d) < MIN_FIT_POINTS or len(set(d.tolist())) < MIN_FIT_POINTS or not np.all(d > 0):
        return None
    scaled = d / d.max()

    def solve(beta: float) -> tuple[float, float, float]:
        """(sse, E, B at the scaled D) for this beta; sse = inf when no decreasing curve fits."""
        x = np.power(scaled, -beta)
        (e, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)
        if e < 0:  # the asymptote of a loss cannot be negative: best fit on the E = 0 boundary
            e, b = 0.0, float(x @ y / (x @ x))
        if b <= 0:
            return math.inf, e, b
        return float(np.sum((e + b * x - y) ** 2)), e, b

    sses = [solve(beta)[0] for beta in betas]
    i = int(np.argmin(sses))
    if not math.isfinite(sses[i]):
        return None
    lo, hi = betas[max(i - 1, 0)], betas[min(i + 1, len(betas) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # the bracket shrinks to ~1e-8 of the grid step
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if solve(a)[0] < solve(b)[0]:
            hi = b
        else:
            lo = a
    beta = (lo + hi) / 2 if solve((lo + hi) / 2)[0] <= sses[i] else float(betas[i])
    sse, e, b = solve(beta)
    return PowerLawFit(E=float(e), B=float(b * d.max() ** beta), beta=float(beta), rmse=math.sqrt(sse / len(d)),
                       points=len(d), shape=shape)


def fit_cooldowns(cooldowns: list[Cooldown]) -> tuple[PowerLawFit | None, str]:
    """Fit the shape with the most finished cooldowns; returns (fit or None, a sentence saying why)."""
    done = [c for c in cooldowns if c.result is not None]
    if not done:
        return None, "no finished cooldowns yet: nothing to fit (run `evertrain fork` or the forker)"
    shape, count = Counter(c.shape for c in done).most_common(1)[0]
    points = sorted((c.result["tokens"], c.result["val_loss"]) for c in done if c.shape == shape)
    if len({t for t, _ in points}) < MIN_FIT_POINTS:
        return None, (f"only {len({t for t, _ in points})} cooldown result(s) at distinct token counts "
                      f"(shape {shape}): the fit of L(D) = E + B*D^-beta needs {MIN_FIT_POINTS}")
    fit = fit_power_law([t for t, _ in points], [loss for _, loss in points], shape)
    if fit is None:
        return None, f"the {shape} cooldown losses do not decrease with tokens: no projection"
    return fit, ""


# -- output --------------------------------------------------------------------------------------

def fmt_tokens(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def tables(report: RunReport) -> list[Table]:
    ckpts = Table(title=f"checkpoints of {report.run_dir}")
    for column in ("step", "tokens", "pinned"):
        ckpts.add_column(column, justify="right" if column != "pinned" else "left")
    for c in report.checkpoints:
        ckpts.add_row(str(c.step), fmt_tokens(c.tokens), ", ".join(c.pinned_by) or "-")
    cools = Table(title="cooldowns")
    for column in ("from step", "shape", "C", "tokens", "val loss", "ppl"):
        cools.add_column(column, justify="left" if column == "shape" else "right")
    for c in sorted(report.cooldowns, key=lambda c: (c.from_step, c.shape, c.cooldown_steps)):
        r = c.result
        status = "running" if c.curve else "queued"
        cools.add_row(str(c.from_step), c.shape, str(c.cooldown_steps),
                      fmt_tokens(r["tokens"] if r else (c.curve[-1]["tokens"] if c.curve else None)),
                      f"{r['val_loss']:.4f}" if r else status, f"{r['val_ppl']:.2f}" if r else "-")
    return [ckpts, cools]


def projection(report: RunReport, fit: PowerLawFit, extra_tokens: float | None) -> str:
    now = report.tokens_so_far or max(c.result["tokens"] for c in report.cooldowns if c.result)
    extra = extra_tokens if extra_tokens is not None else now
    here, there = float(fit(now)), float(fit(now + extra))
    return (f"fit ({fit.points} {fit.shape} cooldowns): L(D) = {fit.E:.4f} + {fit.B:.4g} * D^-{fit.beta:.3f} "
            f"(rmse {fit.rmse:.2g}), D = tokens trained by the end of a cooldown\n"
            f"cooled down at {fmt_tokens(now)} tokens (so far): ~{here:.4f}; at {fmt_tokens(now + extra)} "
            f"(another {fmt_tokens(extra)}): ~{there:.4f}, a projected gain of {here - there:.4f} "
            f"(asymptote E = {fit.E:.4f})")


def plot(report: RunReport, fit: PowerLawFit | None, extra_tokens: float | None, out: Path) -> Path:
    """Two panels over tokens: loss (main run, cooldown branches ending in val-loss points, the fit)
    and LR. Written under a temporary name and renamed, so a viewer never sees half a PNG."""
    import matplotlib  # here, not at the top: every `evertrain` command imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(9, 7), height_ratios=(3, 1.3))
    if report.train:
        tokens = [r["tokens"] for r in report.train]
        ax_loss.plot(tokens, [r["loss"] for r in report.train], color="0.35", lw=1, label="main run (train)")
        ax_lr.plot(tokens, [r["lr"] for r in report.train], color="0.35", lw=1)
    if report.evals:
        ax_loss.plot([r["tokens"] for r in report.evals], [r["val_loss"] for r in report.evals], "o",
                     color="0.6", ms=3, label="main run (val)")
    colors = plt.get_cmap("viridis")
    done = [c for c in report.cooldowns if c.curve or c.result]
    for i, c in enumerate(sorted(done, key=lambda c: c.from_step)):
        color = colors(i / max(len(done) - 1, 1))
        if c.curve:
            tokens = [r["tokens"] for r in c.curve]
            ax_loss.plot(tokens, [r["loss"] for r in c.curve], color=color, lw=1.2)
            ax_lr.plot(tokens, [r["lr"] for r in c.curve], color=color, lw=1.2)
        if c.result:
            ax_loss.plot([c.result["tokens"]], [c.result["val_loss"]], "*", color=color, ms=11, mec="k", mew=0.5,
                         label=f"cooldown from {c.from_step} ({c.shape}, {c.cooldown_steps}): "
                               f"{c.result['val_loss']:.3f}")
    if fit is not None:
        now = report.tokens_so_far or 0
        points = [c.result["tokens"] for c in report.cooldowns if c.result and c.shape == fit.shape]
        right = max(points + [now]) + (extra_tokens if extra_tokens is not None else now)
        grid = np.linspace(min(points) * 0.8, right, 200)
        ax_loss.plot(grid, fit(grid), "--", color="crimson", lw=1,
                     label=f"fit E + B D^-{fit.beta:.2f} (E={fit.E:.3f})")
        ax_loss.plot([right], [float(fit(right))], "x", color="crimson", ms=8,
                     label=f"projected at {fmt_tokens(right)} tokens: {float(fit(right)):.3f}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{report.run_dir.name}: train loss, cooldown branches and their val loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7, loc="upper right")
    ax_lr.set_ylabel("LR")
    ax_lr.set_xlabel("tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
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
    for table in tables(report):
        console.print(table)
    fit, why_not = fit_cooldowns(report.cooldowns)
    console.print(projection(report, fit, args.extra_tokens) if fit else why_not, highlight=False)
    console.print(f"plot: {plot(report, fit, args.extra_tokens, out)}", highlight=False)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="checkpoints, cooldown results, plot and 'should we keep going?'",
                              description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the run's directory, e.g. runs/NAME")
    p.add_argument("--out", help="PNG to write (default RUN/report.png)")
    p.add_argument("--extra-tokens", type=float,
                   help="project the loss after this many more tokens (default: the tokens so far, i.e. doubling)")
    p.set_defaults(func=run_report)
