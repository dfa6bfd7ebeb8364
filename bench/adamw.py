"""AdamW step throughput, side by side in one run: our Triton kernel and torch twin against
torch.optim.AdamW (fused and foreach), as achieved bandwidth against a measured copy bandwidth.

    python bench/adamw.py                          # CUDA: 1e6..1e9 params; CPU: 1e6..5e7 (torch paths)
    python bench/adamw.py --max-params 1e7 --repeats 5

One AdamW step over fp32 params reads p, g, m, v and writes p, m, v: at least 28 bytes per
parameter. GB/s = 28 * params / step time; "% of copy" compares it with `dst.copy_(src)` of the
same number of fp32 elements on the same device (read + write), timed in the same rotation. The
parameters are split like a model's: 32 equal matrices plus 16 norm-sized vectors, so the
multi-tensor handling is part of what is measured. Ours includes computing the LR
from the schedule on the device at every step. Each repetition times every implementation once, in
a rotating order, so drift on a shared machine hits all of them; the best time of each is reported
(interference only ever adds time, so the minimum is the least disturbed measurement).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from evertrain.kernels.adamw import AdamW
from evertrain.pretrain.schedule import Schedule

BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (fp32)
N_MATRICES, N_VECTORS, VECTOR_SIZE = 32, 16, 4096


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--min-params", type=float, default=1e6)
    p.add_argument("--max-params", type=float, default=None, help="default: 1e9 on CUDA, 5e7 on CPU")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed steps per size (default: 20 CUDA, 10 CPU)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compiles here)")
    return p.parse_args()


def tensor_sizes(total: int, aligned: bool = True) -> list[int]:
    """32 equal matrices + 16 vectors summing to about `total`. aligned: every size a multiple of 16
    elements, so (with the allocator's aligned storage) the Triton kernel takes its 128-bit path at every
    size; unaligned: odd matrix sizes, the masked scalar path that views into flat buffers get."""
    vectors = [VECTOR_SIZE] * N_VECTORS
    matrix = (total - sum(vectors)) // N_MATRICES
    matrix = matrix - matrix % 16 if aligned else matrix | 1
    return [matrix] * N_MATRICES + vectors


def best_times(steps: dict, run, repeats: int, warmup: int) -> dict[str, float]:
    """Best seconds of each callable: warmup untimed calls, then `repeats` rounds in a rotating order, so
    drift on a shared machine hits all of them (interference only adds time: the minimum is the least
    disturbed measurement)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    order = list(steps)
    times = {n: [] for n in order}
    for r in range(repeats):
        for n in order[r % len(order) :] + order[: r % len(order)]:
            times[n].append(run(steps[n]))
    return {n: min(t) for n, t in times.items()}


def make_optimizer(name: str, sizes: list[int], grads: list[torch.Tensor], device) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.randn(n, device=device) * 0.02) for n in sizes]
    for p, g in zip(params, grads):
        p.grad = g  # shared by all implementations: none of them writes the gradients
    kwargs = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if name.startswith("ours"):
        return AdamW(params, Schedule(max_lr=3e-4, warmup_steps=1000), impl=name.split()[1], **kwargs)
    return torch.optim.AdamW(
        params, lr=3e-4, fused=name == "torch fused", foreach=name == "torch foreach", **kwargs
    )


def timer(device: torch.device):
    """Seconds for fn(), measured on the device's clock for CUDA."""

    def run(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def main() -> None:
    args = parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    cuda = device.type == "cuda"
    max_params = int(args.max_params or (1e9 if cuda else 5e7))
    repeats = args.repeats or (20 if cuda else 10)
    names = (["ours triton"] if cuda else []) + ["ours torch", "torch fused", "torch foreach"]
    sizes = [n for n in (10**k for k in range(6, 10)) if args.min_params <= n <= max_params]
    if max_params not in sizes and max_params >= args.min_params:
        sizes.append(max_params)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# AdamW step, fp32, {device.type} ({name}), torch {torch.__version__}\n")
    print("| params | implementation | ms/step | GB/s | % of copy | vs torch fused |")
    print("|---:|---|---:|---:|---:|---:|")
    run = timer(device)
    for total in sizes:
        split = tensor_sizes(total)
        grads = [torch.randn(n, device=device) for n in split]
        steps = {n: make_optimizer(n, split, grads, device).step for n in names}
        src, dst = torch.randn(total, device=device), torch.empty(total, device=device)
        steps["copy"] = partial(dst.copy_, src)  # no closure: src and dst are deleted below
        best = best_times(steps, run, repeats, args.warmup)
        copy_gbs = 2 * src.nbytes / best["copy"] / 1e9
        print(f"| {total:.0e} | copy (read + write) | {best['copy'] * 1e3:.2f} | {copy_gbs:.1f} | 100% | |")
        for n in names:
            gbs = BYTES_PER_PARAM * sum(split) / best[n] / 1e9
            print(
                f"| {total:.0e} | {n} | {best[n] * 1e3:.2f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% | "
                f"{best['torch fused'] / best[n]:.2f}x |",
                flush=True,
            )
        del steps, grads, src, dst
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
