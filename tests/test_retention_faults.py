"""Retention on a shared filesystem: deletions that fail are reported and retried, never raised;
lease expiry is judged on the observer's clock, whatever the holder's clock says."""

import json
from pathlib import Path

import pytest

from evertrain.pretrain.checkpoint import retention, store
from evertrain.pretrain.checkpoint.retention import PinWatch, apply_retention, is_pinned, pin


def make_checkpoints(ckpt_dir: Path, steps: list[int]) -> None:
    for step in steps:
        step_dir = ckpt_dir / store.step_dir_name(step)
        step_dir.mkdir(parents=True)
        (step_dir / store.META).write_text(json.dumps({"step": step}))
        (step_dir / "shard.bin").write_bytes(b"x" * 64)
    (ckpt_dir / store.LATEST).write_text(store.step_dir_name(max(steps)) + "\n")


def steps_on_disk(ckpt_dir: Path) -> list[int]:
    return [store.step_of(p) for p in store.complete_checkpoints(ckpt_dir)]


def rmtree_with_nfs_busy_files(path, onerror=None, **kwargs):
    """rmtree as on NFS while a reader holds a deleted file open: its `.nfsXXXX` stand-in cannot go."""
    for p in sorted(Path(path).rglob("*"), reverse=True):
        if p.name.startswith(".nfs"):
            onerror(Path.unlink, str(p), (OSError, OSError(16, "Device or resource busy"), None))
        elif p.is_file():
            p.unlink()
        elif not any(p.iterdir()):
            p.rmdir()
    if any(Path(path).iterdir()):
        onerror(Path.rmdir, str(path), (OSError, OSError(39, "Directory not empty"), None))
    else:
        Path(path).rmdir()


