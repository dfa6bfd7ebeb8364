"""What every command that reads a run needs: find a run's checkpoint by step, name and read the
result of a cooldown, and hold a checkpoint against retention while reading it.

Below every command (fork, forker, average, export, report, sweep): it imports only checkpoint/store
and retention, never another command, so the commands can use each other without a circle.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from evertrain.errors import EvertrainError
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.retention import pin, unpin
from evertrain.pretrain.checkpoint.store import CheckpointError


class RunError(EvertrainError, ValueError):
    """A bad reference to a run: not a run dir, no checkpoint at that step."""


def cooldown_dir_name(step: int, shape: str, cooldown_steps: int, data: dict | None = None) -> str:
    """from_<step>_<shape>_<c>, plus @<tag> for a cooldown on another mix (cooldown_data)."""
    return f"from_{step:09d}_{shape}_{cooldown_steps}" + (f"@{data['tag']}" if data else "")


def cooldown_length(step: int, cooldown_steps: int | None = None, fraction: float | None = None) -> int:
    """Cooldown steps c: given, or `fraction` of the fork step (c = round(F * s0))."""
    if cooldown_steps is not None:
        if cooldown_steps <= 0:
            raise RunError(f"--cooldown-steps: must be > 0, got {cooldown_steps}")
        return cooldown_steps
    if fraction is None:
        raise RunError("give --cooldown-steps C or --cooldown-fraction F")
    if not 0.0 < fraction <= 1.0:
        raise RunError(f"--cooldown-fraction: must be in (0, 1], got {fraction}")
    steps = round(fraction * step)
    if steps <= 0:
        raise RunError(f"--cooldown-fraction: {fraction} of step {step} is 0 cooldown steps")
    return steps


def resolve_checkpoint(run_dir: Path, step: str | int) -> tuple[int, Path]:
    """`step` (an int or "latest") -> (step, step_dir), or a RunError that says what exists."""
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--run {run_dir}: not a run directory (no config.yaml)")
    checkpoints = {store.step_of(p): p for p in store.complete_checkpoints(run_dir / "checkpoints")}
    if not checkpoints:
        raise RunError(f"--run {run_dir}: no checkpoints yet")
    if step == "latest":
        step_dir = store.latest_checkpoint(run_dir / "checkpoints")
        return store.step_of(step_dir), step_dir
    try:
        step = int(step)
    except ValueError:
        raise RunError(f"--step: expected a step number or 'latest', got {step!r}") from None
    if step in checkpoints:
        return step, checkpoints[step]
    newest = max(checkpoints)
    if step > newest or step <= 0:
        raise RunError(f"--step {step}: unknown step (the run's checkpoints go up to step {newest})")
    shown = ", ".join(map(str, list(checkpoints)[-8:]))
    raise RunError(f"--step {step}: no checkpoint at this step (available: {shown})")


def read_result(cooldown_dir: Path) -> dict | None:
    """result.json, or None while there is none; one that is not a result (cut short by a copy, edited)
    counts as none too, so the fork is redone and rewrites it."""
    path = cooldown_dir / "result.json"
    try:
        result = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = None
    return result if isinstance(result, dict) and "val_loss" in result else None


class Lease:
    """A pin on a checkpoint, renewed by a daemon thread while a fork or an average reads it, so
    retention keeps it however long that takes and a crashed reader holds it for at most `ttl_s`."""

    def __init__(self, step_dir: Path, holder: str, ttl_s: float = 120.0):
        self.step_dir, self.holder, self.ttl_s = step_dir, holder, ttl_s
        self.stopped = threading.Event()
        self.path = pin(step_dir, holder, ttl_s)  # fails now if retention already deleted it
        self.thread = threading.Thread(target=self._renew, name="evertrain-lease", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stopped.wait(self.ttl_s / 4):
            try:
                self.path = pin(self.step_dir, self.holder, self.ttl_s)
            except CheckpointError:
                return  # cannot happen while pinned; if it does, the fork already holds its weights

    def release(self) -> None:
        self.stopped.set()
        self.thread.join()
        unpin(self.path)
