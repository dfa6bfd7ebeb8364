"""Training-loop overhead: evertrain's loop vs a bare PyTorch loop, same model, same batches.

    python bench/overhead.py --config configs/small.yaml --data data/shakespeare [--threads 1]

ours:        `loop.train` with the single engine and our AdamW (torch twin on CPU, Triton on GPU);
             metrics every `train.log_every` steps (metrics.jsonl + TensorBoard + progress bar) and
             the per-step stop check; eval and checkpoints off (the checkpoint section of
             docs/performance.md measures those).
bare:        the nanoGPT-style loop below with torch.optim.AdamW and clip_grad_norm_, pulling the
             loss to the host every `log_every` steps.
bare+ours:   the same bare loop stepping our AdamW, to separate the loop's cost from the optimizer's.
All three read the same windows from the same TokenStream and start from the same seeded weights.
Each repetition runs the three back to back, rotating which goes first, so drift on a shared machine
hits all of them; each timing covers `--steps` steps after `--warmup` untimed ones. The ratios are
medians over repetitions of the per-repetition ratios, in wall time and in this process's CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from evertrain.pretrain import engines
from evertrain.pretrain.config import load_config
from evertrain.pretrain.data.stream import TokenStream
from evertrain.pretrain.engines.base import build_model
from evertrain.pretrain.loop import train
from evertrain.pretrain.optim import build_optimizer
from evertrain.pretrain.schedule import Schedule


def time_ours(cfg, warmup: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per step of `train()`, including its own set-up (metrics files, TensorBoard writer)."""
    engine = engines.create(cfg)
    stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.train.max_steps = warmup
        train(cfg, run_dir, engine, stream, None)
        tokens = warmup * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len
        cfg.train.max_steps = warmup + steps
        synchronize(engine.device)
        start = clocks()
        train(
            cfg,
            run_dir,
            engine,
            stream,
            None,
            start={"step": warmup, "tokens": tokens, "data": stream.state_dict()},
        )
        synchronize(engine.device)
        return per_step(start, steps)


def bare_loop(model, optimizer, stream, cfg, steps: int) -> list[float]:
    t = cfg.train
    losses = []
    for step in range(1, steps + 1):
        batch = stream.next_batch(t.micro_batch_size * t.grad_accum, 0, 1)
        for micro in batch.split(t.micro_batch_size):
            loss = model.loss(micro.to(model.embed_tokens.weight.device))
            (loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % t.log_every == 0:
            losses.append(loss.item())  # the one sync a minimal loop makes, to log
    return losses


def time_bare(cfg, warmup: int, steps: int, our_adamw: bool = False) -> tuple[float, float]:
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    o = cfg.optim
    if our_adamw:
        optimizer = build_optimizer(model, o, Schedule.from_config(o))
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=o.max_lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
    stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    bare_loop(model, optimizer, stream, cfg, warmup)
    synchronize(device)
    start = clocks()
    bare_loop(model, optimizer, stream, cfg, steps)
    synchronize(device)
    return per_step(start, steps)


def clocks() -> tuple[float, float]:
    """Wall time, and this process's CPU time: on a machine shared with other jobs the CPU time
    is the steadier measure of our own work (with --threads 1 it is the compute time)."""
    return time.perf_counter(), time.process_time()


def per_step(start: tuple[float, float], steps: int) -> tuple[float, float]:
    return tuple((now - then) / steps for now, then in zip(clocks(), start))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--data", help="prepared data dir (default: the config's data.path)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, help="torch CPU threads for every loop (default: torch's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [*args.overrides, "engine.name=single", "eval.every_steps=0", "checkpoint.every_steps=0"]
    if args.data:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(args.config, overrides)
    n_params = build_model(cfg, torch.device("cpu")).num_params()
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len

    loops = {
        "ours": time_ours,
        "bare": time_bare,
        "bare+ours": lambda c, w, s: time_bare(c, w, s, our_adamw=True),
    }
    names = list(loops)
    wall, cpu = ({name: [] for name in loops} for _ in range(2))
    for rep in range(args.reps):
        for name in names[rep % 3 :] + names[: rep % 3]:
            w, c = loops[name](load_config(args.config, overrides), args.warmup, args.steps)
            wall[name].append(w)
            cpu[name].append(c)
        print(
            f"rep {rep} ms/step wall (cpu): "
            + ", ".join(f"{n} {wall[n][-1] * 1e3:.1f} ({cpu[n][-1] * 1e3:.1f})" for n in names),
            flush=True,
        )

    def ratio(times: dict, a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(
        f"\n{Path(args.config).name}: {n_params / 1e6:.2f}M params, {tokens_per_step} tokens/step, "
        f"{torch.get_num_threads()} threads, {args.reps} reps x {args.steps} steps, log_every={cfg.train.log_every}"
    )
    print("| loop | wall ms/step | CPU ms/step | tokens/s (wall) |")
    print("|---|---|---|---|")
    for name, label in [
        ("ours", "evertrain `train()`, our AdamW"),
        ("bare", "bare loop, torch.optim.AdamW"),
        ("bare+ours", "bare loop, our AdamW"),
    ]:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {label} | {w * 1e3:.1f} | {c * 1e3:.1f} | {tokens_per_step / w:,.0f} |")
    print("\n| step-time ratio (median of per-repetition ratios) | wall | CPU |")
    print("|---|---|---|")
    print(
        f"| ours / bare with torch.optim.AdamW (goal <= 1.03) | {ratio(wall, 'ours', 'bare'):.3f} "
        f"| {ratio(cpu, 'ours', 'bare'):.3f} |"
    )
    print(
        f"| ours / bare with our AdamW (the loop alone) | {ratio(wall, 'ours', 'bare+ours'):.3f} "
        f"| {ratio(cpu, 'ours', 'bare+ours'):.3f} |"
    )


if __name__ == "__main__":
    main()
