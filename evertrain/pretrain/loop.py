"""The training loop, the same for every engine and for forked cooldowns.

    batch (read ahead: prefetch.py) -> engine.train_step (micro-batches, clip, step) -> non-finite flag (device)
          -> [log step: one host sync, metrics] -> [eval step]
          -> [checkpoint step: non-finite check, refresh data, save] -> stop?

Steady-state steps never wait for the device: losses and non-finite flags are summed on device and
pulled to the host only on log and checkpoint steps (nonfinite.py), and the stop decision is a vote
on CPU tensors (distributed.StopVote). Batches come from a prefetch.Prefetcher over the stream: read
ahead in a background thread, already on the device, and checkpoints save the position of the last
batch trained, not of the last one read.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import torch

from evertrain.errors import EvertrainError
from evertrain.pretrain.checkpoint.store import step_of
from evertrain.pretrain.config import Config
from evertrain.pretrain.console import closing_line, run_banner
from evertrain.pretrain.distributed import StopVote
from evertrain.pretrain.engines.base import Engine
from evertrain.pretrain.evaluate import evaluate, load_val_batches
from evertrain.pretrain.hardware import peak_memory_gib, peak_tflops
from evertrain.pretrain.metrics import Metrics
from evertrain.pretrain.model import flops_per_token
from evertrain.pretrain.prefetch import Prefetcher
from evertrain.pretrain.nonfinite import NonFiniteWatch


def train(cfg: Config, run_dir: str | Path, engine: Engine, stream, ckpt, *, start: dict | None = None,
          started=None) -> int:
    """Train from the run's latest checkpoint (else `start`, else step 0) until `train.max_steps` or a
    SIGTERM/SIGINT, checkpointing on the way out. `ckpt` may be None (no checkpoints). `started()`,
    if given, is called once the checkpoint and the data were loaded and checked, before the first
    step. Returns the last step done."""
    t, eval_every, ckpt_every = cfg.train, cfg.eval.every_steps, cfg.checkpoint.every_steps
    step, tokens, nonfinite_before = resume(engine, stream, ckpt, start)
    watch = NonFiniteWatch(engine, t.on_nonfinite, nonfinite_before)
    global_windows = t.micro_batch_size * t.grad_accum * engine.world_size
    tokens_per_step = global_windows * cfg.model.seq_len
    val = load_val_batches(cfg, engine) if eval_every else []
    if started is not None:
        started()
    metrics = Metrics(run_dir, engine.is_main, step, t.max_steps, cfg=cfg)
    metrics.console.say(run_banner(cfg, engine, run_dir, step, tokens_per_step, stream.manifest_version))
    window = LogWindow(engine, tokens, flops_per_token(cfg.model), peak_tflops(engine.device, t.peak_tflops))
    vote = StopVote(engine.world_size)
    saved = None
    abandoned = False
    batches = Prefetcher(stream, global_windows, engine.rank, engine.world_size, depth=cfg.data.prefetch,
                         device=engine.device, limit=None if t.max_steps is None else max(t.max_steps - step, 0))
    try:
        with StopSignals() as signals:
            while t.max_steps is None or step < t.max_steps:
                batch = batches.next_batch()
                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))
                step, tokens = step + 1, tokens + tokens_per_step
                window.add(loss, watch.observe(step, loss, grad_norm))
                metrics.advance()
                signalled = vote(signals.received)  # the same on every rank
                stop = signalled or step == t.max_steps
                log_now = stop or step % t.log_every == 0
                if log_now:
                    nonfinite = watch.read()
                    metrics.write({**window.record(step, tokens, grad_norm, batches.manifest_version),
                                   "nonfinite_steps": nonfinite})
                    watch.enforce()  # after the record, so metrics.jsonl shows the divergence
                if eval_every and step % eval_every == 0:
                    started = time.perf_counter()
                    val_loss = evaluate(engine, val)["val_loss"]
                    metrics.write({"kind": "eval", "step": step, "tokens": tokens, "val_loss": val_loss,
                                   "eval_s": time.perf_counter() - started, "time": time.time()})
                if ckpt is not None and (stop or (ckpt_every and step % ckpt_every == 0)):
                    nonfinite = watch.read()
                    watch.enforce()  # never commit a checkpoint made after a non-finite step (stop mode)
                    refresh_data(batches, engine)  # appended shards join after this step (prefetch.py)
                    extra = {"tokens": tokens, "data": batches.state_dict(), "nonfinite_steps": nonfinite}
                    budget = cfg.checkpoint.stop_budget_s
                    if not signalled:  # a signal may come while this waits for the last save: same budget
                        kept = ckpt.save(step, extra, stop=lambda: signals.deadline_if_received(budget))
                        saved = step if kept else saved
                    else:
                        kept = ckpt.save_before(step, extra, signals.deadline(budget))
                    if signalled or not kept:
                        latest = ckpt.latest()  # the stop step, or the last one committed
                        saved = step_of(latest) if latest is not None else None
                    if not kept:
                        stop = abandoned = True  # exit now; do not wait for the writer
                        print(f"checkpoint: the stop budget of {budget:g}s ran out; abandoned the save in "
                              f"flight (rank {engine.rank}); the last committed checkpoint is {latest}",
                              file=sys.stderr, flush=True)
                if log_now:
                    window.restart(tokens)  # eval and checkpoint time is not training throughput
                if stop:
                    break
        vote.close()
        if ckpt is not None and not abandoned:
            ckpt.wait()  # committed: the closing line may name it
        reason = f"train.max_steps={t.max_steps}" if t.max_steps is not None and step >= t.max_steps else "stop signal"
    finally:
        batches.close()
        metrics.close()
    metrics.console.say(closing_line(step, reason, saved, run_dir))
    return step


def resume(engine: Engine, stream, ckpt, start: dict | None) -> tuple[int, int, int]:
    """(step, tokens, non-finite steps so far) to continue from; the stream is moved to the matching
    position.

    The run's own latest checkpoint wins; `start` is where a fork branches off (the `extra` of the
    checkpoint the caller already loaded into the engine)."""
    extra = ckpt.resume() if ckpt is not None else None
    extra = extra or start
    if extra is None:
        return 0, 0, 0
    stream.load_state_dict(extra["data"])
    refresh_data(stream, engine)  # shards appended while the run was down
    return int(extra["step"]), int(extra["tokens"]), int(extra.get("nonfinite_steps") or 0)


class LogWindow:
    """Sums the loss on device between log steps and turns it into one metrics record with a single
    host sync: `loss` is the mean over the window's finite steps (all ranks; NaN when there were none),
    `lr` and `grad_norm` those of the log step, `tokens_per_s` and `step_time_s` the window's
    throughput, `mfu` the model FLOPs done per second over the peak of all devices (only when the
    peak is known), `peak_mem_gib` this rank's peak memory (hardware.py)."""

    def __init__(self, engine: Engine, tokens: int, flops_per_token: float = 0.0, peak_tflops: float | None = None):
        self.engine = engine
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.loss_sum = torch.zeros((), device=engine.device)
        self.finite_steps = torch.zeros((), device=engine.device)
        self.steps = 0
        self.start_tokens, self.start_time = tokens, time.perf_counter()

    def add(self, loss: torch.Tensor, bad: torch.Tensor) -> None:
        """`bad`: this step's non-finite flag; a skipped step must not turn the window's mean to NaN."""
        self.loss_sum += torch.where(bad, 0.0, loss.detach().float())
        self.finite_steps += ~bad
        self.steps += 1

    def record(self, step: int, tokens: int, grad_norm: torch.Tensor, data_version: int) -> dict:
        mean = torch.where(self.finite_steps > 0, self.loss_sum / self.finite_steps.clamp(min=1), float("nan"))
        mean_loss = self.engine.all_reduce_mean(mean)
        lr = self.engine.optimizer.lr.reshape(())
        loss, lr, grad_norm = torch.stack([mean_loss, lr.float(), grad_norm.reshape(()).float()]).tolist()
        elapsed = time.perf_counter() - self.start_time
        tokens_per_s = (tokens - self.start_tokens) / elapsed
        record = {"kind": "train", "step": step, "tokens": tokens, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "step_time_s": elapsed / max(self.steps, 1),
                  "peak_mem_gib": peak_memory_gib(self.engine.device), "time": time.time(),
                  "data_version": data_version}
        if self.peak_tflops:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.engine.world_size)
        return record

    def restart(self, tokens: int) -> None:
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.steps = 0
        self.start_tokens, self.start_time = tokens, time.perf_counter()


