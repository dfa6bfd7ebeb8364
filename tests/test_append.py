"""Appending to a data dir: the stream extends exactly (live, and across a kill/resume of pretrain.py),
old shards are never reordered, dropped or re-encoded with another tokenizer, a failed append leaves
the old manifest valid, and concurrent appends queue on the file lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from test_data import SEQ, all_windows, read, rows, tree_digest

from evertrain.launch import cli
from evertrain.pretrain.data import prepare as dataprep
from evertrain.pretrain.data.prepare import append, prepare
from evertrain.pretrain.data.stream import DataError, TokenStream, load_manifest, val_batches

from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the session's data dir (version 1, six train shards)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.fixture(scope="module")
def new_text(corpus_files, tmp_path_factory) -> list[Path]:
    """Three more documents (~20 KB each) from plays the tiny data dir does not use."""
    root = tmp_path_factory.mktemp("new_text")
    paths = []
    for source in corpus_files.train[-3:]:
        path = root / source.name
        text = source.read_text()[:20_000]
        path.write_text(text[: text.rfind("\n") + 1])
        paths.append(path)
    return paths


def without_lock(digest: dict[str, str]) -> dict[str, str]:
    return {name: sha for name, sha in digest.items() if name != dataprep.LOCK_FILE}


# ---------------------------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("where", ["write_split", "write_manifest"])
def test_a_full_disk_during_prepare_or_append_is_one_line_and_loses_nothing(
    data, new_text, tmp_path, monkeypatch, where
):
    import errno

    real = getattr(dataprep, where)

    def disk_full(*args, **kwargs):
        if where == "write_manifest" and args[1] != data:
            return real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "some.bin"))

    before = tree_digest(data)
    monkeypatch.setattr(dataprep, where, disk_full)
    with pytest.raises(
        DataError,
        match=f"some.bin: No space left on device; {data} is unchanged "
        r"\(still version 1\)",
    ) as err:
        append(data, new_text[:1], shard_tokens=8000)
    assert "\n" not in str(err.value) and without_lock(tree_digest(data)) == without_lock(before)
    assert not list(data.glob(".append-*")) and not list(data.glob(".manifest*"))
    if where == "write_split":
        out = tmp_path / "new" / "data"
        with pytest.raises(DataError, match=f"No space left on device; nothing was written to {out}"):
            prepare(new_text[:1], out, tokenizer=data / "tokenizer.model")
        assert not (tmp_path / "new").exists() or not list((tmp_path / "new").iterdir())


def test_inputs_without_documents_are_refused_not_a_new_empty_version(data, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('\n\n{"text": ""}\n   \n')
    before = tree_digest(data)
    with pytest.raises(
        DataError,
        match=r"nothing to append: no documents in the inputs \(0 documents, 1 empty "
        r"skipped\); .* is unchanged \(still version 1\)",
    ):
        append(data, [blank])
    assert without_lock(tree_digest(data)) == without_lock(before) and load_manifest(data).version == 1
    with pytest.raises(DataError, match="--input: no documents in the inputs .*nothing was written"):
        prepare([blank], tmp_path / "out", tokenizer=data / "tokenizer.model")
    assert not (tmp_path / "out").exists()


def test_append_adds_shards_at_the_end(data, new_text):
    before = load_manifest(data)
    grown = append(data, new_text[:2], shard_tokens=8000)
    assert grown.version == 2 and grown.train[: len(before.train)] == before.train and grown.val == before.val
    assert [s.file for s in grown.train[len(before.train) :]] == [
        f"train-{i:06d}.bin" for i in range(6, 8 + 1)
    ]
    *counts, inputs = grown.history[-1].items()
    assert dict(counts) == {"version": 2, "train": 9, "val": 2}
    assert inputs == (
        "inputs",
        [{"split": "train", "path": str(p), "sha256": dataprep.file_sha256(p)} for p in new_text[:2]],
    )
    assert load_manifest(data, verify_checksums=True) == grown


def test_live_stream_takes_appended_shards_exactly(data, new_text):
    reference = TokenStream(data, SEQ, seed=9)  # never refreshed: the old stream
    live = TokenStream(data, SEQ, seed=9)
    trained = read(live, 400)
    saved = live.state_dict()  # what a checkpoint at this boundary holds
    old_windows = all_windows(data, SEQ)
    append(data, new_text, shard_tokens=8000)
    assert live.refresh() and live.manifest_version == 2 and not live.refresh()
    epoch_length = live.layout.length
    trained += read(live, epoch_length - 400, batch=64)

    assert trained[:400] == read(reference, 400)  # the past is unchanged
    new_windows = all_windows(data, SEQ)[len(old_windows) :]
    assert Counter(trained) == Counter(old_windows + new_windows)  # none twice, none skipped
    # the new shards join the rest of the epoch interleaved (issue 17; it used to put them at its end):
    # their share of each half of the rest is their share of the rest
    rest, new = trained[400:], set(new_windows)
    share = len(new_windows) / len(rest)
    for half in (rest[: len(rest) // 2], rest[len(rest) // 2 :]):
        assert abs(sum(w in new for w in half) / len(half) - share) < 0.03

    resumed = TokenStream(data, SEQ, seed=9)  # a restart from the checkpoint taken before the append
    resumed.load_state_dict(saved)
    assert resumed.manifest_version == 1 and resumed.refresh()
    assert read(resumed, epoch_length - 400, batch=64) == trained[400:]


def test_data_appended_at_the_exact_end_of_an_epoch_joins_that_epoch(data, new_text):
    stream = TokenStream(data, SEQ, seed=2)
    old = read(stream, stream.layout.length, batch=64)
    append(data, new_text[:1], shard_tokens=8000)
    stream.refresh()
    new_windows = all_windows(data, SEQ)[len(old) :]
    assert Counter(read(stream, len(new_windows), batch=64)) == Counter(new_windows)
    assert stream.state_dict()["epoch"] == 0
    stream.next_batch(1)
    assert stream.state_dict()["epoch"] == 1


def test_appends_mid_epoch_then_resume_on_another_world_size_read_each_window_once(data, new_text):
    """Two appends join one epoch at two cursors (the second a new source at weight 2), the state
    saved after them resumes on 4 ranks mid-epoch, and the epoch is still every window exactly once
    (twice for the weight-2 source), the same windows as the uninterrupted single-rank run."""
    stream = TokenStream(data, SEQ, seed=7)
    trained = read(stream, 1000, batch=40)
    append(data, new_text[:1], shard_tokens=8000)
    assert stream.refresh()
    trained += read(stream, 1200, batch=40)
    append(data, new_text[1:2], source="news", weight=2.0, shard_tokens=8000)
    assert stream.refresh()
    trained += read(stream, 800, batch=40)
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["segments"] == [[0, 1], [1000, 2], [2200, 3]] and state["manifest_version"] == 3
    rest = stream.layout.length - 3000
    single = read(stream, rest, batch=40)
    ranks = [TokenStream(data, SEQ, seed=7) for _ in range(4)]
    for rank in ranks:
        rank.load_state_dict(state)
    resumed = [
        row
        for _ in range(rest // 40)
        for row in [r for k, s in enumerate(ranks) for r in rows(s.next_batch(40, k, 4))]
    ]
    assert resumed == single[: len(resumed)]
    manifest = load_manifest(data)
    windows = all_windows(data, SEQ)
    news = set(
        all_windows(data, SEQ)[-sum(s.tokens // (SEQ + 1) for s in manifest.train if s.source == "news") :]
    )
    expected = Counter(windows) + Counter(w for w in windows if w in news)
    assert Counter(trained + single) == expected and stream.state_dict()["epoch"] == 0


def test_val_append_extends_the_val_split_only(data, new_text):
    first_batches = val_batches(data, SEQ, 2, 8)
    grown = append(data, val=new_text[:1], shard_tokens=20_000)
    assert grown.version == 2 and len(grown.val) == 3 and grown.train == load_manifest(data).train
    assert all((a == b).all() for a, b in zip(val_batches(data, SEQ, 2, 8), first_batches))
    assert len(val_batches(data, SEQ, 1, 540)[0]) == 540  # more val windows than before (527)


def test_already_tokenized_shards_are_appended_as_they_are(data, tiny_data, tmp_path):
    # data is a copy of tiny_data, so this shard is its own shard 0: a duplicate, taken on purpose
    grown = append(data, [tiny_data / "train-000000.bin"], allow_duplicate=True)
    assert grown.train[-1].sha256 == grown.train[0].sha256 and grown.train[-1].tokens == 1 << 15
    out_of_vocab = tmp_path / "other.bin"
    np.array([1, 2, 600], dtype="<u2").tofile(out_of_vocab)
    with pytest.raises(DataError, match="other.bin: token id 600 is outside this data dir's vocab of 512"):
        append(data, [out_of_vocab])
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="odd.bin: 3 bytes is not a whole number of uint16 tokens"):
        append(data, [odd])
    assert load_manifest(data).version == 2


def test_a_token_id_equal_to_the_vocab_size_is_refused(data, tmp_path):
    """Ids run 0..vocab_size-1: 511 is the last valid one of a 512 vocab, 512 is one past it."""
    last = tmp_path / "last.bin"
    np.array([1, 511, 2], dtype="<u2").tofile(last)
    assert append(data, [last]).version == 2
    one_past = tmp_path / "one_past.bin"
    np.array([1, 512, 2], dtype="<u2").tofile(one_past)
    try:
        append(data, [one_past])
    except DataError as exc:
        assert "one_past.bin: token id 512 is outside this data dir's vocab of 512" in str(exc)
    else:
        pytest.fail("a token id equal to the vocab size (512 of 512) was accepted")
    assert load_manifest(data).version == 2


def test_mixture_sources_and_weights(data, new_text):
    grown = append(data, new_text[:1], source="extra", weight=0.5, shard_tokens=4000)
    assert grown.weights == {"main": 1.0, "extra": 0.5}
    stream = TokenStream(data, SEQ, seed=0)
    extra = [n // (SEQ + 1) for n in (s.tokens for s in grown.train if s.source == "extra")]
    assert stream.layout.length == len(all_windows(data, SEQ)) - sum(extra) + sum(round(n / 2) for n in extra)
    with pytest.raises(DataError, match="source 'extra' already has weight 0.5"):
        append(data, new_text[1:2], source="extra", weight=2.0)
    edit_manifest(data, lambda m: m["weights"].update(extra=2.0))  # by hand, under a live stream
    with pytest.raises(DataError, match="weight of source 'extra' changed from 0.5 to 2.0"):
        stream.refresh()


# ---------------------------------------------------------------------------------------------- refusals


def edit_manifest(data_dir: Path, edit) -> None:
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["train"].insert(1, m["train"].pop(2)), "train shard 1 is 'train-000002.bin'"),
        (lambda m: m["train"].pop(3), "train shard 3 is 'train-000004.bin'"),
        (lambda m: m["train"].pop(), "train shard 'train-000005.bin' is missing"),
        (lambda m: m["val"].pop(), "val shard 'val-000001.bin' is missing"),
    ],
)
def test_hand_edited_manifest_that_reorders_or_drops_shards_is_refused(data, edit, message):
    stream = TokenStream(data, SEQ, seed=0)
    state = stream.state_dict()
    edit_manifest(data, edit)
    with pytest.raises(DataError, match=message):
        stream.refresh()  # a live run
    with pytest.raises(DataError, match=message):
        TokenStream(data, SEQ, seed=0).load_state_dict(state)  # a restart
    with pytest.raises(DataError, match=message):
        append(data, [data / "train-000000.bin"])


def test_an_old_shard_changed_under_a_live_stream_is_refused(data, new_text):
    stream = TokenStream(data, SEQ, seed=0)
    append(data, new_text[:1], shard_tokens=8000)
    edit_manifest(data, lambda m: m["train"][2].update(sha256="0" * 64))
    with pytest.raises(DataError, match="train shard 'train-000002.bin' changed since version 1"):
        stream.refresh()


def test_another_tokenizer_is_refused(data, tiny_slices, new_text, tmp_path):
    other = prepare(tiny_slices.train[:2], tmp_path / "other", 400, shard_tokens=1 << 15)
    before = tree_digest(data)
    with pytest.raises(DataError, match="--tokenizer .*tokenizer.model: not the tokenizer of"):
        append(data, new_text, tokenizer=other.data_dir / "tokenizer.model")
    append(data, new_text[:1], tokenizer=data / "tokenizer.model")  # its own is fine
    shutil.copyfile(other.data_dir / "tokenizer.model", data / "tokenizer.model")
    with pytest.raises(
        DataError, match="tokenizer.model: differs from the tokenizer manifest.json was made with"
    ):
        append(data, new_text[1:])
    assert load_manifest(data).version == 2 and set(before) <= set(tree_digest(data))


def test_a_failed_append_leaves_the_old_manifest_valid(data, new_text, tmp_path, monkeypatch):
    before = tree_digest(data)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\n")
    with pytest.raises(DataError, match="bad.txt: not UTF-8"):
        append(data, [new_text[0], bad])  # fails while encoding, after new_text[0]
    assert without_lock(tree_digest(data)) == before

    def crash(manifest, directory):  # the last step: shards are in place, the manifest is not
        raise OSError("disk full")

    monkeypatch.setattr(dataprep, "write_manifest", crash)
    with pytest.raises(DataError, match="disk full; .* is unchanged \\(still version 1\\)"):  # one line
        append(data, new_text[:1], shard_tokens=8000)
    monkeypatch.undo()
    assert load_manifest(data, verify_checksums=True).version == 1  # unlisted new files are invisible
    assert not list(data.glob(".append-*"))
    assert append(data, new_text[:1], shard_tokens=8000).version == 2  # and overwritten by the next append
    assert load_manifest(data, verify_checksums=True).version == 2


def test_concurrent_appends_queue_on_the_lock(data, new_text):
    """Two `evertrain data append` processes start while the test holds the lock: both wait, then both
    land, one after the other (version 3, all shards listed once, checksums fine)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lock = FileLock(data / dataprep.LOCK_FILE)
    lock.acquire()
    procs = [
        subprocess.Popen(
            [
                str(VENV_BIN / "evertrain"),
                "data",
                "append",
                "--data",
                str(data),
                str(path),
                "--shard-tokens",
                "8000",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in new_text[:2]
    ]
    try:
        waiting = [proc.stderr.readline() for proc in procs]  # blocks until each reports the wait
        assert all("waiting for another append" in line for line in waiting), waiting
        assert load_manifest(data).version == 1
    finally:
        lock.release()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    manifest = load_manifest(data, verify_checksums=True)
    assert manifest.version == 3 and [h["version"] for h in manifest.history] == [1, 2, 3]
    assert [h["train"] for h in manifest.history] == [6, 8, 10]  # each document is ~11k tokens: 2 shards


def test_cli_append(data, new_text, capsys, monkeypatch):
    assert (
        cli.main(
            [
                "data",
                "append",
                "--data",
                str(data),
                str(new_text[0]),
                "--val",
                str(new_text[1]),
                "--shard-tokens",
                "100000",
            ]
        )
        == 0
    )
    assert "version 2" in capsys.readouterr().out
    manifest = load_manifest(data)
    assert (len(manifest.train), len(manifest.val)) == (7, 3)
    assert cli.main(["data", "append", "--data", str(data)]) == 2
    assert cli.main(["data", "append", "--data", str(data.parent / "nowhere"), str(new_text[0])]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert (
        len(errors) == 2
        and "nothing to append" in errors[0]
        and "nowhere/manifest.json: no manifest" in errors[1]
    )


# ---------------------------------------------------------------------------------------------- with the trainer

# pretrain.py with every window it trains on recorded: (cursor before the batch, manifest version,
# a digest of each window), one JSON line per batch, flushed so a SIGKILL loses nothing written.
# Recorded where the loop takes a batch, not where the stream reads it: batches are read ahead.
RECORD_WINDOWS = """
import hashlib, json, runpy, sys
from evertrain.pretrain.data.prefetch import Prefetcher

log = open(sys.argv[1], "a", buffering=1)
log.write(json.dumps({"start": True}) + "\\n")
next_batch = Prefetcher.next_batch

def recorded(self):
    cursor, batch = self.state_dict()["cursor"], next_batch(self)
    digests = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in batch]
    log.write(json.dumps({"cursor": cursor, "version": self.manifest_version, "windows": digests}) + "\\n")
    return batch

Prefetcher.next_batch = recorded
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
GLOBAL_WINDOWS = 4  # train.micro_batch_size: one rank, no accumulation


def pretrain(data: Path, run_dir: Path, record: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        RECORD_WINDOWS,
        str(record),
        "pretrain.py",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run_dir),
        f"data.path={data}",
        "model.vocab_size=512",
        "model.seq_len=32",
        f"train.micro_batch_size={GLOBAL_WINDOWS}",
        "train.log_every=1",
        "eval.every_steps=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=100",
        "--engine",
        "single",
        *overrides,
    ]


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "LATEST"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


def checkpoint_data_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:09d}" / "meta.json").read_text())["data"]


@pytest.fixture
def small_data(tiny_data, tiny_slices, tmp_path) -> Path:
    """~45 windows of seq_len 32 (about 11 steps of 4 windows) with the tiny data dir's tokenizer, so
    a short run gets through the old shards and into the appended ones."""
    text = tmp_path / "small.txt"
    text.write_text(tiny_slices.train[0].read_text()[:5_000])
    return prepare(
        [text], tmp_path / "small", tokenizer=tiny_data / "tokenizer.model", shard_tokens=600
    ).data_dir


def test_append_while_training_and_across_a_kill(small_data, new_text, tmp_path):
    """A live run takes an append at its next checkpoint; after a SIGKILL it resumes from its last
    checkpoint and takes a second append made while it was down. The windows of the surviving
    trajectory are the old stream up to each refresh plus the continuation over old and new shards:
    none twice, none skipped, and each step's metrics name the manifest version it read."""
    data, run_dir, record, log = (
        small_data,
        tmp_path / "run",
        tmp_path / "windows.jsonl",
        tmp_path / "pretrain.log",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            pretrain(data, run_dir, record, "train.max_steps=null"),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: latest_step(run_dir) >= 2, proc, log, "the first checkpoint")
        append(data, [text_slice(new_text[0], 2_500)], shard_tokens=600)  # while the run is live
        wait_for(
            lambda: checkpoint_data_state(run_dir, latest_step(run_dir))["manifest_version"] == 2,
            proc,
            log,
            "the checkpoint that refreshed the data",
        )
        refreshed_at = latest_step(run_dir)
        wait_for(lambda: latest_step(run_dir) > refreshed_at, proc, log, "a checkpoint that trained on it")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = latest_step(run_dir)
    append(data, [text_slice(new_text[1], 2_500)], shard_tokens=600)  # while the run is down
    final_steps = TokenStream(data, SEQ, seed=0).layout.length // GLOBAL_WINDOWS  # to the end of epoch 0
    resumed = subprocess.run(
        pretrain(data, run_dir, record, f"train.max_steps={final_steps}"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    second_start = max(i for i, line in enumerate(lines) if "start" in line)
    first_run, second_run = lines[1:second_start], lines[second_start + 1 :]
    resume_cursor = killed_at * GLOBAL_WINDOWS
    # the surviving trajectory: the first run up to its last checkpoint, then the resumed run
    survived = [b for b in first_run if b["cursor"] < resume_cursor] + second_run
    assert [b["cursor"] for b in survived] == list(range(0, final_steps * GLOBAL_WINDOWS, GLOBAL_WINDOWS))
    versions = [b["version"] for b in survived]
    first_refresh = survived[versions.index(2)]["cursor"]
    assert (
        0 < first_refresh < resume_cursor and first_refresh % (2 * GLOBAL_WINDOWS) == 0
    )  # a checkpoint boundary
    assert survived[versions.index(3)]["cursor"] == resume_cursor  # the second append joined on restart

    trained = [w for b in survived for w in b["windows"]]
    every_window = [sha1(w) for w in all_windows(data, SEQ)]
    assert len(set(trained)) == len(trained) and set(trained) <= set(every_window)  # none twice
    # the resumed run is the stream restored from the checkpoint it resumed from (appended data joins the
    # epoch where a run picks it up, so a fresh stream over the grown data dir is another order: issue 17)
    replay = TokenStream(data, SEQ, seed=1234)
    replay.load_state_dict(checkpoint_data_state(run_dir, killed_at))
    replay.refresh()
    assert [w for b in second_run for w in b["windows"]] == [
        sha1(w) for w in read(replay, len(trained) - resume_cursor, GLOBAL_WINDOWS)
    ]
    assert (
        len(set(every_window) - set(trained)) == len(every_window) - len(trained) < GLOBAL_WINDOWS
    )  # none skipped

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data_versions = {r["step"]: r["data_version"] for r in metrics if r["kind"] == "train"}
    assert data_versions == {b["cursor"] // GLOBAL_WINDOWS + 1: b["version"] for b in survived}


def text_slice(path: Path, chars: int) -> Path:
    out = path.with_name(f"{path.stem}-{chars}.txt")
    text = path.read_text()[:chars]
    out.write_text(text[: text.rfind("\n") + 1])
    return out


def sha1(window: bytes) -> str:
    return hashlib.sha1(window).hexdigest()
