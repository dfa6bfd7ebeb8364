"""`evertrain average`: the uniform average of a run's last K checkpoints, evaluated, with no training.

Averaging the weights of the last few checkpoints of a constant-LR (or rsqrt) run approximates a
cooldown at zero training cost (Sanyal et al. 2023, "LAWA"; Hägele et al. 2024, section 4). For the
steps s_1 < ... < s_K (the newest K committed checkpoints with --last K, or --steps):

    average_checkpoints(run_dir, steps) -> result dict
      - pins every source checkpoint (runs.Lease) while it is read, so retention keeps it;
      - reads only their fp32 weights (checkpoint/slices.py: any engine, any world size, no moments),
        refusing non-finite weights and checkpoints of another model shape than the run's;
      - averages them elementwise in fp32: (w_1 + ... + w_K) / K, parameter by parameter across the K
        checkpoints into one fp32 copy, which the evaluation uses as its model's parameters: memory
        is about one copy of the weights plus the largest parameter, whatever K;
      - evaluates the average on the run's own val windows (eval.batches global batches of the global
        batch the newest source checkpoint trained with: the windows the run's evals and its forks
        score), in one process, with the run's compute dtype;
      - writes runs/NAME/averages/<average_dir_name(steps)>/ atomically (built in a temp dir, renamed):
          config.yaml   the run's config
          final/        the averaged weights as a weights-only DCP checkpoint with meta.json, which
                        load_consolidated and `evertrain export hf --average NAME` read
          result.json   {"kind": "average", "steps", "step" (the newest), "tokens" (seen at it),
                         "val_loss", "val_ppl", "eval_batches", "eval_s", "time", "name"}
    A directory that exists is done: the call returns its result.json without reading anything.

The retention rule must keep the K checkpoints (checkpoint.keep_last >= K, docs/forking.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from evertrain import safe_json
from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text, fsync_dir
from evertrain.launch.runs import Lease, read_result
from evertrain.pretrain.checkpoint import store

MAX_JOINED_STEPS = 64  # longer step lists are named by a hash in the directory name


class AverageError(EvertrainError, ValueError):
    """A bad averaging request: too few checkpoints, an unknown step, non-finite or mismatched weights."""


WEIGHTINGS = ("uniform", "tail", "ema")
EMA_DECAY = 0.7  # the ema weighting's factor per checkpoint back in time


def average_dir_name(steps: list[int], weighting: str = "uniform") -> str:
    """avg_<newest step:09d>_k<K>_<s1>-<s2>-...[_<weighting>]: the same steps, the same name, however
    they were asked for (--last K or --steps); a list too long to spell out is named by its hash
    instead. The uniform average has no suffix."""
    steps = sorted(steps)
    joined = "-".join(map(str, steps))
    if len(joined) > MAX_JOINED_STEPS:
        joined = hashlib.sha256(joined.encode()).hexdigest()[:12]
    suffix = "" if weighting == "uniform" else f"_{weighting.replace(':', '')}"
    return f"avg_{steps[-1]:09d}_k{len(steps)}_{joined}{suffix}"


def parse_weighting(text: str) -> str:
    """uniform | tail | ema | ema:BETA (0 < BETA < 1); errors name the problem."""
    name, _, beta = text.partition(":")
    if name not in WEIGHTINGS or (beta and name != "ema"):
        raise AverageError(f"--weighting: expected uniform, tail, ema or ema:BETA, got {text!r}")
    if beta:
        try:
            value = float(beta)
        except ValueError:
            value = float("nan")
        if not 0.0 < value < 1.0:
            raise AverageError(f"--weighting {text}: BETA must be in (0, 1)")
    return text


def checkpoint_weights(k: int, weighting: str) -> list[float]:
    """The weight of each of k checkpoints, oldest first, summing to 1: uniform 1/k; tail
    proportional to 1, 2, ..., k (the newest counts most, the oldest least); ema proportional to
    BETA^(k-1), ..., BETA, 1 (an exponential moving average sampled at the checkpoints)."""
    name, _, beta = weighting.partition(":")
    if name == "uniform":
        raw = [1.0] * k
    elif name == "tail":
        raw = [float(i) for i in range(1, k + 1)]
    else:
        decay = float(beta) if beta else EMA_DECAY
        raw = [decay ** (k - 1 - i) for i in range(k)]
    return [w / sum(raw) for w in raw]


def available_checkpoints(run_dir: Path) -> dict[int, Path]:
    """{step: step_dir} of the run's committed checkpoints, oldest first; errors for a non-run."""
    if not (run_dir / "config.yaml").is_file():
        raise AverageError(f"--run {run_dir}: not a run directory (no config.yaml)")
    return {
        store.step_of(p): p
        for p in store.complete_checkpoints(run_dir / "checkpoints")
        if store.step_of(p) > 0
    }


