"""The prefetching input pipeline (evertrain/pretrain/data/prefetch.py): the same batches as the stream, a
consumed position that ignores what was read ahead, appends that join exactly at a refresh, worker
errors that reach the training thread, and no read past the run's last step. The kill -9 with batches
in flight is in test_resume.py; the loop's own use of it in test_train.py and test_append.py."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from test_data import all_windows, rows

from evertrain.pretrain.data.prefetch import Prefetcher
from evertrain.pretrain.data.prepare import append
from evertrain.pretrain.data.stream import DataError, TokenStream

SEQ, G = 256, 8


class CountingStream(TokenStream):
    """A TokenStream that counts its reads and refreshes, and can be told to fail or to wait."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = self.refreshes = 0
        self.fail_at = None
        self.gate = threading.Event()
        self.gate.set()

    def next_batch(self, *args, **kwargs):
        self.gate.wait()
        if self.reads + 1 == self.fail_at:
            self.reads += 1
            raise DataError("shard vanished")
        batch = super().next_batch(*args, **kwargs)
        self.reads += 1  # counted once read, so a waiter that sees n reads sees their cursor too
        return batch

    def refresh(self):
        self.refreshes += 1
        return super().refresh()


@contextlib.contextmanager
def prefetching(stream: TokenStream, **kwargs):
    """A Prefetcher of G windows a batch over `stream`, closed (its worker joined) on the way out."""
    batches = Prefetcher(stream, G, **kwargs)
    try:
        yield batches
    finally:
        batches.close()


def wait_reads(stream: CountingStream, n: int) -> None:
    deadline = time.monotonic() + 30
    while stream.reads < n:
        assert time.monotonic() < deadline, f"the worker read {stream.reads} batches, expected {n}"
        time.sleep(0.002)


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def test_same_batches_and_the_consumed_position(tiny_data):
    plain, ahead = TokenStream(tiny_data, SEQ, seed=3), CountingStream(tiny_data, SEQ, seed=3)
    with prefetching(ahead, depth=3) as batches:
        for _ in range(5):
            batch = batches.next_batch()
            assert torch.equal(batch, plain.next_batch(G))
            assert batches.state_dict() == plain.state_dict()  # what was trained, not what was read
            assert batches.manifest_version == plain.manifest_version
        wait_reads(ahead, 5 + 3)
        assert ahead.state_dict()["cursor"] == (5 + 3) * G  # three batches in flight, none counted
        time.sleep(0.05)
        assert ahead.reads == 8  # and no more than `depth` ahead
    assert batches.thread is None


def test_depth_zero_reads_in_the_caller(tiny_data):
    stream = CountingStream(tiny_data, SEQ, seed=3)
    batches = Prefetcher(stream, G, depth=0)
    batches.next_batch()
    assert stream.reads == 1 and batches.thread is None


def test_refresh_without_an_append_keeps_the_read_ahead(tiny_data):
    stream = CountingStream(tiny_data, SEQ, seed=3)
    with prefetching(stream, depth=2) as batches:
        batches.next_batch()
        wait_reads(stream, 3)
        assert batches.refresh() is False
        assert stream.reads == 3 and batches.state_dict()["cursor"] == G  # nothing discarded or re-read
        plain = TokenStream(tiny_data, SEQ, seed=3)
        plain.next_batch(G)
        assert all(torch.equal(batches.next_batch(), plain.next_batch(G)) for _ in range(4))


