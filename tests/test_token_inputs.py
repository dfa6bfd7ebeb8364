"""`evertrain data prepare` from what users bring besides text: already-tokenized .bin/.npy files (their
dtype and EOS stated), a tokenizer given as a model directory, and inputs with no usable record at all,
each either working or refused with one line that says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from evertrain.launch import cli
from evertrain.pretrain.data.prepare import append
from evertrain.pretrain.data.stream import load_manifest


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    manifest = load_manifest(data_dir)
    dtype = np.dtype(manifest.dtype)
    return np.concatenate([np.fromfile(data_dir / shard.file, dtype) for shard in manifest.shards(split)])


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().err


def test_prepare_from_token_files_keeps_every_id(tiny_data, tmp_path, capsys):
    train, val = split_tokens(tiny_data, "train"), split_tokens(tiny_data, "val")
    train.astype("<u4").tofile(tmp_path / "train.bin")  # 32-bit ids, as many tokenizer pipelines write them
    np.save(tmp_path / "val.npy", val.astype(np.int64))
    out = tmp_path / "from_tokens"
    code, err = run_cli(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "train.bin"),
            "--val",
            str(tmp_path / "val.npy"),
            "--token-dtype",
            "uint32",
            "--tokenizer",
            str(tiny_data / "tokenizer.model"),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    assert np.array_equal(split_tokens(out, "train"), train) and np.array_equal(split_tokens(out, "val"), val)
    ours, theirs = load_manifest(out, verify_checksums=True), load_manifest(tiny_data)
    assert (ours.vocab_size, ours.eos_id, ours.dtype, ours.tokenizer) == (
        theirs.vocab_size,
        theirs.eos_id,
        theirs.dtype,
        theirs.tokenizer,
    )


def test_the_eos_of_token_files_is_stated_and_recorded(tiny_data, tmp_path, capsys):
    np.save(tmp_path / "t.npy", split_tokens(tiny_data, "val"))
    args = [
        "data",
        "prepare",
        "--input",
        str(tmp_path / "t.npy"),
        "--tokenizer",
        str(tiny_data / "tokenizer.model"),
        "--workers",
        "1",
    ]
    assert run_cli([*args, "--out", str(tmp_path / "a"), "--eos-id", "7"], capsys)[0] == 0
    assert load_manifest(tmp_path / "a").eos_id == 7
    code, err = run_cli([*args, "--out", str(tmp_path / "b"), "--eos-id", "512"], capsys)
    assert code == 2 and err.strip().endswith(
        "--eos-id 512: not an id of the tokenizer's 512-piece vocabulary"
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "setup, message",
    [
        (
            lambda d, tok: ("t.npy", None, None),
            "t.npy: already-tokenized ids need --tokenizer, the tokenizer that made them",
        ),
        (lambda d, tok: ("t.bin", tok, None), "t.bin: say the dtype of its ids with --token-dtype"),
        (
            lambda d, tok: ("t.bin", tok, "uint16"),
            "t.bin: token id 600 is outside this data dir's vocab of 512",
        ),
        (
            lambda d, tok: ("m.npy", tok, None),
            "m.npy: expected a 1-D array of integer token ids, got float32",
        ),
    ],
)
def test_token_files_that_cannot_be_read_are_one_line(tiny_data, tmp_path, capsys, setup, message):
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.uint16))
    np.array([1, 600], dtype="<u2").tofile(tmp_path / "t.bin")
    np.save(tmp_path / "m.npy", np.zeros((2, 3), np.float32))
    name, tokenizer, dtype = setup(tmp_path, tiny_data / "tokenizer.model")
    args = [
        "data",
        "prepare",
        "--input",
        str(tmp_path / name),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
    ]
    args += ["--tokenizer", str(tokenizer)] if tokenizer else ["--vocab-size", "300"]
    args += ["--token-dtype", dtype] if dtype else []
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_append_takes_a_npy(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    ids = np.arange(100, dtype=np.int32) % 512
    np.save(tmp_path / "more.npy", ids)
    grown = append(data, [tmp_path / "more.npy"])
    assert np.array_equal(split_tokens(data, "train")[-100:], ids) and grown.version == 2


def test_a_model_directory_is_a_tokenizer(tiny_data, tiny_slices, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf_dir = tmp_path / "hf_model"  # as a Hugging Face model repo holds it: config.json, tokenizer.json, ...
    hf_dir.mkdir()
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        [tiny_slices.val[0].read_text()[:20000]],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, err = run_cli(
        [
            "data",
            "prepare",
            "--input",
            str(tiny_slices.val[0]),
            "--tokenizer",
            str(hf_dir),
            "--out",
            str(tmp_path / "d"),
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    manifest = load_manifest(tmp_path / "d")
    assert manifest.tokenizer["path"] == "tokenizer.json" and manifest.eos_id == hf.token_to_id(
        "<|endoftext|>"
    )
    (tmp_path / "empty").mkdir()
    code, err = run_cli(
        [
            "data",
            "prepare",
            "--input",
            str(tiny_slices.val[0]),
            "--tokenizer",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "e"),
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 2 and "a directory without tokenizer.json or tokenizer.model" in err


def test_skip_bad_with_every_record_bad_says_so(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\nnot json\n')
    code, err = run_cli(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "bad.jsonl"),
            "--out",
            str(tmp_path / "d"),
            "--vocab-size",
            "300",
            "--skip-bad",
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "--input: no text to train the tokenizer on (read 0 documents, 2 bad records skipped" in err
    assert "sentencepiece" not in err and "INTERNAL" not in err
