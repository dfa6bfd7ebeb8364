"""Files another process may read while we write them (manifest.json, LATEST, meta.json, result.json,
metrics.jsonl rewrites, pins, stamps, the report's PNG): readers see the old file or the whole new one.

Each is written under a temporary name in its own directory, flushed and fsynced, renamed over the
old one (os.replace: atomic on POSIX), and then the directory is fsynced so that the rename itself
survives a crash. Files private to a writer until a directory rename publishes them (a checkpoint's
shards in its step_X.tmp-* dir) need only their own fsync and do not come here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from evertrain import safe_json


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file to write `path`'s new content to ("w" text, "wb" binary); it replaces `path` when the
    block ends without an error. On an error the temporary file is removed and `path` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    # pid and thread: two writers of the same file (another process, or a background thread) never
    # share a temporary name; the leading dot keeps globs of the directory from seeing it
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: Path, obj, **dumps_kwargs) -> None:
    """`obj` as JSON every parser reads (safe_json: a non-finite number becomes null), one line end."""
    atomic_write_text(path, safe_json.dumps(obj, **dumps_kwargs) + "\n")
