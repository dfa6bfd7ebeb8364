"""A lease file: the lock that holds across hosts where flock does not.

    lease = Lease.acquire(run_dir / ".lock.lease", "run dir")   # LeaseError naming the holder
    ...                                                         # a thread renews it every HEARTBEAT
    lease.release()

On NFS mounted with `local_lock=flock` or `nolock` (and on other network filesystems without
cross-host locks) flock is local to each client: a trainer on host A and one on host B both "hold"
it. So the run, forker and data-dir locks, where their file lies on a network filesystem
(`network_filesystem`, from /proc/mounts), also take a lease: a file created with O_EXCL (atomic on
NFSv3+ and the other network filesystems listed) holding {host, pid, token, heartbeat, ttl_s}. The
holder rewrites `heartbeat` every HEARTBEAT_S from a daemon thread, as long as the process lives.

Another process takes a lease over only when it is stale: on the holder's own host, when its pid is
gone; from another host, when its heartbeat is older than its ttl_s. The latter compares the two
hosts' wall clocks, so they must agree to within LEASE_TTL_S (minutes; NTP gives milliseconds).
Taking over renames the stale file away first (only one contender's rename finds it), checks that
the file it moved is the stale one it judged, then creates its own with O_EXCL.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from evertrain.errors import EvertrainError

LEASE_TTL_S = 300.0  # a heartbeat older than this is a dead holder's (clocks must agree to well within it)
HEARTBEAT_S = 30.0
# Filesystems whose flock may not reach other clients (NFS with local_lock, SMB, FUSE network mounts).
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "glusterfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.rclone",
        "fuse.juicefs",
    }
)


class LeaseError(EvertrainError):
    """Another live process, on this host or another, holds the lease."""


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem `path` lies on (the longest mount point above its real path in
    /proc/mounts, or in `mounts`: the same format); None if unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def network_filesystem(path: str | Path) -> str | None:
    """The filesystem type when `path` lies on one whose flock may not hold across hosts, else None."""
    kind = filesystem_type(path)
    return kind if kind in NETWORK_FS else None


def read_record(path: Path) -> dict | None:
    """The lease's body; None if it cannot be read as one (being written, or garbage)."""
    try:
        record = json.loads(path.read_text())
        float(record["heartbeat"]), float(record["ttl_s"]), int(record["pid"]), str(record["host"])
        return record
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(record: dict | None) -> str:
    if record is None:
        return "holder unknown: its lease file is unreadable or being written"
    age = time.time() - float(record["heartbeat"])
    return f"host {record['host']}, pid {record['pid']}, heartbeat {age:.0f} s ago"


def is_stale(path: Path, record: dict | None) -> bool:
    """A dead holder's lease (see the module docstring); an unreadable one only once its file is
    older than the ttl (a writer may be between create and write)."""
    if record is None:
        return time.time() - path.stat().st_mtime > LEASE_TTL_S
    if record["host"] == socket.gethostname():
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False
    return time.time() - float(record["heartbeat"]) > float(record["ttl_s"])


@dataclass
class Lease:
    path: Path
    token: str
    ttl_s: float = LEASE_TTL_S
    lost: str | None = None  # why the heartbeat found the lease no longer ours
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, path: str | Path, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S) -> Lease:
        """Create the lease, or take over a stale one; LeaseError naming a live holder."""
        path = Path(path)
        lease = cls(path, secrets.token_hex(8), ttl_s)
        for _ in range(5):  # contenders for a stale lease: each round one of them wins
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    record = read_record(path)
                    if not is_stale(path, record):
                        raise LeaseError(f"{path}: held by {describe(record)}")
                    take_over(path, record)
                except FileNotFoundError:
                    pass  # released or taken over meanwhile: try again
                continue
            with os.fdopen(fd, "w") as f:
                f.write(lease.body())
                f.flush()
                os.fsync(f.fileno())
            lease._thread = threading.Thread(
                target=lease._beat, args=(heartbeat_s,), daemon=True, name=f"lease {path.name}"
            )
            lease._thread.start()
            return lease
        raise LeaseError(f"{path}: other processes keep taking this lease; try again")

    def body(self) -> str:
        return (
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "token": self.token,
                    "heartbeat": time.time(),
                    "ttl_s": self.ttl_s,
                }
            )
            + "\n"
        )

    def renew(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; False (and `lost` says why) if not."""
        try:
            record = read_record(self.path)
        except FileNotFoundError:
            record = None
        if record is None or record.get("token") != self.token:
            self.lost = f"{self.path}: the lease is no longer ours ({describe(record)})"
            return False
        tmp = self.path.with_name(f"{self.path.name}.tmp-{self.token}")
        tmp.write_text(self.body())
        os.replace(tmp, self.path)
        return True

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                if not self.renew():
                    print(
                        f"warning: {self.lost}; another process may be using what it guards",
                        file=sys.stderr,
                        flush=True,
                    )
                    return
            except OSError as exc:  # a filesystem hiccup: the next beat retries, well within the ttl
                print(
                    f"warning: {self.path}: lease renewal failed ({exc.strerror or exc})",
                    file=sys.stderr,
                    flush=True,
                )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            record = read_record(self.path)
        except FileNotFoundError:
            return
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def take_over(path: Path, judged: dict | None) -> None:
    """Move a stale lease out of the way, unless another contender replaced it meanwhile (then it
    is put back and the next round judges it again)."""
    moved = path.with_name(f"{path.name}.stale-{secrets.token_hex(4)}")
    os.rename(path, moved)  # FileNotFoundError: someone else moved it first
    try:
        now = read_record(moved)
    except FileNotFoundError:
        return
    if judged is not None and (now is None or now.get("token") != judged.get("token")):
        try:
            os.link(moved, path)  # a fresh lease we must not remove: back where it was, if still free
        except OSError:
            pass
    moved.unlink(missing_ok=True)


def lease_if_shared(lock_path: str | Path) -> Lease | None:
    """A lease beside the flock'ed `lock_path` (`<name>.lease`) when it lies on a network filesystem;
    None where flock alone holds (a local disk)."""
    lock_path = Path(lock_path)
    if network_filesystem(lock_path.parent) is None:
        return None
    return Lease.acquire(lock_path.with_name(f"{lock_path.name}.lease"))
