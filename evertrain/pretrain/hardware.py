"""What the device can do and what a run has used of it: the peak FLOP/s MFU is measured against, and
peak memory. Host-side lookups only; nothing here touches the training step.
"""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks per device (vendor datasheets, TFLOP/s, no sparsity), matched against
# torch.cuda.get_device_name in this order (the first fragment found wins: "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0), ("V100", 125.0))


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """`train.peak_tflops` if set, else the table's entry for this GPU; None when unknown (e.g. CPU)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated device memory on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
