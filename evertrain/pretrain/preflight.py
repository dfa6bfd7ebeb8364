"""Start-up checks of a training run that need more than the config itself: each problem is one line
naming the key or file, raised before any heavy work (torch process group, model, engine).

pretrain.py calls `preflight` on every rank right after reading the config; a new check joins here.
Today: the data dir can serve the config (it exists, its vocabulary fits model.vocab_size, it has
the validation split that periodic eval reads).
"""
from __future__ import annotations

import sys
from pathlib import Path

from evertrain.pretrain.config import Config, ConfigError
from evertrain.pretrain.data import MANIFEST, DataError, Manifest, load_manifest
from evertrain.pretrain.datastamps import VerifiedStamps, stamp_file


def preflight(cfg: Config, *, verify_checksums: bool, quiet: bool = False) -> Manifest:
    """Check that the run can start; returns the data manifest. `verify_checksums`: hash every shard
    (once per node is enough). Warnings (worth saying, not fatal) go to stderr unless `quiet`."""
    def warn(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    manifest = check_data(cfg, verify_checksums)
    check_vocab(cfg, manifest, warn)
    return manifest


def check_data(cfg: Config, verify_checksums: bool) -> Manifest:
    path = cfg.data.path
    if not (Path(path) / MANIFEST).is_file():  # e.g. configs/1b.yaml before its data is prepared
        raise DataError(f"data.path={path}: no {MANIFEST} there; prepare it first with `evertrain data prepare "
                        f"--input TEXT... --out {path} --vocab-size {cfg.model.vocab_size}` (docs/data.md), "
                        "or point data.path at a prepared data dir")
    # hashes only shards this node has not verified unchanged before (datastamps.py): O(new shards)
    stamps = VerifiedStamps(stamp_file(path)) if verify_checksums else None
    manifest = load_manifest(path, verify_checksums=verify_checksums, stamps=stamps)
    if cfg.eval.every_steps and not manifest.val:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps}, but data.path={cfg.data.path} has no "
                          "validation shards; append some with `evertrain data append --val FILE...` "
                          "or set eval.every_steps=0")
    return manifest


def check_vocab(cfg: Config, manifest: Manifest, warn) -> None:
    """Token ids run up to the tokenizer's vocab_size - 1; a smaller embedding fails at the first batch
    with an index error deep in torch. A larger one works (padding rows are common) but rows far past
    the tokenizer's are never trained: most likely the config is paired with the wrong data dir."""
    model_vocab, data_vocab = cfg.model.vocab_size, manifest.vocab_size
    if model_vocab < data_vocab:
        raise ConfigError(f"model.vocab_size={model_vocab} is smaller than the {data_vocab}-token vocabulary of "
                          f"data.path={cfg.data.path}; set model.vocab_size={data_vocab} (or more)")
    if model_vocab > 2 * data_vocab:
        warn(f"warning: model.vocab_size={model_vocab}, but data.path={cfg.data.path} has a {data_vocab}-token "
             f"vocabulary: {model_vocab - data_vocab} embedding rows will never see a token")

