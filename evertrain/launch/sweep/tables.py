"""The sweep's results as text: the main table, the loss at every max_lr, the paired differences within
one run, the regime lines (what `evertrain sweep` prints and bench/horizon_sweep.py writes into
docs/horizon_sweep.md).
"""

from __future__ import annotations


def lr_text(lr: float) -> str:
    """0.015 -> '1.5e-2', 0.03 -> '3e-2', 0.00125 -> '1.25e-3' (up to three significant digits:
    a grid's points stay distinct)."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per horizon the mean val loss over seeds +- half their range, the LR it was
    won at (edge of the grid flagged), the gap to cosine in %; and the row's verdict."""
    horizons = results["plan"]["horizons"]
    header = ["schedule", *(f"T={t}" for t in horizons), "vs cosine (seed ranges)"]
    rows = []
    for row in results["rows"]:
        cells = []
        for t in horizons:
            cell = row["cells"].get(str(t))
            if cell is None:  # a prediction the loss model could not make yet
                cells.append("-")
                continue
            text = f"{cell['mean']:.4f} ±{cell['half_range']:.4f} @{lr_text(cell['lr'])}"
            text += f" (edge: {cell['edge']})" if cell["edge"] else ""
            text += f" ({cell['gap_pct']:+.2f}%)" if row["cooldown"] is not None else ""
            cells.append(text)
        rows.append([row["label"], *cells, row["verdict"] or "(reference)"])
    return header, rows


