"""Checkpoint cost, measured side by side in one run (single engine, CPU is fine):

  (a) how long a save holds up the training loop, asynchronous vs synchronous (goal: <= 2-3%): the
      time in `save()` plus the time the next step's optimizer waited for the host copy;
  (b) steady tokens/s with a save every ~10 s vs without saves (goal: >= 95% on 2 shared cores);
  (c) the save's background write bandwidth vs a plain sequential write of the same bytes (>= 80%).
  (gpu) on CUDA only: (a) for a 1B model (configs/1b.yaml shape) on the GPU, staged asynchronously
      (side-stream copy into pinned memory) vs a synchronous save.

    python bench/checkpoint.py                       # 34M parameters: a ~400 MB checkpoint
    python bench/checkpoint.py --d-model 1024 --n-layers 8 --dir /mnt/fast

Random tokens stand in for data (no data dir needed). Repetitions alternate the order of the
compared variants, or (b) takes its baseline from the same run, so drift on a shared machine hits
both sides; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evertrain.pretrain import engines
from evertrain.pretrain.checkpoint import CheckpointManager
from evertrain.pretrain.checkpoint.store import HASH, read_meta
from evertrain.pretrain.config import load_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--saves", type=int, default=3, help="repetitions of (a) and (c)")
    p.add_argument("--steps", type=int, default=240, help="steps of the throughput run in (b)")
    p.add_argument("--every-s", type=float, default=10.0, help="save about every this many seconds in (b)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    return p.parse_args()


def build(args, config: str | None = None, device: str = "cpu"):
    shape = [] if config else [
        f"model.d_model={args.d_model}", f"model.n_layers={args.n_layers}", f"model.n_heads={args.d_model // 64}",
        f"model.vocab_size={args.vocab_size}", "model.tie_embeddings=false"]
    cfg = load_config(config, [*shape, f"model.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
                               "train.grad_accum=1", f"train.device={device}", "engine.name=single",
                               "checkpoint.keep_last=1", "optim.warmup_steps=10"])
    engine = engines.create(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    return cfg, engine, batch.to(engine.device)


def train_steps(engine, batch, n: int) -> None:
    for _ in range(n):
        loss, _ = engine.train_step([batch])
    loss.item()  # the host sync a log step would do


def save_costs(cfg, engine, batch, root: Path, async_save: bool, reps: int, first_step: int) -> dict:
    """Median seconds of `reps` saves, by phase (see SaveTimings) and in total, and the bytes saved.
    `loop` is what the loop lost: save() plus the next step's wait for the host copy (the optimizer
    step pre-hook of checkpoint/staging.py)."""
    cfg.checkpoint.async_save = async_save
    ckpt = CheckpointManager(root, cfg, engine)
    stager = ckpt.state.stager
    timings, total, loop = [], [], []
    for i in range(reps + 1):  # the first save allocates the staging buffers: not counted
        train_steps(engine, batch, 1)
        start = time.perf_counter()
        ckpt.save(first_step + i, {"tokens": 0})
        blocked = ckpt.timings.blocked
        stager.waited = 0.0
        train_steps(engine, batch, 1)  # the next step: forward/backward overlap the copy, the update waits
        loop.append(blocked + stager.waited)
        ckpt.wait()
        total.append(time.perf_counter() - start)
        timings.append(ckpt.timings)
    ckpt.close()
    size = sum(f["size"] for f in read_meta(ckpt.latest())["files"].values())
    costs = {key: statistics.median(getattr(t, key) for t in timings[1:]) for key in ("blocked", "copy", "write", "hash")}
    return {**costs, "loop": statistics.median(loop[1:]), "total": statistics.median(total[1:]), "size": size}


def throughput_with_saves(cfg, engine, batch, root: Path, steps: int, every: int, first_step: int) -> dict:
    """One run of `steps` steps saving every `every` steps. The baseline is measured in the same run:
    the mean time of the steps during which no save was in flight, so other load on a shared machine
    hits both sides alike (a mean, not a median: stray slow steps happen on both sides)."""
    cfg.checkpoint.async_save = True
    ckpt = CheckpointManager(root, cfg, engine)
    ckpt.save(first_step, {"tokens": 0})  # allocates the staging buffers, as a run's first save does
    ckpt.wait()
    step_spans, saves = [], []
    run_start = time.perf_counter()
    for i in range(1, steps + 1):
        start = time.perf_counter()
        train_steps(engine, batch, 1)
        step_spans.append((start, time.perf_counter()))
        if i % every == 0 and i < steps:
            started = time.perf_counter()
            ckpt.save(first_step + i, {"tokens": 0})
            saves.append((started, ckpt.timings))  # the background thread completes these timings
    elapsed = time.perf_counter() - run_start
    ckpt.close()
    busy = [(start, start + t.blocked + t.copy + t.write + t.hash + t.commit) for start, t in saves]
    clean = [end - start for start, end in step_spans
             if not any(start < busy_end and end > busy_start for busy_start, busy_end in busy)]
    step_s = statistics.mean(clean)
    return {"plain": batch.numel() / step_s, "saving": steps * batch.numel() / elapsed, "step_s": step_s,
            "cost_per_save": (elapsed - steps * step_s) / len(saves), "clean_steps": len(clean)}


def plain_write_s(path: Path, size: int) -> float:
    """One sequential write of `size` bytes from memory, fsynced: what the disk gives a simple writer."""
    data = os.urandom(1 << 24) * (size // (1 << 24) + 1)
    view = memoryview(data)[:size]
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(view)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def step_seconds(engine, batch, n: int = 3) -> float:
    start = time.perf_counter()
    train_steps(engine, batch, n)
    return (time.perf_counter() - start) / n


def alternated_costs(cfg, engine, batch, root: Path, reps: int, step: int) -> tuple[dict, int]:
    """save_costs for sync and async, twice each in alternating order; {mode: [costs, costs]}."""
    results = {True: [], False: []}
    for order in ((False, True), (True, False)):
        for mode in order:
            results[mode].append(save_costs(cfg, engine, batch, root / f"a{step}", mode, reps, step))
            step += 2 * (reps + 1)
    return results, step


def median_of(results: dict, mode: bool, key: str) -> float:
    return statistics.median(r[key] for r in results[mode])


def gpu_case(args, root: Path) -> None:
    """(a) on CUDA for the 1B shape: the loop's loss per save, staged async vs synchronous."""
    cfg, engine, batch = build(args, config="configs/1b.yaml", device="cuda")
    params = sum(p.numel() for p in engine.model.parameters())
    try:
        train_steps(engine, batch, 3)
        results, _ = alternated_costs(cfg, engine, batch, root / "gpu", max(1, args.saves - 1), 1000)
        sync_loop, async_loop = median_of(results, False, "loop"), median_of(results, True, "loop")
        print(f"(gpu) {params / 1e9:.2f}B parameters on {torch.cuda.get_device_name()}: loop blocked per save "
              f"sync {sync_loop * 1e3:.0f} ms, staged async {async_loop * 1e3:.1f} ms -> "
              f"{async_loop / sync_loop:.2%} of sync; the background copy took {median_of(results, True, 'copy'):.2f} s")
    finally:
        engine.close()


