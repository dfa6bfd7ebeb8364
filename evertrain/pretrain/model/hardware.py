"""What the device can do and what a run has used of it: the peak FLOP/s MFU is measured against, and
peak memory. Host-side lookups only; nothing here touches the training step.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peaks per device (TFLOP/s, no sparsity: datasheets that quote "with sparsity"
# figures are halved), matched against torch.cuda.get_device_name in this order: the first fragment
# found wins, so a variant comes before its family ("H100 NVL" before "H100", "GB200" before "B200")
# and "H20" after every "H200". Sources, dense bf16:
#   NVIDIA H100 datasheet: SXM 989, NVL 835 (1,671 sparse), PCIe 756; H800 is the H100 part (SXM 989,
#     PCIe 756); GH200 989.   NVIDIA H200 datasheet: SXM 989, NVL 835 (1,671 sparse).
#   NVIDIA H20: 148.   NVIDIA HGX B200: 2,250 per GPU (4.5 PFLOPS sparse); GB200 NVL72: 2,500 per GPU;
#     B100: 1,750.   NVIDIA A100 / A800: 312; L40S 362; L4 121; A10G 70.
#   AMD Instinct datasheets: MI300X and MI325X 1,307.4; MI250X 383 (ROCm torch names the device
#     "AMD Instinct MI300X" and reports it as a cuda device).
# V100 has no bf16 tensor cores (bf16 runs emulated), so it has no entry: MFU there needs train.peak_tflops.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("MI325X", 1307.4),
    ("MI300X", 1307.4),
    ("MI250X", 383.0),
)


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """`train.peak_tflops` if set, else the table's entry for this GPU; None when unknown (e.g. CPU)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """The table's dense bf16 peak for a device name, or None when no fragment matches."""
    return next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)


def use_tf32(device: torch.device) -> bool:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (torch's default is full fp32,
    several times slower: a run that forgets train.dtype=bfloat16 would crawl silently). TF32 keeps
    fp32's range with a 10-bit mantissa, what torchtitan and Megatron use for fp32 matmuls. Returns
    whether it was switched on (CUDA only)."""
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated device memory on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
