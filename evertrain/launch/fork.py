"""`evertrain fork`: cool a checkpoint down on the side and evaluate it, leaving the main run alone.

From the checkpoint at step s0 the fork continues the same data stream from the saved cursor for c
steps with the cooldown overlay `lr = lr(s0) * f((step - s0) / c)` (design.md), then evaluates on the
validation split. On any engine and world size: it keeps the main run's global batch. Everything
goes to runs/NAME/cooldowns/from_<s0>_<shape>_<c>/ (with `@mix-<hash>` when it cools down on another mix):
  fork.json (what the fork is), config.yaml, metrics.jsonl, checkpoints/ (its own, so a killed fork
  resumes), final/ (the weights, a checkpoint-format step dir that load_consolidated and
  `evertrain export hf --cooldown` read), result.json (written last: a fork with result.json is done).
With --eval-cmd / --lm-eval-tasks, evaluation hooks (evals.py) run on final/ exported as a Hugging
Face directory before result.json is written, and their metrics go into it under "evals".
The only thing it writes into the main run is its lease in the source checkpoint's pins/.

On another mix (`--data-weights hq=0.7,main=0.3`: shares of sources of the run's data dir, and/or
`--data PATH`: another data dir with the same tokenizer) the cooldown reads that mix's stream from
its start instead of continuing the run's (the same windows for every fork on the mix, so branches
compare), evaluates on the run's own val split, and result.json records the mix under `data`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from evertrain import safe_json
from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text
from evertrain.launch.evals import EvalHooks, hooks_from_args, run_hooks
from evertrain.launch.runs import (
    Lease,
    RunError,
    cooldown_dir_name,
    cooldown_length,
    read_result,
    resolve_checkpoint,
)
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.config import COOLDOWN_SHAPES, DEFAULT_COOLDOWN_SHAPE, Config, dump_yaml, load_config


class ForkError(EvertrainError, ValueError):
    """A bad fork request: unknown step, no checkpoint there, bad cooldown length or shape."""


def cooldown_data(path: str | None, weights: str | None) -> dict | None:
    """The cooldown's mix from --data / --data-weights, None for the run's own stream: {"path" (None:
    the run's data dir), "weights" ({source: share} or None: the data dir's own weights), "label" (for
    the report), "tag" (for the directory name: the same request, the same fork)}."""
    from evertrain.pretrain.data.stream import parse_mix  # light: numpy only

    if path is None and weights is None:
        return None
    if path is not None and not (Path(path) / "manifest.json").is_file():
        raise ForkError(f"--data {path}: not a data dir (no manifest.json)")
    mix = parse_mix(weights) if weights is not None else None
    where = str(Path(path).resolve()) if path is not None else None
    label = ",".join(f"{source}={share:g}" for source, share in mix.items()) if mix else "its weights"
    label = f"{label} of {path}" if path is not None else label
    digest = hashlib.sha256(json.dumps([where, mix], sort_keys=True).encode()).hexdigest()[:8]
    return {"path": where, "weights": mix, "label": label, "tag": f"mix-{digest}"}


def check_cooldown_data(data: dict, run_data_path: str, seq_len: int) -> None:
    """Another data dir must use the run's tokenizer; the mix's sources must have windows."""
    from evertrain.pretrain.data.stream import TokenStream, load_manifest

    if data["path"] is not None:
        ours, theirs = load_manifest(run_data_path), load_manifest(data["path"])
        if ours.tokenizer["sha256"] != theirs.tokenizer["sha256"]:
            raise ForkError(
                f"--data {data['path']}: tokenized with another tokenizer than the run's "
                f"{run_data_path} (tokenizer sha256 differs)"
            )
    TokenStream(data["path"] or run_data_path, seq_len, 0, mix=data["weights"])  # names a missing source


# {"error": ...}: the eval hooks of this fork's last attempt failed (report.py shows it)
FAILED = "failed.json"


def fork_spec(
    run_dir: Path,
    out: Path,
    step: int,
    cooldown_steps: int,
    shape: str,
    source: Path | None,
    is_main: bool,
    data: dict | None = None,
) -> dict:
    """What the fork is, fixed at its first start in out/fork.json: above all the main run's global
    batch (windows per step), which the fork keeps on any world size, so it is the same computation
    as the main run would have done, and a resumed fork needs neither the source nor its world size."""
    path = out / "fork.json"
    if path.is_file():
        return json.loads(path.read_text())
    if source is None:
        raise ForkError(f"{out}: has checkpoints but no fork.json; fork from an existing checkpoint instead")
    main = load_config(run_dir / "config.yaml").train
    spec = {
        "from_step": step,
        "cooldown_steps": cooldown_steps,
        "shape": shape,
        "source": str(source),
        "global_windows": main.micro_batch_size * main.grad_accum * store.read_meta(source)["world_size"],
        "data": data,
    }
    if is_main:
        atomic_write_text(path, json.dumps(spec, indent=1))
    return spec


def batch_split(global_windows: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) giving `global_windows` per step on `world_size` ranks, with the
    largest micro-batch that is not above the configured one."""
    if global_windows % world_size:
        raise ForkError(
            f"the run's global batch of {global_windows} windows cannot be split over "
            f"{world_size} ranks; fork on a world size that divides it"
        )
    per_rank = global_windows // world_size
    micro = max(m for m in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def fork_config(
    run_dir: Path, out: Path, end_step: int, global_windows: int, world_size: int, args: argparse.Namespace
) -> Config:
    """The run's config (a resumed fork: its own) with the fork's stop step, the run's global batch
    split over this world size, no periodic eval (one eval at the end), only its newest checkpoint."""
    base = out / "config.yaml" if (out / "config.yaml").is_file() else run_dir / "config.yaml"
    micro, accum = batch_split(global_windows, load_config(base).train.micro_batch_size, world_size)
    # the weights come from the checkpoint, never from the HF start
    overrides = [
        f"train.max_steps={end_step}",
        f"train.micro_batch_size={micro}",
        f"train.grad_accum={accum}",
        "eval.every_steps=0",
        "checkpoint.keep_last=1",
        "checkpoint.keep_every=0",
        "model.init_from=null",
    ]
    if args.eval_batches is not None:
        overrides.append(f"eval.batches={args.eval_batches}")
    if args.engine is not None:
        overrides.append(f"engine.name={args.engine}")
    return load_config(base, overrides)


def publish_final(out: Path, step_dir: Path) -> Path:
    """The last checkpoint as out/final/ (hard links: no copy of the weights), swapped in by rename."""
    final, tmp = out / "final", out / f"final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links
            shutil.copy2(src, dst)

    shutil.copytree(step_dir, tmp, copy_function=link_or_copy)
    if final.exists():  # a run killed between publishing and result.json
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def run_fork(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.eval_batches is not None and args.eval_batches <= 0:
        raise ForkError(f"--eval-batches: must be > 0, got {args.eval_batches}")
    hooks = hooks_from_args(args)
    try:
        step, source = resolve_checkpoint(run_dir, args.step)
    except RunError:
        step, source = resumable_without_source(run_dir, args) or (None, None)
        if step is None:
            raise
    cooldown_steps = cooldown_length(step, args.cooldown_steps, args.cooldown_fraction)
    data = cooldown_data(args.data, args.data_weights)
    out = run_dir / "cooldowns" / cooldown_dir_name(step, args.shape, cooldown_steps, data)
    if (result := read_result(out)) is not None:
        if hooks and "evals" not in result:  # evals for a fork done without them, on rank 0
            from evertrain.pretrain.distributed import rank_and_world

            return write_result(out, result, hooks) if rank_and_world()[0] == 0 else 0
        print(f"fork: {out} is done already: val_loss {result['val_loss']:.4f}")
        return 0
    from evertrain.pretrain.distributed import (  # torch: only once a fork runs
        adopt_scheduler_env,
        rank_and_world,
    )

    adopt_scheduler_env()  # under srun / mpirun (a Slurm fork job): ranks from the scheduler
    rank = rank_and_world()[0]
    if data is not None:
        run_cfg = load_config(run_dir / "config.yaml")
        check_cooldown_data(data, run_cfg.data.path, run_cfg.model.seq_len)
    if rank != 0:  # rank 0 holds the lock and the lease for the whole process group
        return cool_down(args, run_dir, out, step, cooldown_steps, source, hooks, data)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / "fork.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ForkError(f"{out}: another fork is already running there") from None
    (out / FAILED).unlink(missing_ok=True)  # an earlier attempt's; this one is running
    lease = None
    try:
        lease = Lease(source, f"fork.{out.name}") if source is not None else None
        if data is None:  # the loss model describes the run's own stream; made before the fork trains
            from evertrain.launch.lossmodel.predict import ensure_prediction

            ensure_prediction(run_dir, out, step, cooldown_steps, args.shape)
        return cool_down(args, run_dir, out, step, cooldown_steps, source, hooks, data)
    finally:
        if lease is not None:
            lease.release()
        lock.release()


def resumable_without_source(run_dir: Path, args: argparse.Namespace) -> tuple[int, None] | None:
    """A fork whose source checkpoint is gone can still finish from its own checkpoints."""
    try:
        step = int(args.step)
        out = (
            run_dir
            / "cooldowns"
            / cooldown_dir_name(
                step,
                args.shape,
                cooldown_length(step, args.cooldown_steps, args.cooldown_fraction),
                cooldown_data(args.data, args.data_weights),
            )
        )
    except (ValueError, ForkError):
        return None
    return (step, None) if store.complete_checkpoints(out / "checkpoints") else None


def cool_down(
    args,
    run_dir: Path,
    out: Path,
    step: int,
    cooldown_steps: int,
    source: Path | None,
    hooks: EvalHooks = EvalHooks(),
    data: dict | None = None,
) -> int:
    """Train steps step+1 .. step+cooldown_steps under the cooldown overlay (on `data`'s mix if given),
    evaluate, publish, run the eval hooks (rank 0, after the engine is closed), write result.json."""
    from evertrain.pretrain import engines
    from evertrain.pretrain.checkpoint import CheckpointManager
    from evertrain.pretrain.data.stream import TokenStream
    from evertrain.pretrain.distributed import detect_launcher, rank_and_world
    from evertrain.pretrain.loop import train
    from evertrain.pretrain.run.evaluate import evaluate, load_val_batches
    from evertrain.pretrain.schedule import Cooldown, Schedule

    end_step = step + cooldown_steps
    rank, _, world_size = rank_and_world()
    spec = fork_spec(run_dir, out, step, cooldown_steps, args.shape, source, is_main=rank == 0, data=data)
    cfg = fork_config(run_dir, out, end_step, spec["global_windows"], world_size, args)
    schedule = Schedule.from_config(cfg.optim, cooldown=Cooldown(step, cooldown_steps, args.shape))
    engine = engines.create(cfg, schedule, launcher=detect_launcher(os.environ, args.local_rank))
    ckpt = result = None
    try:
        if engine.is_main:
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
            print(
                f"fork: step {step} -> {end_step} ({args.shape} cooldown, {engine.name} x{engine.world_size}) "
                f"into {out}",
                flush=True,
            )
        ckpt = CheckpointManager(out, cfg, engine)
        start = ckpt.load(source) if ckpt.latest() is None else None  # else: resume the fork itself
        if data is None:
            stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
        else:  # another mix, read from its start; eval stays on the run's val split (cfg.data.path)
            stream = TokenStream(
                data["path"] or cfg.data.path, cfg.model.seq_len, cfg.train.seed, mix=data["weights"]
            )
            if start is not None:
                start = {**start, "data": stream.state_dict()}
        # before the cooldown: a missing val split fails now, not after it
        val = load_val_batches(cfg, engine)
        last = train(cfg, out, engine, stream, ckpt, start=start, final_dir=out / "final")  # see write_result
        if last < end_step:
            if engine.is_main:
                print(f"fork: stopped at step {last} of {end_step}; rerun the same command to resume")
            return 130
        scores = evaluate(engine, val)
        if engine.is_main:
            last_dir = ckpt.latest()
            tokens = store.read_meta(last_dir)["tokens"]
            with open(out / "metrics.jsonl", "a") as f:
                f.write(
                    safe_json.dumps(
                        {"kind": "eval", "step": last, "tokens": tokens, "val_loss": scores["val_loss"]}
                    )
                    + "\n"
                )
            publish_final(out, last_dir)
            result = {
                "from_step": step,
                "cooldown_steps": cooldown_steps,
                "shape": args.shape,
                "tokens": tokens,
                "val_loss": scores["val_loss"],
                "val_ppl": scores["val_ppl"],
            }
            result.update(scored_prediction(out, result))
            if getattr(args, "final", False):
                result["final"] = True  # the forker's stop rule chose this cooldown to end the run
            if data is not None:
                result["data"] = {key: data[key] for key in ("path", "weights", "label")}
    finally:
        if ckpt is not None:
            ckpt.close()
        engine.close()
        if ckpt is not None and ckpt.abandoned:  # as in pretrain.py: do not join the abandoned writer
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    if result is None:  # not the main rank
        return 0
    if hooks:  # the hooks' processes get the device to themselves: drop the model and the cached blocks
        import gc

        import torch

        del engine, ckpt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return write_result(out, result, hooks, cfg)


def scored_prediction(out: Path, result: dict) -> dict:
    """`predicted`, `prediction_interval`, `prediction_error` from out/prediction.json, if there is one."""
    from evertrain.launch.lossmodel.predict import read_prediction, scored

    return scored(result, read_prediction(out))


def write_result(out: Path, result: dict, hooks: EvalHooks, cfg: Config | None = None) -> int:
    """Run the eval hooks on final/ (their metrics go under "evals"), then write result.json, which marks
    the fork done; its own checkpoints go (final/ holds the last state). A failing hook raises first."""
    if hooks:
        cfg = cfg or load_config(out / "config.yaml")
        print(f"fork: running eval hooks on {out / 'final'} (log: {out / 'eval.log'})", flush=True)
        try:
            result = {**result, "evals": run_hooks(hooks, out, out / "final", cfg)}
        except EvertrainError as exc:  # not done, and not running either: `evertrain report` says so
            atomic_write_text(out / FAILED, safe_json.dumps({"error": str(exc)}, indent=1))
            raise
    atomic_write_text(out / "result.json", safe_json.dumps(result, indent=1))
    (out / FAILED).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    evals = f", evals {json.dumps(result['evals'])}" if "evals" in result else ""
    print(
        f"fork: val_loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.2f}) at {result['tokens']} tokens"
        f"{evals} -> {out / 'result.json'}",
        flush=True,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    # --run-dir: the same, for torchrun, whose parser takes `--run` for an abbreviation of its --run-path
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="the main run's directory, e.g. runs/NAME (required)",
    )
    p.add_argument("--step", required=True, help="checkpoint step to fork from, or 'latest' (required)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--cooldown-steps", type=int, help="cooldown length C in steps (this or --cooldown-fraction required)"
    )
    length.add_argument(
        "--cooldown-fraction",
        type=float,
        help="cooldown length as a fraction of the step, C = F * S (this or --cooldown-steps required)",
    )
    p.add_argument("--shape", choices=COOLDOWN_SHAPES, default=DEFAULT_COOLDOWN_SHAPE, help="cooldown shape")
    p.add_argument(
        "--eval-batches", type=int, help="validation batches for the final eval (default: eval.batches)"
    )
    p.add_argument(
        "--engine",
        choices=("auto", "single", "deepspeed", "fsdp"),
        help="engine for the fork (default: the run's engine.name)",
    )
    add_eval_arguments(p)
    p.add_argument(
        "--data",
        metavar="PATH",
        help="cool down on another data dir, with the run's tokenizer (default: the run's data.path)",
    )
    p.add_argument(
        "--data-weights",
        metavar="SRC=SHARE,...",
        help="cool down on this mix of sources (of the run's data dir, or of --data), e.g. hq=0.7,main=0.3 "
        "(default: the run's mix)",
    )
    p.add_argument(
        "--final",
        action="store_true",
        help="mark this cooldown final in result.json (the forker's stop rule launches it so; default: not final)",
    )
    # passed by the deepspeed launcher; env has it too
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_fork)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The post-fork evaluation hooks (evals.py); the forker passes them on to every fork."""
    p.add_argument(
        "--eval-cmd",
        help='after the cooldown, run "CMD {hf_dir} {out_json}" on the fork exported to '
        "Hugging Face format; the JSON object it writes goes into result.json evals "
        "(default: no hook)",
    )
    p.add_argument(
        "--lm-eval-tasks",
        help="after the cooldown, run lm-evaluation-harness on these tasks: T1,T2 "
        "(needs `pip install evertrain[eval]`; default: none)",
    )
    p.add_argument(
        "--lm-eval-include",
        help="directory of extra lm-eval task YAMLs (lm_eval --include_path; default: none)",
    )
    p.add_argument(
        "--lm-eval-limit", type=int, help="lm-eval examples per task, for a quick look (default: all)"
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fork", help="cool a checkpoint down on the side and evaluate it", description=__doc__.splitlines()[0]
    )
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """`python -m evertrain.launch.fork ...`: how the forker and the launchers start a fork."""
    parser = argparse.ArgumentParser(
        prog="python -m evertrain.launch.fork", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_fork(args)
    except EvertrainError as exc:
        print(f"evertrain fork: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
