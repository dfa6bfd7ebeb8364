"""Which ranks reached a point where all ranks wait for each other: a roll call through the
rendezvous store, so a wait that failed names the ranks that are missing.

    roll_call = RollCall.for_default_group(timeout_s)   # once, after init_process_group (engines/)
    with roll_call.guard("the checkpoint load"):        # any wait on the other ranks
        dcp.load(...)                                   # failed as a collective -> MissingRankError
    roll_call.check("the end of training")              # a wait of its own: all ranks, or an error

Each rank sets a key for the point it reached and waits, at most train.collective_timeout_s, until
every rank has; the ranks whose keys are absent are the missing ones. A collective's own error cannot
say that (gloo's reads "connection closed by peer" or "timed out", and a monitored barrier names the
rank only from rank 0's side); the store names the exact ranks on every rank, for any world size,
whether the missing one was stopped, killed or is stuck. The store is the launcher's rendezvous
(a TCPStore in rank 0 or in torchrun's agent): no process group, no device.

A point is the caller's name plus how often this process passed it (`guard` counts every pass, failed
or not, so all ranks agree on the count), and a repeated use never sees an earlier one's keys.
Nothing runs on the steady path: `guard` costs a counter until its block fails, and the roll call
itself runs only after a collective failed, or where the ranks wait for each other anyway.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import torch.distributed as dist

from evertrain import torch_compat
from evertrain.pretrain.distributed import MissingRankError, collective_failed

PREFIX = "evertrain/roll_call"


class RollCall:
    """The roll call of one process group's ranks; made once per process, passed where ranks wait."""

    def __init__(self, store: dist.Store | None, rank: int, world_size: int, timeout_s: float):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.passes: dict[str, int] = {}  # point name -> how often this process reached it

    @classmethod
    def for_default_group(cls, timeout_s: float) -> RollCall:
        """Over the ranks of the default process group (alone: every roll call passes at once)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls(None, 0, 1, timeout_s)
        store = torch_compat.default_store(timeout_s)
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s)

    def check(self, where: str, cause: BaseException | None = None) -> None:
        """Wait (at most timeout_s; twice that with a `cause`) until every rank reaches this call;
        MissingRankError naming the ranks that did not. With a `cause` (a collective that failed),
        return quietly when all came: the caller re-raises the cause, which was not a missing rank."""
        point = self._point(where)
        if self.world_size > 1:
            self._call(point, where, cause)

    @contextlib.contextmanager
    def guard(self, where: str):
        """Run the block; if it fails as a collective (timed out, lost a peer), take the roll call:
        MissingRankError naming who did not reach `where`, else the block's own error."""
        point = self._point(where)  # on every pass, so the ranks that fail agree on the point
        try:
            yield
        except RuntimeError as failed:
            if self.world_size > 1 and collective_failed(failed):
                self._call(point, where, failed)
            raise

    def _point(self, where: str) -> str:
        passes = self.passes[where] = self.passes.get(where, 0) + 1
        return f"{PREFIX}/{where}/{passes}"

    def _call(self, point: str, where: str, cause: BaseException | None) -> None:
        # after a failed collective, twice the timeout: a rank whose collective failed at once (its
        # peer's connection closed) must not name one still waiting out the same collective
        store, timeout = self.store, timedelta(seconds=self.timeout_s * (1 if cause is None else 2))
        try:
            store.set(f"{point}/{self.rank}", b"")
            if store.add(f"{point}/arrived", 1) == self.world_size:  # the last to arrive says so
                store.set(f"{point}/all", b"")
            store.wait([f"{point}/all"], timeout)
            return
        except RuntimeError as failed:  # timed out (DistStoreError; a FileStore's plain RuntimeError)
            try:
                missing = [r for r in range(self.world_size) if not store.check([f"{point}/{r}"])]
            except RuntimeError:
                raise MissingRankError(
                    f"the rendezvous store stopped answering at {where} (it lives in rank 0 or in the "
                    f"launcher's agent, which is stopped or gone)"
                ) from cause or failed
            if not missing:
                return  # all came, just as the wait ran out
            raise MissingRankError(
                f"rank(s) {', '.join(map(str, missing))} did not reach {where} within "
                f"train.collective_timeout_s={self.timeout_s:g}s (stopped, killed or stuck; a launcher "
                f"that signals only some ranks leaves the others waiting)"
            ) from cause or failed
