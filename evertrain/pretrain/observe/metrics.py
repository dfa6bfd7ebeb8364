"""Where training numbers go: run_dir/metrics.jsonl, TensorBoard (when installed), the console, and the
W&B / MLflow trackers `logging` asks for (loggers.py).

Only the main rank records anything; on other ranks every method is a no-op, so the loop can call
them unconditionally. Records are plain dicts of host numbers: the loop decides when to sync.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evertrain import safe_json
from evertrain.files import atomic_write_text
from evertrain.pretrain.observe.console import Console
from evertrain.pretrain.observe.loggers import check_installed, open_sinks

METRICS_FILE = "metrics.jsonl"


def drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records so every step
    appears once. Rewritten under a temporary name, then renamed over the original."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [
        line.rstrip("\n") + "\n"
        for line in lines
        if (record := _parse(line)) is not None and record.get("step", 0) <= step
    ]
    if kept == lines:
        return
    atomic_write_text(path, "".join(kept))


def _parse(line: str) -> dict | None:
    """A record, or None for a line cut short by a crash mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None  # a stray non-record line is dropped too


def _tensorboard_writer(log_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    # purge_step hides the events a resumed run is about to redo, like drop_records_after
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)


class Metrics:
    """The run's metric sinks; `enabled` only on the main rank."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        start_step: int,
        max_steps: int | None,
        tensorboard: bool = True,
        progress: bool = True,
        cfg=None,
    ):
        self.enabled = enabled
        if cfg is not None:
            check_installed(cfg)  # on every rank, before the main rank opens anything
        # then the console counts the skipped steps
        skip = cfg is not None and cfg.train.on_nonfinite == "skip"
        # banner, bar or lines
        self.console = Console(enabled and progress, start_step, max_steps, skipped=skip)
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        drop_records_after(self.path, start_step)
        self.file = self.path.open("a")
        self.tb = _tensorboard_writer(run_dir / "tensorboard", start_step) if tensorboard else None
        self.sinks = open_sinks(cfg, run_dir) if cfg is not None else []

    def advance(self) -> None:
        """One optimizer step done (host-only bookkeeping: no tensors involved)."""
        self.console.advance()

    def write(self, record: dict) -> None:
        """Append one record, e.g. {"kind": "train", "step": 10, "loss": 5.1, ...}."""
        if not self.enabled:
            return
        self.file.write(safe_json.dumps(record) + "\n")  # NaN -> null + "nonfinite": [keys]
        self.file.flush()  # readers (report, forker) tail this file while the run goes on
        kind, step = record["kind"], record["step"]
        numbers = {
            k: v
            for k, v in record.items()
            if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(f"{kind}/{key}", value, global_step=step)
        for sink in self.sinks:
            sink.write(record)
        self.console.record(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self.console.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        for sink in self.sinks:
            sink.close()
