"""Staging a checkpoint (copying the live state to host memory) without the training thread waiting
for the copy; the next optimizer step waits for it instead, and only if it is not done yet.

    save(step):    stage(state_dict) -> Future of the host copy          (returns at once)
    step + 1:      forward, backward                                     (read the weights: no conflict)
                   optimizer step pre-hook: guard()                      (the only writer waits here)
    writer thread: future.result() -> write the files

The ordering, per device:
- CUDA: the copies are issued non-blocking on a side stream that first waits for the compute stream
  (so they read the step's final values) into pinned buffers; an event is recorded after them. The
  guard makes the *compute stream* wait on that event, so the next optimizer step's kernels run after
  the copy on the device while the host never waits. The writer thread waits on the event itself
  before it reads the buffers.
- CPU: the copy runs in a background thread (memcpy releases the GIL) into buffers kept from one save
  to the next, overlapping the next step's forward and backward; the guard waits for that thread.
  A copy cannot be avoided on CPU: the optimizer updates the weights in place.

The buffers are DCP's `StateDictStager` (kept between saves by storage, pinned on CUDA), so DTensors
of FSDP2 and DeepSpeed's nested state dicts stage the same way. At most one staging is in flight: the
manager waits for the previous save before it stages the next.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from evertrain import torch_compat


class BackgroundStager:
    """See the module docstring. `optimizer` is the one whose `step()` is the next write to the state."""

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copier = torch_compat.state_dict_stager(pin_memory=self.cuda, share_memory=False)
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evertrain-stage")
        self.copy_done: Future | None = None  # CPU: the copy; CUDA: the host-side wait for the event
        self.event = None  # CUDA: recorded on the side stream after the last copy
        self.waited = 0.0  # seconds the last guard held the training thread (CPU; 0 on CUDA)
        self.hook = optimizer.register_step_pre_hook(lambda *_: self.guard())

    def stage(self, state_dict: dict) -> Future:
        """Start copying `state_dict` to host memory; the Future gives the copy once it is complete."""
        self.guard()  # a previous staging is finished (the manager waited for its save already)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            self.side.wait_stream(compute)  # the copies read what the step wrote, not older values
            with torch.cuda.stream(self.side):
                staged = self.copier.stage(state_dict, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.side)
            self.event = event
            # the source tensors stay referenced until the copy is done (the allocator must not reuse them)
            self.copy_done = self.thread.submit(_after_event, event, staged, state_dict)
        else:
            self.copy_done = self.thread.submit(self.copier.stage, state_dict, non_blocking=False)
        return self.copy_done

    def guard(self) -> None:
        """Called before the optimizer writes the state: order that write after the copy."""
        if self.cuda:
            if self.event is not None:
                # the device waits, not the host
                torch.cuda.current_stream(self.device).wait_event(self.event)
                self.event = None
        elif self.copy_done is not None:
            copy_done, self.copy_done = self.copy_done, None
            started = time.perf_counter()
            copy_done.result()  # usually done already: it overlapped forward and backward
            self.waited = time.perf_counter() - started

    def close(self) -> None:
        self.hook.remove()
        self.thread.shutdown(wait=True)
        self.copier.close()


def _after_event(event, staged: dict, source: dict) -> dict:
    event.synchronize()  # the writer's thread waits for the side stream, never the training thread
    del source
    return staged
