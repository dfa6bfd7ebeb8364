"""evertrain/files.py: a file another process may read is replaced whole or not at all, durably."""

from __future__ import annotations

import json
import os
import stat

import pytest

from evertrain import files


def test_text_binary_and_json_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old\n")
    files.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    files.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    files.atomic_write_json(path, {"loss": float("nan"), "step": 3}, indent=1)
    assert json.loads(path.read_text()) == {"loss": None, "step": 3, "nonfinite": ["loss"]}
    assert path.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk gone"):
        with files.atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        files.atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_the_file_and_then_its_directory_are_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "LATEST"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_write_text(path, "step_000000002\n")
    # the data before the rename (else a crash can leave an empty file under the name), the
    # directory's entry after it (else a crash can bring back the old file)
    assert events == ["fsync file", "replace", "fsync dir"]
    assert path.read_text() == "step_000000002\n"


def test_only_text_or_binary_writes(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with files.atomic_open(tmp_path / "x", "a"):
            pass
