"""How fast the `evertrain` command answers: --help, --version and each command's --help (and
`pretrain.py --help` / `--print-config`), each in a
fresh interpreter (what a user waits for), next to `python -c "import torch"` and an empty interpreter.

    python bench/cli_startup.py [--reps 7] [--baseline DIR]

--baseline DIR: also time another checkout's code (e.g. one from before the lazy imports:
`git worktree add /tmp/old COMMIT`), side by side. Each repetition runs every case once, in rotating
order, so drift on a shared machine hits all of them; figures are medians of wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [
    ["--help"],
    ["--version"],
    ["data", "prepare", "--help"],
    ["fork", "--help"],
    ["forker", "--help"],
    ["report", "--help"],
    ["export", "hf", "--help"],
    ["sweep", "--help"],
]
PRETRAIN_CASES = [["--help"], ["--config", "configs/tiny.yaml", "--print-config"]]  # python pretrain.py ...


def wall_s(argv: list[str], tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same commands in")
    args = parser.parse_args()
    trees = {"now": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    cases = {
        ("python -c pass", "now"): [sys.executable, "-c", "pass"],
        ("python -c 'import torch'", "now"): [sys.executable, "-c", "import torch"],
    }
    for label in trees:
        for case in CASES:
            cases[("evertrain " + " ".join(case), label)] = [
                sys.executable,
                "-m",
                "evertrain.launch.cli",
                *case,
            ]
        for case in PRETRAIN_CASES:
            cases[("pretrain.py " + " ".join(case)[:22], label)] = [sys.executable, "pretrain.py", *case]
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    keys = list(cases)
    for rep in range(args.reps):
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            times[key].append(wall_s(cases[key], trees[key[1]]))
    median = {key: statistics.median(values) for key, values in times.items()}
    torch_s = median[("python -c 'import torch'", "now")]
    print(f"median wall seconds over {args.reps} runs (ratio: to `import torch`)")
    header = f"{'command':34} {'now':>7} {'ratio':>6}" + (
        f" {'baseline':>9} {'ratio':>6}" if args.baseline else ""
    )
    print(header)
    for name in dict.fromkeys(name for name, _ in keys):
        row = f"{name:34} {median[(name, 'now')]:7.2f} {median[(name, 'now')] / torch_s:6.2f}"
        if args.baseline and (name, "baseline") in median:
            row += f" {median[(name, 'baseline')]:9.2f} {median[(name, 'baseline')] / torch_s:6.2f}"
        print(row)


if __name__ == "__main__":
    main()
