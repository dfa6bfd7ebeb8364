"""Where documents come from: the input arguments of `evertrain data prepare|append`, expanded and read.

Contract:
- `expand_inputs(args)` turns files, directories and globs into a list of `Input`s, in the order given
  (a directory or glob expands in sorted path order), each with its kind:
    .txt and any other file     text: the whole file is one document, or, with `--split-docs REGEX`,
                                the pieces between matches of REGEX (re.MULTILINE)
    .jsonl .jsonl.gz .jsonl.zst one document per record, its `--text-field` (default "text")
    .parquet                    one document per row, the same field (pyarrow)
    .arrow                      one document per row (an Arrow stream or file, as Hugging Face
                                `datasets` writes its cache and `save_to_disk` files)
    a dir with state.json       a Hugging Face `save_to_disk` dataset: its .arrow files in its order
    .bin .npy                   already-tokenized ids, documents joined by EOS (a .bin is flat ids of
                                a stated dtype; a .npy a 1-D integer array)
  A plain directory expands to the files of those kinds under it (hidden ones skipped).
- `documents(input, options, counts)` yields the input's documents as str, exactly as stored (no
  newline translation: a CRLF document keeps its "\\r\\n"). Empty documents are skipped and counted.
  A bad record (invalid JSON, not an object, field missing, null or not a string, text not UTF-8) is a
  `DataError` naming the file and line/row, or with `skip_bad` a count. A problem with a whole file
  (unreadable, the field is not a column, a column that is not text) is always an error.
- The same in two halves for encoding processes: `raw_pieces` (reading only) in the parent,
  `decode` where the documents are encoded, `account` (counts, the error) back in the parent, in order.
- `select_part(inputs, i, n)`: the i-th of n contiguous slices of the inputs, balanced by bytes, so
  that parts prepared on n machines and appended in order give the tokens of one whole prepare.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from evertrain.pretrain.data.stream import DataError

TEXT, JSONL, PARQUET, ARROW, TOKENS = "text", "jsonl", "parquet", "arrow", "tokens"
ROWS = "rows"  # a piece of a Parquet or Arrow input: a batch of its text column
# what a directory expands to
SUFFIXES = {
    ".jsonl": JSONL,
    ".jsonl.gz": JSONL,
    ".jsonl.zst": JSONL,
    ".parquet": PARQUET,
    ".arrow": ARROW,
    ".bin": TOKENS,
    ".npy": TOKENS,
    ".txt": TEXT,
}
HF_STATE, HF_DICT = "state.json", "dataset_dict.json"
ARROW_BATCH_ROWS = 1024  # rows read from a parquet file per step
JSONL_BLOCK_BYTES = 1 << 20  # JSONL is read in blocks of whole lines of about this size
# a JSONL line longer than this is refused (decoding it would take ~50x in memory)
MAX_RECORD_BYTES = 64 << 20


@dataclass(frozen=True)
class Input:
    path: Path
    kind: str
    size: int  # bytes on disk: for the progress bar, the tokenizer's sample stride and --part balance


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    split_docs: str | None = None  # a regex; text files hold many documents separated by its matches
    skip_bad: bool = False


@dataclass
class Counts:
    """What reading saw, for the summary line."""

    documents: int = 0
    empty: int = 0  # documents with no text, skipped
    bad: int = 0  # records skipped by --skip-bad
    first_bad: str = ""  # where the first skipped one was, and why

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents"]
        if self.empty:
            parts.append(f"{self.empty:,} empty skipped")
        if self.bad:
            parts.append(f"{self.bad:,} bad records skipped (first: {self.first_bad})")
        return ", ".join(parts)


def read_options(
    text_field: str = "text", split_docs: str | None = None, skip_bad: bool = False
) -> ReadOptions:
    if split_docs is not None:
        try:
            re.compile(split_docs, re.MULTILINE)
        except re.error as exc:
            raise DataError(f"--split-docs {split_docs!r}: not a regular expression ({exc})") from None
    if not text_field:
        raise DataError("--text-field: must not be empty")
    return ReadOptions(text_field, split_docs, skip_bad)


# ---------------------------------------------------------------------------------------------- expansion


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def expand_inputs(args: list[str | Path], flag: str) -> list[Input]:
    inputs: list[Input] = []
    for arg in args:
        path = Path(arg)
        if not path.exists() and glob.has_magic(str(arg)):
            matches = sorted(glob.glob(str(arg), recursive=True))
            if not matches:
                raise DataError(f"{flag} {arg}: no file matches")
            for match in matches:
                inputs += _expand_path(Path(match), flag, explicit=False)
        elif not path.exists():
            raise DataError(f"{flag} {path}: no such file or directory")
        else:
            inputs += _expand_path(path, flag, explicit=True)
    return inputs


def _expand_path(path: Path, flag: str, explicit: bool) -> list[Input]:
    if path.is_dir():
        if (path / HF_DICT).is_file():
            splits = json.loads((path / HF_DICT).read_text()).get("splits", [])
            raise DataError(
                f"{flag} {path}: a Hugging Face DatasetDict; give one split's directory "
                f"({', '.join(str(path / s) for s in splits) or path / 'train'})"
            )
        if (path / HF_STATE).is_file():
            return hf_dataset_files(path, flag)
        found = []
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() or kind_of(child) is not None:
                found += _expand_path(child, flag, explicit=False)
        if explicit and not found:
            raise DataError(
                f"{flag} {path}: no input files in this directory "
                f"(looked for {', '.join(SUFFIXES)} and Hugging Face dataset directories)"
            )
        return found
    if not path.is_file():
        raise DataError(f"{flag} {path}: not a file or directory")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{flag} {path}: file is empty")
    return [Input(path, kind_of(path) or TEXT, size)]


def hf_dataset_files(path: Path, flag: str) -> list[Input]:
    """The .arrow files of a `Dataset.save_to_disk` directory, in the order its state.json lists them."""
    try:
        files = [entry["filename"] for entry in json.loads((path / HF_STATE).read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{flag} {path / HF_STATE}: not a Hugging Face dataset state ({exc!r})") from None
    inputs = []
    for name in files:
        file = path / name
        if not file.is_file():
            raise DataError(f"{flag} {file}: listed in {path / HF_STATE} but missing")
        inputs.append(Input(file, ARROW, file.stat().st_size))
    return inputs


def parse_part(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N (i counts from 0, like SLURM_ARRAY_TASK_ID with --array=0-(N-1))."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise DataError(f"--part {text}: must be i/N with 0 <= i < N, e.g. 0/8")
    return int(match[1]), int(match[2])


def select_part(inputs: list[Input], index: int, parts: int) -> list[Input]:
    """Part `index` of `parts` contiguous slices, cut where the running byte count crosses k/parts of
    the total; every part gets at least one input."""
    if parts > len(inputs):
        raise DataError(
            f"--part {index}/{parts}: only {len(inputs)} input files; a part is whole files, "
            f"so use at most {len(inputs)} parts"
        )
    total = sum(i.size for i in inputs)
    cuts, running, k = [0], 0, 1
    for position, inp in enumerate(inputs):
        running += inp.size
        while k < parts and running * parts >= k * total:
            cuts.append(position + 1)
            k += 1
    cuts += [len(inputs)] * (parts + 1 - len(cuts))
    for k in range(1, parts):  # at least one file each: no cut before k files or after len - (parts - k)
        cuts[k] = min(max(cuts[k], cuts[k - 1] + 1), len(inputs) - (parts - k))
    return inputs[cuts[index] : cuts[index + 1]]


# ---------------------------------------------------------------------------------------------- reading
#
# Reading is split in two so that the process reading the inputs does as little as possible per
# byte: `raw_pieces` only reads (whole text files as bytes, JSONL as blocks of whole lines, Parquet
# and Arrow as column batches), and `decode` (UTF-8, JSON, the field) runs where the documents are
# encoded, in the encoding processes. `account` then turns bad records into the error or the count,
# in input order, in the reading process.


@dataclass(frozen=True)
class Raw:
    """A piece of one input as read, not yet decoded into documents."""

    path: Path
    kind: str  # TEXT (data: the file's bytes), JSONL (bytes of whole lines), ROWS (a pyarrow string array)
    first: int  # number of the first line (JSONL, from 1) or row (ROWS, from 0)
    data: object
    size: int  # bytes, for batching


@dataclass
class Decoded:
    """The documents of one or more pieces: texts (non-empty), how many were empty, and the bad
    records in order as (where, why)."""

    texts: list[str]
    empty: int = 0
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def documents(inp: Input, options: ReadOptions, counts: Counts) -> Iterator[str]:
    """The input's documents in order (read and decoded in this process)."""
    for raw in raw_pieces(inp, options):
        decoded = decode([raw], options)
        account(decoded, len(decoded.texts), options, counts)
        yield from decoded.texts


