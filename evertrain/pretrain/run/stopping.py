"""How a run stops: SIGTERM/SIGINT become a clean stop after the current step, and the checkpoint saved
on the way out fits the stop's budget.

    with StopSignals() as signals:                  # the loop's body runs inside
        signalled = vote(signals.received)          # distributed.StopVote: the same step on every rank
        saved, kept = save_within_budget(ckpt, step, extra, signals, signalled, budget_s, rank, saved)

No host sync of its own: signals are host flags, and the saves are the checkpoint manager's.

A stop can also be requested through a file, RUN/STOP, that any host may write (`evertrain forker
--stop-main` does): StopFile looks for it only on the steps whose vote lands on a checkpoint step, so
the run stops there, checkpointing as on SIGTERM, and removes the file. Looking is a stat() on the host:
no collective and no device sync beyond the vote every step already makes.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from evertrain.pretrain.checkpoint.store import step_of


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (and its checkpoint).

    Repeats are ignored: launchers forward a Ctrl-C as SIGTERM to ranks that already got the SIGINT,
    and deepspeed, torchrun and Slurm send SIGKILL ~30 s after that. So the stop has a budget
    (`checkpoint.stop_budget_s`, counted from the first signal): the last save is finished within it
    or abandoned, and the process exits; the last committed checkpoint is intact either way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = False
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if not self.received:
            self.received_at = time.monotonic()
        self.received = True

    def deadline_if_received(self, budget_s: float) -> float | None:
        """The stop's deadline once this rank got a signal, else None."""
        return None if self.received_at is None else self.received_at + budget_s

    def deadline(self, budget_s: float) -> float:
        """When the stop must be over; a rank stopped by the others' vote counts from now."""
        return (self.received_at if self.received_at is not None else time.monotonic()) + budget_s

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: nothing to listen for
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


STOP_FILE = "STOP"


class StopFile:
    """RUN/STOP, a stop request from another process or host (the module docstring).

    StopVote (distributed.py) answers a vote one step later on more than one rank, so with
    `vote_lag` 1 the file is looked at one step before each checkpoint step, and its vote is read
    on the checkpoint step itself; alone (lag 0) on the checkpoint step."""

    def __init__(self, run_dir: str | Path, every_steps: int, world_size: int):
        self.path = Path(run_dir) / STOP_FILE
        self.every = every_steps
        self.lag = 1 if world_size > 1 else 0
        self.seen = False

    def requested(self, step: int) -> bool:
        """True from the first look that found the file (only steps whose vote lands on a checkpoint)."""
        if not self.seen and self.every and (step + self.lag) % self.every == 0:
            self.seen = self.path.exists()
        return self.seen

    def consume(self, is_main: bool) -> None:
        """The stop it asked for is checkpointed: remove the request (the main rank; a resume runs on)."""
        if self.seen and is_main:
            self.path.unlink(missing_ok=True)


def save_within_budget(
    ckpt,
    step: int,
    extra: dict,
    signals: StopSignals,
    signalled: bool,
    budget_s: float,
    rank: int,
    saved: int | None,
) -> tuple[int | None, bool]:
    """Save `step` (every rank calls it); returns (the last step this process committed, kept).

    Not stopping for a signal: an ordinary save, but a signal that comes while it waits for the save
    before it gets the stop's budget. Stopping for one: the stop's save, within the budget. `kept` False:
    a write was abandoned when the budget ran out, and the caller exits at once (not waiting for the
    writer); the last committed checkpoint is intact."""
    if not signalled:
        kept = ckpt.save(step, extra, stop=lambda: signals.deadline_if_received(budget_s))
        saved = step if kept else saved
    else:
        kept = ckpt.save_before(step, extra, signals.deadline(budget_s))
    if signalled or not kept:
        latest = ckpt.latest()  # the stop step, or the last one committed
        saved = step_of(latest) if latest is not None else None
    if not kept:
        print(
            f"checkpoint: the stop budget of {budget_s:g}s ran out; abandoned the save in "
            f"flight (rank {rank}); the last committed checkpoint is {latest}",
            file=sys.stderr,
            flush=True,
        )
    return saved, kept
