"""Train a model: `python | deepspeed | torchrun  pretrain.py --config C [--run-dir D] [k.k=v ...]`.

The engine follows the launcher (engine.name=auto): plain python trains in one process, `deepspeed`
uses DeepSpeed ZeRO, `torchrun` uses FSDP2, and so do `srun` / `mpirun` with several tasks (ranks from
the scheduler's variables; engine.name=deepspeed for DeepSpeed). Rerunning on the same run dir resumes
from its latest checkpoint: `pretrain.py --run-dir D [k.k=v ...]` with the run's own D/config.yaml
(overrides only where a resume may change them: run_config.py), or the whole command again. There is
no fixed end: the run stops at train.max_steps if set, or on SIGTERM/SIGINT after finishing the step
and writing a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text
from evertrain.launch.helptext import HelpFormatter, examples_epilog
from evertrain.pretrain.config import Config, ConfigError, dump_yaml, load_config
from evertrain.pretrain.run.run_config import (
    CONFIG_FILE,
    changes,
    check_same_model,
    previous_config,
    resume_config,
    trained_on,
)

# torch and everything that imports it are imported in main() once the arguments are parsed and the config
# loaded, so `--help`, `--print-config` and a config error answer at once (tests/test_cli.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=examples_epilog("pretrain.py"),
    )
    parser.add_argument(
        "--config",
        help="YAML config, e.g. configs/tiny.yaml (default: resume --run-dir with its own config.yaml)",
    )
    # --run-dir under torchrun, whose own parser takes `--run` for an abbreviation of its --run-path
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run_dir",
        help="where checkpoints and metrics go (default: runs/<config stem>); alone, resumes "
        "that run with its config.yaml",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + overrides) as YAML and exit (default: train)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "single", "deepspeed", "fsdp"),
        help="shorthand for engine.name=... (default: the config's engine.name)",
    )
    # passed by the deepspeed launcher; env has it too
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--resume-step",
        type=int,
        default=None,
        metavar="N",
        help="resume from the checkpoint of step N instead of the latest; the later ones are "
        "renamed *.abandoned-<time> (e.g. the latest is corrupt). Use once, not in a restart loop "
        "(default: the latest)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. train.max_steps=500 optim.max_lr=3e-3 (docs/config.md)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)  # overrides may come before or after options


def engine_config(run_dir: Path, cfg: Config) -> Config:
    """model.init_from only seeds a new run: once the run has a checkpoint it resumes from that, and
    the Hugging Face directory is neither read again nor needed any more."""
    from evertrain.pretrain.checkpoint.store import latest_checkpoint

    if cfg.model.init_from is None or latest_checkpoint(run_dir / "checkpoints") is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))


def write_config(run_dir: Path, cfg: Config) -> None:
    """The resolved config, replaced atomically (a resumed run may change e.g. train.max_steps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))


def stop_committed(ckpt) -> bool:
    return ckpt is not None and ckpt.stop_committed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = ckpt = lock = None
    hint = ""
    returned = None  # 0 trained, 2 an error line was printed: how the try block ended, if it did
    try:
        overrides = list(args.overrides) + ([f"engine.name={args.engine}"] if args.engine else [])
        if args.config is None and args.run_dir is None:
            raise ConfigError("give --config FILE to start a run, or --run-dir DIR to resume one")
        run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
        previous = previous_config(run_dir)
        if args.config is None:
            cfg = resume_config(run_dir, previous, overrides)
        else:
            cfg = load_config(args.config, overrides)
        hint = trained_on(run_dir, previous, cfg)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from evertrain.pretrain import engines
        from evertrain.pretrain.checkpoint import CheckpointManager
        from evertrain.pretrain.checkpoint.retention import has_live_pins
        from evertrain.pretrain.checkpoint.store import rewind
        from evertrain.pretrain.data.stream import TokenStream
        from evertrain.pretrain.distributed import adopt_scheduler_env, detect_launcher, rank_and_world
        from evertrain.pretrain.loop import train
        from evertrain.pretrain.run.lock import RunLock
        from evertrain.pretrain.run.preflight import preflight, resolve_auto

        adopt_scheduler_env()  # srun / mpirun: ranks from the scheduler, before anything reads RANK
        cfg = resolve_auto(cfg)  # model.vocab_size: auto -> the data's, before the model is compared or built
        rank, local_rank, _ = rank_and_world()
        check_same_model(run_dir, previous, cfg)  # on every rank, before any heavy start-up
        if previous is not None and rank == 0:
            changed = changes(previous, cfg)
            print(
                f"pretrain.py: resuming {run_dir}"
                + (
                    f"; changed since its {CONFIG_FILE}: " + ", ".join(changed)
                    if changed
                    else f" with its {CONFIG_FILE}"
                ),
                flush=True,
            )
        # checksums once per node (shards may live on node-local disks); warnings once per run.
        # Read-only, so a refused start leaves no trace: not even the run dir.
        preflight(engine_config(run_dir, cfg), verify_checksums=local_rank == 0, quiet=rank != 0)
        if rank == 0:  # the trainer's rank 0 holds it; before anything is written
            lock = RunLock.acquire(run_dir)
        if args.resume_step is not None and lock is not None:  # rank 0, before the others can read
            # a dead reader's pins do not count
            rewind(run_dir / "checkpoints", args.resume_step, pinned=has_live_pins)
        stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
        engine = engines.create(
            engine_config(run_dir, cfg), launcher=detect_launcher(os.environ, args.local_rank)
        )
        ckpt = CheckpointManager(run_dir, cfg, engine)
        # config.yaml describes a run that started: written once the checkpoint and data checks passed,
        # so a refused start does not leave a config that then refuses the corrected one
        started = (lambda: write_config(run_dir, cfg)) if engine.is_main else None
        train(cfg, run_dir, engine, stream, ckpt, started=started)
        returned = 0
        return 0
    except EvertrainError as exc:
        rank = int(os.environ.get("RANK", "0"))  # as rank_and_world() reads it, without importing torch
        # a DataError comes only once it was imported
        data = sys.modules.get("evertrain.pretrain.data.stream")
        # which data the run trained on, if not this
        where = hint if data is not None and isinstance(exc, data.DataError) else ""
        print(f"pretrain.py: error: {exc}{where}" + (f" (rank {rank})" if rank else ""), file=sys.stderr)
        returned = 2
        return 2
    except KeyboardInterrupt:
        # during start-up (the loop itself turns signals into a clean stop): 130. A second Ctrl-C once
        # the stop's checkpoint is committed (while the run closes down) loses nothing: 0, as the first
        return 0 if stop_committed(ckpt) else 130
    finally:
        try:
            if ckpt is not None:
                ckpt.close()
            if engine is not None:
                engine.close()
            if lock is not None:
                lock.release()
        except KeyboardInterrupt:
            if not stop_committed(ckpt):
                raise
        except EvertrainError as exc:  # closing down: the last save failed, or a rank missing from it
            if returned is None:
                raise  # after an unexpected error: both tracebacks
            if returned == 0:  # else the first error line said what went wrong (e.g. named that rank)
                rank = int(os.environ.get("RANK", "0"))
                print(f"pretrain.py: error: {exc}" + (f" (rank {rank})" if rank else ""), file=sys.stderr)
            raise SystemExit(2) from None
        if ckpt is not None and ckpt.abandoned:
            # a stop abandoned a save (checkpoint.stop_budget_s): its writer thread may still be busy,
            # and a normal exit would join it, past the launcher's SIGKILL
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
