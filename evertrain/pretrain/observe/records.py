"""The metrics records the training loop writes, built where the loop already syncs with the host.

    window = LogWindow(engine, tokens, flops_per_token, peak_tflops)
    window.add(loss, bad)                         # every step: device ops only, no host sync
    window.record(step, tokens, grad_norm, v)     # log step: one host sync -> a "train" record
    window.restart(tokens)                        # after the log step's eval and checkpoint
    eval_record(engine, val, step, tokens)        # eval step: one host sync -> an "eval" record

Records are plain dicts of host numbers for metrics.Metrics (metrics.jsonl, TensorBoard, trackers, the
console); their keys are the formats docs/design.md names.
"""

from __future__ import annotations

import time

import torch

from evertrain.pretrain.engines.base import Engine
from evertrain.pretrain.model.hardware import peak_memory_gib
from evertrain.pretrain.run.evaluate import evaluate


class LogWindow:
    """Sums the loss on device between log steps and turns it into one metrics record with a single
    host sync: `loss` is the mean over the window's finite steps (all ranks; NaN when there were none),
    `lr` and `grad_norm` those of the log step, `tokens_per_s` and `step_time_s` the window's
    throughput, `mfu` the model FLOPs done per second over the peak of all devices (only when the
    peak is known; `mfu_torchtitan` the same by torchtitan's FLOP count, see model.py), `peak_mem_gib`
    this rank's peak memory (hardware.py)."""

    def __init__(
        self,
        engine: Engine,
        tokens: int,
        flops_per_token: float = 0.0,
        peak_tflops: float | None = None,
        torchtitan_flops_per_token: float = 0.0,
    ):
        self.engine = engine
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.torchtitan_flops_per_token = torchtitan_flops_per_token
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
        mean = torch.where(
            self.finite_steps > 0, self.loss_sum / self.finite_steps.clamp(min=1), float("nan")
        )
        mean_loss = self.engine.all_reduce_mean(mean)
        lr = self.engine.optimizer.lr.reshape(())
        loss, lr, grad_norm = torch.stack([mean_loss, lr.float(), grad_norm.reshape(()).float()]).tolist()
        elapsed = time.perf_counter() - self.start_time
        tokens_per_s = (tokens - self.start_tokens) / elapsed
        record = {
            "kind": "train",
            "step": step,
            "tokens": tokens,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed / max(self.steps, 1),
            "peak_mem_gib": peak_memory_gib(self.engine.device),
            "time": time.time(),
            "data_version": data_version,
        }
        if self.peak_tflops:
            peak = self.peak_tflops * 1e12 * self.engine.world_size
            record["mfu"] = self.flops_per_token * tokens_per_s / peak
            if self.torchtitan_flops_per_token:
                record["mfu_torchtitan"] = self.torchtitan_flops_per_token * tokens_per_s / peak
        return record

    def restart(self, tokens: int) -> None:
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.steps = 0
        self.start_tokens, self.start_time = tokens, time.perf_counter()


def eval_record(engine: Engine, val: list[torch.Tensor], step: int, tokens: int) -> dict:
    """The validation loss at `step` (host sync: evaluate's .item()) and how long scoring it took."""
    started = time.perf_counter()
    val_loss = evaluate(engine, val)["val_loss"]
    return {
        "kind": "eval",
        "step": step,
        "tokens": tokens,
        "val_loss": val_loss,
        "eval_s": time.perf_counter() - started,
        "time": time.time(),
    }
