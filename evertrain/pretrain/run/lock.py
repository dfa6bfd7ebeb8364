"""One trainer per run dir: `run_dir/.lock`, held with flock for the trainer's whole life.

    lock = RunLock.acquire(run_dir)     # RunLockError naming the holder if another trainer has it
    ...                                 # train; the kernel drops the lock when this process dies
    lock.release()

Two trainers on one run dir interleave metrics, overwrite config.yaml and delete each other's
in-flight saves (stale temp-dir cleanup). The realistic way to get there is a launcher killed with
SIGKILL whose workers keep training, and a plain restart beside them; so the lock is taken by the
process that trains (rank 0), before anything is written, and refused at once (no waiting).

flock is released by the kernel when its holder dies, however it dies, so a dead holder's lock is
simply taken over: no pid probing, no stale-lock heuristics (and no race between two restarts: flock
decides). The file's JSON body {host, pid, since} only serves the error message. On NFS, Linux maps
flock to POSIX byte-range locks, which the server (NLM/NFSv4 leases) frees when the client host
stops renewing them, so a crashed host's lock is taken over after the lease expires. But NFS mounted
with `local_lock=flock` or `nolock` keeps flock on each client, so there (and on other network
filesystems) the lock also takes a lease, `.lock.lease`, that holds across hosts (lease.py).

Readers (forks, exports, the report) never take it: they write nowhere in the run dir but pins.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.pretrain.run.lease import Lease, LeaseError, lease_if_shared

LOCK_FILE = ".lock"


class RunLockError(EvertrainError):
    """The run dir is held by another live trainer (or cannot be locked at all)."""


@dataclass
class RunLock:
    path: Path
    fd: int
    lease: Lease | None = None  # on a network filesystem (see the module docstring)

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLockError(f"{path}: cannot create the run lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(fd)
            os.close(fd)
            raise RunLockError(
                f"{run_dir}: another trainer is using this run dir ({holder}); stop it first, "
                f"or use another --run-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RunLockError(
                f"{path}: cannot lock ({exc.strerror}); does the filesystem support locks?"
            ) from None
        try:
            lease = lease_if_shared(path)
        except LeaseError as exc:
            os.close(fd)
            raise RunLockError(
                f"{run_dir}: another trainer is using this run dir ({exc}); stop it first, "
                f"or use another --run-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RunLockError(
                f"{path}.lease: cannot write the run's lease ({exc.strerror or exc})"
            ) from None
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode() + b"\n", 0)
        return cls(path, fd, lease)

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.lease is not None:
            self.lease.release()
        try:
            os.ftruncate(self.fd, 0)  # the next holder's body, not ours, is what an error should show
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(fd: int) -> str:
    """'host H, pid P, since <UTC time>' from the lock's body; what is known if it is partly written."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record["since"])))
        return f"host {record['host']}, pid {record['pid']}, since {since}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return "holder unknown: its lock file is being written"
