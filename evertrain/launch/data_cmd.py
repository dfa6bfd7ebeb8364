"""`evertrain data prepare|append`: make a data dir from text, or add shards to one (docs/data.md)."""

from __future__ import annotations

import argparse
import os

from evertrain.pretrain.data.prepare import DEFAULT_SHARD_TOKENS, TOKEN_FILE_DTYPES, append, prepare
from evertrain.pretrain.data.sources import Counts
from evertrain.pretrain.data.stream import DEFAULT_SOURCE, Manifest


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe(manifest: Manifest) -> str:
    parts = []
    for split in ("train", "val"):
        shards = manifest.shards(split)
        parts.append(
            f"{split} {sum(s.tokens for s in shards):,} tokens in {len(shards)} shard{'s' * (len(shards) != 1)}"
        )
    return (
        f"{manifest.data_dir}: version {manifest.version}, {', '.join(parts)} "
        f"(vocab {manifest.vocab_size}, {manifest.dtype})"
    )


def reading(args: argparse.Namespace) -> dict:
    return {"text_field": args.text_field, "split_docs": args.split_docs, "skip_bad": args.skip_bad}


def run_prepare(args: argparse.Namespace) -> int:
    counts = Counts()
    manifest = prepare(
        args.input,
        args.out,
        args.vocab_size,
        val=args.val,
        tokenizer=args.tokenizer,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        source=args.source,
        part=args.part,
        token_dtype=args.token_dtype,
        eos_id=args.eos_id,
        counts=counts,
        **reading(args),
    )
    # not for tokens only
    read = f"; read {counts.summary()}" if counts.documents or counts.empty or counts.bad else ""
    print(f"prepared {describe(manifest)}{read}")
    return 0


def run_append(args: argparse.Namespace) -> int:
    counts = Counts()
    manifest = append(
        args.data,
        args.files,
        val=args.val,
        tokenizer=args.tokenizer,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        source=args.source,
        weight=args.weight,
        allow_duplicate=args.allow_duplicate,
        token_dtype=args.token_dtype,
        counts=counts,
        **reading(args),
    )
    # not for .bin only
    read = f"; read {counts.summary()}" if counts.documents or counts.empty or counts.bad else ""
    print(f"appended to {describe(manifest)}{read}")
    return 0


def add_encoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="encoding processes (default: the CPUs this process may use); "
        "the output is the same for any number",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS})",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the text of a JSONL record / Parquet, Arrow or HF dataset row (default: text)",
    )
    parser.add_argument(
        "--split-docs",
        metavar="REGEX",
        help="a text file holds many documents, separated by matches of REGEX (multiline; default: one document per text file)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records (invalid JSON, field missing or not text) and count them, "
        "instead of stopping at the first (default: stop)",
    )
    parser.add_argument(
        "--token-dtype",
        choices=TOKEN_FILE_DTYPES,
        help="dtype of the ids in .bin inputs (little-endian; documents joined by EOS); prepare "
        "needs it for a .bin, append defaults to the data dir's dtype. A .npy carries its own",
    )


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare or grow a tokenized data dir")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{prepare,append}")

    prepare = commands.add_parser(
        "prepare",
        help="tokenize text files into a new data dir",
        description="Train a sentencepiece BPE tokenizer (or reuse a .model or tokenizer.json) and write token "
        "shards + manifest.json. Inputs: .txt (one document per file, or --split-docs), .jsonl, "
        ".jsonl.gz, .jsonl.zst (one per record), .parquet, .arrow, Hugging Face save_to_disk "
        "directories, plain directories and globs; already-tokenized .bin/.npy files with the "
        "--tokenizer that made them. Each document is encoded whole; documents "
        "are joined by EOS.",
    )
    prepare.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="training inputs (files, directories, globs), in order (required)",
    )
    prepare.add_argument(
        "--val", nargs="+", default=[], metavar="PATH", help="validation inputs (default: none)"
    )
    prepare.add_argument(
        "--out", required=True, help="the data dir to create, e.g. data/NAME (required; must not exist)"
    )
    prepare.add_argument(
        "--vocab-size", type=int, help="train a tokenizer with this many pieces (required unless --tokenizer)"
    )
    prepare.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="use this sentencepiece .model or Hugging Face tokenizer.json (or a model dir holding "
        "one) instead of training one; required for .bin/.npy token inputs (default: train one)",
    )
    prepare.add_argument(
        "--eos-id",
        type=int,
        metavar="ID",
        help="the id that ends each document, in token inputs and in what is encoded "
        "(default: the tokenizer's EOS)",
    )
    prepare.add_argument(
        "--part",
        metavar="I/N",
        help="prepare only the I-th (from 0) of N contiguous slices of the --input files "
        "(needs --tokenizer; --val goes to part 0); `evertrain data append` adds the "
        "other parts' shards in order (default: all of them)",
    )
    prepare.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"mixture source name (default: {DEFAULT_SOURCE})"
    )
    add_encoding_options(prepare)
    prepare.set_defaults(func=run_prepare)

    append = commands.add_parser(
        "append",
        help="add shards to a data dir (a live run picks them up at its next checkpoint)",
        description="Encode inputs (as for prepare) with the data dir's tokenizer (or take already-tokenized .bin shard files) "
        "and add them at the end of the train split (FILES) and/or the val split (--val). "
        "Old shards never change; manifest.json is replaced atomically under a file lock.",
    )
    append.add_argument("--data", required=True, help="the data dir, e.g. data/NAME (required)")
    append.add_argument(
        "files",
        nargs="*",
        metavar="FILES",
        help="training inputs (as for prepare) or .bin token files, in order",
    )
    append.add_argument(
        "--val", nargs="+", default=[], metavar="FILE", help="files for the validation split (default: none)"
    )
    append.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="refuse unless this is the data dir's tokenizer (default: no check)",
    )
    append.add_argument(
        "--source", default=DEFAULT_SOURCE, help=f"mixture source name (default: {DEFAULT_SOURCE})"
    )
    append.add_argument(
        "--weight",
        type=float,
        help="sampling weight of a new source: windows per epoch = weight x its windows (default 1)",
    )
    append.add_argument(
        "--allow-duplicate",
        action="store_true",
        help="add a file even if the data dir already holds its bytes (an input taken by an "
        "earlier version, or one of its own shards; default: refuse)",
    )
    add_encoding_options(append)
    append.set_defaults(func=run_append)
