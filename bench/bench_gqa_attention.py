"""Grouped-query attention: SDPA's own GQA broadcast (enable_gqa) vs expanding K/V first.

model.causal_attention uses enable_gqa except on CUDA in fp32, where SDPA has no fused GQA kernel and
would take its unfused math kernel. This prints both paths side by side (forward + backward, 8B-like
head layout: 32 query heads, 8 K/V heads, head_dim 128), their ratio, and the kernel SDPA picks.

    .venv/bin/python bench/bench_gqa_attention.py [--seq 512] [--batch 2] [--iters 5]
"""

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from evertrain.pretrain.model.transformer import causal_attention

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def runs_fused(q, k, v, expand_kv: bool) -> bool:
    """Whether SDPA serves this call with a fused kernel (it raises when only math would do)."""
    try:
        with torch.no_grad(), sdpa_kernel(FUSED):
            causal_attention(q, k, v, expand_kv=expand_kv)
        return True
    except RuntimeError:
        return False


def time_paths(q, k, v, iters: int) -> tuple[float, float]:
    """Mean seconds of (expanded K/V, enable_gqa), interleaved so load drift hits both alike."""

    def step(expand_kv: bool) -> float:
        q.grad = k.grad = v.grad = None
        if q.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        causal_attention(q, k, v, expand_kv=expand_kv).sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step(True), step(False)  # warm up (kernel selection, allocator)
    totals = [0.0, 0.0]
    for _ in range(iters):
        totals[0] += step(True)
        totals[1] += step(False)
    return totals[0] / iters, totals[1] / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    setups = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        setups += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    print(f"B={args.batch} T={args.seq} heads 32/8 head_dim 128, forward+backward, mean of {args.iters}")
    print(f"{'device':<6} {'dtype':<9} {'expand K/V':>11} {'enable_gqa':>11} {'gqa/expand':>11}  gqa kernel")
    for device, dtype in setups:

        def make(heads):
            return torch.randn(
                args.batch, heads, args.seq, 128, device=device, dtype=dtype, requires_grad=True
            )

        q, k, v = make(32), make(8), make(8)
        expanded, broadcast = time_paths(q, k, v, args.iters)
        kernel = "fused" if runs_fused(q, k, v, expand_kv=False) else "math"
        print(
            f"{device:<6} {str(dtype).removeprefix('torch.'):<9} {expanded * 1e3:>9.1f}ms "
            f"{broadcast * 1e3:>9.1f}ms {broadcast / expanded:>10.2f}x  {kernel}"
        )


if __name__ == "__main__":
    main()
