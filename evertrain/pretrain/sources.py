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
    .bin                        already-tokenized ids (only `append` takes them)
  A plain directory expands to the files of those kinds under it (hidden ones skipped).
- `documents(input, options, counts)` yields the input's documents as str, exactly as stored (no
  newline translation: a CRLF document keeps its "\\r\\n"). Empty documents are skipped and counted.
  A bad record (invalid JSON, not an object, field missing, null or not a string, text not UTF-8) is a
  `DataError` naming the file and line/row, or with `skip_bad` a count. A problem with a whole file
  (unreadable, the field is not a column, a column that is not text) is always an error.
- `select_part(inputs, i, n)`: the i-th of n contiguous slices of the inputs, balanced by bytes, so
  that parts prepared on n machines and appended in order give the tokens of one whole prepare.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from evertrain.pretrain.data import DataError

TEXT, JSONL, PARQUET, ARROW, TOKENS = "text", "jsonl", "parquet", "arrow", "tokens"
SUFFIXES = {".jsonl": JSONL, ".jsonl.gz": JSONL, ".jsonl.zst": JSONL, ".parquet": PARQUET,
            ".arrow": ARROW, ".bin": TOKENS, ".txt": TEXT}  # what a directory expands to
HF_STATE, HF_DICT = "state.json", "dataset_dict.json"
ARROW_BATCH_ROWS = 1024  # rows read from a parquet file per step


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
            raise DataError(f"{flag} {path}: a Hugging Face DatasetDict; give one split's directory "
                            f"({', '.join(str(path / s) for s in splits) or path / 'train'})")
        if (path / HF_STATE).is_file():
            return hf_dataset_files(path, flag)
        found = []
        for child in sorted(path.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() or kind_of(child) is not None:
                found += _expand_path(child, flag, explicit=False)
        if explicit and not found:
            raise DataError(f"{flag} {path}: no input files in this directory "
                            f"(looked for {', '.join(SUFFIXES)} and Hugging Face dataset directories)")
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
        raise DataError(f"--part {index}/{parts}: only {len(inputs)} input files; a part is whole files, "
                        f"so use at most {len(inputs)} parts")
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
    return inputs[cuts[index]:cuts[index + 1]]


# ---------------------------------------------------------------------------------------------- reading

class BadRecord(Exception):
    """One record that cannot be a document; `documents` turns it into a DataError or a count."""


def documents(inp: Input, options: ReadOptions, counts: Counts) -> Iterator[str]:
    readers = {TEXT: _text_documents, JSONL: _jsonl_documents, PARQUET: _parquet_documents,
               ARROW: _arrow_documents}
    if inp.kind not in readers:
        raise DataError(f"{inp.path}: token files cannot be read as text")
    for where, text in readers[inp.kind](inp.path, options):
        if isinstance(text, BadRecord):
            if not options.skip_bad:
                raise DataError(f"{where}: {text} (--skip-bad skips such records)")
            counts.bad += 1
            counts.first_bad = counts.first_bad or f"{where}: {text}"
        elif not text:
            counts.empty += 1
        else:
            counts.documents += 1
            yield text


def _text_documents(path: Path, options: ReadOptions):
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as written
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if options.split_docs is None:
        yield path, text
        return
    for number, piece in enumerate(re.split(options.split_docs, text, flags=re.MULTILINE)):
        yield f"{path} document {number}", piece


def _open_jsonl(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the `zstandard` package "
                            "(pip install 'evertrain[data]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_documents(path: Path, options: ReadOptions):
    field = options.text_field
    try:
        with _open_jsonl(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing one, say) hold no record
                yield f"{path}:{number}", _record_text(line, field)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except Exception as exc:
        if type(exc).__name__ == "ZstdError":
            raise DataError(f"{path}: cannot read it (zstd: {exc})") from None
        raise


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
        return BadRecord(f"field '{field}' is {'null' if text is None else type(text).__name__}, not a string")
    return text


def _pyarrow(path: Path):
    try:
        import pyarrow
    except ImportError:
        raise DataError(f"{path}: reading Parquet/Arrow needs the `pyarrow` package "
                        "(pip install 'evertrain[data]')") from None
    return pyarrow


def _text_column(path: Path, schema, field: str) -> None:
    pa = _pyarrow(path)
    if field not in schema.names:
        raise DataError(f"{path}: no column '{field}' (it has: {', '.join(schema.names[:8])}; "
                        "choose one with --text-field)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column '{field}' is {kind}, not text")


def _rows(path: Path, batches, field: str):
    row = 0
    for batch in batches:
        for text in batch.column(field).to_pylist():
            yield f"{path} row {row}", BadRecord(f"field '{field}' is null") if text is None else text
            row += 1


def _parquet_documents(path: Path, options: ReadOptions):
    pa = _pyarrow(path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        _text_column(path, parquet.schema_arrow, options.text_field)
        yield from _rows(path, parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[options.text_field]),
                         options.text_field)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _arrow_documents(path: Path, options: ReadOptions):
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
        yield from _rows(path, batches, options.text_field)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow file ({exc})") from None
