"""`evertrain export hf`: which weights (a run's checkpoint, a finished cooldown or a checkpoint average)
and which tokenizer go into the Hugging Face checkpoint that export.py writes.

The argument checks and `--help` need no torch; export.py (torch, safetensors, sentencepiece,
tokenizers) is imported once there is something to export.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import threading
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.launch.runs import resolve_checkpoint
from evertrain.pretrain.checkpoint.retention import pin, unpin
from evertrain.pretrain.config import load_config
from evertrain.pretrain.data.stream import MANIFEST, load_manifest

EXPORT_PIN_TTL_S = 3600.0  # reading even an 8B checkpoint takes minutes; a crashed export's pin expires


class ExportSourceError(EvertrainError, ValueError):
    """Nothing exportable where the arguments point: no run, no finished cooldown, no tokenizer."""


def resolve_source(
    run_dir: Path, step: str | None, cooldown: str | None, average: str | None = None
) -> tuple[Path, Path]:
    """-> (checkpoint step dir holding the weights, config.yaml describing them)."""
    if step is not None:
        _, step_dir = resolve_checkpoint(run_dir, step)
        return step_dir, run_dir / "config.yaml"
    option, name, kind = (
        ("--cooldown", cooldown, "cooldowns") if average is None else ("--average", average, "averages")
    )
    cooldown_dir = Path(name)
    if not cooldown_dir.is_dir() and (run_dir / kind / name).is_dir():
        cooldown_dir = run_dir / kind / name  # a bare cooldown (or average) name inside the run
    if not (cooldown_dir / "final" / "meta.json").is_file():
        raise ExportSourceError(f"{option} {name}: no finished {kind[:-1]} there (no final/meta.json)")
    config = cooldown_dir / "config.yaml"
    return cooldown_dir / "final", config if config.is_file() else run_dir / "config.yaml"


def tokenizer_from_manifest(data_path: str, config_path: Path) -> tuple[Path, int | None, int | None]:
    """The data dir's tokenizer model and its bos/eos ids, as its manifest records them."""
    if not (Path(data_path) / MANIFEST).is_file():
        raise ExportSourceError(
            f"data.path={data_path} (from {config_path}): no {MANIFEST} there; "
            "pass --tokenizer PATH/tokenizer.model (or tokenizer.json)"
        )
    manifest = load_manifest(data_path)
    return Path(data_path) / manifest.tokenizer["path"], manifest.bos_id, manifest.eos_id


def run_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise ExportSourceError(f"--run {run_dir}: not a run directory (no config.yaml)")
    if Path(args.out).exists():  # export_hf checks too; this is before reading gigabytes of weights
        raise ExportSourceError(f"--out {args.out}: already exists; choose a new directory")
    step_dir, config_path = resolve_source(run_dir, args.step, args.cooldown, args.average)
    # a run checkpoint is pinned while it is read, so the live run's retention cannot delete it under
    # us (a finished cooldown's final/ is never pruned): at once, before seconds of importing torch
    # in which keep_last=1 could delete it
    holder = f"export.{socket.gethostname()}.{os.getpid()}"
    lease = pin(step_dir, holder, EXPORT_PIN_TTL_S) if args.step is not None else None
    try:
        with stopped_by_sigterm():
            return export_pinned(args, step_dir, config_path)
    finally:
        if lease is not None:
            unpin(lease)


class ExportStopped(EvertrainError):
    """SIGTERM during an export: the half-written directory is removed, the pin released."""


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM raises ExportStopped, so the export's own cleanup runs (its temp dir is model-sized)
    and the user reads one line instead of a silent exit 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise ExportStopped(f"stopped by {signal.Signals(signum).name}; nothing was written to --out")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def export_pinned(args: argparse.Namespace, step_dir: Path, config_path: Path) -> int:
    cfg = load_config(config_path)
    if args.tokenizer:
        tokenizer, bos_id, eos_id = Path(args.tokenizer), None, None
    else:
        tokenizer, bos_id, eos_id = tokenizer_from_manifest(cfg.data.path, config_path)
    import torch

    from evertrain.launch.export import check_tokenizer, export_hf_checkpoint, parse_size
    from evertrain.pretrain import checkpoint
    from evertrain.pretrain.checkpoint import store

    max_shard = parse_size(args.max_shard_size)  # before reading anything
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    meta = checkpoint.read_meta(step_dir)
    checkpoint.check_model(step_dir, meta, cfg)
    check_tokenizer(tokenizer, meta, step_dir)
    store.verify_files(step_dir, meta, mode=cfg.checkpoint.verify)  # streamed: no file is held in memory
    out = export_hf_checkpoint(
        step_dir,
        meta,
        cfg.model,
        tokenizer,
        args.out,
        bos_id=bos_id,
        eos_id=eos_id,
        dtype=dtype,
        max_shard_size=max_shard,
    )
    print(f"exported {step_dir} -> {out}")
    return 0


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a checkpoint to another format")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    hf = formats.add_parser(
        "hf",
        help="as a Hugging Face Llama checkpoint (safetensors + tokenizer)",
        description="A checkpoint or cooldown result as a standard Hugging Face Llama checkpoint.",
    )
    hf.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory, e.g. runs/NAME")
    source = hf.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--step",
        help="checkpoint step of the run, or 'latest' (one of --step, --cooldown, --average required)",
    )
    source.add_argument(
        "--cooldown",
        help="cooldown directory, or its name under RUN/cooldowns/ (one of --step, --cooldown, --average required)",
    )
    source.add_argument(
        "--average",
        help="checkpoint average directory, or its name under RUN/averages/ (one of --step, --cooldown, --average "
        "required)",
    )
    hf.add_argument("--out", required=True, help="output directory (must not exist)")
    hf.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype to write"
    )
    hf.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file; more weights than this are split into shards with "
        "model.safetensors.index.json, as Hugging Face does (default 5GB; e.g. 500MB, 2GiB)",
    )
    hf.add_argument(
        "--tokenizer",
        help="SentencePiece .model or tokenizer.json to ship (default: the run's data manifest's)",
    )
    hf.set_defaults(func=run_export)
