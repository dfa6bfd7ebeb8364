"""Locks on shared filesystems: where flock does not reach other hosts (NFS with local_lock=flock or
nolock), the run, forker and data-dir locks also hold a lease file that a second host is refused
by, and that is taken over only once its holder is dead (lease.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evertrain.pretrain.run import lease
from evertrain.pretrain.run.lease import Lease, LeaseError, filesystem_type

REPO = Path(__file__).resolve().parents[1]

MOUNTS = """sysfs /sys sysfs rw 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/shared nfs4 rw,local_lock=flock 0 0
/dev/sdb1 /mnt/shared/local\\040disk xfs rw 0 0
"""


def test_the_filesystem_type_comes_from_the_longest_mount_point():
    assert filesystem_type("/mnt/shared/runs/a", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/shared/local disk/x", MOUNTS) == "xfs"
    assert filesystem_type("/mnt/sharedx", MOUNTS) == "ext4"
    assert filesystem_type("/home/u", MOUNTS) == "ext4"


def test_a_lease_refuses_another_hosts_live_holder_and_takes_over_a_stale_one(tmp_path):
    path = tmp_path / ".lock.lease"
    record = {"host": "node-b", "pid": 4242, "token": "theirs", "heartbeat": time.time(), "ttl_s": 300.0}
    path.write_text(json.dumps(record))
    with pytest.raises(LeaseError, match=r"held by host node-b, pid 4242, heartbeat \d+ s ago"):
        Lease.acquire(path)
    path.write_text(json.dumps({**record, "heartbeat": time.time() - 301}))  # node-b stopped renewing
    ours = Lease.acquire(path, heartbeat_s=0.05)
    try:
        first = json.loads(path.read_text())
        assert first["token"] == ours.token and first["host"] == socket.gethostname()
        time.sleep(0.3)
        assert json.loads(path.read_text())["heartbeat"] > first["heartbeat"]  # renewed
        with pytest.raises(LeaseError, match=f"pid {os.getpid()}"):
            Lease.acquire(path)  # this host, a live pid: held
    finally:
        ours.release()
    assert not path.exists() and not list(tmp_path.iterdir())


# A process on "NFS with local_lock=flock": flock always succeeds, the run dir counts as a network mount.
HOLDER = """
import fcntl, socket, sys, time
fcntl.flock = lambda fd, op: None
from evertrain.pretrain.run import lease
lease.network_filesystem = lambda path: "nfs"
if sys.argv[2] != "-":
    socket.gethostname = lambda: sys.argv[2]
from evertrain.pretrain.run.lock import RunLock, RunLockError
try:
    lock = RunLock.acquire(sys.argv[1])
except RunLockError as exc:
    print(exc, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
"""


def holder(run: Path, host: str, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), host, str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_two_trainers_whose_flock_always_succeeds_do_not_both_hold_the_run(tmp_path):
    run = tmp_path / "run"
    first = holder(run, "-", 120)
    try:
        assert first.stdout.readline().strip() == "held"
        for host in ("-", "node-b"):  # another process on this host, and one on another host
            second = holder(run, host, 0)
            out, _ = second.communicate(timeout=120)
            assert second.returncode == 2, out
            assert "another trainer is using this run dir" in out and f"pid {first.pid}" in out
            assert len(out.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = holder(run, "-", 0)  # the holder died on this host: its lease is taken over at once
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0 and out.strip() == "held"
    assert not (run / ".lock.lease").exists()  # released


def test_locks_take_no_lease_on_a_local_disk(tmp_path):
    from evertrain.pretrain.run.lock import RunLock

    with RunLock.acquire(tmp_path / "run") as lock:
        assert (lock.lease is None) == (lease.network_filesystem(tmp_path) is None)


def test_the_forker_and_data_dir_locks_take_the_lease_too(tmp_path, monkeypatch, capsys):
    """A forker or an append on another host holds the lease: a second forker is refused, an append
    waits for it (as it waits for a local one)."""
    import threading

    from evertrain.launch.forker import Forker, ForkerError, ForkerOptions
    from evertrain.launch.nodes import parse_pool
    from evertrain.pretrain.data import prepare as dataprep

    monkeypatch.setattr(lease, "network_filesystem", lambda path: "nfs")
    foreign = {"host": "node-b", "pid": 4242, "token": "theirs", "heartbeat": time.time(), "ttl_s": 300.0}
    run = tmp_path / "run"
    (run / "forker").mkdir(parents=True)
    (run / "forker" / "forker.lock.lease").write_text(json.dumps(foreign))
    options = ForkerOptions(run, cooldown_fraction=0.5, every=10, once=True, poll_s=0.01)
    with pytest.raises(ForkerError, match="another forker is already running on .* held by host node-b"):
        Forker(options, parse_pool("local:1"), log=lambda _: None).run()

    data = tmp_path / "data"
    data.mkdir()
    (data / ".lock.lease").write_text(json.dumps(foreign))
    monkeypatch.setattr(dataprep, "LEASE_POLL_S", 0.05)
    entered = threading.Event()

    def append():
        with dataprep.data_dir_lock(data):
            entered.set()

    worker = threading.Thread(target=append)
    worker.start()
    time.sleep(0.5)
    assert not entered.is_set() and "waiting for another append" in capsys.readouterr().err
    (data / ".lock.lease").write_text(json.dumps({**foreign, "heartbeat": time.time() - 400}))  # node-b died
    worker.join(timeout=60)
    assert entered.is_set() and not (data / ".lock.lease").exists()
