"""What a run prints for people: a start banner, its progress, and a closing line, all on stderr.

On a terminal the progress is a tqdm bar with the latest loss and lr. Anywhere else (Slurm, nohup,
CI: stderr is not a TTY) it is one plain line per log step, never a `\\r`, so a batch log reads and
greps like a table:

    step 20/600 | tokens 41K | loss 5.6981 | lr 2.25e-03 | grad_norm 0.912 | 7.3K tok/s | MFU 38.1% | elapsed 0:00:06

MFU shows when the device's peak is known (train.peak_tflops, or hardware.py by device name; never on
CPU); with train.on_nonfinite=skip, "skipped N" counts the updates dropped so far. The bar's postfix
carries the same throughput figures.

Only the main rank prints; on other ranks every method is a no-op. The numbers are the metrics
records the loop already pulled to the host on log steps: printing adds no device sync.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from tqdm import tqdm


def human(n: float) -> str:
    """1234 -> 1.23K, 5_500_000 -> 5.5M: counts as people say them."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def throughput(record: dict, skipped: bool = False) -> dict[str, str]:
    """Tokens/s, MFU (when the record has it) and, with `skipped`, the non-finite steps dropped so far."""
    shown = {"tok/s": human(record["tokens_per_s"])}
    if "mfu" in record:
        shown["MFU"] = f"{100 * record['mfu']:.1f}%"
    if skipped:
        shown["skipped"] = str(record.get("nonfinite_steps", 0))
    return shown


def step_line(record: dict, max_steps: int | None, elapsed_s: float, skipped: bool = False) -> str:
    """One log step (a metrics.jsonl "train" record) as a plain line."""
    of = f"/{max_steps}" if max_steps is not None else ""
    shown = throughput(record, skipped)
    extra = "".join(f" | {key} {value}" for key, value in shown.items() if key != "tok/s")
    return (
        f"step {record['step']}{of} | tokens {human(record['tokens'])} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3g} | grad_norm {record['grad_norm']:.3g} | "
        f"{shown['tok/s']} tok/s{extra} | elapsed {clock(elapsed_s)}"
    )


def start_banner(
    *,
    params: int,
    tokens_per_step: int,
    engine: str,
    world_size: int,
    dtype: str,
    device: str,
    start_step: int,
    data_path: str,
    data_version: int,
    run_dir: str | Path,
    init_from: str | None = None,
) -> str:
    start = (
        f"resumed from step {start_step}"
        if start_step
        else f"initialized from {init_from.removeprefix('hf:')}"
        if init_from
        else "fresh start"
    )
    return (
        f"evertrain: {human(params)} parameters | {human(tokens_per_step)} tokens/step | {engine} x{world_size} | "
        f"{dtype} on {device} | {start} | data {data_path} v{data_version} | run {run_dir}"
    )


def run_banner(cfg, engine, run_dir, start_step: int, tokens_per_step: int, data_version: int) -> str:
    """The banner of a training loop on `engine` (any of them: ZeRO-3 keeps a parameter's full size in
    ds_numel, FSDP2's DTensors report theirs)."""
    params = sum(getattr(p, "ds_numel", None) or p.numel() for p in engine.raw_model.parameters())
    name = f"{engine.name} ZeRO-{cfg.engine.zero_stage}" if engine.name == "deepspeed" else engine.name
    if engine.name == "fsdp":
        name = f"{name} ({engine.layout})"
    return start_banner(
        params=params,
        tokens_per_step=tokens_per_step,
        engine=name,
        world_size=engine.world_size,
        dtype=cfg.train.dtype,
        device=engine.device.type,
        start_step=start_step,
        data_path=cfg.data.path,
        data_version=data_version,
        run_dir=run_dir,
        init_from=cfg.model.init_from,
    )


def closing_line(
    step: int, reason: str, saved_step: int | None, run_dir: str | Path, final_dir: str | Path | None = None
) -> str:
    """`saved_step`: the last checkpoint this process committed (None: it saved none). `final_dir`: where a
    finished run's state goes instead of its checkpoints, which are then deleted (a fork's final/)."""
    saved = (
        f"last checkpoint: step {saved_step} in {Path(run_dir) / 'checkpoints'}"
        if saved_step is not None
        else "no checkpoint saved"
    )
    if final_dir is not None and saved_step == step:
        saved = f"its final state goes to {final_dir} once evaluated"
    return f"evertrain: stopped at step {step} ({reason}); {saved}"


class Console:
    """The run's console on the main rank; a bar on a terminal, plain lines elsewhere."""

    def __init__(
        self,
        enabled: bool,
        start_step: int,
        max_steps: int | None,
        stream: TextIO | None = None,
        skipped: bool = False,
    ):
        self.enabled, self.skipped = enabled, skipped
        if not enabled:
            return
        self.stream = stream if stream is not None else sys.stderr
        self.max_steps = max_steps
        self.start_time = time.perf_counter()
        self.tty = self.stream.isatty()
        # mininterval: the bar redraws at most once a second whatever the step rate
        self.bar = (
            tqdm(
                total=max_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=self.stream,
            )
            if self.tty
            else None
        )
        self.shown: dict[str, str] = {}
        self.data_version = None  # of the last train record: a change is said on a line of its own

    def say(self, line: str) -> None:
        """A line of its own (the banner, the closing line), also on a terminal with a bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def advance(self) -> None:
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def record(self, record: dict) -> None:
        """Show a metrics record: a line per train record off a terminal, the bar's postfix on one."""
        if not self.enabled:
            return
        if record["kind"] == "train" and record.get("data_version") is not None:
            if self.data_version is not None and record["data_version"] != self.data_version:
                self.say(
                    f"step {record['step']} | data v{record['data_version']}: the shards appended to the data "
                    "dir joined the stream at the last checkpoint"
                )
            self.data_version = record["data_version"]
        if self.bar is None:
            if record["kind"] == "train":
                self.say(
                    step_line(record, self.max_steps, time.perf_counter() - self.start_time, self.skipped)
                )
            elif "val_loss" in record:
                self.say(f"step {record['step']} | eval | val_loss {record['val_loss']:.4f}")
            return
        self.shown.update({k: f"{record[k]:.4g}" for k in ("loss", "val_loss", "lr") if k in record})
        if record["kind"] == "train":
            self.shown.update(throughput(record, self.skipped))
        self.bar.set_postfix(self.shown, refresh=False)

    def close(self) -> None:
        """Ends the bar; later `say` lines print plainly below it."""
        if self.enabled and self.bar is not None:
            self.bar.close()
            self.bar = None
