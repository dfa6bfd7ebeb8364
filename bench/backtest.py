"""Backtest the loss model and the stop rule on a finished run with several forks.

At every fork step k of the run: fit the loss model on what was known when the main run was at k (its
records up to k and the cooldowns that had ended by then), predict every cooldown that ended later
(each a 95% interval), and evaluate the stop rule (--min-gain-per-hour G) at k. Against it, the
hindsight-optimal stop: the first fork step whose actual gain per hour to the next fork (the drop of the
cooldowns' val losses, over the hours between their ends at the run's measured tokens/s) is below G.

    python bench/backtest.py --run runs/demo [--min-gain-per-hour G] [--plot docs/decisions.png]

Prints one line per k, then `prediction MAE: X nats, coverage: Y%` over every (k, later fork) pair.
Without --min-gain-per-hour, G is the median actual gain per hour between consecutive forks (printed),
so that the hindsight stop falls inside the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

from evertrain.launch.lossmodel.decision import Rule, evaluate
from evertrain.launch.lossmodel.fit import fit_loss_model
from evertrain.launch.lossmodel.observations import LossModelError, load_observations
from evertrain.launch.lossmodel.predict import predict_cooldown
from evertrain.launch.stoprule import measured_tokens_per_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--min-gain-per-hour", type=float)
    p.add_argument("--plot", help="PNG: actual vs predicted cooldown losses, and the projected gain per hour")
    p.add_argument(
        "--train-curves",
        action="store_true",
        help="fit the train windows too at every k (default: as `evertrain predict` does, only while "
        "there are few val losses)",
    )
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    everything = load_observations(run_dir)
    forks = sorted(
        (
            (r["from_step"], r["cooldown_steps"], r["shape"], r["val_loss"])
            for r in everything.cooldowns
            if r.get("shape")
        ),
        key=lambda f: (f[0], f[1]),
    )
    if len(forks) < 3:
        print(f"{run_dir}: {len(forks)} finished cooldowns; a backtest needs 3 or more", file=sys.stderr)
        return 2
    tokens_per_s = measured_tokens_per_s(run_dir)
    tps = everything.tokens_per_step
    fraction = statistics.median(c / s for s, c, _, _ in forks)
    shape = statistics.mode(f[2] for f in forks)

    # actual gain per hour of training on from one fork step to the next (both cooled down)
    actual = []
    for (s0, c0, _, l0), (s1, c1, _, l1) in zip(forks, forks[1:]):
        hours = ((s1 + c1) - (s0 + c0)) * tps / tokens_per_s / 3600.0
        actual.append((s0, (l0 - l1) / hours))
    threshold = args.min_gain_per_hour
    if threshold is None:
        threshold = statistics.median(g for _, g in actual)
        print(f"G = {threshold:.4g} nats/hour: the median actual gain per hour between consecutive forks")
    hindsight = next((s for s, g in actual if g < threshold), forks[-1][0])
    print(
        f"run {run_dir}: {len(forks)} cooldowns ({shape}, median C/S {fraction:.2f}), {tps:.0f} tokens/step, "
        f"{tokens_per_s:.4g} tokens/s measured"
    )
    print("actual gain per hour to the next fork: " + ", ".join(f"{s}: {g:.4g}" for s, g in actual))

    errors, inside, rows, first_stop = [], [], [], None
    for i, (k, _, _, _) in enumerate(forks):
        obs = load_observations(run_dir, until_step=k)
        try:
            fit = fit_loss_model(obs, train_curves=True if args.train_curves else None)
        except LossModelError as exc:
            print(f"k={k}: no fit ({exc})")
            continue
        later = [f for f in forks if f[0] + f[1] > k]
        try:
            preds = [(f, predict_cooldown(obs, fit, f[0], f[1], f[2])) for f in later]
        except LossModelError as exc:  # e.g. a constant-LR run before its first cooldown
            print(f"k={k}: no prediction ({exc})")
            continue
        errs = [f[3] - pr["predicted"] for f, pr in preds]
        ins = [abs(e) <= pr["interval"] for e, (_, pr) in zip(errs, preds)]
        errors += errs
        inside += ins
        stride = (forks[i + 1][0] - k) if i + 1 < len(forks) else (k - forks[i - 1][0])
        line = evaluate(
            obs,
            fit,
            Rule(min_gain_per_hour=threshold, cooldown_fraction=fraction, shape=shape, stride=stride),
            k,
            tokens_per_s,
        )
        if line["verdict"] == "stop" and first_stop is None:
            first_stop = k
        lo, hi = line["gain_per_hour_band"]
        final = preds[-1][1] if preds else None
        rows.append(
            {
                "k": k,
                "cooldowns": len(obs.branches) - 1,
                "later": len(later),
                "mae": float(np.mean(np.abs(errs))) if errs else None,
                "inside": sum(ins),
                "gph": line["gain_per_hour"],
                "lo": lo,
                "hi": hi,
                "verdict": line["verdict"],
                "final": final,
                "final_actual": forks[-1][3],
                "preds": preds,
            }
        )
        print(
            f"k={k:5d}: fit on {len(obs.branches) - 1} cooldown(s), {fit.points} "
            f"{'points' if fit.train_curves else 'val losses'}; {len(later)} later fork(s): "
            + (f"MAE {rows[-1]['mae']:.4f}, {sum(ins)}/{len(ins)} inside; " if errs else "")
            + (
                f"final (from {forks[-1][0]}): {final['predicted']:.4f} +- {final['interval']:.4f} vs "
                f"{forks[-1][3]:.4f}; "
                if final
                else ""
            )
            + f"gain/hour {line['gain_per_hour']:.4g} (95% {lo:.4g} .. {hi:.4g}) -> {line['verdict']}"
        )
    if not errors:
        print("no predictions could be made", file=sys.stderr)
        return 2
    print(
        f"prediction MAE: {float(np.mean(np.abs(errors))):.4f} nats, coverage: {100.0 * np.mean(inside):.0f}% "
        f"({sum(inside)} of {len(inside)} actuals inside their 95% intervals)"
    )
    print(
        f"stop rule (G = {threshold:.4g} nats/hour): first says stop at step "
        f"{first_stop if first_stop is not None else 'never (within the run)'}; hindsight-optimal stop: step {hindsight}"
    )
    if args.plot:
        plot(rows, forks, actual, threshold, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def plot(rows, forks, actual, threshold, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_g) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    ax.plot([s for s, *_ in forks], [f[3] for f in forks], "k*", ms=10, label="actual cooldown val loss")
    colors = plt.get_cmap("viridis")
    for i, row in enumerate(rows):
        if not row["preds"]:
            continue
        xs = [f[0] + 3 * i for f, _ in row["preds"]]  # nudged apart so the bars do not overlap
        ax.errorbar(
            xs,
            [p["predicted"] for _, p in row["preds"]],
            yerr=[p["interval"] for _, p in row["preds"]],
            fmt="o",
            ms=3,
            capsize=2,
            color=colors(i / max(len(rows) - 1, 1)),
            label=f"predicted from k={row['k']}",
        )
    losses = [f[3] for f in forks]
    ax.set_ylim(min(losses) - 0.4, max(losses) + 0.4)  # the first fits' intervals are far wider: clipped
    ax.set_ylabel("val loss at the cooldown's end")
    ax.set_title("loss model backtest: each fork predicted from what was known at k (95% intervals)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ks = [r["k"] for r in rows]
    ax_g.plot(ks, [r["gph"] for r in rows], "o-", color="crimson", label="projected gain per hour at k")
    ax_g.fill_between(
        ks, [r["lo"] for r in rows], [r["hi"] for r in rows], color="crimson", alpha=0.15, label="95% band"
    )
    ax_g.plot([s for s, _ in actual], [g for _, g in actual], "ks--", ms=4, label="actual, to the next fork")
    ax_g.axhline(threshold, color="0.4", lw=1, ls=":", label=f"G = {threshold:.3g}")
    gains = [g for _, g in actual]
    ax_g.set_ylim(min(0.0, min(gains)), 1.5 * max(gains))
    ax_g.set_ylabel("nats per hour")
    ax_g.set_xlabel("fork step k")
    ax_g.legend(fontsize=7)
    ax_g.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