def refresh_data(stream, engine: Engine, attempts: int = 10) -> None:
    """Let shards appended since the last checkpoint join the stream, the same on every rank.

    Ranks read the manifest independently and may land on either side of an append; whoever is
    behind re-reads until all agree (a manifest only grows, so re-reading catches up)."""
    stream.refresh()
    for _ in range(attempts):
        oldest, newest = engine.min_max_over_ranks(stream.manifest_version)
        if oldest == newest:
            return
        if stream.manifest_version < newest:
            stream.refresh()
    raise EvertrainError(f"data.path: ranks disagree on the manifest version after {attempts} re-reads "
                         f"(saw {oldest}..{newest}); is the manifest being rewritten?")


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (and its checkpoint).

    Repeats are ignored: launchers forward a Ctrl-C as SIGTERM to ranks that already got the SIGINT,
    and deepspeed, torchrun and Slurm send SIGKILL ~30 s after that. So the stop has a budget
    (`checkpoint.stop_budget_s`, counted from the first signal): the last save is finished within it
    or abandoned, and the process exits; the last committed checkpoint is intact either way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = False
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if not self.received:
            self.received_at = time.monotonic()
        self.received = True

    def deadline_if_received(self, budget_s: float) -> float | None:
        """The stop's deadline once this rank got a signal, else None."""
        return None if self.received_at is None else self.received_at + budget_s

    def deadline(self, budget_s: float) -> float:
        """When the stop must be over; a rank stopped by the others' vote counts from now."""
        return (self.received_at if self.received_at is not None else time.monotonic()) + budget_s

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: nothing to listen for
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
