"""Data layer: corpus unpacking, deterministic prepare, the window stream (world size, resume, epochs,
mixture weights), val batches, and one clear error for each kind of bad input with nothing damaged."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from evertrain.launch import cli
from evertrain.pretrain.data.bpe import train_tokenizer
from evertrain.pretrain.data.prepare import prepare
from evertrain.pretrain.data.sources import expand_inputs
from evertrain.pretrain.data.stream import (
    DataError,
    TokenStream,
    file_sha256,
    load_manifest,
    shard_name,
    val_batches,
)

from conftest import load_unpack

SEQ = 32


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()
    }


def all_windows(data_dir: Path, seq_len: int, split: str = "train") -> list[bytes]:
    """Every window of a split in manifest order, as bytes of int64 rows (what the stream returns)."""
    manifest = load_manifest(data_dir)
    out = []
    for shard in manifest.shards(split):
        tokens = np.fromfile(data_dir / shard.file, dtype="<u2")
        n = shard.tokens // (seq_len + 1)
        out += [row.astype(np.int64).tobytes() for row in tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)]
    return out


def rows(batch: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in batch]


def read(stream: TokenStream, windows: int, batch: int = 8) -> list[bytes]:
    """The next `windows` windows, in batches of `batch` and one smaller batch for the rest."""
    sizes = [batch] * (windows // batch) + ([windows % batch] if windows % batch else [])
    return [r for size in sizes for r in rows(stream.next_batch(size))]


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


# ---------------------------------------------------------------------------------------------- corpus


def test_unpack_strips_markdown_and_holds_out_whole_plays(corpus_files):
    unpack = load_unpack()
    assert sorted(p.stem for p in corpus_files.val) == sorted(unpack.VAL_PLAYS)
    assert len(corpus_files.train) == 35 and not {p.stem for p in corpus_files.train} & set(unpack.VAL_PLAYS)
    assert sum(p.stat().st_size for p in corpus_files.train + corpus_files.val) > 4_500_000
    hamlet = next(p for p in corpus_files.train if p.stem == "hamlet").read_text()
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?\n" in hamlet
    assert not any(mark in hamlet for mark in ("**", "_", "#", "\\", "  \n"))


def test_markdown_to_text():
    markdown = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nWords,\\-- more:  \n__\\[Aside]_ &amp; c.\n"
    assert (
        load_unpack().markdown_to_text(markdown)
        == "Play\n\nACT I\n\nEnter A\n\nA\nWords,-- more:\n[Aside] & c.\n"
    )


def test_unpack_is_idempotent(tmp_path):
    unpack = load_unpack()
    first = unpack.unpack(tmp_path)
    stamps = {p: p.stat().st_mtime_ns for paths in first.values() for p in paths}
    assert unpack.unpack(tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_is_byte_for_byte_deterministic(tiny_data, tiny_slices, tmp_path):
    again = prepare(
        tiny_slices.train, tmp_path / "again", 512, val=tiny_slices.val, shard_tokens=1 << 15, workers=1
    )  # the fixture used 2 encoding threads
    assert tree_digest(again.data_dir) == tree_digest(tiny_data)
    assert len(again.train) > 1 and all(s.tokens == 1 << 15 for s in again.train[:-1])


def test_tokenizer_trains_on_an_even_sample_of_large_inputs(tiny_slices):
    inputs = expand_inputs(tiny_slices.train, "--input")
    sampled = train_tokenizer(inputs, 400, sample_bytes=60_000)  # every 5th paragraph
    assert sampled == train_tokenizer(inputs, 400, sample_bytes=60_000)
    assert sampled != train_tokenizer(inputs, 400)


def test_prepared_tokens_are_the_documents_joined_by_eos(tiny_data, tiny_slices):
    manifest = load_manifest(tiny_data, verify_checksums=True)
    assert (manifest.version, manifest.dtype, manifest.vocab_size) == (1, "uint16", 512)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / manifest.tokenizer["path"]))
    tokens = np.concatenate([np.fromfile(tiny_data / s.file, dtype="<u2") for s in manifest.train]).tolist()
    texts = [p.read_text() for p in tiny_slices.train]
    assert split_on(tokens, manifest.eos_id) == [
        sp.encode(t) for t in texts
    ]  # encoding in blocks changes nothing
    assert [sp.decode(d) for d in split_on(tokens, manifest.eos_id)] == texts  # lossless, newlines included


def split_on(tokens: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for t in tokens:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert current == []  # every document ends with EOS
    return docs


@pytest.mark.parametrize("problem", ["missing", "empty", "not utf-8"])
def test_bad_input_is_refused_and_leaves_nothing_behind(tiny_slices, tmp_path, problem):
    bad = tmp_path / "bad.txt"
    if problem != "missing":
        bad.write_bytes(b"" if problem == "empty" else b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="bad.txt"):
        prepare(tiny_slices.train, tmp_path / "out", 512, val=[bad], shard_tokens=1 << 15)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.txt"] if problem != "missing" else [])


def test_prepare_never_overwrites_a_data_dir(tiny_data, tiny_slices, data_copy):
    before = tree_digest(data_copy)
    with pytest.raises(DataError, match="already a data dir"):
        prepare(tiny_slices.train[:1], data_copy, 512)
    assert tree_digest(data_copy) == before


def test_reused_tokenizer_gives_the_same_tokens(tiny_data, tiny_slices, tmp_path):
    reused = prepare(
        tiny_slices.train,
        tmp_path / "reused",
        tokenizer=tiny_data / "tokenizer.model",
        val=tiny_slices.val,
        shard_tokens=1 << 15,
    )
    assert tree_digest(reused.data_dir) == tree_digest(tiny_data)
    with pytest.raises(DataError, match="--vocab-size 1024: --tokenizer .* has 512"):
        prepare(tiny_slices.train, tmp_path / "other", 1024, tokenizer=tiny_data / "tokenizer.model")


def test_cli_prepare_and_one_line_errors(tiny_slices, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    args = [
        "data",
        "prepare",
        "--input",
        *map(str, tiny_slices.train[:2]),
        "--val",
        str(tiny_slices.val[0]),
        "--out",
        str(out),
        "--vocab-size",
        "400",
        "--shard-tokens",
        "20000",
        "--workers",
        "2",
    ]
    assert cli.main(args) == 0
    assert "version 1" in capsys.readouterr().out
    assert load_manifest(out, verify_checksums=True).vocab_size == 400
    assert cli.main(args) == 2  # again: the data dir exists
    assert (
        cli.main(
            args[:2]
            + ["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x"), "--vocab-size", "400"]
        )
        == 2
    )
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "already a data dir" in errors[0] and "nope.txt: no such file" in errors[1]


# ---------------------------------------------------------------------------------------------- manifest checks


def edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_corrupt_shard_is_detected(data_copy):
    shard = data_copy / shard_name("train", 1)
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 1
    shard.write_bytes(bytes(blob))
    load_manifest(data_copy)  # sizes are fine: only the checksum can tell
    with pytest.raises(DataError, match="train-000001.bin: shard sha256 does not match"):
        load_manifest(data_copy, verify_checksums=True)


def test_wrong_size_shard_is_detected(data_copy):
    shard = data_copy / shard_name("train", 2)
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="train-000002.bin: shard is 65534 bytes"):
        TokenStream(data_copy, SEQ, seed=0)


def test_vocab_that_does_not_fit_the_dtype_is_refused(data_copy):
    edit_manifest(data_copy, lambda m: m.update(vocab_size=70_000))
    with pytest.raises(DataError, match="vocab_size 70000 does not fit token dtype uint16"):
        load_manifest(data_copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["train"][0].update(source=7), r"'train\[0\].source' should be str, got 7"),
        (lambda m: m.update(bos_id="x"), "'bos_id' 'x' is not null or an id"),
        (lambda m: m.update(history={"a": 1}), "'history' should be list"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_one_line(data_copy, edit, message):
    edit_manifest(data_copy, edit)
    with pytest.raises(DataError, match=message) as err:
        TokenStream(data_copy, SEQ, seed=0)
    assert "\n" not in str(err.value)


def test_seq_len_longer_than_every_shard_is_named(tiny_data):
    with pytest.raises(DataError, match="seq_len 40000 needs documents/shards of >= 40001 tokens") as error:
        TokenStream(tiny_data, 40_000, seed=0)
    assert str(error.value).startswith(f"{tiny_data}: ")
    with pytest.raises(DataError, match="seq_len 40000"):
        val_batches(tiny_data, 40_000, 1, 1)


# ---------------------------------------------------------------------------------------------- stream


def test_world_size_one_and_two_see_the_same_windows(tiny_data):
    single = TokenStream(tiny_data, SEQ, seed=3)
    ranks = [TokenStream(tiny_data, SEQ, seed=3) for _ in range(2)]
    for _ in range(40):
        whole = single.next_batch(12, 0, 1)
        halves = [stream.next_batch(12, rank, 2) for rank, stream in enumerate(ranks)]
        assert whole.dtype == torch.int64 and whole.shape == (12, SEQ + 1)
        assert torch.equal(whole, torch.cat(halves))
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_restored_cursor_continues_exactly_on_another_world_size(tiny_data):
    reference = TokenStream(tiny_data, SEQ, seed=3)
    read(reference, 8 * 30)
    state = json.loads(json.dumps(reference.state_dict()))  # it goes through a checkpoint's JSON
    expected = torch.cat([reference.next_batch(8) for _ in range(20)])
    restored = [TokenStream(tiny_data, SEQ, seed=3) for _ in range(4)]
    for stream in restored:
        stream.load_state_dict(state)
    got = torch.cat([torch.cat([s.next_batch(8, r, 4) for r, s in enumerate(restored)]) for _ in range(20)])
    assert torch.equal(got, expected)


def test_an_epoch_is_every_window_once_shuffled_across_shards(tiny_data):
    """Replaces the old "shuffled within its shard, shard blocks in manifest order" test: the order
    itself changed (issue 17). The corpus is given in file order, so shard 0 holds the first files: its
    share of the windows is flat over the epoch, not a block at its start."""
    stream = TokenStream(tiny_data, SEQ, seed=5)
    windows = all_windows(tiny_data, SEQ)
    first_shard = set(windows[: load_manifest(tiny_data).train[0].tokens // (SEQ + 1)])
    epoch = read(stream, len(windows), batch=64)
    assert Counter(epoch) == Counter(windows) and epoch != windows
    share = len(first_shard) / len(windows)
    quarter = len(epoch) // 4
    for k in range(4):  # no drift: the first files are spread over the whole epoch
        part = epoch[k * quarter : (k + 1) * quarter]
        assert abs(sum(w in first_shard for w in part) / len(part) - share) < 0.04
    assert (
        stream.state_dict().items()
        >= {
            "cursor": len(windows),
            "epoch": 0,
            "epoch_start": 0,
            "manifest_version": 1,
            "segments": [[0, 1]],
            "mix": None,
        }.items()
    )
    next_epoch = read(stream, len(windows), batch=64)
    assert Counter(next_epoch) == Counter(windows) and next_epoch != epoch
    assert stream.state_dict()["epoch"] == 1
    assert read(TokenStream(tiny_data, SEQ, seed=6), 64) != epoch[:64]  # the seed picks the order


def test_a_batch_across_the_epoch_end_takes_the_next_epoch(tiny_data):
    n = len(all_windows(tiny_data, SEQ))
    stream = TokenStream(tiny_data, SEQ, seed=5)
    read(stream, n - 3, batch=64)
    crossing = rows(stream.next_batch(8))
    in_other_batches = TokenStream(tiny_data, SEQ, seed=5)
    assert crossing == read(in_other_batches, n + 5, batch=64)[n - 3 :]
    assert (
        stream.state_dict().items()
        >= {
            "cursor": n + 5,
            "epoch": 1,
            "epoch_start": n,
            "manifest_version": 1,
            "segments": [[0, 1]],
            "mix": None,
        }.items()
    )


def test_mixture_weights_repeat_or_subsample_each_source_interleaved(data_copy):
    """Replaces the old block-per-shard mixture test (issue 17): the counts per epoch are the same
    (weight x windows per shard), but the sources are interleaved at every position."""

    def weigh(m):  # shards 0-2 are source "a" at 2x, 3-5 source "b" at 0.5x
        for i, shard in enumerate(m["train"]):
            shard["source"] = "a" if i < 3 else "b"
        m["weights"] = {"a": 2.0, "b": 0.5}

    edit_manifest(data_copy, weigh)
    windows = all_windows(data_copy, SEQ)
    per_shard = [s.tokens // (SEQ + 1) for s in load_manifest(data_copy).train]
    a, b = windows[: sum(per_shard[:3])], windows[sum(per_shard[:3]) :]
    expected_length = 2 * len(a) + sum(round(0.5 * n) for n in per_shard[3:])
    stream = TokenStream(data_copy, SEQ, seed=1)
    epoch = read(stream, expected_length, batch=64)
    assert stream.layout.length == expected_length
    a_set = set(a)
    from_a = [w for w in epoch if w in a_set]
    from_b = [w for w in epoch if w not in a_set]
    assert Counter(from_a) == Counter(a + a)  # every "a" window twice
    assert len(set(from_b)) == len(from_b) == expected_length - 2 * len(a) and set(from_b) < set(b)
    share_a = 2 * len(a) / expected_length
    is_a = np.array([w in a_set for w in epoch], dtype=np.int64)
    runs = np.convolve(is_a, np.ones(1000, dtype=np.int64), mode="valid") / 1000  # every 1000 consecutive
    assert np.abs(runs - share_a).max() <= 0.02
    again = TokenStream(data_copy, SEQ, seed=1)  # a fixed function of manifest + seed
    assert read(again, expected_length, batch=64) == epoch
    assert read(stream, 64, batch=64) != epoch[:64]  # the next epoch draws afresh


def test_a_cooldown_mix_samples_sources_by_share(data_copy):
    def sources(m):  # shards 0-1 "hq", 2-5 "main"
        for i, shard in enumerate(m["train"]):
            shard["source"] = "hq" if i < 2 else "main"

    edit_manifest(data_copy, sources)
    windows = all_windows(data_copy, SEQ)
    per_shard = [s.tokens // (SEQ + 1) for s in load_manifest(data_copy).train]
    hq = set(windows[: sum(per_shard[:2])])
    stream = TokenStream(data_copy, SEQ, seed=4, mix={"hq": 0.7, "main": 0.3})
    epoch = read(stream, stream.layout.length, batch=64)
    assert len(set(epoch)) == len(epoch)  # a mix epoch reads no window twice
    assert sum(w in hq for w in epoch) == len(hq)  # it ends when hq, the scarce source, has given all
    is_hq = np.array([w in hq for w in epoch], dtype=np.int64)
    runs = np.convolve(is_hq, np.ones(1000, dtype=np.int64), mode="valid") / 1000
    assert np.abs(runs - 0.7).max() <= 0.02
    state = stream.state_dict()
    assert state["mix"] == {"hq": 0.7, "main": 0.3}
    with pytest.raises(DataError, match="read with mix"):
        TokenStream(data_copy, SEQ, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="mix source 'news' has no train windows"):
        TokenStream(data_copy, SEQ, seed=4, mix={"news": 1.0})


# ---------------------------------------------------------------------------------------------- val


def test_val_batches_are_the_first_val_windows_split_over_ranks(tiny_data):
    expected = all_windows(tiny_data, SEQ, "val")[: 3 * 8]
    single = val_batches(tiny_data, SEQ, 3, 8)
    assert [r for batch in single for r in rows(batch)] == expected
    halves = [val_batches(tiny_data, SEQ, 3, 8, rank, 2) for rank in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), single[i])
    with pytest.raises(DataError, match="fewer than the 1000 batches x 8 windows"):
        val_batches(tiny_data, SEQ, 1000, 8)
