"""The horizon experiment, end to end: run (or resume) `evertrain sweep`, then write its table, the
compute of both ways and one figure into docs/horizon_sweep.md (between the generated-section
markers, so the hand-written analysis around them survives a rerun).

    python bench/horizon_sweep.py                 # the full sweep (configs/sweep.yaml, ~25-35 min on 2 cores)
    python bench/horizon_sweep.py --quick         # tiny model, tens of steps: the pipeline only
    python bench/horizon_sweep.py --horizons 300 600 1200 --out runs/sweep_long --doc docs/x.md

Takes every `evertrain sweep` option (see evertrain/launch/sweep.py).
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
from evertrain.launch import sweep  # noqa: E402
from evertrain.pretrain.checkpoint import store  # noqa: E402
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


def plot(results: dict, out: Path, png: Path) -> None:
    """LR of every run, val loss curves with the cooldown end points, and loss at T against T."""
    plan = sweep.SweepPlan.from_dict(results["plan"])
    fig, (ax_lr, ax_loss, ax_t) = plt.subplots(1, 3, figsize=(17, 5))
    end_losses = []
    for t in plan.horizons:
        run = out / sweep.cosine_name(t)
        ax_lr.plot(*read_records(run, "train", "lr"), color="black", lw=1)
        steps, losses = read_records(run, "eval", "val_loss")
        ax_loss.plot(steps, losses, color="black", lw=1, label="cosine to T" if t == plan.horizons[0] else None)
        end_losses.append(losses[-1])
    for decay in plan.schedules:
        main_lr = dict(zip(*read_records(out / decay, "train", "lr")))
        ax_lr.plot(list(main_lr), list(main_lr.values()), color=COLORS[decay], lw=1.5, label=decay)
        ax_loss.plot(*read_records(out / decay, "eval", "val_loss"), color=COLORS[decay], lw=1.5,
                     label=f"{decay}, no cooldown")
        for t in plan.horizons:
            for shape in plan.shapes:
                fork = sweep.ForkJob(decay, plan.fork_step(t), plan.cooldown_steps(t), shape).result_dir(out)
                steps, lrs = read_records(fork, "train", "lr")
                if plan.fork_step(t) in main_lr:  # start the branch where it leaves the main run
                    steps, lrs = [plan.fork_step(t), *steps], [main_lr[plan.fork_step(t)], *lrs]
                ax_lr.plot(steps, lrs, color=COLORS[decay], lw=0.8, ls="--" if shape == "linear" else ":")
                loss = sweep.read_result(fork)["val_loss"]
                ax_loss.plot([t], [loss], MARKERS[shape], color=COLORS[decay], ms=6,
                             label=f"{decay} + {shape} cooldown" if t == plan.horizons[0] else None)
                end_losses.append(loss)
    for row in results["rows"]:
        losses = [row["val_loss"][str(t)] for t in plan.horizons]
        ax_t.plot(plan.horizons, losses, marker=MARKERS[row["cooldown"]],
                  color=COLORS[row["schedule"]], ls="-" if row["cooldown"] != "none" else ":", label=row["label"])
    ax_lr.set(title="learning rate (dashed: linear, dotted: 1-sqrt cooldowns)", xlabel="step", ylabel="lr")
    low, high = min(end_losses), max(end_losses)
    ax_loss.set(title="validation loss", xlabel="step", ylabel="val loss",
                ylim=(low - 0.1 * (high - low + 0.1), high + 1.5 * (high - low + 0.1)))
    ax_t.set(title="val loss at the horizon", xlabel="horizon T (steps)", ylabel="val loss", xscale="log")
    ax_t.set_xticks(plan.horizons, [str(t) for t in plan.horizons])
    ax_t.minorticks_off()
    for ax in (ax_lr, ax_loss, ax_t):
        ax.grid(alpha=0.3)
    ax_lr.legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp{png.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def parameter_count(config: str, overrides: tuple[str, ...]) -> int:
    from evertrain.pretrain.model import Transformer

    return sum(p.numel() for p in Transformer(load_config(config, overrides).model).parameters())


def generated_section(results: dict, command: str, png: Path, doc: Path) -> str:
    plan, c = results["plan"], results["compute"]
    cfg = load_config(plan["config"], plan["overrides"])
    header, rows = sweep.table_rows(results)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    n_shapes = len(plan["shapes"])
    return "\n".join([
        BEGIN,
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by:",
        "",
        f"    {command}",
        "",
        f"Model {parameter_count(plan['config'], tuple(plan['overrides'])) / 1e6:.2f}M parameters "
        f"(d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, seq {cfg.model.seq_len}), "
        f"{cfg.train.micro_batch_size * cfg.train.grad_accum} x {cfg.model.seq_len} tokens per step, "
        f"data `{cfg.data.path}`, seed {cfg.train.seed}. Every run: max_lr {cfg.optim.max_lr:g}, "
        f"warmup {cfg.optim.warmup_steps}, weight decay {cfg.optim.weight_decay:g}, clip {cfg.optim.grad_clip:g}; "
        f"rsqrt timescale {cfg.optim.rsqrt_timescale or cfg.optim.warmup_steps}; cosine to 0 at T. "
        f"Cooldowns: {plan['cooldown_fraction']:g} x T steps forked at step {1 - plan['cooldown_fraction']:g} x T, "
        f"so they end at T with the cosine run's steps and tokens. Val loss on the same "
        f"{cfg.eval.batches} x {cfg.train.micro_batch_size * cfg.train.grad_accum} windows of the held-out plays "
        f"everywhere (eval every {results['eval_every']} steps).",
        "",
        "Validation loss at each horizon T (gap to the cosine run tuned to T):",
        "",
        *table,
        "",
        f"Compute for all {len(plan['horizons'])} horizons, in optimizer steps: cosine way "
        f"{' + '.join(map(str, plan['horizons']))} = **{c['cosine_steps']}**; fork way "
        f"{c['main_run_steps']} (one run to the last T) + {c['cooldown_steps']} (cooldowns) = "
        f"**{c['fork_steps_per_shape']}** per cooldown shape, **{sweep.saving_words(c['saving'])}** "
        f"(both shapes, as run here: {c['main_run_steps'] + n_shapes * c['cooldown_steps']}). "
        f"Strictly the open-ended run only has to reach the last fork point; it ran to the last T for "
        f"the no-cooldown values.",
        "",
        f"![horizon sweep]({png.name})",
        END,
    ])


def write_doc(doc: Path, section: str) -> None:
    """Replace the generated section of `doc` (or create the doc), keeping everything around it."""
    text = doc.read_text() if doc.is_file() else f"# Horizon sweep\n\n{BEGIN}\n{END}\n"
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise EvertrainError(f"{doc}: expected exactly one '{BEGIN}' ... '{END}' section")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    store.atomic_write_text(doc, head + section + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep.add_arguments(parser)
    parser.add_argument("--doc", help="markdown to write the results into (default docs/horizon_sweep.md; "
                                      "--quick: OUT/horizon_sweep.md); the PNG goes next to it")
    args = parser.parse_intermixed_args(argv)
    if args.quick and args.out == "runs/horizon_sweep":
        args.out = "runs/horizon_sweep_quick"
    doc = Path(args.doc or (Path(args.out) / "horizon_sweep.md" if args.quick else "docs/horizon_sweep.md"))
    png = doc.with_suffix(".png")
    doc.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = sweep.run_sweep(sweep.plan_from_args(args), args.out, parallel=args.parallel)
        sweep.print_results(results)
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