def account(decoded: Decoded, n_documents: int, options: ReadOptions, counts: Counts) -> None:
    """Count what was decoded; the first bad record is an error unless options.skip_bad."""
    if decoded.bad:
        where, why = decoded.bad[0]
        if not options.skip_bad:
            raise DataError(f"{where}: {why} (--skip-bad skips such records)")
        counts.bad += len(decoded.bad)
        counts.first_bad = counts.first_bad or f"{where}: {why}"
    counts.documents += n_documents
    counts.empty += decoded.empty


def raw_pieces(inp: Input, options: ReadOptions) -> Iterator[Raw]:
    readers = {TEXT: _text_raw, JSONL: _jsonl_raw, PARQUET: _parquet_raw, ARROW: _arrow_raw}
    if inp.kind not in readers:
        raise DataError(f"{inp.path}: token files cannot be read as text")
    return readers[inp.kind](inp.path, options)


def decode(pieces: list[Raw], options: ReadOptions) -> Decoded:
    out = Decoded([])
    for raw in pieces:
        for where, text in _records(raw, options):
            if isinstance(text, BadRecord):
                out.bad.append((where, str(text)))
            elif text:
                out.texts.append(text)
            else:
                out.empty += 1
    return out


class BadRecord(str):
    """Why a record cannot be a document (a str subclass, so it crosses processes as text)."""


