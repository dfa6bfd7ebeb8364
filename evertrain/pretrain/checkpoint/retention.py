"""Which checkpoints survive: the newest `keep_last`, every `keep_every`-th step, and pinned ones.

A pin is a lease a reader (a forked cooldown, an export) takes on a checkpoint:
`step_X/pins/<holder>.json` with an expiry time, so a crashed reader cannot keep a checkpoint
forever. Retention runs on rank 0 right after a newer checkpoint was committed.

Deleting races with pinning (another process), so a deletion first renames the step dir out of the
way (atomic), then looks for pins once more, and puts the directory back if one appeared. A pin is
written into the directory itself, so a pin taken after that rename fails instead of pinning nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.store import CheckpointError

HOLDER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
DELETING_TAG = ".tmp-deleting"  # contains TMP_TAG: never mistaken for a checkpoint


def pin(step_dir: Path, holder: str, ttl_s: float) -> Path:
    """Lease `step_dir` for `ttl_s` seconds; returns the pin file (give it to `unpin`)."""
    step_dir = Path(step_dir)
    if not HOLDER_RE.match(holder) or holder.startswith("."):
        raise CheckpointError(f"pin holder {holder!r}: use letters, digits and _.@- only")
    if not ttl_s > 0:
        raise CheckpointError(f"pin ttl {ttl_s!r}: must be > 0 seconds")
    pins = step_dir / "pins"
    path = pins / f"{holder}.json"
    now = time.time()
    record = {"holder": holder, "created": now, "expires": now + ttl_s,
              "host": socket.gethostname(), "pid": os.getpid()}
    try:
        pins.mkdir(exist_ok=True)  # no parents=True: a deleted checkpoint must not be recreated
        store.atomic_write_text(path, json.dumps(record))
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no such checkpoint (deleted by retention?)") from None
    if not (step_dir / store.META).is_file():
        unpin(path)
        raise CheckpointError(f"{step_dir}: not a complete checkpoint")
    return path


def unpin(path: Path) -> None:
    """Release a pin; a pin that is already gone (expired and cleaned, dir deleted) is fine."""
    Path(path).unlink(missing_ok=True)


def active_pins(step_dir: Path, now: float | None = None) -> list[dict]:
    """Unexpired pins of `step_dir`; unreadable pin files count as active (never delete on doubt)."""
    now = time.time() if now is None else now
    active = []
    for path in sorted((Path(step_dir) / "pins").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            expires = float(record["expires"])
        except FileNotFoundError:
            continue  # unpinned while we looked
        except (ValueError, KeyError, TypeError):
            active.append({"holder": path.stem, "expires": float("inf")})
            continue
        if expires > now:
            active.append(record)
    return active


def is_pinned(step_dir: Path, now: float | None = None) -> bool:
    return bool(active_pins(step_dir, now))


def steps_to_keep(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The retention rule without the pins: the newest `keep_last` and multiples of `keep_every`."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete committed checkpoints that no rule keeps; returns the deleted directories."""
    ckpt_dir = Path(ckpt_dir)
    committed = store.complete_checkpoints(ckpt_dir)
    keep = steps_to_keep([store.step_of(p) for p in committed], keep_last, keep_every)
    latest_file = ckpt_dir / store.LATEST
    if latest_file.is_file():  # never delete what LATEST names, whatever the numbers say
        keep.add(store.step_of(ckpt_dir / latest_file.read_text().strip()))
    deleted = []
    for step_dir in committed:
        if store.step_of(step_dir) in keep or is_pinned(step_dir):
            continue
        doomed = step_dir.with_name(step_dir.name + DELETING_TAG)
        os.rename(step_dir, doomed)
        if is_pinned(doomed):  # a reader pinned it between our check and the rename
            os.rename(doomed, step_dir)
            continue
        shutil.rmtree(doomed)
        deleted.append(step_dir)
    return deleted
