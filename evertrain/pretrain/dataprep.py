"""Making and growing data dirs: tokenizer training, parallel encoding, shard writing, prepare, append.

    prepare: text files -> sentencepiece BPE tokenizer -> token shards + manifest.json (version 1)
    append:  text files (same tokenizer) or token shard files -> new shards at the end, version + 1

Both are deterministic (same input -> same bytes) and never damage what is already there: prepare
builds the data dir under a temp name and renames it into place; append stages its shards, moves
them in, and only then replaces manifest.json, under a file lock so concurrent appends queue up.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from filelock import FileLock, Timeout
from tqdm import tqdm

from evertrain.pretrain.data import (DEFAULT_SOURCE, DTYPES, MANIFEST, SPLITS, DataError, Manifest, Shard,
                                     check_extends, load_manifest, shard_name)

TOKENIZER_FILE = "tokenizer.model"
LOCK_FILE = ".lock"
TOKEN_FILE_SUFFIX = ".bin"  # an input with this suffix is already-tokenized (a shard of the data dir's dtype)
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16: big enough for a good within-shard shuffle
TOKENIZER_SAMPLE_BYTES = 1 << 30  # the tokenizer trains on an even sample of at most this much text
SENTENCE_CHARS = 1 << 14  # training text is fed as paragraphs, split further when longer than this
ENCODE_BLOCK_CHARS = 1 << 13  # text is encoded in blocks that end after a newline (always a token boundary)
ENCODE_BATCH_CHARS = 1 << 23  # blocks handed to sentencepiece's threads per call
COPY_TOKENS = 1 << 22  # tokens read per step when importing a token file


# ---------------------------------------------------------------------------------------------- inputs

def check_inputs(files: Iterable[str | Path], flag: str) -> list[Path]:
    """Existing, non-empty files, in the order given (it is the order of the stream)."""
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise DataError(f"{flag} {path}: no such file")
        if not path.is_file():
            raise DataError(f"{flag} {path}: not a file")
        if path.stat().st_size == 0:
            raise DataError(f"{flag} {path}: file is empty")
    return paths


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def text_blocks(path: Path, block_chars: int = ENCODE_BLOCK_CHARS) -> Iterator[str]:
    """The file's text in blocks of about block_chars that end right after a newline."""
    block, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                block.append(line)
                size += len(line)
                if size >= block_chars:
                    yield "".join(block)
                    block, size = [], 0
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if block:
        yield "".join(block)


