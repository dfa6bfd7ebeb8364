"""The on-disk commit protocol of checkpoints; knows files and directories, not engines.

    checkpoints/step_000001000.tmp-<nonce>/   every rank writes its shards, then `done.<rank>`
    checkpoints/step_000001000/               rank 0 renamed it after writing meta.json
    checkpoints/LATEST                        "step_000001000", replaced atomically

A directory is a checkpoint only when its name is `step_<9 digits>` and it holds a meta.json; both
are true only after the rename, so a crash at any moment leaves the old checkpoints and at most a
`*.tmp-*` directory that nothing reads and the next run removes. No collectives here: rank 0 learns
that the other ranks finished from their marker files, so this can run in a background thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import xxhash

from evertrain import safe_json
from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text, fsync_dir

LATEST = "LATEST"
META = "meta.json"
TMP_TAG = ".tmp-"  # step_000001000.tmp-<nonce>: never read as a checkpoint
STEP_RE = re.compile(r"^step_(\d{9})$")
# Content hashes a meta.json may name per file; new checkpoints write HASH (and say so in meta["hash"]).
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
HASH = "xxh3_128"
VERIFY_MODES = ("full", "size")


class CheckpointError(EvertrainError):
    """A checkpoint that cannot be used as asked; the message names the file or directory."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def step_of(path: Path) -> int | None:
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


# -- small durable-file helpers ------------------------------------------------------------------


def file_digest(path: Path, algorithm: str = HASH, chunk: int = 8 << 20) -> dict:
    """{"size", <algorithm>: hex} of a file. xxh3_128 runs ~7x faster than sha256 here, fast enough to
    keep up with the disk from the page cache the write just filled; both release the GIL."""
    h = HASHES[algorithm]()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
            size += n
    return {"size": size, algorithm: h.hexdigest()}


class HashingFile:
    """A file opened for writing that hashes (store.HASH) every byte written through it: the digest
    of what the writer handed to the file, computed from its buffers, with no second pass reading the
    file back. `digests[name]` gets {"size", HASH} (as file_digest gives) when the file is closed.
    Writes only append (torch.save, pickle and DCP never seek back), so that is the file's content."""

    def __init__(self, path: Path, digests: dict[str, dict]):
        self.path, self.digests = Path(path), digests
        self.raw = open(self.path, "wb")
        self.hash, self.size = HASHES[HASH](), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()
            self.digests[self.path.name] = {"size": self.size, HASH: self.hash.hexdigest()}

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def entry_algorithm(entry: dict) -> str:
    """Which hash a meta.json file entry carries: checkpoints from before xxh3 carry sha256."""
    for algorithm in HASHES:
        if algorithm in entry:
            return algorithm
    raise KeyError("no known hash")


# -- writing: temp dir, markers, meta, commit -----------------------------------------------------


def tmp_dir_for(ckpt_dir: Path, step: int, nonce: str) -> Path:
    return Path(ckpt_dir) / f"{step_dir_name(step)}{TMP_TAG}{nonce}"


def remove_stale_tmp_dirs(ckpt_dir: Path, nonce: str) -> list[Path]:
    """Delete `*.tmp-*` leftovers of earlier (crashed) processes; rank 0, before saving."""
    removed = []
    if not Path(ckpt_dir).is_dir():
        return removed
    for path in Path(ckpt_dir).iterdir():
        if TMP_TAG in path.name and not path.name.endswith(nonce) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_done_marker(tmp_dir: Path, rank: int, files: dict[str, dict]) -> None:
    """This rank's files are on disk; `files` maps their names to size and content hash."""
    atomic_write_text(Path(tmp_dir) / f"done.{rank}", json.dumps(files, sort_keys=True))


def wait_for_done_markers(
    tmp_dir: Path, world_size: int, timeout_s: float = 3600.0, poll_s: float = 0.01
) -> dict[str, dict]:
    """Rank 0: block until every rank's marker exists; returns the union of their file lists."""
    deadline = time.monotonic() + timeout_s
    files: dict[str, dict] = {}
    for rank in range(world_size):
        marker = Path(tmp_dir) / f"done.{rank}"
        while not marker.exists():
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"{marker}: rank {rank} did not finish its shards within {timeout_s:.0f}s"
                )
            time.sleep(poll_s)
        files.update(json.loads(marker.read_text()))
    return files


def commit(tmp_dir: Path, meta: dict) -> Path:
    """Rank 0: write meta.json, rename the temp dir into place, then point LATEST at it."""
    tmp_dir = Path(tmp_dir)
    ckpt_dir = tmp_dir.parent
    final = ckpt_dir / step_dir_name(meta["step"])
    atomic_write_text(tmp_dir / META, safe_json.dumps(meta, indent=1, sort_keys=True))
    for marker in tmp_dir.glob("done.*"):
        marker.unlink()
    fsync_dir(tmp_dir)
    os.rename(tmp_dir, final)  # atomic; the checkpoint appears complete or not at all
    fsync_dir(ckpt_dir)
    atomic_write_text(ckpt_dir / LATEST, final.name + "\n")
    return final


# -- reading: which checkpoint, is it intact ------------------------------------------------------


