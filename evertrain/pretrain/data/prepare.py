"""Making and growing data dirs: prepare and append, each input through bpe.py, encode.py, shards.py.

    prepare: inputs (text, JSONL, Parquet, HF datasets: sources.py) -> a sentencepiece BPE tokenizer
             trained on them, or a given .model / tokenizer.json -> token shards + manifest.json (version 1);
             already-tokenized .bin/.npy inputs with the tokenizer that made them
    append:  inputs (the data dir's tokenizer) or token files -> new shards at the end, version + 1

Each document is encoded whole (tokenizer.py) and followed by EOS. This process only reads (raw pieces:
file bytes, blocks of JSONL lines, column batches) and writes; decoding the records and encoding them
runs in `workers` processes, results taken back in submission order, so the bytes written, and the first
bad record reported, are the same for any worker count. `--part i/N` prepares the i-th of N contiguous
slices of the inputs (sources.select_part); appending the parts' shards in order gives the tokens of one
whole prepare.

Both are deterministic (same input -> same bytes) and never damage what is already there: prepare
builds the data dir under a temp name and renames it into place; append stages its shards, moves
them in, and only then replaces manifest.json, under a file lock so concurrent appends queue up.

Every version's history entry records the sha256 of each input file it took ("inputs"), so append
refuses a file whose bytes the data dir already holds (an input taken before, or one of its own shards)
unless allow_duplicate. Manifests written before this record load as they are; their old inputs are
then known only through their shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from evertrain.pretrain.data import tokenizer as tok
from evertrain.pretrain.data.bpe import train_tokenizer
from evertrain.pretrain.data.encode import TOKEN_FILE_DTYPES, Encoding, dtype_for
from evertrain.pretrain.data.shards import write_manifest, write_split
from evertrain.pretrain.data.sources import (
    TOKENS,
    Counts,
    Input,
    expand_inputs,
    parse_part,
    read_options,
    select_part,
)
from evertrain.pretrain.data.stream import (
    DEFAULT_SOURCE,
    MANIFEST,
    SPLITS,
    DataError,
    Manifest,
    check_extends,
    load_manifest,
)
from evertrain.pretrain.run.lease import Lease, LeaseError, lease_if_shared

TOKENIZER_FILE = tok.FILE_NAMES[tok.SENTENCEPIECE]  # a trained tokenizer's name in the data dir
LOCK_FILE = ".lock"
LEASE_POLL_S = 10.0  # how often a waiting append looks at another host's lease
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16: big enough for a good within-shard shuffle


def prepare(
    inputs: Iterable[str | Path],
    out: str | Path,
    vocab_size: int | None = None,
    *,
    val: Iterable[str | Path] = (),
    tokenizer: str | Path | None = None,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = DEFAULT_SOURCE,
    text_field: str = "text",
    split_docs: str | None = None,
    skip_bad: bool = False,
    part: str | None = None,
    token_dtype: str | None = None,
    eos_id: int | None = None,
    counts: Counts | None = None,
) -> Manifest:
    """Make data dir `out` from inputs (sources.py): train (or reuse) the tokenizer, encode, write shards.
    With `part` "i/N": only the i-th of N slices of the train inputs (val only in part 0), with a given
    tokenizer. `counts`, when given, receives what was read (documents, empty, skipped).
    Already-tokenized inputs (.bin of `token_dtype`, .npy) need the `tokenizer` that made them; `eos_id`
    (default: the tokenizer's) is the id that ends each document in them, and in what is encoded."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise DataError(
            f"--out {out}: already a data dir; add to it with `evertrain data append --data {out} FILES`"
        )
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
        files = {
            "train": select_part(files["train"], index, parts),
            "val": files["val"] if index == 0 else [],
        }
    if tokenizer is not None:
        spec = read_tokenizer_spec(tokenizer, "--tokenizer")
    elif vocab_size is None:
        raise DataError("--vocab-size: required unless --tokenizer reuses a model")
    else:
        spec = tok.spec_from_bytes(
            train_tokenizer(files["train"], vocab_size, options=options), "the trained tokenizer"
        )
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
        shards = {
            split: write_split(files[split], enc, staging, split, 0, source, counts) for split in SPLITS
        }
        if not shards["train"]:
            raise DataError(
                f"--input: no documents in the inputs ({counts.summary()}); nothing was written to {out}"
            )
        manifest = Manifest(
            out,
            version=1,
            tokenizer={"path": tokenizer_file, "sha256": hashlib.sha256(spec.model).hexdigest()},
            vocab_size=vocab,
            eos_id=spec.eos_id,
            bos_id=spec.bos_id,
            dtype=enc.dtype,
            train=tuple(shards["train"]),
            val=tuple(shards["val"]),
            weights={source: 1.0},
            history=(
                {
                    "version": 1,
                    "train": len(shards["train"]),
                    "val": len(shards["val"]),
                    "inputs": input_records(files),
                },
            ),
        )
        write_manifest(manifest, staging)
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(staging, out)
    except OSError as exc:  # a full disk, a quota: one line; the staging dir goes, `out` was never made
        raise DataError(
            f"{exc.filename or out}: {exc.strerror or exc}; nothing was written to {out}"
        ) from None
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
            raise DataError(
                f"{inp.path}: already-tokenized ids need --tokenizer, the tokenizer that made them "
                "(the data dir keeps it); text inputs train one with --vocab-size"
            )
        if inp.path.name.endswith(".bin") and token_dtype is None:
            raise DataError(
                f"{inp.path}: say the dtype of its ids with --token-dtype "
                f"({'|'.join(TOKEN_FILE_DTYPES)}); a .npy carries its own"
            )