def last_steps(run_dir: Path, k: int) -> list[int]:
    """The steps of the newest `k` committed checkpoints."""
    if k <= 0:
        raise AverageError(f"--last: must be >= 1, got {k}")
    steps = list(available_checkpoints(run_dir))
    if len(steps) < k:
        raise AverageError(
            f"--last {k}: the run has {len(steps)} checkpoint(s) ({', '.join(map(str, steps)) or 'none'}); "
            f"keep at least {k} (checkpoint.keep_last >= {k})"
        )
    return steps[-k:]


def check_steps(run_dir: Path, steps: list[int]) -> dict[int, Path]:
    """{step: step_dir} for the requested steps, sorted; one error naming what is wrong."""
    if not steps:
        raise AverageError("--steps: give at least one step")
    if len(set(steps)) != len(steps):
        raise AverageError(f"--steps {','.join(map(str, steps))}: a step is listed twice")
    checkpoints = available_checkpoints(run_dir)
    missing = [s for s in steps if s not in checkpoints]
    if missing:
        shown = ", ".join(map(str, list(checkpoints)[-8:])) or "none"
        raise AverageError(f"--steps: no checkpoint at step {missing[0]} (available: {shown})")
    return {s: checkpoints[s] for s in sorted(steps)}


def average_checkpoints(
    run_dir: Path, steps: list[int], *, eval_batches: int | None = None, weighting: str = "uniform"
) -> dict:
    """Average the weights of the run's checkpoints at `steps` (checkpoint_weights), evaluate, write
    averages/<name>/; returns result.json's content (the existing one when that average was made before)."""
    run_dir = Path(run_dir)
    weighting = parse_weighting(weighting)
    sources = check_steps(run_dir, list(steps))
    if eval_batches is not None and eval_batches <= 0:
        raise AverageError(f"--eval-batches: must be > 0, got {eval_batches}")
    name = average_dir_name(list(sources), weighting)
    averages = run_dir / "averages"
    out = averages / name
    if (result := read_result(out)) is not None:
        return result
    averages.mkdir(exist_ok=True)
    lock = FileLock(averages / f".{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise AverageError(f"{out}: another process is writing this average") from None
    try:
        if (result := read_result(out)) is not None:  # finished while we waited for the lock
            return result
        for stale in averages.glob(f".{name}.tmp-*"):  # a crashed attempt's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        return make_average(run_dir, out, sources, eval_batches, weighting)
    finally:
        lock.release()


def make_average(
    run_dir: Path, out: Path, sources: dict[int, Path], eval_batches: int | None, weighting: str = "uniform"
) -> dict:
    from evertrain.pretrain.config import dump_yaml, load_config

    cfg = load_config(
        run_dir / "config.yaml", [] if eval_batches is None else [f"eval.batches={eval_batches}"]
    )
    leases = []
    try:
        for step_dir in sources.values():
            leases.append(Lease(step_dir, f"average.{out.name}"[:128]))
        metas = {step: store.read_meta(step_dir) for step, step_dir in sources.items()}
        check_same_model(cfg, sources, metas)
        readers = {
            step: open_weights(step_dir, metas[step], cfg.checkpoint.verify)
            for step, step_dir in sources.items()
        }
        average = accumulate(
            sources, readers, checkpoint_weights(len(sources), weighting), weighting == "uniform"
        )
    finally:
        for lease in leases:
            lease.release()
    newest = metas[max(sources)]
    started = time.perf_counter()
    # The model takes the averaged tensors themselves (no copy on CPU): they are written from there.
    scores = evaluate_weights(cfg, average, global_windows(cfg, newest))
    eval_s = time.perf_counter() - started
    result = {
        "kind": "average",
        "name": out.name,
        "steps": list(sources),
        "step": max(sources),
        "tokens": newest.get("tokens"),
        "val_loss": scores["val_loss"],
        "val_ppl": scores["val_ppl"],
        "eval_batches": cfg.eval.batches,
        "eval_s": eval_s,
        "time": time.time(),
        "weighting": weighting,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        write_weights(tmp / "final", average, newest, list(sources))
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        atomic_write_text(tmp / "result.json", safe_json.dumps(result, indent=1))
        fsync_dir(tmp)
        os.rename(tmp, out)  # the directory appears complete or not at all
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def check_same_model(cfg, sources: dict[int, Path], metas: dict[int, dict]) -> None:
    """Every source has the run's model shape (else averaging them means nothing)."""
    from evertrain.pretrain.checkpoint.manager import check_model
    from evertrain.pretrain.checkpoint.store import CheckpointError

    for step, step_dir in sources.items():
        try:
            check_model(step_dir, metas[step], cfg)
        except CheckpointError as exc:
            raise AverageError(f"mismatched configs: {exc}") from None


def open_weights(step_dir: Path, meta: dict, verify: str):
    """A reader of the checkpoint's fp32 weights (checkpoint/slices.py), every file checked against
    meta.json first; nothing is read yet, and no optimizer moments ever are."""
    from evertrain.pretrain.checkpoint import dcp as _dcp  # noqa: F401  (silences DCP's no_dist warning)
    from evertrain.pretrain.checkpoint.slices import open_reader

    store.verify_files(step_dir, meta, mode=verify)
    return open_reader(step_dir, meta)


def accumulate(sources: dict[int, Path], readers: dict, factors: list[float], uniform: bool) -> dict:
    """{name: fp32 CPU tensor} the weighted sum of the checkpoints, parameter by parameter: one full
    copy of the weights plus one parameter read at a time, however many checkpoints. `uniform`: a
    plain sum divided once by K (the 1-checkpoint average is that checkpoint exactly). A NaN/Inf
    weight is refused, naming the checkpoint and the parameter."""
    import torch

    from evertrain.pretrain.checkpoint.slices import WEIGHT, Slice

    first = next(iter(sources))
    names = list(readers[first].shapes)
    for step, reader in readers.items():
        if reader.shapes != readers[first].shapes:
            raise AverageError(f"{sources[step]}: holds other parameters than {sources[first]}")
    total = {}
    for name in names:
        shape = readers[first].shapes[name]
        for (step, reader), factor in zip(readers.items(), factors):
            (flat,) = reader.read([Slice(name, WEIGHT, 0, shape.numel())])
            value = flat.view(shape).float()
            if not torch.isfinite(value).all():
                raise AverageError(
                    f"{sources[step]}: parameter '{name}' has NaN/Inf weights; average only checkpoints "
                    "from before the divergence (--steps)"
                )
            if not uniform:
                value.mul_(factor)
            if name not in total:
                total[name] = value.contiguous()
            else:
                total[name].add_(value)
            del flat, value
        if uniform:
            total[name].div_(len(sources))
    return total


def global_windows(cfg, meta: dict) -> int:
    """The run's global batch at the newest source checkpoint: its evals (and its forks') scored
    eval.batches batches of this many windows."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * int(meta["world_size"])


def evaluate_weights(cfg, weights: dict, batch_windows: int) -> dict:
    """{"val_loss", "val_ppl"} of `weights` on the run's val windows, in this process (the windows
    and their mean are those of evaluate.py on any world size: equal micro-batches, plain mean)."""
    import torch

    from evertrain.pretrain.data.stream import val_batches
    from evertrain.pretrain.distributed import pick_device
    from evertrain.pretrain.engines.base import Engine, compute_dtype
    from evertrain.pretrain.model.transformer import Transformer
    from evertrain.pretrain.run.evaluate import evaluate

    device = pick_device(cfg.train.device)
    with torch.device("meta"):
        model = Transformer(cfg.model, init=False)
    # The parameters become `weights`' own tensors (on CPU no copy is made: one copy of the model in
    # memory, not two); only the derived rope buffers are allocated here.
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False, assign=True)
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise AverageError(f"the checkpoints hold no parameter '{name}'")
    model.rope_cos = torch.empty_like(model.rope_cos, device=device)
    model.rope_sin = torch.empty_like(model.rope_sin, device=device)
    model.init_buffers()
    engine = Engine(
        model=model, raw_model=model, optimizer=None, device=device, autocast_dtype=compute_dtype(cfg, device)
    )
    batches = val_batches(cfg.data.path, cfg.model.seq_len, cfg.eval.batches, batch_windows)
    micro = [m for batch in batches for m in batch.split(cfg.train.micro_batch_size)]
    return evaluate(engine, micro)


def write_weights(final: Path, weights: dict, newest: dict, steps: list[int]) -> None:
    """`weights` as a weights-only DCP checkpoint (the single engine's layout, without "optim")
    with a meta.json like the newest source's, so load_consolidated and export read it."""
    import torch.distributed.checkpoint as dcp

    final.mkdir()
    dcp.save({"model": weights}, checkpoint_id=str(final), no_dist=True)
    files = {p.name: store.file_digest(p) for p in sorted(final.iterdir()) if p.is_file()}
    meta = {
        **newest,
        "engine": "single",
        "world_size": 1,
        "zero_stage": None,
        "files": files,
        "hash": store.HASH,
        "created": time.time(),
        "averaged_steps": steps,
    }
    atomic_write_text(final / store.META, safe_json.dumps(meta, indent=1, sort_keys=True))


# -- CLI -----------------------------------------------------------------------------------------


def parse_steps(text: str) -> tuple[int, ...]:
    """S1,S2,... for --steps here and the forker's --at."""
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None
    if any(s <= 0 for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be > 0, got {text!r}")
    return steps


def run_average(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    steps = last_steps(run_dir, args.last) if args.last is not None else args.steps
    weighting = parse_weighting(args.weighting)
    name = average_dir_name(check_steps(run_dir, steps), weighting)
    done = read_result(run_dir / "averages" / name) is not None
    result = average_checkpoints(run_dir, steps, eval_batches=args.eval_batches, weighting=weighting)
    print(
        f"average: {name}{' (done already)' if done else ''}: steps {','.join(map(str, result['steps']))}: "
        f"val_loss {result['val_loss']:.4f} at {result['tokens']} tokens -> {run_dir / 'averages' / name}",
        flush=True,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="the run's directory, e.g. runs/NAME (required)"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--last", type=int, metavar="K", help="average the newest K checkpoints (this or --steps required)"
    )
    which.add_argument(
        "--steps",
        type=parse_steps,
        metavar="S1,S2,...",
        help="average the checkpoints at these steps (this or --last required)",
    )
    p.add_argument("--eval-batches", type=int, help="validation batches (default: the run's eval.batches)")
    p.add_argument(
        "--weighting",
        default="uniform",
        metavar="uniform|tail|ema[:BETA]",
        help="uniform (default); tail: weights 1..K, the newest most; ema: BETA^(K-1)..1 "
        f"(BETA default {EMA_DECAY})",
    )
    p.set_defaults(func=run_average)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "average",
        help="evaluate the uniform average of a run's last K checkpoints",
        description=__doc__.splitlines()[0],
    )
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`python -m evertrain.launch.average ...`."""
    parser = argparse.ArgumentParser(
        prog="python -m evertrain.launch.average", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_average(args)
    except EvertrainError as exc:
        print(f"evertrain average: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
