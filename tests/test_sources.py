"""Inputs of `evertrain data prepare|append`: every format gives one document per record, directories
and globs expand in order, bad records are one error naming file and line (or counted with
--skip-bad), nothing half-written is left, and --part slices are contiguous and balanced."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from evertrain.launch import cli
from evertrain.pretrain.data import encode, sources
from evertrain.pretrain.data.prepare import prepare
from evertrain.pretrain.data.sources import (
    Counts,
    Input,
    ReadOptions,
    documents,
    expand_inputs,
    parse_part,
    select_part,
)
from evertrain.pretrain.data.stream import DataError, load_manifest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

RECORDS = [f"Record {i}: {'lorem ipsum ' * (i % 7)}\nsecond line é🙂\n" for i in range(50)]


def jsonl_bytes(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()


def write_arrow_stream(path: Path, texts: list[str], field: str = "text") -> None:
    table = pa.table({field: texts, "id": list(range(len(texts)))})
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)


def write_hf_dataset(directory: Path, texts: list[str]) -> None:
    """What `Dataset.save_to_disk` writes: Arrow stream files listed in state.json (built with pyarrow)."""
    directory.mkdir()
    half = len(texts) // 2
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    write_arrow_stream(directory / names[0], texts[:half])
    write_arrow_stream(directory / names[1], texts[half:])
    (directory / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_split": "train"})
    )
    (directory / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """RECORDS spread over every input kind, in sorted-name order a-f (a directory reads them in order)."""
    root = tmp_path / "corpus"
    root.mkdir()
    chunks = [RECORDS[i : i + 10] for i in range(0, 50, 10)]
    (root / "a.jsonl").write_bytes(jsonl_bytes(chunks[0]).rstrip(b"\n"))  # no newline after the last record
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(chunks[1])))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(chunks[2])))
    pq.write_table(pa.table({"text": chunks[3]}), root / "d.parquet", row_group_size=4)
    write_hf_dataset(root / "e_hf", chunks[4][:6])
    (root / "f.txt").write_text("".join(chunks[4][6:]), encoding="utf-8")
    (root / ".hidden.jsonl").write_text("not read\n")
    (root / "notes.md").write_text("not an input kind: a directory skips it\n")
    return root


def read_all(args, options=ReadOptions(), counts=None) -> list[str]:
    counts = Counts() if counts is None else counts
    return [d for inp in expand_inputs(args, "--input") for d in documents(inp, options, counts)]


@pytest.mark.parametrize("block", [1 << 20, 100])  # 100 bytes: JSONL blocks end mid-file, records span reads
def test_every_format_reads_one_document_per_record(corpus, block, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", block)
    kinds = [(i.path.name, i.kind) for i in expand_inputs([corpus], "--input")]
    assert kinds == [
        ("a.jsonl", "jsonl"),
        ("b.jsonl.gz", "jsonl"),
        ("c.jsonl.zst", "jsonl"),
        ("d.parquet", "parquet"),
        ("data-00000-of-00002.arrow", "arrow"),
        ("data-00001-of-00002.arrow", "arrow"),
        ("f.txt", "text"),
    ]
    counts = Counts()
    assert read_all([corpus], counts=counts)[:46] == RECORDS[:46]  # f.txt is one document: the last 4 records
    assert counts.documents == 47
    assert read_all([corpus], ReadOptions(split_docs=r"(?=^Record )"))[46:] == RECORDS[46:]
    assert read_all([str(corpus / "*.jsonl*")]) == RECORDS[:30]  # a glob, sorted
    assert read_all([corpus / "e_hf"]) == RECORDS[40:46]  # a save_to_disk dataset directory
    file_format = corpus / "g.arrow"  # the random-access Arrow file format too
    with pa.ipc.new_file(str(file_format), pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": RECORDS[:3]}))
    assert read_all([file_format]) == RECORDS[:3]


def test_a_jsonl_of_n_records_is_n_documents(tiny_data, corpus, tmp_path):
    manifest = prepare([corpus], tmp_path / "out", tokenizer=tiny_data / "tokenizer.model", workers=2)
    tokens = np.concatenate([np.fromfile(tmp_path / "out" / s.file, dtype="<u2") for s in manifest.train])
    assert (tokens == manifest.eos_id).sum() == 47 and tokens[-1] == manifest.eos_id
    jsonl = prepare([corpus / "a.jsonl"], tmp_path / "jsonl", tokenizer=tiny_data / "tokenizer.model")
    assert (np.fromfile(tmp_path / "jsonl" / jsonl.train[0].file, dtype="<u2") == jsonl.eos_id).sum() == 10
    trained = prepare(
        [corpus / "a.jsonl"], tmp_path / "trained", 300
    )  # the tokenizer trains on the records' text
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "trained" / "tokenizer.model"))
    assert any("lorem" in sp.id_to_piece(i) for i in range(sp.vocab_size())) and not any(
        '"text"' in sp.id_to_piece(i) for i in range(sp.vocab_size())
    )
    assert trained.vocab_size == 300


BAD_JSONL = {
    "invalid JSON": (b'{"text": "ok"}\n{"text": "cut\n', r"bad.jsonl:2: invalid JSON"),
    "not an object": (b'{"text": "ok"}\n["text"]\n', r"bad.jsonl:2: a JSON list, not an object"),
    "missing field": (b'{"text": "ok"}\n\n{"body": "x"}\n', r"bad.jsonl:3: no field 'text' \(it has: body"),
    "not a string": (b'{"text": "ok"}\n{"text": 7}\n', r"bad.jsonl:2: field 'text' is int, not a string"),
    "null": (b'{"text": "ok"}\n{"text": null}\n', r"bad.jsonl:2: field 'text' is null"),
    "not UTF-8": (b'{"text": "ok"}\n{"text": "\xff"}\n', r"bad.jsonl:2: not UTF-8"),
}


@pytest.mark.parametrize("problem", list(BAD_JSONL))
def test_a_bad_record_names_file_and_line_or_is_counted(problem, tiny_data, tmp_path, monkeypatch):
    content, message = BAD_JSONL[problem]
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_bytes(content + b'{"text": "after"}\n')
    with pytest.raises(DataError, match=message + r".*\(--skip-bad skips such records\)"):
        prepare([bad], tmp_path / "out" / "data", tokenizer=tiny_data / "tokenizer.model")
    good = (
        tmp_path / "in" / "good.jsonl"
    )  # in processes, with the bad line in a later block: still this error
    good.write_bytes(jsonl_bytes(RECORDS))
    monkeypatch.setattr(sources, "JSONL_BLOCK_BYTES", 10)
    monkeypatch.setattr(encode, "ENCODE_BATCH_BYTES", 10)
    with pytest.raises(DataError, match=message):
        prepare([good, bad], tmp_path / "out" / "data", tokenizer=tiny_data / "tokenizer.model", workers=2)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written
    counts = Counts()
    prepare(
        [good, bad],
        tmp_path / "out" / "data",
        tokenizer=tiny_data / "tokenizer.model",
        skip_bad=True,
        counts=counts,
        workers=2,
    )
    assert (counts.documents, counts.bad) == (2 + 50, 1) and counts.first_bad.startswith(str(bad))
    assert "1 bad records skipped (first:" in counts.summary()


def test_bad_files_are_one_clear_error(tiny_data, corpus, tmp_path):
    def refused(inputs, message, **kw):
        with pytest.raises(DataError, match=message):
            prepare(inputs, tmp_path / "out", tokenizer=tiny_data / "tokenizer.model", **kw)
        assert not (tmp_path / "out").exists()

    refused([corpus / "d.parquet"], r"d.parquet: no column 'body' \(it has: text", text_field="body")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    refused([tmp_path / "ints.parquet"], "ints.parquet: column 'text' is int64, not text")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    refused([tmp_path / "nulls.parquet"], r"nulls.parquet row 1: field 'text' is null")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    refused([tmp_path / "broken.parquet"], "broken.parquet: not a readable Parquet file")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    refused([tmp_path / "broken.jsonl.gz"], "broken.jsonl.gz: cannot read it")
    whole = zstandard.ZstdCompressor().compress(jsonl_bytes(RECORDS * 40))
    (tmp_path / "two_frames.jsonl.zst").write_bytes(whole + whole)  # concatenated frames read on
    assert prepare(
        [tmp_path / "two_frames.jsonl.zst"],
        tmp_path / "zst",
        tokenizer=tiny_data / "tokenizer.model",
        counts=(zst := Counts()),
    ).version == 1 and zst.documents == 2 * 40 * len(RECORDS)
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])  # zstandard itself stops quietly here
    (tmp_path / "huge.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "' + b"x" * 5000 + b'"}\n')
    sources.MAX_RECORD_BYTES, limit = 1000, sources.MAX_RECORD_BYTES
    try:  # a one-line record bigger than the limit: refused before it is held whole, naming its line
        sources.JSONL_BLOCK_BYTES, block = 100, sources.JSONL_BLOCK_BYTES
        refused([tmp_path / "huge.jsonl"], r"huge.jsonl:2: a record of more than 1,000 bytes")
    finally:
        sources.MAX_RECORD_BYTES, sources.JSONL_BLOCK_BYTES = limit, block
    refused(
        [tmp_path / "cut.jsonl.zst"], r"cut.jsonl.zst: cannot read it \(the file ends inside a zstd frame"
    )
    refused([str(tmp_path / "none-*.jsonl")], r"--input .*none-\*.jsonl: no file matches")
    (tmp_path / "empty_dir").mkdir()
    refused([tmp_path / "empty_dir"], "empty_dir: no input files in this directory")
    dataset_dict = tmp_path / "dd"
    dataset_dict.mkdir()
    (dataset_dict / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    refused([dataset_dict], "dd: a Hugging Face DatasetDict; give one split's directory .*dd/train")
    refused([corpus / "f.txt"], r"--split-docs '\(': not a regular expression", split_docs="(")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    refused([tmp_path / "latin1.txt"], r"latin1.txt: not UTF-8 text \(invalid continuation byte at byte 3\)")
    counts = Counts()
    prepare(
        [corpus / "f.txt", tmp_path / "latin1.txt"],
        tmp_path / "out",
        tokenizer=tiny_data / "tokenizer.model",
        skip_bad=True,
        counts=counts,
    )
    assert (counts.documents, counts.bad) == (1, 1)


def test_part_slices_are_contiguous_balanced_and_cover_everything(tiny_data, tiny_slices, tmp_path):
    inputs = [Input(Path(f"f{i}"), "jsonl", size) for i, size in enumerate([5, 1, 1, 1, 4, 4, 2, 2])]
    parts = [select_part(inputs, i, 4) for i in range(4)]
    assert [p for part in parts for p in part] == inputs and all(parts)
    assert [sum(p.size for p in part) for part in parts] == [
        5,
        7,
        4,
        4,
    ]  # cut after the file that crosses k/4 of the bytes
    assert [len(select_part(inputs[:3], i, 3)) for i in range(3)] == [1, 1, 1]  # never an empty part
    with pytest.raises(DataError, match="--part 0/9: only 8 input files"):
        select_part(inputs, 0, 9)
    for bad in ("2/2", "1", "-1/2", "a/b"):
        with pytest.raises(DataError, match=f"--part {bad}: must be i/N"):
            parse_part(bad)
    with pytest.raises(DataError, match=r"--part 1/2: needs --tokenizer"):
        prepare(tiny_slices.train, tmp_path / "out", 300, part="1/2")
    later = prepare(
        tiny_slices.train,
        tmp_path / "p1",
        tokenizer=tiny_data / "tokenizer.model",
        val=tiny_slices.val,
        part="1/2",
    )
    assert later.val == ()  # validation goes to part 0 only


def test_cli_reads_jsonl_with_a_field_and_reports_counts(tiny_data, tmp_path, capsys, monkeypatch):
    data = tmp_path / "in.jsonl"
    data.write_bytes(jsonl_bytes(RECORDS[:5], field="body") + b"{oops\n" + b'{"body": ""}\n')
    args = [
        "data",
        "prepare",
        "--input",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--text-field",
        "body",
        "--tokenizer",
        str(tiny_data / "tokenizer.model"),
        "--workers",
        "1",
    ]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
    assert cli.main(args + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert (
        "read 5 documents, 1 empty skipped, 1 bad records skipped (first: " in out
        and "in.jsonl:6: invalid JSON" in out
    )
    assert load_manifest(tmp_path / "out", verify_checksums=True).version == 1


def test_real_datasets_save_to_disk_and_cache_files(tmp_path):
    """The same readers on what the `datasets` library itself writes (when it is installed)."""
    datasets = pytest.importorskip("datasets")
    texts = RECORDS[:9] + ["", "crlf\r\nkept"]
    dataset = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    counts = Counts()
    assert read_all([tmp_path / "saved"], counts=counts) == RECORDS[:9] + ["crlf\r\nkept"]
    assert (counts.documents, counts.empty) == (10, 1)
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="a Hugging Face DatasetDict; give one split's directory"):
        read_all([tmp_path / "dict"])
    assert read_all([tmp_path / "dict" / "test"]) == RECORDS[:9] + ["crlf\r\nkept"]
    (tmp_path / "x.jsonl").write_bytes(jsonl_bytes(RECORDS[:4]))
    cached = datasets.load_dataset(
        "json", data_files=str(tmp_path / "x.jsonl"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert (
        read_all([f["filename"] for f in cached.cache_files]) == RECORDS[:4]
    )  # an offline cache's .arrow files
