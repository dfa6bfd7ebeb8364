"""Free estimates compared: for every finished cooldown of a run whose end step e has a checkpoint and a
main-run eval, average the newest K checkpoints up to e with each weighting (uniform, tail, ema), and
print the fraction of the cooldown's gain each recovers (evertrain/launch/free_estimates.py).

    python bench/free_estimates.py --run runs/NAME [--k 3,5] [--weightings uniform,tail,ema]

The averages land in runs/NAME/averages/ (reused when there), so `evertrain report` tables them too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from evertrain.launch.average import available_checkpoints, average_checkpoints
from evertrain.launch.free_estimates import recoveries
from evertrain.launch.report import load_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--k", default="5", help="checkpoints per average: K1,K2,...")
    p.add_argument("--weightings", default="uniform,tail,ema")
    p.add_argument("--eval-batches", type=int)
    args = p.parse_args(argv)
    report = load_run(Path(args.run))
    checkpoints = sorted(available_checkpoints(report.run_dir))
    main_val = {r["step"]: r["val_loss"] for r in report.evals}
    ends = [
        (c.name, c.from_step + c.cooldown_steps, c.result["val_loss"])
        for c in report.cooldowns
        if c.result and c.data == "run" and c.from_step + c.cooldown_steps in main_val
    ]
    averages = []
    for _, end, _ in ends:
        upto = [s for s in checkpoints if s <= end]
        if not upto or upto[-1] != end:
            continue
        for k in map(int, args.k.split(",")):
            if len(upto) < k:
                continue
            for weighting in args.weightings.split(","):
                averages.append(
                    average_checkpoints(
                        report.run_dir, upto[-k:], eval_batches=args.eval_batches, weighting=weighting
                    )
                )
    rows = recoveries(main_val, ends, averages)
    print(f"{'cooldown':34} {'end':>5} {'gain':>8} {'average':>12} {'fraction':>8}")
    for r in rows:
        fraction = "-" if r.fraction is None else f"{r.fraction:.2f}"
        print(
            f"{r.cooldown:34} {r.end_step:5d} {r.gain:+8.4f} {r.weighting + ' k' + str(r.k):>12} {fraction:>8}"
        )
    groups = sorted({(r.weighting, r.k) for r in rows})
    for weighting, k in groups:
        fractions = [
            r.fraction
            for r in rows
            if (r.weighting, r.k) == (weighting, k) and r.fraction is not None and r.gain > 0
        ]
        gaps = [abs(r.average_loss - r.cooldown_loss) for r in rows if (r.weighting, r.k) == (weighting, k)]
        if fractions:
            print(
                f"{weighting} k{k}: median fraction of the gain recovered {statistics.median(fractions):.2f} "
                f"(mean {statistics.mean(fractions):.2f}) over {len(fractions)} cooldown(s) that gained; "
                f"median |average - cooldown| {statistics.median(gaps):.4f} nats over {len(gaps)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