def test_an_append_joins_right_after_the_refresh_even_with_batches_in_flight(data, tiny_slices):
    """Consumed up to the last batch of epoch 0; the worker has already read two batches of epoch 1
    from the old shards. After an append + refresh those are discarded: the next windows are the new
    shards, exactly as for a stream that was never read ahead."""
    epoch = len(all_windows(data, SEQ))
    plain, stream = TokenStream(data, SEQ, seed=5), CountingStream(data, SEQ, seed=5)
    stale = TokenStream(data, SEQ, seed=5)  # never refreshed: what the read-ahead batches hold
    before = epoch // G - 1
    for _ in range(before):
        plain.next_batch(G)
        stream.next_batch(G)
        stale.next_batch(G)
    stale.next_batch(G)
    stream.reads = 0
    with prefetching(stream, depth=2) as batches:
        assert torch.equal(batches.next_batch(), plain.next_batch(G))  # the end of epoch 0
        wait_reads(stream, 3)  # two batches past the epoch end, read with manifest version 1
        append(
            data, [tiny_slices.val[0]], shard_tokens=1 << 14, allow_duplicate=True
        )  # the val text, as train
        assert batches.refresh() is True and plain.refresh() is True
        assert batches.manifest_version == plain.manifest_version == 2
        assert batches.state_dict() == plain.state_dict()
        new_windows = set(all_windows(data, SEQ)[epoch:])
        after = [batches.next_batch() for _ in range(3)]
        for batch in after:
            assert torch.equal(batch, plain.next_batch(G))
        assert set(rows(after[0])) & new_windows  # the appended shards...
        assert not torch.equal(after[0], stale.next_batch(G))  # ...not the stale read-ahead of epoch 1


def test_a_worker_error_reaches_the_training_thread_in_order(tiny_data):
    stream = CountingStream(tiny_data, SEQ, seed=3)
    stream.fail_at = 3
    with prefetching(stream, depth=2) as batches:
        batches.next_batch()
        batches.next_batch()  # read before the failure: still trained
        with pytest.raises(DataError, match="shard vanished"):
            batches.next_batch()


def test_no_batch_is_read_past_the_limit(tiny_data):
    stream = CountingStream(tiny_data, SEQ, seed=3)
    with prefetching(stream, depth=4, limit=3) as batches:
        for _ in range(3):
            batches.next_batch()
        time.sleep(0.05)
        assert stream.reads == 3 and stream.state_dict() == batches.state_dict()
        with pytest.raises(RuntimeError, match="limit"):
            batches.next_batch()


def test_refresh_waits_for_a_read_in_progress(tiny_data):
    """The stream is never read and refreshed at once: refresh pauses the worker between batches."""
    stream = CountingStream(tiny_data, SEQ, seed=3)
    with prefetching(stream, depth=2) as batches:
        try:
            batches.next_batch()
            wait_reads(stream, 3)
            stream.gate.clear()
            batches.next_batch()  # frees a slot: the worker starts read 4 and blocks in it
            deadline = time.monotonic() + 30
            while not batches.busy:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            done = threading.Event()
            refresher = threading.Thread(target=lambda: (batches.refresh(), done.set()))
            refresher.start()
            time.sleep(0.1)
            assert not done.is_set() and stream.refreshes == 0  # waiting for the read to finish
            stream.gate.set()
            refresher.join(10)
            assert done.is_set() and stream.refreshes == 1
        finally:
            stream.gate.set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device_from_pinned_memory(tiny_data):
    plain = TokenStream(tiny_data, SEQ, seed=3)
    with prefetching(TokenStream(tiny_data, SEQ, seed=3), depth=2, device="cuda") as batches:
        for _ in range(6):
            batch = batches.next_batch()
            assert batch.is_cuda and torch.equal(batch.cpu(), plain.next_batch(G))
        assert all(slot is None or slot.is_pinned() for slot in batches.slots)


def test_read_ahead_discarded_by_a_refresh_is_credited_back_to_the_limit(data, tiny_slices):
    """A run of 4 steps (limit 4) whose worker has read 2 batches ahead when an append lands: the
    refresh discards them, so they must count as unread, or the run's last steps find no batch left."""
    stream = CountingStream(data, SEQ, seed=5)
    with prefetching(stream, depth=2, limit=4) as batches:
        batches.next_batch()
        wait_reads(stream, 3)  # two batches in flight, the limit's last one not read yet
        append(data, [tiny_slices.val[0]], shard_tokens=1 << 14, allow_duplicate=True)
        assert batches.refresh() is True
        try:
            for _ in range(3):
                batches.next_batch()
        except RuntimeError as exc:
            pytest.fail(f"the read-ahead discarded by the refresh was not credited back to the limit: {exc}")
        with pytest.raises(RuntimeError, match="limit"):  # and the limit still holds
            batches.next_batch()
