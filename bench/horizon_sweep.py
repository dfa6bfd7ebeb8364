"""The horizon experiment, end to end: run (or resume) `evertrain sweep`, then write its table, the
compute of both ways and one figure into docs/horizon_sweep.md (between the generated-section
markers, so the hand-written analysis around them survives a rerun).

    # the page's sweep (~1 h, 2 busy cores):
    python bench/horizon_sweep.py --max-lrs 7.5e-3 1.5e-2 3e-2 6e-2 1.2e-1 --seeds 2 --shapes 1-sqrt
    python bench/horizon_sweep.py --quick         # tiny model, tens of steps: the pipeline only
    python bench/horizon_sweep.py --horizons 300 600 1200 --out runs/sweep_long --doc docs/x.md

Takes every `evertrain sweep` option (see evertrain/launch/sweep/).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from evertrain.errors import EvertrainError  # noqa: E402
from evertrain.files import atomic_write_text  # noqa: E402
from evertrain.launch.sweep import command as sweep_command  # noqa: E402
from evertrain.launch.sweep import execute as sweep_execute  # noqa: E402
from evertrain.launch.sweep import plan as sweep_plan  # noqa: E402
from evertrain.launch.sweep import tables as sweep_tables  # noqa: E402
from evertrain.pretrain.config import load_config  # noqa: E402

BEGIN, END = "<!-- horizon_sweep.py: begin generated -->", "<!-- horizon_sweep.py: end generated -->"
COLORS = {"cosine": "black", "rsqrt": "tab:blue", "constant": "tab:orange"}
MARKERS = {None: "s", "linear": "o", "1-sqrt": "^", "none": "x", "cosine": "D"}


def read_records(run_dir: Path, kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == kind:
                steps.append(record["step"])
                values.append(record[key])
    return steps, values


def style(row: dict) -> dict:
    cooldown = row["cooldown"] or ""
    return {
        "color": COLORS[row["schedule"]],
        "marker": MARKERS.get(row["cooldown"], "P" if cooldown.startswith("predicted") else "v"),
        "ls": ":"
        if cooldown == "none"
        else "--"
        if cooldown.startswith("average")
        else "-."
        if cooldown.startswith("predicted")
        else "-",
    }


def plot(results: dict, out: Path, png: Path) -> None:
    """Val loss curves of the first seed (each way at its best LR for the last T), val loss at T
    against T (mean and seed range at each row's best LR), and val loss against max_lr at the last T."""
    plan = sweep_plan.SweepPlan.from_dict(results["plan"])
    last, first_seed = str(plan.horizons[-1]), plan.cells()[0].seed
    seed_label = first_seed if first_seed is not None else load_config(plan.config, plan.overrides).train.seed
    fig, (ax_loss, ax_t, ax_lr) = plt.subplots(1, 3, figsize=(18, 5.2))

    def cell_dir(lr: float) -> Path:
        return out / sweep_plan.Cell(lr if plan.max_lrs else None, first_seed).name

    rows = {(row["schedule"], row["cooldown"]): row for row in results["rows"]}
    end_losses = []
    for t in plan.horizons:
        lr = rows["cosine", None]["cells"][str(t)]["lr"]
        steps, losses = read_records(cell_dir(lr) / sweep_plan.cosine_name(t), "eval", "val_loss")
        ax_loss.plot(
            steps,
            losses,
            color="black",
            lw=1,
            label="cosine to T (its best LR)" if t == plan.horizons[0] else None,
        )
        end_losses.append(losses[-1])
    for decay in plan.schedules:
        lr = rows[decay, "none"]["cells"][last]["lr"]
        ax_loss.plot(
            *read_records(cell_dir(lr) / decay, "eval", "val_loss"),
            color=COLORS[decay],
            lw=1.5,
            label=f"{decay} at lr {sweep_tables.lr_text(lr)}, no cooldown",
        )
        for (schedule, cooldown), row in rows.items():
            if schedule != decay or cooldown in (None, "none"):
                continue
            ts = [t for t in plan.horizons if str(t) in row["cells"]]
            losses = [row["cells"][str(t)]["mean"] for t in ts]
            ax_loss.plot(
                ts,
                losses,
                style(row)["marker"],
                color=COLORS[decay],
                ms=6,
                label=f"{row['label']} (mean, best LR)",
            )
            end_losses += losses
    for row in results["rows"]:
        ts = [t for t in plan.horizons if str(t) in row["cells"]]
        cells = [row["cells"][str(t)] for t in ts]
        st = style(row)
        ax_t.errorbar(
            ts,
            [c["mean"] for c in cells],
            yerr=[c["half_range"] for c in cells],
            capsize=3,
            label=row["label"],
            **st,
        )
        if last not in row["cells"]:
            continue
        by_lr = row["cells"][last]["by_lr"]
        ax_lr.errorbar(
            [e["lr"] for e in by_lr],
            [e["mean"] for e in by_lr],
            yerr=[e["half_range"] for e in by_lr],
            capsize=3,
            label=row["label"],
            **st,
        )
    low, high = min(end_losses), max(end_losses)
    ax_loss.set(
        title=f"validation loss (seed {seed_label})",
        xlabel="step",
        ylabel="val loss",
        ylim=(low - 0.1 * (high - low + 0.1), high + 1.5 * (high - low + 0.1)),
    )
    ax_t.set(
        title="val loss at T: mean, bars = seed range, each at its best LR",
        xlabel="horizon T (steps)",
        ylabel="val loss",
        xscale="log",
    )
    ax_t.set_xticks(plan.horizons, [str(t) for t in plan.horizons])
    ax_lr.set(
        title=f"val loss at T={last} against max_lr (bars = seed range)",
        xlabel="max_lr",
        ylabel="val loss",
        xscale="log",
    )
    lrs = sorted({r["lr"] for r in results["records"]})
    ax_lr.set_xticks(lrs, [sweep_tables.lr_text(lr) for lr in lrs])
    for ax in (ax_loss, ax_t, ax_lr):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp{png.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def load_words(invocations: list[dict]) -> str:
    """Wall time and load average of the invocations that ran something."""
    ran = [i for i in invocations if i["load_1min"]]
    if not ran:
        return "no invocation ran long enough to sample the load"
    loads = [x for i in ran for x in i["load_1min"]]
    return (
        f"{sum(i['wall_s'] for i in ran) / 60:.0f} min wall over {len(ran)} invocation(s) with "
        f"{ran[0]['parallel']} runs at a time; 1-min load average (the box is shared) "
        f"{min(loads):.1f}-{max(loads):.1f}, mean {sum(loads) / len(loads):.1f}, sampled every minute"
    )


def generated_section(results: dict, command: str, png: Path, doc: Path) -> str:
    plan, c = results["plan"], results["compute"]
    cfg = load_config(plan["config"], plan["overrides"])
    seeds = plan["seeds"] or [cfg.train.seed]
    lrs = sorted({r["lr"] for r in results["records"]})
    n_shapes = len(plan["shapes"])
    return "\n".join(
        [
            BEGIN,
            f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by:",
            "",
            f"    {command}",
            "",
            f"Model d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, seq {cfg.model.seq_len}, "
            f"{cfg.train.micro_batch_size * cfg.train.grad_accum} x {cfg.model.seq_len} tokens per step, "
            f"data `{cfg.data.path}`. Grid: max_lr {', '.join(sweep_tables.lr_text(lr) for lr in lrs)} x seeds "
            f"{', '.join(map(str, seeds))} ({len(lrs) * len(seeds)} cells). Every run: warmup {cfg.optim.warmup_steps}, "
            f"weight decay {cfg.optim.weight_decay:g}, clip {cfg.optim.grad_clip:g}; rsqrt timescale "
            f"{cfg.optim.rsqrt_timescale or cfg.optim.warmup_steps}; cosine to 0 at T. "
            f"Cooldowns ({', '.join(plan['shapes'])}): {plan['cooldown_fraction']:g} x T steps forked at step "
            f"{1 - plan['cooldown_fraction']:g} x T, so they end at T with the cosine run's steps and tokens. "
            + (
                f"Averages ({', '.join(plan.get('average_weightings', ['uniform']))}): the open-ended run's "
                f"{plan['average_last']} checkpoints evenly from {1 - plan['cooldown_fraction']:g} x T to T "
                "(no training). "
                if plan["average_last"]
                else ""
            )
            + "Predicted: the loss model fitted on what the open-ended run knew at the fork point (its "
            "records to that step and the cooldowns that had ended), as `evertrain predict` there. "
            + f"Val loss on the same {cfg.eval.batches} x {cfg.train.micro_batch_size * cfg.train.grad_accum} windows "
            f"of the held-out plays everywhere (eval every {results['eval_every']} steps).",
            "",
            "Regime (parameters counted with the tied embedding, which is also the output head; the training "
            "stream repeats the corpus in a new order each epoch):",
            "",
            *(f"- {line}" for line in sweep_tables.regime_lines(results)),
            "",
            f"Validation loss at each horizon T: mean over the {len(seeds)} seeds ± half their min-max range "
            f"(for two seeds, exactly the two values), at the row's own best max_lr (`@`; `edge` = the best is "
            f"the lowest or highest LR of the grid), gap of the means to cosine. The last column calls a row "
            f"lower/higher than cosine only where the two seed ranges do not overlap, else level:",
            "",
            *markdown(*sweep_tables.table_rows(results)),
            "",
            "Mean val loss at every max_lr of the grid, low to high (bold: the row's best; a prediction's bold "
            "is its cooldown's LR):",
            "",
            *markdown(*sweep_tables.lr_table_rows(results)),
            "",
            "Paired differences within one open-ended run (same LR and seed: the run's own noise cancels), "
            "over every (LR, seed) of the grid, in nats of val loss at T (positive: the first is worse):",
            "",
            *markdown(*sweep_tables.paired_rows(results)),
            "",
            "Knowing a cooldown without running it, within each open-ended run over every (LR, seed) of the "
            "grid: the loss model's prediction at the fork point against the cooldown's actual val loss, and "
            "the fraction of the cooldown's gain each checkpoint average recovers, mean(no cooldown - "
            "average) / mean(no cooldown - cooldown):",
            "",
            *markdown(*sweep_tables.estimate_rows(results)),
            "",
            f"Compute per cell for all {len(plan['horizons'])} horizons, in optimizer steps: cosine way "
            f"{' + '.join(map(str, plan['horizons']))} = **{c['cosine_steps']}**; fork way "
            f"{c['main_run_steps']} (the open-ended run to the last fork point) + {c['cooldown_steps']} (cooldowns) = "
            f"**{c['fork_steps_per_shape']}** per cooldown shape, **{sweep_tables.saving_words(c['saving'])}**. "
            f"The no-cooldown and averaging rows need the open-ended run to the last T "
            f"({c['open_ended_to_last_t']} steps); the averages train nothing. The whole sweep trained "
            f"{c['sweep_steps']:,} steps ({n_shapes} cooldown shape(s), {len(plan['schedules'])} open-ended "
            f"schedule(s)): {load_words(results['invocations'])}.",
            "",
            f"![horizon sweep]({png.name})",
            END,
        ]
    )


def write_doc(doc: Path, section: str) -> None:
    """Replace the generated section of `doc` (or create the doc), keeping everything around it."""
    text = doc.read_text() if doc.is_file() else f"# Horizon sweep\n\n{BEGIN}\n{END}\n"
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise EvertrainError(f"{doc}: expected exactly one '{BEGIN}' ... '{END}' section")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    atomic_write_text(doc, head + section + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep_command.add_arguments(parser)
    parser.add_argument(
        "--doc",
        help="markdown to write the results into (default docs/horizon_sweep.md; "
        "--quick: OUT/horizon_sweep.md); the PNG goes next to it",
    )
    args = parser.parse_intermixed_args(argv)
    if args.quick and args.out == "runs/horizon_sweep":
        args.out = "runs/horizon_sweep_quick"
    doc = Path(args.doc or (Path(args.out) / "horizon_sweep.md" if args.quick else "docs/horizon_sweep.md"))
    png = doc.with_suffix(".png")
    doc.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = sweep_execute.run_sweep(
            sweep_command.plan_from_args(args),
            args.out,
            parallel=args.parallel,
            averages=not args.skip_averages,
        )
        sweep_tables.print_results(results)
        plot(results, Path(args.out), png)
        command = "python bench/horizon_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_doc(doc, generated_section(results, command.strip(), png, doc))
    except EvertrainError as exc:
        print(f"horizon_sweep.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"horizon_sweep.py: wrote {doc} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