def read_tokenizer_spec(path: str | Path, flag: str) -> tok.TokenizerSpec:
    try:
        return tok.read_spec(path, flag)
    except tok.TokenizerError as exc:
        raise DataError(str(exc)) from None


def append(
    data_dir: str | Path,
    inputs: Iterable[str | Path] = (),
    *,
    val: Iterable[str | Path] = (),
    tokenizer: str | Path | None = None,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = DEFAULT_SOURCE,
    weight: float | None = None,
    text_field: str = "text",
    split_docs: str | None = None,
    skip_bad: bool = False,
    allow_duplicate: bool = False,
    token_dtype: str | None = None,
    counts: Counts | None = None,
) -> Manifest:
    """Add shards made from `inputs` (train) and `val` at the end of data dir's splits; version + 1.
    A .bin input holds ids of `token_dtype` (default: the data dir's dtype, as its own shards).
    An input whose bytes the data dir already holds is refused unless `allow_duplicate`."""
    data_dir = Path(data_dir)
    check_positive(workers=workers, shard_tokens=shard_tokens)
    if token_dtype is not None and token_dtype not in TOKEN_FILE_DTYPES:
        raise DataError(f"--token-dtype {token_dtype}: must be one of {', '.join(TOKEN_FILE_DTYPES)}")
    options = read_options(text_field, split_docs, skip_bad)
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
            raise DataError(
                f"{tokenizer_path}: differs from the tokenizer {MANIFEST} was made with (sha256 mismatch)"
            )
        if tokenizer is not None:
            try:
                given = tok.tokenizer_file(tokenizer, "--tokenizer")
            except tok.TokenizerError as exc:
                raise DataError(str(exc)) from None
            if hashlib.sha256(given.read_bytes()).hexdigest() != manifest.tokenizer["sha256"]:
                raise DataError(
                    f"--tokenizer {tokenizer}: not the tokenizer of {data_dir} (sha256 differs); "
                    "a data dir keeps one tokenizer"
                )
        for inp in files["train"] + files["val"]:
            check_token_file_origin(inp, manifest)
        records = input_records(files)  # under the lock: the history read is the one we extend
        if not allow_duplicate:
            check_duplicates(records, manifest)
        weights = weights_after(manifest, source, weight)
        has_text = any(inp.kind != TOKENS for split in SPLITS for inp in files[split])
        # the manifest's EOS, not one looked up again: every document of the data dir ends with the same id
        spec = (
            tok.TokenizerSpec(tok.kind_of(model), model, manifest.eos_id, manifest.bos_id)
            if has_text
            else None
        )
        enc = Encoding(spec, manifest.vocab_size, manifest.dtype, workers, shard_tokens, options, token_dtype)
        for stale in data_dir.glob(".append-*"):  # left by a killed append; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = data_dir / f".append-{os.getpid()}"
        moved: list[Path] = []  # shards no manifest names yet
        try:
            staging.mkdir()
            added = {
                split: write_split(
                    files[split], enc, staging, split, len(manifest.shards(split)), source, counts
                )
                for split in SPLITS
            }
            if not added["train"] and not added["val"]:  # all blank: a new version of nothing says nothing
                raise DataError(
                    f"nothing to append: no documents in the inputs ({counts.summary()}); {data_dir} "
                    f"is unchanged (still version {manifest.version})"
                )
            version = manifest.version + 1
            counts_after = {split: len(manifest.shards(split)) + len(added[split]) for split in SPLITS}
            grown = dataclasses.replace(
                manifest,
                version=version,
                weights=weights,
                history=manifest.history + ({"version": version, **counts_after, "inputs": records},),
                train=manifest.train + tuple(added["train"]),
                val=manifest.val + tuple(added["val"]),
            )
            check_extends(manifest, grown)
            for shard in (
                added["train"] + added["val"]
            ):  # not listed yet: invisible until the manifest names them
                os.replace(staging / shard.file, data_dir / shard.file)
                moved.append(data_dir / shard.file)
            write_manifest(grown, data_dir)
        except (
            OSError
        ) as exc:  # a full disk: one line; the manifest (replaced atomically) is still the old one
            for path in moved:  # we hold the lock: nobody else wrote them
                path.unlink(missing_ok=True)
            raise DataError(
                f"{exc.filename or data_dir}: {exc.strerror or exc}; {data_dir} is unchanged "
                f"(still version {manifest.version})"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return grown


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def input_records(files: dict[str, list[Input]]) -> list[dict]:
    """What a history entry keeps of its inputs: split, path as given, sha256 of the file's bytes."""
    return [
        {"split": split, "path": str(inp.path), "sha256": file_sha256(inp.path)}
        for split in SPLITS
        for inp in files[split]
    ]


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
            raise DataError(
                f"{record['path']}: {manifest.data_dir} already holds these bytes as {earlier} "
                "(same sha256); pass --allow-duplicate to add them again"
            )
        taken[record["sha256"]] = f"{record['path']}, earlier in this append"


def check_token_file_origin(inp: Input, manifest: Manifest) -> None:
    """A token file that is a shard of another data dir (a --part, say) must come from the same tokenizer:
    ids of another vocabulary would pass the range check and be silently wrong."""
    origin = inp.path.parent / MANIFEST
    if inp.kind != TOKENS or not origin.is_file():
        return
    other = load_manifest(inp.path.parent)
    if other.tokenizer["sha256"] != manifest.tokenizer["sha256"] or other.dtype != manifest.dtype:
        raise DataError(
            f"{inp.path}: a shard of {inp.path.parent}, which was made with another tokenizer "
            f"or dtype than {manifest.data_dir} (tokenizer sha256 or dtype differs)"
        )


def weights_after(manifest: Manifest, source: str, weight: float | None) -> dict[str, float]:
    """The manifest's weights with `source` added; a source already there keeps its weight."""
    weights = dict(manifest.weights)
    if source in weights or any(s.source == source for split in SPLITS for s in manifest.shards(split)):
        current = manifest.weight(source)
        if weight is not None and weight != current:
            raise DataError(
                f"--weight {weight}: source '{source}' already has weight {current}, and data already "
                "trained on cannot be reweighted (append under a new --source)"
            )
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
