"""Token-exactness of prepare/append: the tokens written are exactly those of encoding each document
whole, followed by EOS, for a Llama-style sentencepiece model (add_dummy_prefix, byte fallback) and a
Hugging Face byte-level BPE tokenizer.json, for any number of encoding processes and across --part
slices appended in order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from evertrain.pretrain.data import encode as data_encode
from evertrain.pretrain.data.prepare import append, prepare
from evertrain.pretrain.data.stream import DataError, load_manifest

tokenizers = pytest.importorskip("tokenizers")

LONG_LINE = "word " * 5_000  # 25,000 characters, no newline: longer than any old encode block
DOCUMENTS = [
    "  two leading spaces, then\ta tab\n",
    " Ünïcödé — 日本語のテキスト, emoji 🙂🚀, Ελληνικά\n",
    "line one\r\nline two\r\n\r\nthree lines in CRLF\r\n",
    LONG_LINE,
    "no newline at all",
    "\n\nstarts with two newlines",
    "".join(f"verse {i}: the quality of mercy is not strained\n" for i in range(600)),  # ~30 KB of lines
    "trailing spaces   ",
]


def training_text(tiny_slices) -> str:
    return tiny_slices.train[0].read_text(encoding="utf-8")[:40_000] + "".join(DOCUMENTS[:3])


@pytest.fixture(scope="module")
def llama_sp(tiny_slices, tmp_path_factory) -> Path:
    """A sentencepiece BPE with the Llama-2 / Mistral settings: dummy prefix, byte fallback, identity."""
    path = tmp_path_factory.mktemp("llama_sp") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_text(tiny_slices).splitlines()),
            model_writer=f,
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    return path


@pytest.fixture(scope="module")
def hf_bpe(tiny_slices, tmp_path_factory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json whose post-processor adds a BOS (as Llama 3's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([training_text(tiny_slices)], trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    path = tmp_path_factory.mktemp("hf_bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def reference(kind: str, path: Path) -> tuple[callable, callable]:
    """encode(text) -> ids of the whole text, decode(ids) -> text, straight from the library."""
    if kind == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return sp.encode, sp.decode
    hf = tokenizers.Tokenizer.from_file(str(path))
    return (lambda text: hf.encode(text, add_special_tokens=False).ids), hf.decode


def write_inputs(directory: Path) -> list[Path]:
    """The documents as one JSONL (one per record) and then each as its own .txt, bytes as they are."""
    directory.mkdir()
    jsonl = directory / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    texts = []
    for i, doc in enumerate(DOCUMENTS):
        texts.append(directory / f"doc{i}.txt")
        texts[-1].write_bytes(doc.encode("utf-8"))  # no newline translation: CRLF stays CRLF
    return [jsonl, *texts]


def train_tokens(data_dir: Path) -> list[int]:
    manifest = load_manifest(data_dir, verify_checksums=True)
    return np.concatenate(
        [np.fromfile(data_dir / s.file, dtype=manifest.dtype) for s in manifest.train]
    ).tolist()


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_tokens_are_each_document_encoded_whole(kind, llama_sp, hf_bpe, tmp_path, monkeypatch):
    model = llama_sp if kind == "sentencepiece" else hf_bpe
    encode, decode = reference(kind, model)
    inputs = write_inputs(tmp_path / "in")
    monkeypatch.setattr(
        data_encode, "ENCODE_BATCH_BYTES", 20_000
    )  # several batches, so order across processes counts
    one = prepare(inputs, tmp_path / "one", tokenizer=model, workers=1, shard_tokens=3_000)
    eos = one.eos_id
    expected = [t for doc in DOCUMENTS * 2 for t in (*encode(doc), eos)]
    assert train_tokens(one.data_dir) == expected
    assert len(one.train) > 1  # the stream is cut into shards, not the documents

    two = prepare(inputs, tmp_path / "two", tokenizer=model, workers=2, shard_tokens=3_000)
    assert [(tmp_path / "two" / s.file).read_bytes() for s in two.train] == [
        (tmp_path / "one" / s.file).read_bytes() for s in one.train
    ]  # byte-identical for any worker count

    if kind == "tokenizer.json":
        hf = tokenizers.Tokenizer.from_file(str(model))
        assert (one.eos_id, one.bos_id) == (
            hf.token_to_id("<|endoftext|>"),
            hf.token_to_id("<|begin_of_text|>"),
        )
        assert (tmp_path / "one" / "tokenizer.json").read_bytes() == model.read_bytes()
        assert [decode(encode(doc)) for doc in DOCUMENTS] == DOCUMENTS  # byte-level BPE is lossless
        # append encodes with the data dir's own tokenizer.json and its recorded EOS
        grown = append(tmp_path / "one", [inputs[0]], workers=2, shard_tokens=3_000, allow_duplicate=True)
        assert train_tokens(grown.data_dir) == expected + [t for d in DOCUMENTS for t in (*encode(d), eos)]
    else:
        assert (one.eos_id, one.bos_id) == (2, 1)
        # the old block-wise encoding gave every block a dummy-prefix "▁"; whole documents never do
        assert encode(LONG_LINE[:8192]) + encode(LONG_LINE[8192:]) != encode(LONG_LINE)


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_parts_appended_in_order_give_the_whole_prepare(kind, llama_sp, hf_bpe, tmp_path):
    model = llama_sp if kind == "sentencepiece" else hf_bpe
    inputs = write_inputs(tmp_path / "in")
    whole = prepare(inputs, tmp_path / "whole", tokenizer=model, shard_tokens=3_000)
    parts = [
        prepare(inputs, tmp_path / f"part-{i:03d}", tokenizer=model, part=f"{i}/3", shard_tokens=3_000)
        for i in range(3)
    ]
    shard_files = [p.data_dir / s.file for p in parts[1:] for s in p.train]
    # the inputs hold every document twice (the JSONL, then each .txt): part shards coincide byte for byte
    merged = append(parts[0].data_dir, shard_files, shard_tokens=3_000, allow_duplicate=True)
    assert train_tokens(merged.data_dir) == train_tokens(whole.data_dir)
    assert merged.version == 2 and merged.tokenizer == whole.tokenizer


def test_part_shards_made_with_another_tokenizer_are_refused(llama_sp, hf_bpe, tmp_path):
    inputs = write_inputs(tmp_path / "in")
    base = prepare(inputs[:2], tmp_path / "base", tokenizer=llama_sp)
    other = prepare(
        inputs[2:], tmp_path / "other", tokenizer=hf_bpe
    )  # ids fit the vocab: only the origin tells
    with pytest.raises(
        DataError, match="train-000000.bin: a shard of .*other, which was made with another tokenizer"
    ):
        append(base.data_dir, [other.data_dir / "train-000000.bin"])
    assert load_manifest(base.data_dir).version == 1


def test_tokenizer_json_specials(hf_bpe, tmp_path):
    bare = tmp_path / "bare" / "tokenizer.json"  # the specials renamed to names nothing looks for
    bare.parent.mkdir()
    bare.write_text(
        hf_bpe.read_text().replace("<|endoftext|>", "<|stop|>").replace("<|begin_of_text|>", "<|go|>")
    )
    inputs = write_inputs(tmp_path / "in")[:1]
    with pytest.raises(DataError, match="tokenizer.json: no EOS token"):
        prepare(inputs, tmp_path / "out", tokenizer=bare)
    assert not (tmp_path / "out").exists()
    (bare.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|stop|>", "bos_token": {"content": "<|go|>"}})
    )
    manifest = prepare(inputs, tmp_path / "out", tokenizer=bare)
    hf = tokenizers.Tokenizer.from_file(str(bare))
    assert (manifest.eos_id, manifest.bos_id) == (hf.token_to_id("<|stop|>"), hf.token_to_id("<|go|>"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="junk.json: not a valid tokenizer.json"):
        prepare(inputs, tmp_path / "out2", tokenizer=tmp_path / "junk.json")
