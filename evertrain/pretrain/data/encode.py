"""Documents to tokens: the inputs' raw pieces (sources.py) in batches of about ENCODE_BATCH_BYTES,
decoded into documents and encoded whole by the tokenizer (tokenizer.py), each followed by EOS, in
`workers` processes; results are taken back in submission order, so the tokens, and the first bad
record reported, are the same for any worker count. Token files pass through, checked id by id.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evertrain.pretrain.data import tokenizer as tok
from evertrain.pretrain.data.sources import (
    TOKENS,
    Counts,
    Decoded,
    Input,
    Raw,
    ReadOptions,
    account,
    decode,
    raw_pieces,
)
from evertrain.pretrain.data.stream import DTYPES, DataError

ENCODE_BATCH_BYTES = 1 << 20  # input handed to one encoding process per task (whole documents)
PENDING_PER_WORKER = 3  # tasks in flight per process: enough to keep it busy, bounded memory
COPY_TOKENS = 1 << 22  # tokens read per step when importing a token file


TOKEN_FILE_DTYPES = ("uint16", "uint32", "int32", "int64")  # what a .bin input may hold (little-endian)


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class Encoding:
    """How inputs become a data dir's tokens: its tokenizer, vocab and dtype, processes, shard size and
    how records are read."""

    tokenizer: tok.TokenizerSpec | None  # None when only token files are appended
    vocab_size: int
    dtype: str
    workers: int
    shard_tokens: int
    options: ReadOptions = ReadOptions()
    token_dtype: str | None = None  # of .bin inputs; None = the data dir's dtype (a .npy holds its own)


def work_items(inputs: list[Input], enc: Encoding, bar: tqdm) -> Iterator[list[Raw] | np.ndarray]:
    """The inputs in order as batches of raw pieces (about ENCODE_BATCH_BYTES each) to decode and
    encode, and chunks of token files (passed through as they are)."""
    batch: list[Raw] = []
    size = 0
    for inp in inputs:
        if inp.kind == TOKENS:
            if batch:
                yield batch
                batch, size = [], 0
            yield from token_file_chunks(inp.path, enc)
            bar.update(inp.size)
            continue
        for raw in raw_pieces(inp, enc.options):
            batch.append(raw)
            size += raw.size
            if size >= ENCODE_BATCH_BYTES:
                yield batch
                batch, size = [], 0
        bar.update(inp.size)
    if batch:
        yield batch


def encode_pieces(pieces: list[Raw], options: ReadOptions, encode=None) -> tuple[np.ndarray, Decoded, int]:
    """Decode the pieces and encode their documents, each followed by EOS: (tokens, what was decoded
    without its texts, number of documents). `encode` is the tokenizer's encode_joined; by default the
    encoding process's own (tokenizer.init_worker)."""
    decoded = decode(pieces, options)
    tokens = (encode or tok.encode_in_worker)(decoded.texts)
    documents = len(decoded.texts)
    decoded.texts = []  # not sent back: only the counts and the bad records are
    return tokens, decoded, documents


def encoded(items: Iterator[list[Raw] | np.ndarray], enc: Encoding, counts: Counts) -> Iterator[np.ndarray]:
    """Every item's tokens, in the items' order: batches decoded and encoded in this process (workers=1)
    or in `workers` processes, token chunks as they are. Bad records are counted, or raised, in order."""

    def finish(result) -> np.ndarray:
        tokens, decoded, documents = result
        account(decoded, documents, enc.options, counts)
        return tokens

    if enc.workers == 1 or enc.tokenizer is None:
        dtype = DTYPES[enc.dtype]
        local = tok.Tokenizer(enc.tokenizer) if enc.tokenizer is not None else None
        for item in items:
            if isinstance(item, np.ndarray):
                yield item
            else:
                yield finish(
                    encode_pieces(item, enc.options, lambda texts: local.encode_joined(texts, dtype))
                )
        return
    methods = multiprocessing.get_all_start_methods()
    # fork starts in milliseconds and inherits the imports; spawn where there is no fork
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pending: collections.deque = collections.deque()
    with ProcessPoolExecutor(
        enc.workers,
        mp_context=context,
        initializer=tok.init_worker,
        initargs=(enc.tokenizer, DTYPES[enc.dtype]),
    ) as pool:
        try:
            for item in items:
                pending.append(
                    item if isinstance(item, np.ndarray) else pool.submit(encode_pieces, item, enc.options)
                )
                while len(pending) > PENDING_PER_WORKER * enc.workers:
                    yield _result(pending.popleft(), finish)
            while pending:
                yield _result(pending.popleft(), finish)
        finally:
            for future in pending:  # an error upstream: do not encode what nobody will write
                if not isinstance(future, np.ndarray):
                    future.cancel()


def _result(item, finish) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    try:
        return finish(item.result())
    except BrokenProcessPool:
        raise DataError("an encoding process died (out of memory? try fewer --workers)") from None


def token_array(path: Path, dtype_name: str) -> np.ndarray:
    """A token file's ids, memory-mapped: a .npy holds its own dtype and shape, a .bin is flat ids of `dtype_name`."""
    if path.name.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a NumPy .npy array ({exc})") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise DataError(
                f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                f"of shape {tokens.shape}"
            )
        return tokens
    dtype = np.dtype(dtype_name).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype_name} tokens")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def token_file_chunks(path: Path, enc: Encoding) -> Iterator[np.ndarray]:
    """An already-tokenized file (documents joined by EOS), checked id by id."""
    tokens = token_array(path, enc.token_dtype or enc.dtype)
    for start in range(0, tokens.size, COPY_TOKENS):
        chunk = np.array(tokens[start : start + COPY_TOKENS])  # a copy: the memmap closes when this ends
        if chunk.min() < 0 or chunk.max() >= enc.vocab_size:
            bad = int(chunk.min()) if chunk.min() < 0 else int(chunk.max())
            raise DataError(
                f"{path}: token id {bad} is outside this data dir's vocab of "
                f"{enc.vocab_size} (tokenized with another tokenizer, or another dtype?)"
            )
        yield chunk