def test_a_delete_that_fails_is_reported_and_retried_at_the_next_save(tmp_path, monkeypatch, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    make_checkpoints(ckpt_dir, [1, 2, 3])
    (ckpt_dir / "step_000000001" / ".nfs000000001234").write_bytes(b"open elsewhere")
    monkeypatch.setattr(retention.shutil, "rmtree", rmtree_with_nfs_busy_files)
    deleted = apply_retention(ckpt_dir, keep_last=1, keep_every=0)
    assert deleted == [ckpt_dir / "step_000000002"] and steps_on_disk(ckpt_dir) == [3]
    err = capsys.readouterr().err
    assert (
        "could not delete" in err
        and "step_000000001.tmp-deleting" in err
        and "retrying at the next save" in err
    )
    leftover = ckpt_dir / f"step_000000001{retention.DELETING_TAG}"
    assert leftover.is_dir()  # out of the way: never read as a checkpoint, never pinnable

    (leftover / ".nfs000000001234").unlink()  # the reader closed its file
    (ckpt_dir / "step_000000004").mkdir()  # the next save
    (ckpt_dir / "step_000000004" / store.META).write_text("{}")
    (ckpt_dir / store.LATEST).write_text("step_000000004\n")
    apply_retention(ckpt_dir, keep_last=1, keep_every=0)
    assert not leftover.exists() and steps_on_disk(ckpt_dir) == [4]


def test_a_rename_that_fails_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    make_checkpoints(ckpt_dir, [1, 2])

    def stale_handle(src, dst):
        raise OSError(116, "Stale file handle")

    monkeypatch.setattr(retention.os, "rename", stale_handle)
    assert apply_retention(ckpt_dir, keep_last=1, keep_every=0) == []
    assert "cannot move" in capsys.readouterr().err and steps_on_disk(ckpt_dir) == [1, 2]
    monkeypatch.undo()
    assert apply_retention(ckpt_dir, keep_last=1, keep_every=0) == [ckpt_dir / "step_000000001"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("holder_clock_offset_s", [-86400.0, 86400.0])
def test_lease_expiry_ignores_the_holders_clock(tmp_path, monkeypatch, holder_clock_offset_s):
    """A holder whose clock is a day behind (its `expires` lies in our past) or a day ahead: the
    lease lasts ttl_s of the observer's time after it last saw a renewal, either way."""
    ckpt_dir = tmp_path / "checkpoints"
    make_checkpoints(ckpt_dir, [1, 2])
    step_dir = ckpt_dir / "step_000000001"
    real_time = retention.time.time
    monkeypatch.setattr(retention.time, "time", lambda: real_time() + holder_clock_offset_s)
    pin(step_dir, "fork-on-other-host", ttl_s=60)
    monkeypatch.setattr(retention.time, "time", real_time)
    clock = FakeClock()
    monkeypatch.setattr(retention.time, "monotonic", clock)
    watch = PinWatch()

    assert is_pinned(step_dir, watch)  # first sight
    clock.now += 50
    assert apply_retention(ckpt_dir, keep_last=1, keep_every=0, watch=watch) == []
    pin(step_dir, "fork-on-other-host", ttl_s=60)  # renewed: a new token
    assert apply_retention(ckpt_dir, keep_last=1, keep_every=0, watch=watch) == []
    clock.now += 50
    assert is_pinned(step_dir, watch)  # 100 s after the first sight, 50 s after the renewal was seen
    clock.now += 11
    assert not is_pinned(step_dir, watch)  # 61 s without a new renewal: expired
    assert is_pinned(step_dir)  # a one-shot reader without a watch never judges expiry
    assert apply_retention(ckpt_dir, keep_last=1, keep_every=0, watch=watch) == [step_dir]


@pytest.mark.parametrize(
    "content",
    [
        '{"holder": "x", "expires": 1e12, "ttl_s": "abc"}',
        '{"holder": "x", "expires": 1e12, "ttl_s": null}',
        '{"holder": "x", "expires": 1e12, "created": "yesterday"}',
        '{"holder": "x", "expires": "soon"}',
        "[1, 2]",
        "7",
        "not json",
        '{"holder": "x"}',
    ],
)
def test_a_malformed_pin_counts_as_active_and_never_raises(tmp_path, content):
    """Retention runs in the checkpoint writer: a pin it cannot read keeps its checkpoint (never delete
    on doubt) and must not kill training at every save."""
    ckpt_dir = tmp_path / "checkpoints"
    make_checkpoints(ckpt_dir, [1, 2, 3])
    (ckpt_dir / "step_000000001" / "pins").mkdir()
    (ckpt_dir / "step_000000001" / "pins" / "bad.json").write_text(content)
    (ckpt_dir / "step_000000002" / "pins").mkdir()
    (ckpt_dir / "step_000000002" / "pins" / "dir.json").mkdir()  # unreadable as a file
    watch = PinWatch()
    for _ in range(2):  # first sight and a later save
        assert apply_retention(ckpt_dir, keep_last=1, keep_every=0, watch=watch) == []
    assert steps_on_disk(ckpt_dir) == [1, 2, 3] and is_pinned(ckpt_dir / "step_000000001", watch)


def test_resume_step_is_not_blocked_by_a_dead_readers_pins(tmp_path):
    """--resume-step refuses to abandon a checkpoint a reader still uses, but a pin of a process that
    died on this host, or one not renewed for twice its ttl, is no reader: it does not block forever."""
    import os
    import socket
    import subprocess
    import sys

    from evertrain.pretrain.checkpoint.retention import has_live_pins

    ckpt_dir = tmp_path / "checkpoints"
    make_checkpoints(ckpt_dir, [1, 2, 3])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pins = ckpt_dir / "step_000000002" / "pins"
    pins.mkdir()
    record = {"holder": "fork", "ttl_s": 60, "renewal": "a", "created": 0, "expires": 60}
    (pins / "dead.json").write_text(json.dumps({**record, "host": socket.gethostname(), "pid": dead.pid}))
    old = pins / "silent.json"
    old.write_text(json.dumps({**record, "host": "node-b", "pid": 1}))
    os.utime(old, (old.stat().st_atime, old.stat().st_mtime - 121))
    live = pin(ckpt_dir / "step_000000003", "export", ttl_s=60)  # this process: alive
    with pytest.raises(store.CheckpointError, match="step_000000003 is pinned by a reader"):
        store.rewind(ckpt_dir, 1, pinned=has_live_pins)
    live.unlink()
    assert [p.name for p in store.rewind(ckpt_dir, 1, pinned=has_live_pins)] == [
        "step_000000002",
        "step_000000003",
    ]
    (pins.parent.parent / store.LATEST).write_text("step_000000001\n")
    assert not has_live_pins(ckpt_dir / "step_000000001")
    (ckpt_dir / "step_000000001" / "pins").mkdir()
    (ckpt_dir / "step_000000001" / "pins" / "fresh.json").write_text(
        json.dumps({**record, "host": "node-b", "pid": 1})
    )
    assert has_live_pins(ckpt_dir / "step_000000001")  # another host's, renewed recently: a reader
