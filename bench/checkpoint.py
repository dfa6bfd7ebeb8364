"""Checkpoint cost, measured side by side in one run (single engine, CPU is fine):

  (a) how long a save holds up the training loop, asynchronous vs synchronous (goal: <= 2-3%): the
      time in `save()` plus the time the next step's optimizer waited for the host copy;
  (b) steady tokens/s with a save every ~10 s vs without saves (goal: >= 95% on 2 shared cores);
  (c) the save's write (DCP write + fsync of this rank's files, hashed as written; not the copy) vs a plain
      sequential write + fsync of as many bytes, each measured under the same conditions: alone, and
      beside a training step as an asynchronous save's write runs (goal: >= 80%).
  (gpu) on CUDA only: (a) for a 1B model (configs/1b.yaml shape) on the GPU, staged asynchronously
      (side-stream copy into pinned memory) vs a synchronous save.

    python bench/checkpoint.py                       # 34M parameters: a ~400 MB checkpoint
    python bench/checkpoint.py --d-model 1024 --n-layers 8 --dir /mnt/fast

Random tokens stand in for data (no data dir needed). Repetitions alternate the order of the
compared variants (in (b): segments of --every-s seconds without and with a save, AB BA ...), so
drift in the other load on a shared machine hits both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
    p.add_argument("--pairs", type=int, default=8, help="(b): segments without and with a save, of each")
    p.add_argument("--every-s", type=float, default=10.0, help="save about every this many seconds in (b)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    return p.parse_args()


def build(args, config: str | None = None, device: str = "cpu"):
    shape = (
        []
        if config
        else [
            f"model.d_model={args.d_model}",
            f"model.n_layers={args.n_layers}",
            f"model.n_heads={args.d_model // 64}",
            f"model.vocab_size={args.vocab_size}",
            "model.tie_embeddings=false",
        ]
    )
    cfg = load_config(
        config,
        [
            *shape,
            f"model.seq_len={args.seq_len}",
            f"train.micro_batch_size={args.batch}",
            "train.grad_accum=1",
            f"train.device={device}",
            "engine.name=single",
            "checkpoint.keep_last=1",
            "optim.warmup_steps=10",
        ],
    )
    engine = engines.create(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(cfg.model.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    return cfg, engine, batch.to(engine.device)


def train_steps(engine, batch, n: int) -> None:
    for _ in range(n):
        loss, _ = engine.train_step([batch])
    loss.item()  # the host sync a log step would do


def save_costs(cfg, engine, batch, root: Path, async_save: bool, reps: int, first_step: int, plain) -> dict:
    """Seconds of each of `reps` saves, by phase (see SaveTimings) and in total: {key: [seconds]}.
    `loop` is what the loop lost: save() plus the next step's wait for the host copy (the optimizer
    step pre-hook of checkpoint/staging.py). Next to each save, `plain` writes as many bytes under the
    conditions the save's write had: alone for a synchronous save (the loop waited for its write),
    beside a training step for an asynchronous one (its write ran beside the next step); before the
    save at odd repetitions, after it at even ones, so neither side always follows the other (no
    `plain`: no plain writes, and no (c) keys)."""
    cfg.checkpoint.async_save = async_save
    ckpt = CheckpointManager(root, cfg, engine)
    stager = ckpt.state.stager
    timings, total, loop, plains = [], [], [], []

    def plain_write() -> tuple[float, float]:
        train_steps(engine, batch, 1)  # like the save, the plain write follows a step
        if not async_save:
            return plain.write()
        with ThreadPoolExecutor(1) as beside:
            written = beside.submit(plain.write)
            train_steps(engine, batch, 1)
            return written.result()

    for i in range(reps + 1):  # the first save allocates the staging buffers: not counted
        if i % 2 and plain:
            plains.append(plain_write())
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
        if not i % 2 and plain:
            plains.append(plain_write())
    ckpt.close()
    costs = {
        key: [getattr(t, key) for t in timings[1:]]
        for key in ("blocked", "copy", "write", "hash", "write_cpu")
    }
    costs.update(loop=loop[1:], total=total[1:])
    if plain:
        costs.update(
            {
                "plain": [p[0] for p in plains[1:]],
                "plain/write": [p[0] / t.write for p, t in zip(plains[1:], timings[1:])],
                "cpu plain/write": [p[1] / t.write_cpu for p, t in zip(plains[1:], timings[1:])],
            }
        )
    return costs


class PlainWrite:
    """One sequential write() of `size` bytes from memory into a new file, fsynced: what the disk
    gives a simple writer. The bytes are made once (random: nothing on the way can compress them)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.data = memoryview(os.urandom(1 << 24) * (size // (1 << 24) + 1))[:size]

    def write(self) -> tuple[float, float]:
        """(seconds, CPU seconds of the writing thread)."""
        start, cpu = time.perf_counter(), time.thread_time()
        with open(self.path, "wb") as f:
            f.write(self.data)
            f.flush()
            os.fsync(f.fileno())
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        self.path.unlink()
        return elapsed, cpu


def checkpoint_bytes(cfg, engine, root: Path) -> int:
    """The size of one checkpoint of this engine, from a synchronous save's meta.json."""
    cfg.checkpoint.async_save = False
    ckpt = CheckpointManager(root, cfg, engine)
    try:
        ckpt.save(1, {"tokens": 0})
        return sum(f["size"] for f in read_meta(ckpt.latest())["files"].values())
    finally:
        ckpt.close()


def segment(engine, batch, ckpt, seconds: float, save_step: int | None) -> tuple[float, float]:
    """Train for about `seconds`; with `save_step`, save at the start and wait at the end for that
    save, inside the measured time. (tokens/s, tokens per CPU-second of this process, all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    if save_step is not None:
        ckpt.save(save_step, {"tokens": 0})
    steps = 0
    while time.perf_counter() - start < seconds:
        train_steps(engine, batch, 1)
        steps += 1
    ckpt.wait()
    tokens = steps * batch.numel()
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def throughput_with_saves(
    cfg, engine, batch, root: Path, pairs: int, every_s: float, first_step: int
) -> dict:
    """Segments of `every_s` seconds, alternately without a save and with one save at its start (so a
    save every `every_s` seconds by the clock, not by a step count sampled under a passing burst of
    load), `pairs` of each in the order AB BA AB ...: drift in the other load on a shared machine
    hits both sides alike. Means over each side's segments; the median of the pairs' ratios."""
    cfg.checkpoint.async_save = True
    ckpt = CheckpointManager(root, cfg, engine)
    ckpt.save(first_step, {"tokens": 0})  # allocates the staging buffers, as a run's first save does
    ckpt.wait()
    rates = {False: [], True: []}
    for pair in range(pairs):
        for saving in (False, True) if pair % 2 == 0 else (True, False):
            first_step += 1000
            rates[saving].append(segment(engine, batch, ckpt, every_s, first_step if saving else None))
    ckpt.close()
    mean = {side: [statistics.mean(r[i] for r in rates[side]) for i in (0, 1)] for side in rates}
    return {
        "plain": mean[False][0],
        "saving": mean[True][0],
        "cost_per_save": every_s * (1 - mean[True][0] / mean[False][0]),
        "cpu_ratio": mean[True][1] / mean[False][1],
        "pair_ratios": sorted(w[0] / wo[0] for w, wo in zip(rates[True], rates[False])),
    }


def alternated_costs(cfg, engine, batch, root: Path, reps: int, step: int, plain) -> tuple[dict, int]:
    """save_costs for sync and async, twice each in alternating order; {mode: {key: [seconds]}}."""
    results = {True: {}, False: {}}
    for order in ((False, True), (True, False)):
        for mode in order:
            for key, values in save_costs(
                cfg, engine, batch, root / f"a{step}", mode, reps, step, plain
            ).items():
                results[mode].setdefault(key, []).extend(values)
            step += 2 * (reps + 1)
    return results, step


def median_of(results: dict, mode: bool, key: str) -> float:
    """The median over all of a mode's saves (2 x --saves)."""
    return statistics.median(results[mode][key])


def gpu_case(args, root: Path) -> None:
    """(a) on CUDA for the 1B shape: the loop's loss per save, staged async vs synchronous."""
    cfg, engine, batch = build(args, config="configs/1b.yaml", device="cuda")
    params = sum(p.numel() for p in engine.model.parameters())
    try:
        train_steps(engine, batch, 3)
        results, _ = alternated_costs(cfg, engine, batch, root / "gpu", max(1, args.saves - 1), 1000, None)
        sync_loop, async_loop = median_of(results, False, "loop"), median_of(results, True, "loop")
        print(
            f"(gpu) {params / 1e9:.2f}B parameters on {torch.cuda.get_device_name()}: loop blocked per save "
            f"sync {sync_loop * 1e3:.0f} ms, staged async {async_loop * 1e3:.1f} ms -> "
            f"{async_loop / sync_loop:.2%} of sync; the background copy took {median_of(results, True, 'copy'):.2f} s"
        )
    finally:
        engine.close()


def main() -> None:
    args = parse_args()
    cfg, engine, batch = build(args)
    params = sum(p.numel() for p in engine.model.parameters())
    print(
        f"model: {params / 1e6:.1f}M parameters, {batch.numel()} tokens/step, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, hash {HASH}"
    )
    train_steps(engine, batch, 3)  # warm-up
    root = Path(tempfile.mkdtemp(prefix="evertrain-bench-ckpt-", dir=args.dir))
    step = 1000
    try:
        size = checkpoint_bytes(cfg, engine, root / "size")
        plain = PlainWrite(root / "plain.bin", size)
        # (a) + (c): alternate which mode goes first
        results, step = alternated_costs(cfg, engine, batch, root, args.saves, step, plain)
        sync_loop, async_loop = median_of(results, False, "loop"), median_of(results, True, "loop")
        print(
            f"(a) loop blocked per save: sync {sync_loop * 1e3:.0f} ms, async {async_loop * 1e3:.1f} ms "
            f"(save() {median_of(results, True, 'blocked') * 1e3:.1f} ms + the next update's wait for the copy) "
            f"-> {async_loop / sync_loop:.1%} of sync (goal <= 2-3%)"
        )

        # (c): each side under the same conditions, measured next to each other
        alone, alone_plain = median_of(results, False, "write"), median_of(results, False, "plain")
        beside, beside_plain = median_of(results, True, "write"), median_of(results, True, "plain")
        gbs = lambda s: f"{size / s / 1e9:.2f} GB/s"  # noqa: E731
        print(
            f"(c) {size / 1e9:.2f} GB, the save's write vs a plain sequential write next to it (goal >= 80%; "
            f"the median of the {len(results[False]['write'])} pairs' ratios): alone {gbs(alone)} vs {gbs(alone_plain)}"
            f" -> {median_of(results, False, 'plain/write'):.0%}; beside a training step (async) {gbs(beside)} vs "
            f"{gbs(beside_plain)} -> {median_of(results, True, 'plain/write'):.0%}; CPU time of the writing thread, plain / "
            f"the save's: alone {median_of(results, False, 'cpu plain/write'):.0%}, beside a step "
            f"{median_of(results, True, 'cpu plain/write'):.0%}. The whole synchronous save "
            f"{gbs(median_of(results, False, 'total'))} = copy {median_of(results, False, 'copy'):.2f} s + write "
            f"{alone:.2f} s + {HASH} {median_of(results, False, 'hash'):.2f} s + commit"
        )
        print(f"load average {os.getloadavg()[0]:.1f}")

        # (b)
        b = throughput_with_saves(cfg, engine, batch, root / "b", args.pairs, args.every_s, step)
        ratios = b["pair_ratios"]
        print(
            f"(b) tokens/s: without saves {b['plain']:.0f}, with a save every {args.every_s:.0f} s {b['saving']:.0f}"
            f" -> {b['saving'] / b['plain']:.1%} (goal >= 95% here); over the {len(ratios)} pairs of {args.every_s:.0f} s"
            f" segments: median {statistics.median(ratios):.1%}, range {ratios[0]:.1%}-{ratios[-1]:.1%}; a save "
            f"costs {b['cost_per_save']:.2f} s of training; tokens per CPU-second of this process (other "
            f"load does not enter): {b['cpu_ratio']:.1%} of without"
        )
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
