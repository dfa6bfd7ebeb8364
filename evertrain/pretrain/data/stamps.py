"""Start-up data verification in O(new shards): this node's record of the shards it already hashed.

Every start checks every shard's size, but hashing terabytes on every node at every start takes
hours. So a node remembers, per data dir, each file it hashed and found as manifest.json says: its
sha256 with the file's identity at that moment (device, inode, size, mtime and ctime in ns). A later
start skips the hash of a file whose identity is unchanged, and hashes anything new or changed (an
appended shard; a rewritten one, which then fails as before). ctime cannot be set from user space, so
rewriting a shard and restoring its mtime still counts as a change.

The stamps live outside the data dir (which may be read-only or shared by nodes with their own local
copies): `$EVERTRAIN_CACHE` (default ~/.cache/evertrain)/verified/<host>-<data dir hash>.json, one
file per node and data dir. Losing them only costs one full verification.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from evertrain.files import atomic_write_text


def stamp_file(data_dir: str | Path) -> Path:
    cache = Path(os.environ.get("EVERTRAIN_CACHE") or Path.home() / ".cache" / "evertrain")
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return cache / "verified" / f"{socket.gethostname()}-{key}.json"


def identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedStamps:
    """file name -> [identity..., sha256] of the files this node hashed and found right."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hashed = 0  # files hashed in this process (for the start-up log and tests)
        try:
            self.stamps = json.loads(self.path.read_text())
            if not isinstance(self.stamps, dict):
                self.stamps = {}
        except (OSError, ValueError):
            self.stamps = {}  # none yet, or unreadable: verify everything once

    def verified(self, path: Path, name: str, sha256: str) -> bool:
        """True if `path` was hashed to `sha256` before and has not changed since."""
        return self.stamps.get(name) == [*identity(path), sha256]

    def mark(self, path: Path, name: str, sha256: str) -> None:
        self.stamps[name] = [*identity(path), sha256]

    def save(self) -> None:
        """Best effort: a cache that cannot be written only means hashing again next time."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.stamps, sort_keys=True))
        except OSError:
            pass
