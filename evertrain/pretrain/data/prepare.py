"""Making and growing data dirs: tokenizer training, parallel encoding, shard writing, prepare, append.

    prepare: inputs (text, JSONL, Parquet, HF datasets: sources.py) -> a sentencepiece BPE tokenizer
             trained on them, or a given .model / tokenizer.json -> token shards + manifest.json (version 1);
             already-tokenized .bin/.npy inputs with the tokenizer that made them
    append:  inputs (the data dir's tokenizer) or token files -> new shards at the end, version + 1

Each document is encoded whole (tokenizer.py) and followed by EOS. This process only reads (raw
pieces: file bytes, blocks of JSONL lines, column batches) and writes; decoding the records and
encoding them runs in `workers` processes, results taken back in submission order, so the bytes
written, and the first bad record reported, are the same for any worker count. `--part i/N` prepares the i-th of N contiguous slices of the inputs
(sources.select_part); appending the parts' shards in order gives the tokens of one whole prepare.

Both are deterministic (same input -> same bytes) and never damage what is already there: prepare
builds the data dir under a temp name and renames it into place; append stages its shards, moves
them in, and only then replaces manifest.json, under a file lock so concurrent appends queue up.

Every version's history entry records the sha256 of each input file it took ("inputs"), so append
refuses a file whose bytes the data dir already holds (an input taken before, or one of its own shards)
unless allow_duplicate. Manifests written before this record load as they are; their old inputs are
then known only through their shards.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from filelock import FileLock, Timeout
from tqdm import tqdm

from evertrain.files import atomic_write_json
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
    documents,
    expand_inputs,
    parse_part,
    raw_pieces,
    select_part,
)
from evertrain.pretrain.data.stream import (
    DEFAULT_SOURCE,
    DTYPES,
    MANIFEST,
    SPLITS,
    DataError,
    Manifest,
    Shard,
    check_extends,
    load_manifest,
    shard_name,
)
from evertrain.pretrain.run.lease import Lease, LeaseError, lease_if_shared

TOKENIZER_FILE = tok.FILE_NAMES[tok.SENTENCEPIECE]  # a trained tokenizer's name in the data dir
LOCK_FILE = ".lock"
LEASE_POLL_S = 10.0  # how often a waiting append looks at another host's lease
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16: big enough for a good within-shard shuffle
TOKENIZER_SAMPLE_BYTES = 1 << 30  # the tokenizer trains on an even sample of at most this much text
SENTENCE_CHARS = 1 << 14  # training text is fed as paragraphs, split further when longer than this
ENCODE_BATCH_BYTES = 1 << 20  # input handed to one encoding process per task (whole documents)
PENDING_PER_WORKER = 3  # tasks in flight per process: enough to keep it busy, bounded memory
COPY_TOKENS = 1 << 22  # tokens read per step when importing a token file
TOKEN_FILE_DTYPES = ("uint16", "uint32", "int32", "int64")  # what a .bin input may hold (little-endian)


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs with their newlines, cut at SENTENCE_CHARS (sentencepiece skips
    longer sentences)."""
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > SENTENCE_CHARS:  # one long line (a document without newlines, say)
            if current:
                yield "".join(current)
                current, size = [], 0
            yield line[:SENTENCE_CHARS]
            line = line[SENTENCE_CHARS:]
        current.append(line)
        size += len(line)
        if not line.strip() or size >= SENTENCE_CHARS:
            yield "".join(current)
            current, size = [], 0
    if current:
        yield "".join(current)


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(inputs: list[Input], vocab_size: int, sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
                    options: ReadOptions = ReadOptions()) -> bytes:
    """A byte-fallback BPE model (serialized) trained on the documents' paragraphs; the same bytes every time.

    Text is kept as is (identity normalization, no whitespace collapsing, no dummy prefix) and "\\n" is
    a piece of its own, so decode(encode(text)) == text and verse keeps its lines. One thread:
    sentencepiece's multi-threaded trainer breaks ties differently from run to run."""
    stride = max(1, -(-sum(i.size for i in inputs) // sample_bytes))
    read = Counts()
    every = (p for i in inputs for doc in documents(i, options, read) for p in paragraphs(doc))
    sample = (p for i, p in enumerate(every) if i % stride == 0)
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
        if not read.documents:  # sentencepiece would say "[!sentences_.empty()]"
            raise DataError(f"--input: no text to train the tokenizer on (read {read.summary()})") from None
        reason = str(exc).strip().splitlines()[-1].split("] ", 1)[-1]  # drop "INTERNAL: file.cc(638) [check]"
        raise DataError(f"--vocab-size {vocab_size}: sentencepiece refused it: {reason}") from None
    return model.getvalue()


# ---------------------------------------------------------------------------------------------- encoding

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
                yield finish(encode_pieces(item, enc.options, lambda texts: local.encode_joined(texts, dtype)))
        return
    methods = multiprocessing.get_all_start_methods()
    # fork starts in milliseconds and inherits the imports; spawn where there is no fork
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pending: collections.deque = collections.deque()
    with ProcessPoolExecutor(enc.workers, mp_context=context, initializer=tok.init_worker,
                             initargs=(enc.tokenizer, DTYPES[enc.dtype])) as pool:
        try:
            for item in items:
                pending.append(item if isinstance(item, np.ndarray) else
                               pool.submit(encode_pieces, item, enc.options))
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
            raise DataError(f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                            f"of shape {tokens.shape}")
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
        chunk = np.array(tokens[start:start + COPY_TOKENS])  # a copy: the memmap closes when this ends
        if chunk.min() < 0 or chunk.max() >= enc.vocab_size:
            bad = int(chunk.min()) if chunk.min() < 0 else int(chunk.max())
            raise DataError(f"{path}: token id {bad} is outside this data dir's vocab of "
                            f"{enc.vocab_size} (tokenized with another tokenizer, or another dtype?)")
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
            data = np.ascontiguousarray(tokens[:self.shard_tokens - self.filled], dtype=self.dtype)
            self.file.write(data)  # the array's own buffer: no copy to bytes
            self.digest.update(data)
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


def write_split(inputs: list[Input], enc: Encoding, directory: Path, split: str, first_index: int,
                source: str, counts: Counts) -> list[Shard]:
    writer = ShardWriter(directory, split, first_index, enc.shard_tokens, enc.dtype, source)
    with tqdm(total=sum(i.size for i in inputs), unit="B", unit_scale=True, desc=f"encoding {split}",
              disable=None, file=sys.stderr) as bar:
        try:
            for tokens in encoded(work_items(inputs, enc, bar), enc, counts):
                writer.write(tokens)
        finally:
            shards = writer.close()
    return shards


def write_manifest(manifest: Manifest, directory: Path) -> None:
    """manifest.json replaced atomically: readers see the old or the new one, never a mix."""
    atomic_write_json(directory / MANIFEST, manifest.to_json(), indent=1)


# ---------------------------------------------------------------------------------------------- commands

def read_options(text_field: str = "text", split_docs: str | None = None, skip_bad: bool = False) -> ReadOptions:
    if split_docs is not None:
        try:
            re.compile(split_docs, re.MULTILINE)
        except re.error as exc:
            raise DataError(f"--split-docs {split_docs!r}: not a regular expression ({exc})") from None
    if not text_field:
        raise DataError("--text-field: must not be empty")
    return ReadOptions(text_field, split_docs, skip_bad)


def prepare(inputs: Iterable[str | Path], out: str | Path, vocab_size: int | None = None, *,
            val: Iterable[str | Path] = (), tokenizer: str | Path | None = None, workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, source: str = DEFAULT_SOURCE, text_field: str = "text",
            split_docs: str | None = None, skip_bad: bool = False, part: str | None = None,
            token_dtype: str | None = None, eos_id: int | None = None, counts: Counts | None = None) -> Manifest:
    """Make data dir `out` from inputs (sources.py): train (or reuse) the tokenizer, encode, write shards.
    Already-tokenized inputs (.bin of `token_dtype`, .npy) need the `tokenizer` that made them; `eos_id`
    (default: the tokenizer's) is the id that ends each document in them, and in what is encoded.
    With `part` "i/N": only the i-th of N slices of the train inputs (val only in part 0), with a given
    tokenizer. `counts`, when given, receives what was read (documents, empty, skipped)."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise DataError(f"--out {out}: already a data dir; add to it with `evertrain data append --data {out} FILES`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty directory")
    check_positive(workers=workers, shard_tokens=shard_tokens)
    options = read_options(text_field, split_docs, skip_bad)
    files = {"train": expand_inputs(list(inputs), "--input"), "val": expand_inputs(list(val), "--val")}
    if not files["train"]:
        raise DataError("--input: no input files given")
    check_token_inputs(files, tokenizer, token_dtype)
    if part is not None:
        index, parts = parse_part(part)
        if tokenizer is None:
            raise DataError(f"--part {part}: needs --tokenizer (every part must encode with the same model)")
        files = {"train": select_part(files["train"], index, parts), "val": files["val"] if index == 0 else []}
    if tokenizer is not None:
        spec = read_tokenizer_spec(tokenizer, "--tokenizer")
    elif vocab_size is None:
        raise DataError("--vocab-size: required unless --tokenizer reuses a model")
    else:
        spec = tok.spec_from_bytes(train_tokenizer(files["train"], vocab_size, options=options), "the trained tokenizer")
    vocab = tok.Tokenizer(spec).vocab_size
    if vocab_size is not None and vocab_size != vocab:
        raise DataError(f"--vocab-size {vocab_size}: --tokenizer {tokenizer} has {vocab} pieces")
    if eos_id is not None:
        if not 0 <= eos_id < vocab:
            raise DataError(f"--eos-id {eos_id}: not an id of the tokenizer's {vocab}-piece vocabulary")
        spec = dataclasses.replace(spec, eos_id=eos_id)

    counts = Counts() if counts is None else counts
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        staging.mkdir()
        tokenizer_file = tok.FILE_NAMES[spec.kind]
        (staging / tokenizer_file).write_bytes(spec.model)
        enc = Encoding(spec, vocab, dtype_for(vocab), workers, shard_tokens, options, token_dtype)
        shards = {split: write_split(files[split], enc, staging, split, 0, source, counts) for split in SPLITS}
        if not shards["train"]:
            raise DataError(f"--input: no documents in the inputs ({counts.summary()}); nothing was written to {out}")
        manifest = Manifest(
            out, version=1, tokenizer={"path": tokenizer_file, "sha256": hashlib.sha256(spec.model).hexdigest()},
            vocab_size=vocab, eos_id=spec.eos_id, bos_id=spec.bos_id, dtype=enc.dtype,
            train=tuple(shards["train"]), val=tuple(shards["val"]), weights={source: 1.0},
            history=({"version": 1, "train": len(shards["train"]), "val": len(shards["val"]),
                      "inputs": input_records(files)},))
        write_manifest(manifest, staging)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(staging, out)
    except OSError as exc:  # a full disk, a quota: one line; the staging dir goes, `out` was never made
        raise DataError(f"{exc.filename or out}: {exc.strerror or exc}; nothing was written to {out}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def check_token_inputs(files: dict[str, list[Input]], tokenizer, token_dtype: str | None) -> None:
    """Token files come with the tokenizer that made their ids (the data dir keeps it, to encode what is
    appended later), and a .bin with its dtype: flat bytes do not say whether they are 16 or 32 bits."""
    if token_dtype is not None and token_dtype not in TOKEN_FILE_DTYPES:
        raise DataError(f"--token-dtype {token_dtype}: must be one of {', '.join(TOKEN_FILE_DTYPES)}")
    for inp in files["train"] + files["val"]:
        if inp.kind != TOKENS:
            continue
        if tokenizer is None:
            raise DataError(f"{inp.path}: already-tokenized ids need --tokenizer, the tokenizer that made them "
                            "(the data dir keeps it); text inputs train one with --vocab-size")
        if inp.path.name.endswith(".bin") and token_dtype is None:
            raise DataError(f"{inp.path}: say the dtype of its ids with --token-dtype "
                            f"({'|'.join(TOKEN_FILE_DTYPES)}); a .npy carries its own")


def read_tokenizer_spec(path: str | Path, flag: str) -> tok.TokenizerSpec:
    try:
        return tok.read_spec(path, flag)
    except tok.TokenizerError as exc:
        raise DataError(str(exc)) from None


def append(data_dir: str | Path, inputs: Iterable[str | Path] = (), *, val: Iterable[str | Path] = (),
           tokenizer: str | Path | None = None, workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS,
           source: str = DEFAULT_SOURCE, weight: float | None = None, text_field: str = "text",
           split_docs: str | None = None, skip_bad: bool = False, allow_duplicate: bool = False,
           token_dtype: str | None = None, counts: Counts | None = None) -> Manifest:
    """Add shards made from `inputs` (train) and `val` at the end of data dir's splits; version + 1.
    A .bin input holds ids of `token_dtype` (default: the data dir's dtype, as its own shards).
    An input whose bytes the data dir already holds is refused unless `allow_duplicate`."""
    data_dir = Path(data_dir)
    check_positive(workers=workers, shard_tokens=shard_tokens)
    options = read_options(text_field, split_docs, skip_bad)
    if token_dtype is not None and token_dtype not in TOKEN_FILE_DTYPES:
        raise DataError(f"--token-dtype {token_dtype}: must be one of {', '.join(TOKEN_FILE_DTYPES)}")
    files = {"train": expand_inputs(list(inputs), "FILES"), "val": expand_inputs(list(val), "--val")}
    if not files["train"] and not files["val"]:
        raise DataError("nothing to append: give FILES and/or --val FILES")
    load_manifest(data_dir)  # a missing data dir is reported before any lock file is made
    counts = Counts() if counts is None else counts
    with data_dir_lock(data_dir):
        manifest = load_manifest(data_dir)
        tokenizer_path = data_dir / manifest.tokenizer["path"]
        if not tokenizer_path.is_file():
            raise DataError(f"{tokenizer_path}: the data dir's tokenizer is missing")
        model = tokenizer_path.read_bytes()
        if hashlib.sha256(model).hexdigest() != manifest.tokenizer["sha256"]:
            raise DataError(f"{tokenizer_path}: differs from the tokenizer {MANIFEST} was made with (sha256 mismatch)")
        if tokenizer is not None:
            try:
                given = tok.tokenizer_file(tokenizer, "--tokenizer")
            except tok.TokenizerError as exc:
                raise DataError(str(exc)) from None
            if hashlib.sha256(given.read_bytes()).hexdigest() != manifest.tokenizer["sha256"]:
                raise DataError(f"--tokenizer {tokenizer}: not the tokenizer of {data_dir} (sha256 differs); "
                                "a data dir keeps one tokenizer")
        for inp in files["train"] + files["val"]:
            check_token_file_origin(inp, manifest)
        records = input_records(files)  # under the lock: the history read is the one we extend
        if not allow_duplicate:
            check_duplicates(records, manifest)
        weights = weights_after(manifest, source, weight)
        has_text = any(inp.kind != TOKENS for split in SPLITS for inp in files[split])
        # the manifest's EOS, not one looked up again: every document of the data dir ends with the same id
        spec = tok.TokenizerSpec(tok.kind_of(model), model, manifest.eos_id, manifest.bos_id) if has_text else None
        enc = Encoding(spec, manifest.vocab_size, manifest.dtype, workers, shard_tokens, options, token_dtype)
        for stale in data_dir.glob(".append-*"):  # left by a killed append; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = data_dir / f".append-{os.getpid()}"
        moved: list[Path] = []  # shards no manifest names yet
        try:
            staging.mkdir()
            added = {split: write_split(files[split], enc, staging, split, len(manifest.shards(split)), source, counts)
                     for split in SPLITS}
            if not added["train"] and not added["val"]:  # all blank: a new version of nothing says nothing
                raise DataError(f"nothing to append: no documents in the inputs ({counts.summary()}); {data_dir} "
                                f"is unchanged (still version {manifest.version})")
            version = manifest.version + 1
            counts_after = {split: len(manifest.shards(split)) + len(added[split]) for split in SPLITS}
            grown = dataclasses.replace(
                manifest, version=version, weights=weights,
                history=manifest.history + ({"version": version, **counts_after, "inputs": records},),
                train=manifest.train + tuple(added["train"]), val=manifest.val + tuple(added["val"]))
            check_extends(manifest, grown)
            for shard in added["train"] + added["val"]:  # not listed yet: invisible until the manifest names them
                os.replace(staging / shard.file, data_dir / shard.file)
                moved.append(data_dir / shard.file)
            write_manifest(grown, data_dir)
        except OSError as exc:  # a full disk: one line; the manifest (replaced atomically) is still the old one
            for path in moved:  # we hold the lock: nobody else wrote them
                path.unlink(missing_ok=True)
            raise DataError(f"{exc.filename or data_dir}: {exc.strerror or exc}; {data_dir} is unchanged "
                            f"(still version {manifest.version})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return grown


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def input_records(files: dict[str, list[Input]]) -> list[dict]:
    """What a history entry keeps of its inputs: split, path as given, sha256 of the file's bytes."""
    return [{"split": split, "path": str(inp.path), "sha256": file_sha256(inp.path)}
            for split in SPLITS for inp in files[split]]


def check_duplicates(records: list[dict], manifest: Manifest) -> None:
    """Refuse an input whose bytes the data dir already took: an input recorded in its history, one of its
    own shards (a .bin appended twice is both), or the same file twice in this append. Training on it
    twice would silently weight it double, and a train file in val would leak."""
    taken: dict[str, str] = {}  # sha256 -> the earlier version that took it, for the message
    for entry in manifest.history:
        for record in entry.get("inputs", ()):  # absent in manifests written before inputs were recorded
            taken.setdefault(record["sha256"], f"input {record['path']} of version {entry['version']}")
    for split in SPLITS:
        for index, shard in enumerate(manifest.shards(split)):
            # the first version whose history counts include this shard is the one that added it
            version = next((e["version"] for e in manifest.history if e[split] > index), manifest.version)
            taken.setdefault(shard.sha256, f"its {split} shard {shard.file} (version {version})")
    for record in records:
        earlier = taken.get(record["sha256"])
        if earlier is not None:
            raise DataError(f"{record['path']}: {manifest.data_dir} already holds these bytes as {earlier} "
                            "(same sha256); pass --allow-duplicate to add them again")
        taken[record["sha256"]] = f"{record['path']}, earlier in this append"


def check_token_file_origin(inp: Input, manifest: Manifest) -> None:
    """A token file that is a shard of another data dir (a --part, say) must come from the same tokenizer:
    ids of another vocabulary would pass the range check and be silently wrong."""
    origin = inp.path.parent / MANIFEST
    if inp.kind != TOKENS or not origin.is_file():
        return
    other = load_manifest(inp.path.parent)
    if other.tokenizer["sha256"] != manifest.tokenizer["sha256"] or other.dtype != manifest.dtype:
        raise DataError(f"{inp.path}: a shard of {inp.path.parent}, which was made with another tokenizer "
                        f"or dtype than {manifest.data_dir} (tokenizer sha256 or dtype differs)")


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
    sharing the file system where flock works; on a network filesystem also a lease, lease.py)."""
    lock = FileLock(data_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another append to {data_dir} to finish ...", file=sys.stderr)
        lock.acquire()
    try:
        lease = lease_when_free(data_dir / LOCK_FILE)
        try:
            yield
        finally:
            if lease is not None:
                lease.release()
    finally:
        lock.release()


def lease_when_free(lock_path: Path) -> Lease | None:
    """The lease beside the data dir's lock (None on a local disk), waiting while an append on
    another host holds it (its flock may be invisible from here)."""
    while True:
        try:
            return lease_if_shared(lock_path)
        except LeaseError as exc:
            print(f"waiting for another append to {lock_path.parent} to finish ({exc}) ...", file=sys.stderr)
            time.sleep(LEASE_POLL_S)
