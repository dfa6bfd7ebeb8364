"""lm-evaluation-harness on an exported fork: `python -m evertrain.launch.lm_eval_runner --hf-dir D --out J --tasks T1,T2`.

The built-in eval hook behind `evertrain fork/forker --lm-eval-tasks` (evals.py runs it in its own
process on the fork's Hugging Face export). It calls lm_eval's `simple_evaluate` with the `hf` model
on that directory (on CUDA when there is one) and writes J: {task: {metric: value}}, the metrics of
each task without their stderr, named as lm_eval names them minus the default filter
(`acc,none` -> `acc`; another filter stays as `acc,strict-match`). Task YAMLs of your own load with
--include-path (lm_eval's include_path), e.g. a local multiple-choice task over a JSON file.
Needs the optional extra: `pip install 'evertrain[eval]'`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text

DEFAULT_FILTER = "none"
# bookkeeping lm_eval keeps beside the metrics
NOT_METRICS = {
    "alias",
    "sample_len",
    "samples",
    "sample_count",
}


class LMEvalError(EvertrainError, ValueError):
    """lm_eval missing, or a bad runner argument."""


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm_eval's results["results"] -> {task: {metric: number}}; stderr, bookkeeping and non-numbers left out."""
    out = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if (
                metric in NOT_METRICS
                or metric.endswith("_stderr")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue
            if not math.isfinite(value):
                continue
            metrics[metric if filter_name in ("", DEFAULT_FILTER) else key] = float(value)
        if metrics:
            out[task] = metrics
    return out


def evaluate(
    hf_dir: Path,
    tasks: list[str],
    include_path: str | None,
    limit: int | None,
    batch_size: int,
    device: str | None,
) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMEvalError(
            "lm_eval is not installed: pip install 'evertrain[eval]' (lm-evaluation-harness)"
        ) from None
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise LMEvalError(
            f"--tasks: lm_eval knows no task {unknown[0]!r}"
            + ("" if include_path else " (a task of your own needs --include-path)")
        )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(hf_dir),
            "dtype": "bfloat16" if device.startswith("cuda") else "float32",
        },
        tasks=tasks,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    if results is None:  # lm_eval returns None on ranks other than 0
        return {}
    return task_metrics(results["results"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evertrain.launch.lm_eval_runner", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--hf-dir", required=True, help="a Hugging Face Llama directory (evertrain export hf)"
    )
    parser.add_argument("--out", required=True, help="JSON file to write the metrics to")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    parser.add_argument("--include-path", help="directory of extra task YAMLs")
    parser.add_argument("--limit", type=int, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    try:
        hf_dir = Path(args.hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise LMEvalError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face directory)")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise LMEvalError(f"--tasks: expected T1,T2,..., got {args.tasks!r}")
        metrics = evaluate(hf_dir, tasks, args.include_path, args.limit, args.batch_size, args.device)
    except EvertrainError as exc:
        print(f"lm_eval_runner: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic_write_text(out, json.dumps(metrics, indent=1) + "\n")
    print(f"lm_eval_runner: {json.dumps(metrics)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
