"""Tokens to a data dir's files: shards of exactly shard_tokens tokens (the last one shorter), each
fsynced and hashed as it is written, and manifest.json (replaced atomically) naming them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evertrain.files import atomic_write_json
from evertrain.pretrain.data.encode import Encoding, encoded, work_items
from evertrain.pretrain.data.sources import Counts, Input
from evertrain.pretrain.data.stream import DTYPES, MANIFEST, Manifest, Shard, shard_name


class ShardWriter:
    """Cuts a stream of tokens into shard files of exactly shard_tokens tokens (the last one shorter),
    named by position, each with its sha256."""

    def __init__(
        self, directory: Path, split: str, first_index: int, shard_tokens: int, dtype: str, source: str
    ):
        self.directory, self.split, self.index = directory, split, first_index
        self.shard_tokens, self.dtype, self.source = shard_tokens, DTYPES[dtype], source
        self.shards: list[Shard] = []
        self.file = None  # the shard being filled

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.file is None:
                self.file = open(self.directory / shard_name(self.split, self.index), "wb")
                self.filled, self.digest = 0, hashlib.sha256()
            data = np.ascontiguousarray(tokens[: self.shard_tokens - self.filled], dtype=self.dtype)
            self.file.write(data)  # the array's own buffer: no copy to bytes
            self.digest.update(data)
            self.filled += data.size
            tokens = tokens[data.size :]
            if self.filled == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before any manifest names it
        self.file.close()
        self.shards.append(
            Shard(shard_name(self.split, self.index), self.filled, self.digest.hexdigest(), self.source)
        )
        self.file, self.index = None, self.index + 1

    def close(self) -> list[Shard]:
        if self.file is not None:
            self._finish()
        return self.shards


def write_split(
    inputs: list[Input],
    enc: Encoding,
    directory: Path,
    split: str,
    first_index: int,
    source: str,
    counts: Counts,
) -> list[Shard]:
    writer = ShardWriter(directory, split, first_index, enc.shard_tokens, enc.dtype, source)
    with tqdm(
        total=sum(i.size for i in inputs),
        unit="B",
        unit_scale=True,
        desc=f"encoding {split}",
        disable=None,
        file=sys.stderr,
    ) as bar:
        try:
            for tokens in encoded(work_items(inputs, enc, bar), enc, counts):
                writer.write(tokens)
        finally:
            shards = writer.close()
    return shards


def write_manifest(manifest: Manifest, directory: Path) -> None:
    """manifest.json replaced atomically: readers see the old or the new one, never a mix."""
    atomic_write_json(directory / MANIFEST, manifest.to_json(), indent=1)