def _records(raw: Raw, options: ReadOptions) -> Iterator[tuple[str, str | BadRecord]]:
    field = options.text_field
    if raw.kind == TEXT:
        try:
            text = raw.data.decode("utf-8")  # bytes as stored: "\r\n" stays
        except UnicodeDecodeError as exc:  # the file is the record: --skip-bad skips it
            yield str(raw.path), BadRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            return
        if options.split_docs is None:
            yield str(raw.path), text
            return
        for number, piece in enumerate(re.split(options.split_docs, text, flags=re.MULTILINE)):
            yield f"{raw.path} document {number}", piece
    elif raw.kind == JSONL:
        for number, line in enumerate(raw.data.split(b"\n"), start=raw.first):
            if line.strip():  # blank lines (a trailing one, say) hold no record
                yield f"{raw.path}:{number}", _record_text(line, field)
    else:
        for number, text in enumerate(raw.data.to_pylist(), start=raw.first):
            yield f"{raw.path} row {number}", BadRecord(f"field '{field}' is null") if text is None else text


def _text_raw(path: Path, options: ReadOptions) -> Iterator[Raw]:
    data = path.read_bytes()
    yield Raw(path, TEXT, 0, data, len(data))


def _open_jsonl(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst needs the `zstandard` package (pip install 'evertrain[data]')"
            ) from None
        return ZstdFrames(path, zstandard.ZstdDecompressor())
    return open(path, "rb")