def main() -> None:
    args = parse_args()
    cfg, engine, batch = build(args)
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {batch.numel()} tokens/step, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, hash {HASH}")
    train_steps(engine, batch, 3)  # warm-up
    root = Path(tempfile.mkdtemp(prefix="evertrain-bench-ckpt-", dir=args.dir))
    step = 1000
    try:
        # (a) + (c): alternate which mode goes first
        results, step = alternated_costs(cfg, engine, batch, root, args.saves, step)
        sync_loop, async_loop = median_of(results, False, "loop"), median_of(results, True, "loop")
        size = results[False][0]["size"]
        print(f"(a) loop blocked per save: sync {sync_loop * 1e3:.0f} ms, async {async_loop * 1e3:.1f} ms "
              f"(save() {median_of(results, True, 'blocked') * 1e3:.1f} ms + the next update's wait for the copy) "
              f"-> {async_loop / sync_loop:.1%} of sync (goal <= 2-3%)")

        # (b)
        every = max(1, round(args.every_s / step_seconds(engine, batch)))
        b = throughput_with_saves(cfg, engine, batch, root / "b", args.steps, every, step)
        step += args.steps + 1
        print(f"(b) tokens/s: no save in flight {b['plain']:.0f}, with a save every {every} steps "
              f"({every * b['step_s']:.1f} s) {b['saving']:.0f} -> {b['saving'] / b['plain']:.1%} (goal >= 95% here); "
              f"a save costs {b['cost_per_save']:.2f} s of training ({b['clean_steps']} of {args.steps} steps "
              "without a save in flight)")

        # (c)
        plain_s = statistics.median(plain_write_s(root / "plain.bin", size) for _ in range(args.saves))
        write_s, whole_s = median_of(results, True, "write"), median_of(results, False, "total")
        print(f"(c) {size / 1e9:.2f} GB: plain sequential write {size / plain_s / 1e9:.2f} GB/s; the save's "
              f"background write {size / write_s / 1e9:.2f} GB/s ({plain_s / write_s:.0%} of plain, goal >= 80%); "
              f"the whole synchronous save {size / whole_s / 1e9:.2f} GB/s = copy "
              f"{median_of(results, False, 'copy'):.2f} s + write {median_of(results, False, 'write'):.2f} s + "
              f"{HASH} {median_of(results, False, 'hash'):.2f} s + commit")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        engine.close()
    try:
        if torch.cuda.is_available():
            gpu_case(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
