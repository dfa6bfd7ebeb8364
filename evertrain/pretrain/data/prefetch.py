"""Training batches read ahead by a background thread, staged in pinned host memory, copied to the
device on a side stream; the training thread never reads a file and never waits for a copy.

    worker thread:   stream.next_batch -> pinned buffer -> H2D on a side CUDA stream -> event
    training thread: Prefetcher.next_batch() -> the compute stream waits on the event (not the host)

Contract (the loop's view of the data, in place of the TokenStream it wraps):
- `next_batch()` returns, in order, exactly the batches `stream.next_batch(G, rank, W)` would, on
  `device`; at most `depth` batches are read ahead of the last one returned, and never more than
  `limit` in all (a run that ends at max_steps reads no batch it will not train).
- `state_dict()` and `manifest_version` are those of the stream right after the last batch returned:
  what was read ahead but not trained is not consumed, so a checkpoint saves the trained position.
- `refresh()` (checkpoint boundaries) pauses the worker between two batches. If the manifest did not
  grow the read-ahead batches stay valid and are kept. If it grew they are discarded, the stream goes
  back to the consumed position at the version it was read with and is refreshed from there: the
  windows after the boundary are those the unprefetched stream gives, so `data append` stays
  exactly-once (appended shards join at the first step after the boundary, never mid-queue).
- depth 0 reads in the caller's thread, as before prefetching existed.

A thread, not a process: the worker spends its time in file reads, `time.sleep`-like I/O waits and
numpy copies, and a process would add a pickle/shared-memory hop plus a second copy into pinned memory
on the training side; bench/input_pipeline.py measures both (docs/performance.md).

On CUDA the pinned buffers are a ring of depth + 2 slots; a slot is rewritten only after the event
of its previous copy has completed (the worker waits for it, the training thread never does), and the
device batch is `record_stream`ed on the compute stream so the allocator does not hand its memory to
the side stream while the step still reads it.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch


@dataclass
class Staged:
    batch: torch.Tensor  # on the device (or the CPU tensor next_batch returned)
    state: dict  # stream.state_dict() right after this batch
    version: int  # the manifest version it was read with
    ready: object = None  # torch.cuda.Event recorded on the side stream after the H2D copy, or None


class Prefetcher:
    """See the module docstring."""

    def __init__(
        self,
        stream,
        global_windows: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        depth: int = 2,
        device: torch.device | str = "cpu",
        limit: int | None = None,
    ):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.stream, self.depth, self.device = stream, depth, torch.device(device)
        self.args = (global_windows, rank, world_size)
        self.state, self.version = stream.state_dict(), stream.manifest_version  # consumed so far
        self.left = limit  # batches the worker may still read; None = no end
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.slots: list[torch.Tensor | None] = [None] * (depth + 2)
            self.slot_events: list[object] = [None] * (depth + 2)
            self.next_slot = 0
        self.ready: collections.deque[Staged] = collections.deque()
        self.cond = threading.Condition()
        self.paused = self.closing = self.busy = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    @property
    def manifest_version(self) -> int:
        return self.version

    def state_dict(self) -> dict:
        return dict(self.state)

    def next_batch(self) -> torch.Tensor:
        if self.depth == 0:
            self._take_one()
            staged = self._read()
        else:
            self._start()
            with self.cond:
                while not self.ready and self.error is None:
                    if self.left == 0 and not self.busy:
                        raise RuntimeError("Prefetcher: more batches asked for than its limit")
                    self.cond.wait()
                if not self.ready:  # batches read before the failure are still trained first
                    raise self.error
                staged = self.ready.popleft()
                self.cond.notify_all()  # a slot in the queue is free
        self.state, self.version = staged.state, staged.version
        if staged.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(staged.ready)  # the device waits for the copy; the host does not
            staged.batch.record_stream(compute)
        return staged.batch

    def refresh(self) -> bool:
        """Let appended shards join after the last batch returned; True if the manifest grew."""
        self._pause()
        try:
            grew = self.stream.refresh()
            if grew:
                if self.ready or self.stream.state_dict() != self.state:  # read ahead on the old manifest
                    self.left = None if self.left is None else self.left + len(self.ready)
                    self.ready.clear()
                    self.stream.load_state_dict(self.state)  # the consumed position, at its version
                    self.stream.refresh()  # and forward to the manifest as it is now
                self.state, self.version = self.stream.state_dict(), self.stream.manifest_version
            return grew
        finally:
            self._resume()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    # -- the worker -------------------------------------------------------------------------------

    def _start(self) -> None:
        if self.thread is None and not self.closing:
            self.thread = threading.Thread(target=self._work, name="evertrain-prefetch", daemon=True)
            self.thread.start()

    def _pause(self) -> None:
        """Wait until the worker is between two batches and keep it there: the stream is ours."""
        with self.cond:
            self.paused = True
            while self.busy:
                self.cond.wait()

    def _resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def _work(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while True:
            with self.cond:
                while not self.closing and (
                    self.paused or self.left == 0 or len(self.ready) >= self.depth or self.error is not None
                ):
                    self.cond.wait()
                if self.closing:
                    return
                self._take_one()
                self.busy = True
            try:
                staged = self._read()
            except BaseException as exc:  # handed to the training thread by next_batch
                with self.cond:
                    self.error, self.busy = exc, False
                    self.cond.notify_all()
                return
            with self.cond:
                self.ready.append(staged)
                self.busy = False
                self.cond.notify_all()

    def _take_one(self) -> None:
        if self.left is not None:
            if self.left == 0:
                raise RuntimeError("Prefetcher: more batches asked for than its limit")
            self.left -= 1

    def _read(self) -> Staged:
        batch = self.stream.next_batch(*self.args)
        staged = Staged(batch, self.stream.state_dict(), self.stream.manifest_version)
        if self.cuda:
            staged.batch, staged.ready = self._to_device(batch)
        return staged

    def _to_device(self, batch: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Pageable -> pinned (a host memcpy in this thread) -> device, non-blocking on the side stream."""
        i = self.next_slot
        self.next_slot = (i + 1) % len(self.slots)
        if self.slot_events[i] is not None:
            self.slot_events[i].synchronize()  # this slot's previous copy has left it (worker thread only)
        slot = self.slots[i]
        if slot is None or slot.shape != batch.shape or slot.dtype != batch.dtype:
            slot = self.slots[i] = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        slot.copy_(batch)
        with torch.cuda.stream(self.copy_stream):
            on_device = slot.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.slot_events[i] = event
        return on_device, event
