"""Input pipeline cost, measured side by side in one run (CPU is fine; CUDA adds a host-sync check):

A loop whose compute takes ~100 ms per step reads its batches from a TokenStream whose every read is
slowed by an injected delay of ~50 ms (a cold network filesystem). Four loops, run in short blocks
in rotating order so drift on a shared machine hits all of them:

  compute only    no data at all: the floor
  in the loop     data.prefetch=0, the reads in series with compute (what the loop did before)
  thread          data.prefetch=2, evertrain's Prefetcher (a background thread)
  process         the same reads in a worker process (torch.multiprocessing queue, shared memory),
                  the batch then copied into a staging buffer as the pinned path must: the alternative
                  to a thread, measured so the choice is one

It prints `prefetch step-time ratio: X` (thread / compute only; goal <= 1.05).

On CUDA it also runs the single engine on a tiny model with batches from the Prefetcher under
`torch.cuda.set_sync_debug_mode("warn")` and counts host syncs over steady-state steps: those from
the input path (inside `next_batch()`) must be 0; the exit status is 1 otherwise.

    python bench/input_pipeline.py [--data data/shakespeare] [--steps 5] [--repeats 24]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.multiprocessing as mp

from evertrain.pretrain.data.prefetch import Prefetcher
from evertrain.pretrain.data.stream import TokenStream


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--compute-ms", type=float, default=100.0)
    p.add_argument("--read-ms", type=float, default=50.0, help="injected delay per batch read")
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop and block")
    p.add_argument("--repeats", type=int, default=24, help="blocks per loop, loops rotated")
    return p.parse_args()


class SlowStream(TokenStream):
    """A TokenStream whose every read first waits `delay_s` (the filesystem being slow)."""

    def __init__(self, *args, delay_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s

    def next_batch(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().next_batch(*args, **kwargs)


def calibrate(target_s: float):
    """A CPU compute step (matmuls, which release the GIL as a GPU step's launches mostly do) of
    about target_s; returns it as a function."""
    a = torch.randn(512, 512)

    def work(n: int) -> None:
        x = a
        for _ in range(n):
            x = torch.tanh(x @ a)

    work(5)
    start = time.perf_counter()
    work(50)
    per = (time.perf_counter() - start) / 50
    n = max(1, round(target_s / per))
    return lambda: work(n)


def timed(loop_step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loop_step()
    return (time.perf_counter() - start) / steps


def process_worker(args, queue) -> None:
    torch.set_num_threads(1)
    stream = SlowStream(args.data, args.seq_len, 0, delay_s=args.read_ms / 1000)
    while True:
        batch = stream.next_batch(args.batch)
        queue.put((batch, stream.state_dict()))


def run_loops(args, compute) -> dict[str, list[float]]:
    """Seconds per step of each loop, `repeats` blocks of `steps` steps each, the loops' order rotated
    from block to block. Every source lives through the whole run (no start-up inside a block)."""
    delay = args.read_ms / 1000
    in_loop = Prefetcher(SlowStream(args.data, args.seq_len, 0, delay_s=delay), args.batch, depth=0)
    thread = Prefetcher(SlowStream(args.data, args.seq_len, 0, delay_s=delay), args.batch, depth=2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue(maxsize=2)
    worker = ctx.Process(target=process_worker, args=(args, queue), daemon=True)
    worker.start()
    staging = torch.empty(args.batch, args.seq_len + 1, dtype=torch.int64)
    loops = {
        "compute only": compute,
        "in the loop": lambda: (in_loop.next_batch(), compute()),
        "thread": lambda: (thread.next_batch(), compute()),
        "process": lambda: (staging.copy_(queue.get()[0]), compute()),
    }
    times: dict[str, list[float]] = {name: [] for name in loops}
    try:
        queue.get()  # the worker's start-up (spawn, imports) is not a step
        for step in loops.values():  # warm: a loop's first batch is never hidden by anything
            step()
        names = list(loops)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                times[name].append(timed(loops[name], args.steps))
    finally:
        thread.close()
        worker.kill()
        worker.join()
    return times


def sync_check(args) -> int:
    """Host syncs over steady-state steps on CUDA, split into the input path and the rest."""
    from evertrain.pretrain import engines
    from evertrain.pretrain.config import load_config

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.path={args.data}",
            "train.device=cuda",
            "engine.name=single",
            "model.vocab_size=4096",
            "train.micro_batch_size=8",
            "train.grad_accum=2",
        ],
    )
    engine = engines.create(cfg)
    stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    batches = Prefetcher(stream, 16, depth=2, device=engine.device)
    counts = {"input": 0, "step": 0}
    steps = 20
    try:
        for _ in range(5):  # warm-up: allocations, kernel selection, pinned buffers
            engine.train_step(list(batches.next_batch().split(8)))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    before = len(seen)
                    batch = batches.next_batch()
                    micro = list(batch.split(8))
                    counts["input"] += len(seen) - before
                    before = len(seen)
                    engine.train_step(micro)
                    counts["step"] += len(seen) - before
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        batches.close()
    print(
        f"CUDA sync debug over {steps} steady steps: input path {counts['input']} host syncs, "
        f"train_step {counts['step']}"
    )
    for w in seen[:5]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:160]}")
    return 1 if counts["input"] else 0


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    compute = calibrate(args.compute_ms / 1000)
    results = run_loops(args, compute)
    median = {name: statistics.median(values) for name, values in results.items()}
    floor = median["compute only"]
    print(
        f"{args.batch} x {args.seq_len + 1} windows per batch, {args.read_ms:.0f} ms injected per read, "
        f"~{args.compute_ms:.0f} ms compute, {args.repeats} blocks x {args.steps} steps per loop, rotated (median block)"
    )
    print(f"{'loop':<14} {'ms/step':>8} {'/ compute only':>15}")
    for name, seconds in median.items():
        print(f"{name:<14} {seconds * 1000:8.1f} {seconds / floor:15.3f}")
    print(f"prefetch step-time ratio: {median['thread'] / floor:.3f}")
    status = 0
    if torch.cuda.is_available():
        status = sync_check(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
