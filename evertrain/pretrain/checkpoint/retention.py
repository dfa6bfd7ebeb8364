"""Which checkpoints survive: the newest `keep_last`, every `keep_every`-th step, and pinned ones.

A pin is a lease a reader (a forked cooldown, an export) takes on a checkpoint:
`step_X/pins/<holder>.json` with a time to live and a fresh random `renewal` token at every renewal,
so a crashed reader cannot keep a checkpoint forever. Expiry is judged on the observer's own clock,
never by comparing the holder's timestamps with it (hosts' clocks disagree): a `PinWatch` remembers
when it first saw each renewal token, and a pin is expired once the same token has been there for
longer than its ttl_s (time.monotonic() of the observer). An observer without a watch (a one-shot
command) has seen nothing for long, so every readable pin counts as active for it. Retention runs on
rank 0 right after a newer checkpoint was committed, with the manager's long-lived watch.

Filesystem errors never reach training: a directory that cannot be renamed or fully deleted (on
NFS, a `.nfsXXXX` file that a reader still holds open makes rmtree fail) is reported on stderr and
left for the next save, which retries it.

Deleting races with pinning (another process), so a deletion first renames the step dir out of the
way (atomic), then looks for pins once more, and puts the directory back if one appeared. A pin is
written into the directory itself, so a pin taken after that rename fails instead of pinning nothing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from evertrain.files import atomic_write_text
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
    # `expires` is for people reading the file; observers go by `renewal` and `ttl_s` (see PinWatch)
    record = {
        "holder": holder,
        "ttl_s": ttl_s,
        "renewal": secrets.token_hex(8),
        "created": now,
        "expires": now + ttl_s,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    try:
        pins.mkdir(exist_ok=True)  # no parents=True: a deleted checkpoint must not be recreated
        atomic_write_text(path, json.dumps(record))
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no such checkpoint (deleted by retention?)") from None
    if not (step_dir / store.META).is_file():
        unpin(path)
        raise CheckpointError(f"{step_dir}: not a complete checkpoint")
    return path


def unpin(path: Path) -> None:
    """Release a pin; a pin that is already gone (expired and cleaned, dir deleted) is fine."""
    Path(path).unlink(missing_ok=True)


class PinWatch:
    """An observer's memory of pin renewals: (pin file, renewal token) -> when it was first seen."""

    def __init__(self):
        self.first_seen: dict[tuple[str, str], float] = {}

    def expired(self, path: Path, record: dict, ttl_s: float) -> bool:
        now = time.monotonic()
        key = (pin_id(path), str(record.get("renewal", record.get("expires"))))
        seen = self.first_seen.setdefault(key, now)
        return now - seen > ttl_s

    def forget_gone(self, live: set[str]) -> None:
        """Drop what belongs to pin files that no longer exist (keeps the memory small)."""
        self.first_seen = {k: v for k, v in self.first_seen.items() if k[0] in live}


def pin_ttl(record) -> float:
    """A pin's time to live; ValueError/TypeError/KeyError for a record that is not a pin's."""
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    expires = float(record["expires"])
    return float(record["ttl_s"]) if "ttl_s" in record else expires - float(record.get("created", 0))


def pin_id(path: Path) -> str:
    """`step_X/holder.json`, the same while retention has the step dir renamed out of the way."""
    return f"{path.parent.parent.name.removesuffix(DELETING_TAG)}/{path.name}"


def active_pins(step_dir: Path, watch: PinWatch | None = None) -> list[dict]:
    """Pins of `step_dir` that are not expired to `watch` (without one: all readable pins);
    unreadable pin files count as active (never delete on doubt)."""
    active = []
    for path in sorted((Path(step_dir) / "pins").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            ttl_s = pin_ttl(record)  # every field used below, checked here: a bad pin never raises later
        except FileNotFoundError:
            continue  # unpinned while we looked
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, not a pin's fields
            active.append({"holder": path.stem, "expires": float("inf")})
            continue
        if watch is None or not watch.expired(path, record, ttl_s):
            active.append(record)
    return active


def is_pinned(step_dir: Path, watch: PinWatch | None = None) -> bool:
    return bool(active_pins(step_dir, watch))


def has_live_pins(step_dir: Path) -> bool:
    """For a one-shot command that must not wait on the dead (pretrain.py --resume-step): pins that
    may still have a reader. A pin is dead when it names this host and a pid that is gone, or when
    its file was not renewed for twice its ttl_s (by the filesystem's mtime, so a holder's skewed clock
    does not matter); unreadable pins count as live."""
    for pin_path in sorted((Path(step_dir) / "pins").glob("*.json")):
        try:
            record = json.loads(pin_path.read_text())
            ttl_s = pin_ttl(record)
            age = time.time() - pin_path.stat().st_mtime
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            return True
        if not (
            age > 2 * ttl_s
            or (record.get("host") == socket.gethostname() and not pid_alive(record.get("pid")))
        ):
            return True
    return False


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume a reader
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def steps_to_keep(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The retention rule without the pins: the newest `keep_last` and multiples of `keep_every`."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def apply_retention(
    ckpt_dir: Path, keep_last: int, keep_every: int, watch: PinWatch | None = None
) -> list[Path]:
    """Delete committed checkpoints that no rule keeps; returns the deleted directories. Never
    raises for a filesystem error: it is reported and the directory is retried at the next call."""
    ckpt_dir = Path(ckpt_dir)
    retry_leftovers(ckpt_dir)
    committed = store.complete_checkpoints(ckpt_dir)
    keep = steps_to_keep([store.step_of(p) for p in committed], keep_last, keep_every)
    latest_file = ckpt_dir / store.LATEST
    if latest_file.is_file():  # never delete what LATEST names, whatever the numbers say
        keep.add(store.step_of(ckpt_dir / latest_file.read_text().strip()))
    deleted = []
    for step_dir in committed:
        if store.step_of(step_dir) in keep or is_pinned(step_dir, watch=watch):
            continue
        doomed = step_dir.with_name(step_dir.name + DELETING_TAG)
        try:
            os.rename(step_dir, doomed)
        except OSError as exc:
            report(f"cannot move {step_dir} out of the way ({exc.strerror}); retrying at the next save")
            continue
        if is_pinned(doomed, watch=watch):  # a reader pinned it between our check and the rename
            os.rename(doomed, step_dir)
            continue
        if remove_tree(doomed):
            deleted.append(step_dir)
    if watch is not None:
        watch.forget_gone({pin_id(p) for p in ckpt_dir.glob("step_*/pins/*.json")})
    return deleted


def retry_leftovers(ckpt_dir: Path) -> None:
    """Deletions an earlier call could not finish (already renamed, so no reader can pin them)."""
    if ckpt_dir.is_dir():
        for doomed in ckpt_dir.glob(f"step_*{DELETING_TAG}"):
            remove_tree(doomed)


def remove_tree(path: Path) -> bool:
    """rmtree that reports instead of raising; True if `path` is gone."""
    errors = []
    shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(f"{p}: {info[1].__class__.__name__}"))
    if errors:
        report(
            f"could not delete {path} ({errors[0]}{f' and {len(errors) - 1} more' if len(errors) > 1 else ''}); "
            "retrying at the next save"
        )
    return not path.exists()


def report(message: str) -> None:
    print(f"checkpoint retention: {message}", file=sys.stderr, flush=True)