class ZstdFrames:
    """A .zst file's frames, decompressed one after another. zstandard's own stream reader ends
    quietly inside a cut frame (a truncated download would give half the documents); this reader
    raises EOFError there, as gzip does."""

    CHUNK = 1 << 18  # compressed bytes per decompress call

    def __init__(self, path: Path, decompressor):
        self._file = open(path, "rb")
        self._decompressor = decompressor
        self._frame = None  # the frame being decompressed; None between frames

    def read(self, size: int = -1) -> bytes:
        while True:
            chunk = self._file.read(self.CHUNK)
            if not chunk:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (truncated?)")
                return b""
            out = []
            while chunk:
                self._frame = self._frame or self._decompressor.decompressobj()
                out.append(self._frame.decompress(chunk))
                chunk = self._frame.unused_data if self._frame.eof else b""
                self._frame = None if self._frame.eof else self._frame
            if any(out):
                return b"".join(out)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonl_raw(path: Path, options: ReadOptions) -> Iterator[Raw]:
    """Blocks of about JSONL_BLOCK_BYTES that end after a newline, with the number of their first line."""
    line = 1
    rest = b""
    try:
        with _open_jsonl(path) as f:
            while True:
                block = f.read(JSONL_BLOCK_BYTES)
                if not block:
                    break
                block = rest + block
                end = block.rfind(b"\n") + 1
                rest = block[end:]
                if len(rest) > MAX_RECORD_BYTES:
                    number = line + block.count(b"\n", 0, end)
                    raise DataError(
                        f"{path}:{number}: a record of more than {MAX_RECORD_BYTES:,} bytes (no "
                        "newline that long): too large a document to encode in memory, or not JSONL; "
                        "split it"
                    )
                if end:
                    yield Raw(path, JSONL, line, block[:end], end)
                    line += block.count(b"\n", 0, end)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise DataError(f"{path}: cannot read it (zstd: {exc})") from None
        raise
    if rest:  # a last line without a newline
        yield Raw(path, JSONL, line, rest, len(rest))


def _record_text(line: bytes, field: str) -> str | BadRecord:
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return BadRecord("not UTF-8")
    except json.JSONDecodeError as exc:
        return BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return BadRecord(f"a JSON {type(record).__name__}, not an object")
    if field not in record:
        keys = ", ".join(list(record)[:8])
        return BadRecord(f"no field '{field}' (it has: {keys}; choose one with --text-field)")
    text = record[field]
    if not isinstance(text, str):
        return BadRecord(
            f"field '{field}' is {'null' if text is None else type(text).__name__}, not a string"
        )
    return text


def _pyarrow(path: Path):
    try:
        import pyarrow
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet/Arrow needs the `pyarrow` package (pip install 'evertrain[data]')"
        ) from None
    return pyarrow


def _text_column(path: Path, schema, field: str) -> None:
    pa = _pyarrow(path)
    if field not in schema.names:
        raise DataError(
            f"{path}: no column '{field}' (it has: {', '.join(schema.names[:8])}; "
            "choose one with --text-field)"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column '{field}' is {kind}, not text")


def _column_pieces(path: Path, batches, field: str) -> Iterator[Raw]:
    row = 0
    for batch in batches:
        column = batch.column(field)
        yield Raw(path, ROWS, row, column, column.nbytes)
        row += len(column)


def _parquet_raw(path: Path, options: ReadOptions) -> Iterator[Raw]:
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        _text_column(path, parquet.schema_arrow, options.text_field)
        yield from _column_pieces(
            path,
            parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[options.text_field]),
            options.text_field,
        )
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _arrow_raw(path: Path, options: ReadOptions) -> Iterator[Raw]:
    pa = _pyarrow(path)
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)  # what `datasets` writes
            batches = iter(reader)
        except pa.ArrowInvalid:  # the random-access file format
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _text_column(path, reader.schema, options.text_field)
        yield from _column_pieces(path, batches, options.text_field)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow file ({exc})") from None