def read_meta(step_dir: Path) -> dict:
    path = Path(step_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {step_dir} is not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(meta).__name__}, not an object")
    for key in ("step", "engine", "world_size", "model_hash", "files"):
        if key not in meta:
            raise CheckpointError(f"{path}: has no '{key}'")
    if (
        not isinstance(meta["step"], int)
        or not isinstance(meta["files"], dict)
        or not all(isinstance(e, dict) and isinstance(e.get("size"), int) for e in meta["files"].values())
    ):
        raise CheckpointError(
            f"{path}: 'step' is not an integer or 'files' not a table of {{name: {{size, hash}}}}"
        )
    if (
        not isinstance(meta["world_size"], int)
        or meta["world_size"] < 1
        or (meta["engine"] == "deepspeed" and meta.get("zero_stage") not in (0, 1, 2, 3))
    ):
        raise CheckpointError(
            f"{path}: world_size {meta['world_size']!r} or zero_stage {meta.get('zero_stage')!r} "
            "is not a possible value"
        )
    check_confined(Path(step_dir), meta)
    return meta


def check_confined(step_dir: Path, meta: dict) -> None:
    """A checkpoint reads only files of its own real directory: the step dir is not a symlink (to
    another run's checkpoint, which would resume at its step), its name agrees with meta.json's step,
    and every file meta.json lists lies inside it (no absolute path, no `..`, no symlink out)."""
    if step_dir.is_symlink():
        raise CheckpointError(
            f"{step_dir}: is a symbolic link (to {os.readlink(step_dir)}); a checkpoint is read "
            "only from its own directory (copy it instead)"
        )
    named = step_of(step_dir)
    if named is not None and named != meta["step"]:
        raise CheckpointError(
            f"{step_dir / META}: says step {meta['step']}, but the directory is {step_dir.name}"
        )
    for name in meta["files"]:
        confined_path(step_dir, name, f"{step_dir / META}: file")


def confined_path(step_dir: Path, name, what: str) -> Path:
    """step_dir / name, refused unless it is a relative path that stays inside step_dir's real path."""
    real = Path(step_dir).resolve()
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{what} {name!r} is not a path inside {step_dir}")
    if not (real / name).resolve().is_relative_to(real):
        raise CheckpointError(f"{what} {name!r} leads out of {step_dir} (a symbolic link?)")
    return Path(step_dir) / name


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed step dirs, oldest first (temp dirs and anything without meta.json are skipped)."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if step_of(p) is not None and (p / META).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: what LATEST names, or a newer committed one.

    A crash between the rename and the LATEST update leaves a complete step dir newer than LATEST;
    it is whole (meta.json is written before the rename), so it wins.
    """
    ckpt_dir = Path(ckpt_dir)
    latest_file = ckpt_dir / LATEST
    named = None
    if latest_file.is_file():
        try:
            name = latest_file.read_text().strip()
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{latest_file}: not a step dir name (binary garbage); delete it to resume "
                "from the newest complete checkpoint"
            ) from None
        named = ckpt_dir / name
        if step_of(named) is None or not (named / META).is_file():
            raise CheckpointError(f"{latest_file}: names '{name}', which is not a complete checkpoint")
    committed = complete_checkpoints(ckpt_dir)
    newest = committed[-1] if committed else None
    if named is None or (newest is not None and step_of(newest) > step_of(named)):
        return newest
    return named


def rewind(ckpt_dir: Path, step: int, pinned=lambda step_dir: False) -> list[Path]:
    """Make `step` the checkpoint to resume from (pretrain.py --resume-step): every committed step
    dir after it is renamed `<name>.abandoned-<time>` (kept for inspection, never read again) and
    LATEST names it. For a corrupt latest checkpoint, or going back before a divergence. Rank 0."""
    ckpt_dir = Path(ckpt_dir)
    committed = {step_of(p): p for p in complete_checkpoints(ckpt_dir)}
    if step not in committed:
        shown = ", ".join(map(str, list(committed)[-8:])) or "none"
        raise CheckpointError(
            f"--resume-step {step}: no complete checkpoint at this step in {ckpt_dir} (available: {shown})"
        )
    later = [p for s, p in committed.items() if s > step]
    for step_dir in later:
        if pinned(step_dir):
            raise CheckpointError(
                f"--resume-step {step}: {step_dir} is pinned by a reader (a fork or an "
                "export); wait for it, or remove its pins/ entry"
            )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step_dir in later:
        os.rename(step_dir, step_dir.with_name(f"{step_dir.name}.abandoned-{stamp}"))
    atomic_write_text(ckpt_dir / LATEST, committed[step].name + "\n")
    fsync_dir(ckpt_dir)
    return later


def verify_files(step_dir: Path, meta: dict, names: list[str] | None = None, mode: str = "full") -> None:
    """Check the listed files (all of them by default) against meta.json: their size, and with
    mode "full" also their content hash (whichever the entry carries: xxh3_128, or sha256 in older
    checkpoints). "size" skips the second read, for filesystems where reading it all back is too dear."""
    if mode not in VERIFY_MODES:
        raise CheckpointError(f"checkpoint.verify: must be one of {'|'.join(VERIFY_MODES)}, got {mode!r}")
    step_dir = Path(step_dir)
    for name in sorted(meta["files"]) if names is None else names:
        expected = meta["files"][name]
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard (listed in {step_dir / META})")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path}: size {size} bytes, meta.json says {expected['size']}")
        if mode == "size":
            continue
        try:
            algorithm = entry_algorithm(expected)
        except KeyError:
            raise CheckpointError(
                f"{step_dir / META}: entry of '{name}' has none of the hashes {'|'.join(HASHES)}"
            ) from None
        if file_digest(path, algorithm)[algorithm] != expected[algorithm]:
            raise CheckpointError(f"{path}: {algorithm} does not match meta.json (corrupt shard)")