def paragraphs(path: Path) -> Iterator[str]:
    """Blank-line separated paragraphs with their newlines, cut at SENTENCE_CHARS (sentencepiece skips
    longer sentences)."""
    current: list[str] = []
    size = 0
    for block in text_blocks(path):
        for line in block.splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if not line.strip() or size >= SENTENCE_CHARS:
                yield "".join(current)
                current, size = [], 0
    if current:
        yield "".join(current)


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(files: list[Path], vocab_size: int, sample_bytes: int = TOKENIZER_SAMPLE_BYTES) -> bytes:
    """A byte-fallback BPE model (serialized) trained on the files' paragraphs; the same bytes every time.

    Text is kept as is (identity normalization, no whitespace collapsing) and "\\n" is a piece of its
    own, so decode(encode(text)) == text and verse keeps its lines. One thread: sentencepiece's
    multi-threaded trainer breaks ties differently from run to run."""
    stride = max(1, -(-sum(f.stat().st_size for f in files) // sample_bytes))
    sample = (p for i, p in enumerate(p for f in files for p in paragraphs(f)) if i % stride == 0)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample, model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
            user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=4 * SENTENCE_CHARS,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split("] ", 1)[-1]  # drop "INTERNAL: file.cc(638) [check]"
        raise DataError(f"--vocab-size {vocab_size}: sentencepiece refused it: {reason}") from None
    return model.getvalue()


def load_tokenizer(model: bytes, name: str) -> spm.SentencePieceProcessor:
    try:
        tokenizer = spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
        raise DataError(f"{name}: not a sentencepiece model") from None
    if tokenizer.eos_id() < 0:
        raise DataError(f"{name}: the tokenizer has no EOS piece (documents are joined by EOS)")
    return tokenizer


def read_tokenizer(path: str | Path, flag: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file")
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class Encoding:
    """How files become a data dir's tokens: its tokenizer, vocab and dtype, threads and shard size."""
    tokenizer: spm.SentencePieceProcessor | None  # None when only token files are appended
    vocab_size: int
    dtype: str
    workers: int
    shard_tokens: int


def token_chunks(files: list[Path], enc: Encoding, desc: str) -> Iterator[np.ndarray]:
    """The files' tokens in order: text files encoded (each a document followed by EOS) in batches of
    blocks over sentencepiece's threads, token files (TOKEN_FILE_SUFFIX) checked and passed through."""
    blocks: list[str] = []  # text waiting to be encoded
    ends_document: list[bool] = []  # whether EOS follows each block
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=desc,
              disable=None, file=sys.stderr) as bar:
        def encode_pending() -> Iterator[np.ndarray]:
            if not blocks:
                return
            eos = enc.tokenizer.eos_id()
            ids = enc.tokenizer.encode(blocks, num_threads=enc.workers)
            with_eos = ((*piece, eos) if end else piece for piece, end in zip(ids, ends_document))
            yield np.fromiter(itertools.chain.from_iterable(with_eos), dtype=np.int64)
            bar.update(sum(len(block.encode("utf-8")) for block in blocks))
            blocks.clear()
            ends_document.clear()

        for path in files:
            if path.suffix == TOKEN_FILE_SUFFIX:
                yield from encode_pending()
                for tokens in token_file_chunks(path, enc):
                    yield tokens
                    bar.update(tokens.size * DTYPES[enc.dtype].itemsize)
                continue
            for block in text_blocks(path):
                if sum(map(len, blocks)) >= ENCODE_BATCH_CHARS:
                    yield from encode_pending()
                blocks.append(block)
                ends_document.append(False)
            ends_document[-1] = True  # the file's last block is still pending
        yield from encode_pending()


def token_file_chunks(path: Path, enc: Encoding) -> Iterator[np.ndarray]:
    """An already-tokenized file (the data dir's dtype, documents joined by EOS), checked id by id."""
    dtype = DTYPES[enc.dtype]
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {enc.dtype} tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    for start in range(0, tokens.size, COPY_TOKENS):
        chunk = np.asarray(tokens[start:start + COPY_TOKENS], dtype=np.int64)
        if chunk.max() >= enc.vocab_size:
            raise DataError(f"{path}: token id {int(chunk.max())} is outside this data dir's vocab of "
                            f"{enc.vocab_size} (tokenized with another tokenizer?)")
        yield chunk


class ShardWriter:
    """Cuts a stream of tokens into shard files of exactly shard_tokens tokens (the last one shorter),
    named by position, each with its sha256."""

    def __init__(self, directory: Path, split: str, first_index: int, shard_tokens: int, dtype: str, source: str):
        self.directory, self.split, self.index = directory, split, first_index
        self.shard_tokens, self.dtype, self.source = shard_tokens, DTYPES[dtype], source
        self.shards: list[Shard] = []
        self.file = None  # the shard being filled

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.file is None:
                self.file = open(self.directory / shard_name(self.split, self.index), "wb")
                self.filled, self.digest = 0, hashlib.sha256()
            data = tokens[:self.shard_tokens - self.filled].astype(self.dtype)
            self.file.write(data.tobytes())
            self.digest.update(data.tobytes())
            self.filled += data.size
            tokens = tokens[data.size:]
            if self.filled == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before any manifest names it
        self.file.close()
        self.shards.append(Shard(shard_name(self.split, self.index), self.filled, self.digest.hexdigest(), self.source))
        self.file, self.index = None, self.index + 1

    def close(self) -> list[Shard]:
        if self.file is not None:
            self._finish()
        return self.shards


def write_split(files: list[Path], enc: Encoding, directory: Path, split: str, first_index: int,
                source: str) -> list[Shard]:
    writer = ShardWriter(directory, split, first_index, enc.shard_tokens, enc.dtype, source)
    try:
        for tokens in token_chunks(files, enc, desc=f"encoding {split}"):
            writer.write(tokens)
    finally:
        shards = writer.close()
    return shards


def write_manifest(manifest: Manifest, directory: Path) -> None:
    """manifest.json replaced atomically: readers see the old or the new one, never a mix."""
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest.to_json(), indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


# ---------------------------------------------------------------------------------------------- commands

def prepare(inputs: Iterable[str | Path], out: str | Path, vocab_size: int | None = None, *,
            val: Iterable[str | Path] = (), tokenizer: str | Path | None = None, workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, source: str = DEFAULT_SOURCE) -> Manifest:
    """Make data dir `out` from text files: train (or reuse) the tokenizer, encode, write shards."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise DataError(f"--out {out}: already a data dir; add to it with `evertrain data append --data {out} FILES`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty directory")
    check_positive(workers=workers, shard_tokens=shard_tokens)
    files = {"train": check_inputs(inputs, "--input"), "val": check_inputs(val, "--val")}
    if not files["train"]:
        raise DataError("--input: no input files given")
    for path in files["train"] + files["val"]:
        if path.suffix == TOKEN_FILE_SUFFIX:
            raise DataError(f"{path}: prepare reads text; add token files with `evertrain data append`")
    if tokenizer is not None:
        model = read_tokenizer(tokenizer, "--tokenizer")
    elif vocab_size is None:
        raise DataError("--vocab-size: required unless --tokenizer reuses a model")
    else:
        model = train_tokenizer(files["train"], vocab_size)
    sp = load_tokenizer(model, str(tokenizer or "the trained tokenizer"))
    if vocab_size is not None and vocab_size != sp.vocab_size():
        raise DataError(f"--vocab-size {vocab_size}: --tokenizer {tokenizer} has {sp.vocab_size()} pieces")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        staging.mkdir()
        (staging / TOKENIZER_FILE).write_bytes(model)
        enc = Encoding(sp, sp.vocab_size(), token_dtype(sp.vocab_size()), workers, shard_tokens)
        shards = {split: write_split(files[split], enc, staging, split, 0, source) for split in SPLITS}
        manifest = Manifest(
            out, version=1, tokenizer={"path": TOKENIZER_FILE, "sha256": hashlib.sha256(model).hexdigest()},
            vocab_size=sp.vocab_size(), eos_id=sp.eos_id(), bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
            dtype=enc.dtype, train=tuple(shards["train"]), val=tuple(shards["val"]),
            weights={source: 1.0}, history=({"version": 1, "train": len(shards["train"]), "val": len(shards["val"])},))
        write_manifest(manifest, staging)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def append(data_dir: str | Path, inputs: Iterable[str | Path] = (), *, val: Iterable[str | Path] = (),
           tokenizer: str | Path | None = None, workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
           source: str = DEFAULT_SOURCE, weight: float | None = None) -> Manifest:
    """Add shards made from `inputs` (train) and `val` at the end of data dir's splits; version + 1."""
    data_dir = Path(data_dir)
    check_positive(workers=workers, shard_tokens=shard_tokens)
    files = {"train": check_inputs(inputs, "FILES"), "val": check_inputs(val, "--val")}
    if not files["train"] and not files["val"]:
        raise DataError("nothing to append: give FILES and/or --val FILES")
    load_manifest(data_dir)  # a missing data dir is reported before any lock file is made
    with data_dir_lock(data_dir):
        manifest = load_manifest(data_dir)
        model = read_tokenizer(data_dir / manifest.tokenizer["path"], "tokenizer")
        if hashlib.sha256(model).hexdigest() != manifest.tokenizer["sha256"]:
            raise DataError(f"{data_dir / manifest.tokenizer['path']}: differs from the tokenizer "
                            f"{MANIFEST} was made with (sha256 mismatch)")
        if tokenizer is not None and hashlib.sha256(read_tokenizer(tokenizer, "--tokenizer")).hexdigest() \
                != manifest.tokenizer["sha256"]:
            raise DataError(f"--tokenizer {tokenizer}: not the tokenizer of {data_dir} (sha256 differs); "
                            "a data dir keeps one tokenizer")
        weights = weights_after(manifest, source, weight)
        has_text = any(p.suffix != TOKEN_FILE_SUFFIX for split in SPLITS for p in files[split])
        sp = load_tokenizer(model, str(data_dir / manifest.tokenizer["path"])) if has_text else None
        enc = Encoding(sp, manifest.vocab_size, manifest.dtype, workers, shard_tokens)
        for stale in data_dir.glob(".append-*"):  # left by a killed append; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = data_dir / f".append-{os.getpid()}"
        try:
            staging.mkdir()
            added = {split: write_split(files[split], enc, staging, split, len(manifest.shards(split)), source)
                     for split in SPLITS}
            version = manifest.version + 1
            counts = {split: len(manifest.shards(split)) + len(added[split]) for split in SPLITS}
            grown = dataclasses.replace(
                manifest, version=version, weights=weights, history=manifest.history + ({"version": version, **counts},),
                train=manifest.train + tuple(added["train"]), val=manifest.val + tuple(added["val"]))
            check_extends(manifest, grown)
            for shard in added["train"] + added["val"]:  # not listed yet: invisible until the manifest names them
                os.replace(staging / shard.file, data_dir / shard.file)
            write_manifest(grown, data_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return grown


def weights_after(manifest: Manifest, source: str, weight: float | None) -> dict[str, float]:
    """The manifest's weights with `source` added; a source already there keeps its weight."""
    weights = dict(manifest.weights)
    if source in weights or any(s.source == source for split in SPLITS for s in manifest.shards(split)):
        current = manifest.weight(source)
        if weight is not None and weight != current:
            raise DataError(f"--weight {weight}: source '{source}' already has weight {current}, and data already "
                            "trained on cannot be reweighted (append under a new --source)")
        weights[source] = current
    else:
        if weight is not None and not (math.isfinite(weight) and weight >= 0):
            raise DataError(f"--weight {weight}: must be a finite number >= 0")
        weights[source] = 1.0 if weight is None else float(weight)
    return weights


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise DataError(f"--{name.replace('_', '-')} {value}: must be > 0")


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One writer at a time per data dir (a lock file, so it holds across processes and machines
    sharing the file system where flock works)."""
    lock = FileLock(data_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another append to {data_dir} to finish ...", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