def lr_table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per horizon the mean val loss at every LR of the grid, low to high (the
    row's best in bold), so the neighbours of the winner are visible."""
    lrs = sorted({r["lr"] for r in results["records"]})
    grid = " / ".join(lr_text(lr) for lr in lrs)
    header = ["schedule", *(f"T={t}: lr {grid}" for t in results["plan"]["horizons"])]
    rows = []
    for row in results["rows"]:
        cells = []
        for t in results["plan"]["horizons"]:
            cell = row["cells"].get(str(t))
            if cell is None:
                cells.append("-")
                continue
            means = {entry["lr"]: entry["mean"] for entry in cell["by_lr"]}
            cells.append(
                " / ".join(
                    (f"**{means[lr]:.4f}**" if lr == cell["lr"] else f"{means[lr]:.4f}")
                    if lr in means
                    else "-"
                    for lr in lrs
                )
            )
        rows.append([row["label"], *cells])
    return header, rows


PAIRS = (
    ("none", "cooldown", "no cooldown - cooldown"),
    ("average", "cooldown", "average - cooldown"),
    ("none", "average", "no cooldown - average"),
)


def paired_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: within one open-ended run (same LR, same seed) the difference of two of its
    ways at T, min / mean / max over every (LR, seed) of the grid. The run's own noise cancels in a
    pair, so these are sharper than the table's across-seed comparison to cosine. The first cooldown
    shape stands for "cooldown"."""
    plan = results["plan"]
    loss = {
        (r["schedule"], r["cooldown"], r["lr"], r["seed"], r["horizon"]): r["val_loss"]
        for r in results["records"]
    }
    pairs = [
        (a, b, label)
        for a, b, label in PAIRS
        if "average" not in (a, b) or any(key[1] == "average" for key in loss)
    ]
    header = ["schedule", "T", *(f"{label}: min / mean / max" for _, _, label in pairs), "runs"]
    rows = []
    for decay in plan["schedules"]:
        for t in plan["horizons"]:
            cells, n = [], 0
            for a, b, _ in pairs:
                a, b = (plan["shapes"][0] if x == "cooldown" else x for x in (a, b))
                diffs = [
                    loss[key] - loss[(decay, b, *key[2:])]
                    for key in loss
                    if key[:2] == (decay, a) and key[4] == t and (decay, b, *key[2:]) in loss
                ]
                n = len(diffs)
                cells.append(
                    f"{min(diffs):+.4f} / {sum(diffs) / n:+.4f} / {max(diffs):+.4f}" if diffs else "-"
                )
            rows.append([decay, str(t), *cells, str(n)])
    return header, rows


def estimate_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: how well the two ways of knowing a cooldown without running it did, within
    each open-ended run (same LR and seed), over every (LR, seed) of the grid. The loss model: the
    prediction made at the fork point minus the cooldown's actual val loss (min / mean / max) and how
    many actuals fell inside their 95% intervals. Each average: the fraction of the cooldown's gain it
    recovers, mean(no cooldown - average) / mean(no cooldown - cooldown) (1 = all of it), beside the
    mean gain itself. The first cooldown shape stands for "cooldown"."""
    plan = results["plan"]
    shape = plan["shapes"][0]
    by_key = {(r["schedule"], r["cooldown"], r["lr"], r["seed"], r["horizon"]): r for r in results["records"]}
    weightings = [
        w
        for w in plan.get("average_weightings", ["uniform"])
        if any(key[1] == ("average" if w == "uniform" else f"average-{w}") for key in by_key)
    ]
    header = [
        "schedule",
        "T",
        "cooldown's gain (no cooldown - cooldown), mean",
        "predicted - actual: min / mean / max",
        "inside 95%",
        *(f"{w} average: gain recovered" for w in weightings),
    ]
    rows = []
    for decay in plan["schedules"]:
        for t in plan["horizons"]:
            runs = [key for key in by_key if key[:2] == (decay, shape) and key[4] == t]
            gains = [by_key[(decay, "none", *k[2:])]["val_loss"] - by_key[k]["val_loss"] for k in runs]
            errors, inside = [], 0
            for k in runs:
                made = by_key.get((decay, f"predicted-{shape}", *k[2:]))
                if made is not None:
                    errors.append(made["val_loss"] - by_key[k]["val_loss"])
                    inside += abs(errors[-1]) <= made["interval"]
            cells = [
                decay,
                str(t),
                f"{sum(gains) / len(gains):+.4f}" if gains else "-",
                f"{min(errors):+.4f} / {sum(errors) / len(errors):+.4f} / {max(errors):+.4f}"
                if errors
                else "-",
                f"{inside} of {len(errors)}" if errors else "-",
            ]
            for w in weightings:
                key = "average" if w == "uniform" else f"average-{w}"
                recovered = [
                    by_key[(decay, "none", *k[2:])]["val_loss"] - by_key[(decay, key, *k[2:])]["val_loss"]
                    for k in runs
                    if (decay, key, *k[2:]) in by_key
                ]
                gain = sum(gains) / len(gains) if gains else 0.0
                cells.append(
                    f"{100 * (sum(recovered) / len(recovered)) / gain:.0f}%"
                    if recovered and len(recovered) == len(gains) and gain > 0
                    else "- (no gain)"
                    if recovered
                    else "-"
                )
            rows.append(cells)
    return header, rows


def regime_lines(results: dict) -> list[str]:
    r = results["regime"]
    lines = [
        f"model {r['params']:,} parameters, of which {r['embedding_params']:,} the tied token embedding "
        f"(also the output head; counted): {r['tokens_per_step']} tokens per step, "
        f"training split {r['train_tokens']:,} tokens"
    ]
    for t, h in r["horizons"].items():
        lines.append(
            f"T={t}: {h['tokens']:,} tokens = {h['tokens_per_param']:.1f} per parameter "
            f"({h['tokens_per_non_embedding_param']:.0f} per non-embedding parameter), "
            f"{h['epochs']:.2f} epochs"
        )
    return lines


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header, rows = table_rows(results)
    table = Table(
        *header, title="val loss at each horizon: mean ±half range over seeds @best max_lr (gap to cosine)"
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)
    header, rows = lr_table_rows(results)
    table = Table(*header, title="mean val loss at every max_lr of the grid (** = best)")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    header, rows = estimate_rows(results)
    table = Table(*header, title="the loss model's prediction and the averages against the cooldown, per run")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in regime_lines(results):
        console.print(line)
    c = results["compute"]
    console.print(
        f"compute per cell: cosine way {c['cosine_steps']} steps; fork way {c['fork_steps_per_shape']} "
        f"steps per cooldown shape (open-ended run to the last fork point; "
        f"{saving_words(c['saving'])})"
    )


def saving_words(saving: float) -> str:
    """0.23 -> '23% fewer'; one horizon alone costs the fork way more than one cosine run."""
    return f"{100 * abs(saving):.0f}% {'fewer' if saving >= 0 else 'more'}"
