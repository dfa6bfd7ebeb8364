"""One command that proves the GPU path: `make gpu-check` (one process, < 8 min on one H100).

    python bench/gpu_check.py                            # CUDA: writes docs/gpu_check.md + docs/gpu_check.json
    make gpu-check PY=python3                            # the same with the machine's own interpreter, no install
    python bench/gpu_check.py --cpu-smoke --out /tmp/gc  # the same code paths at toy sizes on CPU (in `make test`)

It first prints the versions it runs with (python, torch, CUDA, Triton, DeepSpeed or "absent", GPU);
what a missing package prevents (DeepSpeed's rows) is skipped with one line. Sections, each timed and
recorded even when another fails (a GPU is lent rarely: one run must tell as much as it can):
1. adamw_match    our Triton AdamW vs torch.optim.AdamW (fp32) and vs our torch twin (bf16: both round
                  to bf16 once per step), 200 steps with a grad scale, on the layouts training hands it:
                  aligned tensors (every size a multiple of 16: the kernel's 128-bit path, checked taken),
                  unaligned views into one flat buffer, an FSDP2 last (shorter) shard, and a DeepSpeed flat
                  partition at a nonzero offset: max |difference|.
2. adamw_bench    ms/step, GB/s, % of the measured copy bandwidth and x torch fused, at 1e8 and 1e9
                  parameters sized for the aligned path, plus one unaligned row; and 50 steps back to back
                  with the host's time to issue a step apart (the launch overhead).
3. sdpa_backend   which SDPA kernel runs for bf16 GQA attention at the 1b and 8b head layouts (read from
                  the profiler's op names); the math kernel is a failure.
4. sync_audit     host syncs per phase (steady steps, a log step, an eval, a checkpoint save, the step
                  after it) for the single, FSDP2 and DeepSpeed ZeRO-2/3 engines on a 2-layer 1b shape,
                  the input pipeline included: value reads (.item() ...), explicit synchronize calls
                  (torch.cuda / Stream / Event) and CUDA's sync debug mode; single and FSDP2 must have none
                  in a steady step.
5. throughput     step time, tokens/s and MFU (ours and torchtitan's convention) of configs/1b.yaml on one
                  GPU (FSDP2, world size 1), eager vs compiled, without and with activation checkpointing;
                  each engine freed before the next (checked).
6. checkpoint     the time the loop is blocked per asynchronous save vs a synchronous save (1b model, or
                  fewer layers if one checkpoint would not fit 15 GB or half the free disk; one checkpoint
                  on disk at a time).

The process exits 1 if any section failed or a check did not hold (the report is written first; the
JSON writes a non-finite number as null). On CPU (--cpu-smoke) Triton runs under its interpreter and
CUDA-only measurements are skipped with a reason; the smoke run exists so this script cannot rot
between the rare days a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (Triton interpreted)")
    p.add_argument("--out", type=Path, default=None, help="where gpu_check.md/.json go (default: docs/)")
    p.add_argument("--only", default=None, help="comma-separated section names to run")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 dense peak for MFU (default: from the device name, evertrain/pretrain/model/hardware.py)",
    )
    p.add_argument("--audit-child", nargs=3, metavar=("CASE", "DATA", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class Report:
    """Rows of markdown per section, the raw figures, and which checks failed."""

    device: str
    smoke: bool
    sections: dict = field(default_factory=dict)  # name -> {"seconds", "rows": [str], "raw": {...}, "error"}
    failures: list = field(default_factory=list)

    def section(self, name: str):
        entry = self.sections.setdefault(name, {"rows": [], "raw": {}, "error": None, "seconds": 0.0})
        return entry

    def check(self, name: str, ok: bool, what: str) -> None:
        self.section(name)["rows"].append(f"- {'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            self.failures.append(f"{name}: {what}")

    def markdown(self) -> str:
        lines = [
            f"# GPU check ({'CPU smoke run' if self.smoke else 'measured'})",
            "",
            f"Device: {self.device}. Written by `python bench/gpu_check.py"
            f"{' --cpu-smoke' if self.smoke else ''}`; raw figures in gpu_check.json.",
            "",
        ]
        for name, entry in self.sections.items():
            lines += [f"## {name} ({entry['seconds']:.1f} s)", ""]
            lines += entry["rows"] or ["(no rows)"]
            if entry["error"]:
                lines += ["", "```", entry["error"].rstrip(), "```"]
            lines.append("")
        lines += [
            "## Verdict",
            "",
            "all checks held" if not self.failures else "failed: " + "; ".join(self.failures),
            "",
        ]
        return "\n".join(lines)


# -- 1. AdamW: Triton vs references ----------------------------------------------------------------------


MATCH_WORLD = 4  # the shard layouts below are those of rank(s) in a world of this size


def match_layouts(smoke: bool) -> dict[str, tuple[list[int], str]]:
    """Per layout: the element counts of the tensors the optimizer gets, and how they sit in memory.

    aligned          separate tensors, every size a multiple of 16: the kernel's 128-bit path
    unaligned        views into one flat buffer at offset 1: the masked scalar path
    fsdp_last_shard  the last rank's Shard(0) piece of [rows, cols] matrices (torch.chunk sizes: shorter
                     than the others, here not a multiple of 16 elements), a view at the start of its
                     padded buffer as FSDP2 keeps it
    ds_partition     rank 1's flat fp32 partition of all tensors concatenated (DeepSpeed pads the whole
                     to a multiple of 2 x world and splits it evenly): one view at a nonzero offset"""
    if smoke:
        aligned, odd, matrices = [48, 1024, 32], [48, 1000, 33], [(13, 16), (11, 33)]
    else:
        aligned, odd, matrices = (
            [1 << 20, 4096 * 1024 + 16 * 7, 4096, 1008],
            [1 << 20, 4096 * 1024 + 7, 4096, 1000],
            [(4097, 2048), (1001, 33), (257, 4096)],
        )
    last_shard = []
    for rows, cols in matrices:
        piece = -(-rows // MATCH_WORLD)
        last_shard.append((rows - piece * (MATCH_WORLD - 1)) * cols)
    flat = sum(odd)
    padded = flat + (-flat) % (2 * MATCH_WORLD)
    return {
        "aligned": (aligned, "separate"),
        "unaligned": (odd, "flat+1"),
        "fsdp_last_shard": (last_shard, "padded"),
        "ds_partition": ([padded // MATCH_WORLD], "partition1"),
    }


def place(values, how: str, device, dtype):
    """Parameters holding `values` laid out in memory as `how` says (see match_layouts)."""
    import torch

    if how == "separate":
        return [torch.nn.Parameter(v.to(device=device, dtype=dtype).clone()) for v in values]
    if how == "padded":
        out = []
        for v in values:
            buffer = torch.empty(v.numel() + 64, device=device, dtype=dtype)  # the padding other ranks fill
            buffer[: v.numel()].copy_(v)
            out.append(torch.nn.Parameter(buffer[: v.numel()]))
        return out
    offset = 1 if how == "flat+1" else values[0].numel()  # partition1: rank 1's slice of the flat buffer
    flat = torch.zeros(offset + sum(v.numel() for v in values) + 16, device=device, dtype=dtype)
    out, at = [], offset
    for v in values:
        view = flat[at : at + v.numel()]
        view.copy_(v)
        out.append(torch.nn.Parameter(view))
        at += v.numel()
    return out


def vector_path(tensors) -> bool:
    """Whether the Triton kernel takes its 128-bit path for these (p, g, m, v) tuples (adamw._tables)."""
    return all(t.data_ptr() % 16 == 0 for group in tensors for t in group) and all(
        group[0].numel() % 16 == 0 for group in tensors
    )


def adamw_match(report: Report, device, smoke: bool) -> None:
    import torch

    from evertrain.kernels.adamw import AdamW
    from evertrain.pretrain.schedule import Schedule

    sec = report.section("adamw_match")
    if version_of("triton") == "absent":
        sec["rows"].append("- SKIPPED: triton is not installed (the Triton AdamW cannot run)")
        return
    steps = 6 if smoke else 200
    layouts = match_layouts(smoke)
    sec["rows"] += [
        f"{steps} steps, grad scale 0.5, weight decay 0.1; layouts (element counts): "
        + "; ".join(f"{k} {v[0]}" for k, v in layouts.items()),
        "",
        "| params | layout | kernel path | reference | max abs diff (param) | max abs diff (exp_avg_sq) |",
        "|---|---|---|---|---:|---:|",
    ]
    sched = Schedule(max_lr=1e-3, warmup_steps=0, decay="constant")
    for dtype in (torch.float32, torch.bfloat16):
        for layout, (sizes, how) in layouts.items():
            gen = torch.Generator(device="cpu").manual_seed(0)
            init = [torch.randn(n, generator=gen) * 0.02 for n in sizes]
            ours = place(init, how, device, dtype)
            reference = (
                [p.detach().float().clone().requires_grad_() for p in ours]
                if dtype == torch.float32
                else place(init, how, device, dtype)
            )
            opt = AdamW(ours, sched, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, impl="triton")
            opt.grad_scale = torch.full((1,), 0.5, device=device)
            if dtype == torch.float32:
                ref = torch.optim.AdamW(reference, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
                ref_name = "torch.optim.AdamW"
            else:
                ref = AdamW(reference, sched, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, impl="torch")
                ref.grad_scale = opt.grad_scale
                ref_name = "our torch twin"
            vector = None
            for _ in range(steps):
                g = [torch.randn(n, generator=gen) for n in sizes]  # drawn per step: 200 steps would be GBs
                for p, r, gi in zip(ours, reference, g):
                    p.grad = gi.to(device=device, dtype=dtype)
                    r.grad = (gi * 0.5 if dtype == torch.float32 else gi).to(device=device, dtype=r.dtype)
                opt.step()
                ref.step()
                if vector is None:
                    vector = vector_path(
                        [(p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in ours]
                    )
            dp = max((p.float() - r.float()).abs().max().item() for p, r in zip(ours, reference))
            dv = max(
                (opt.state[p]["exp_avg_sq"] - ref.state[r]["exp_avg_sq"].float()).abs().max().item()
                for p, r in zip(ours, reference)
            )
            name = str(dtype).replace("torch.", "")
            path = "128-bit" if vector else "masked"
            sec["rows"].append(f"| {name} | {layout} | {path} | {ref_name} | {dp:.2e} | {dv:.2e} |")
            sec["raw"][f"{name}/{layout}"] = {
                "param": dp,
                "exp_avg_sq": dv,
                "reference": ref_name,
                "vector_path": vector,
                "sizes": sizes,
            }
            bound = 1e-5 if dtype == torch.float32 else 2**-7  # fp32 rounding vs one bf16 ulp near 1
            report.check(
                "adamw_match",
                dp <= bound and math.isfinite(dv),
                f"{name} {layout} ({path}): param diff {dp:.2e} <= {bound:.0e}",
            )
            if layout == "aligned":  # else the fast path training uses would go unchecked
                report.check("adamw_match", bool(vector), f"{name} aligned: the kernel took its 128-bit path")
            if layout == "ds_partition":
                report.check(
                    "adamw_match",
                    ours[0].storage_offset() > 0,
                    f"{name} ds_partition: at element offset {ours[0].storage_offset()} of its buffer",
                )
    sec["rows"].insert(0, "")


# -- 2. AdamW bandwidth ---------------------------------------------------------------------------------


def adamw_bench(report: Report, device, smoke: bool) -> None:
    import adamw as bench  # bench/adamw.py: the same optimizers, sizes and timer as the standalone bench
    import torch

    sec = report.section("adamw_bench")
    names = ["ours triton", "torch fused"] if device.type == "cuda" or smoke else ["torch fused"]
    if version_of("triton") == "absent":
        sec["rows"].append("- SKIPPED: ours triton (triton is not installed); torch fused measured alone")
        names = ["torch fused"]
    cases = (
        [(67584, True), (67584 + 17 * 32, False)]
        if smoke
        else [(10**8, True), (10**9, True), (10**8 + 17, False)]
    )
    repeats, warmup = (1, 0) if smoke else (20, 3)  # the interpreter is slow
    back_to_back = 2 if smoke else 50
    run = bench.timer(device)
    sec["rows"] += [
        "ms/step: one step between device events (best of the repeats); back-to-back: "
        f"{back_to_back} steps in a row, wall time / step (the queue stays full: device-bound); "
        "host: time to issue one step (Python + launches), the launch overhead apart",
        "",
        "| params | aligned path | implementation | ms/step | back-to-back ms/step | host ms/step | "
        "GB/s | % of copy | x torch fused |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for total, aligned in cases:
        split = bench.tensor_sizes(total, aligned=aligned)
        grads = [torch.randn(n, device=device) for n in split]
        steps = {n: bench.make_optimizer(n, split, grads, device).step for n in names}
        src, dst = torch.randn(total, device=device), torch.empty(total, device=device)
        steps["copy"] = partial(dst.copy_, src)  # no closure: src and dst are deleted below
        best = bench.best_times(steps, run, repeats, warmup)
        copy_gbs = 2 * src.nbytes / best["copy"] / 1e9
        for n in names:
            issue_s, wall_s = time_back_to_back(steps[n], device, back_to_back)
            gbs = bench.BYTES_PER_PARAM * sum(split) / best[n] / 1e9
            ratio = best["torch fused"] / best[n]
            sec["rows"].append(
                f"| {total:.2e} | {aligned} | {n} | {best[n] * 1e3:.2f} | {wall_s * 1e3:.2f} | "
                f"{issue_s * 1e3:.3f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% | {ratio:.2f}x |"
            )
            sec["raw"][f"{total}/{n}"] = {
                "ms": best[n] * 1e3,
                "gbs": gbs,
                "copy_gbs": copy_gbs,
                "x_fused": ratio,
                "aligned": aligned,
                "back_to_back_ms": wall_s * 1e3,
                "host_issue_ms": issue_s * 1e3,
                "back_to_back_steps": back_to_back,
            }
            if n == "ours triton" and aligned and device.type == "cuda":
                report.check(
                    "adamw_bench",
                    gbs >= 0.85 * copy_gbs and ratio >= 1.0,
                    f"{total:.0e} aligned: {100 * gbs / copy_gbs:.0f}% of copy (goal >= 85%), "
                    f"{ratio:.2f}x torch fused (goal >= 1)",
                )
        del steps, grads, src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()


def time_back_to_back(step, device, count: int) -> tuple[float, float]:
    """(host seconds to issue one step, wall seconds per step) over `count` steps issued in a row."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(count):
        step()
    issued = time.perf_counter() - t0
    synchronize(device)
    return issued / count, (time.perf_counter() - t0) / count


# -- 3. SDPA backend -------------------------------------------------------------------------------------

SDPA_OPS = {  # profiler op name fragment -> backend
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_attention_math": "math",
    "_flash_attention_forward": "flash",
}


def sdpa_backend_of(q, k, v) -> str:
    """The SDPA kernel model.causal_attention dispatches to, read from the profiler's op names."""
    import torch

    from evertrain.pretrain.model.transformer import causal_attention

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        causal_attention(q, k, v)
    names = [e.key for e in prof.key_averages()]
    for fragment, backend in SDPA_OPS.items():
        if any(fragment in name for name in names):
            return backend
    return "unknown: " + ", ".join(n for n in names if "attention" in n)


def sdpa_backend(report: Report, device, smoke: bool) -> None:
    import torch

    from evertrain.pretrain.config import load_config

    sec = report.section("sdpa_backend")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sec["rows"] += [
        "| config | heads q/kv | head dim | B x T | dtype | backend |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("1b", "8b"):
        m = load_config(REPO / "configs" / f"{name}.yaml").model
        head_dim = m.d_model // m.n_heads
        b, t = (1, 64) if smoke else (1, m.seq_len)
        q = torch.randn(b, m.n_heads, t, head_dim, device=device, dtype=dtype)
        k, v = (
            torch.randn(b, m.n_kv_heads or m.n_heads, t, head_dim, device=device, dtype=dtype) for _ in "kv"
        )
        backend = sdpa_backend_of(q, k, v)
        sec["rows"].append(
            f"| {name} | {m.n_heads}/{m.n_kv_heads} | {head_dim} | {b} x {t} | "
            f"{str(dtype).replace('torch.', '')} | {backend} |"
        )
        sec["raw"][name] = backend
        report.check(
            "sdpa_backend",
            backend != "math" and not backend.startswith("unknown"),
            f"{name}: fused kernel ({backend})",
        )


# -- shared: configs, a synthetic data dir, engines -------------------------------------------------------


def gpu_config(name: str, smoke: bool, overrides: list[str] = ()):
    """configs/NAME.yaml on this device, or its toy stand-in on CPU (same code, tiny shapes)."""
    from evertrain.pretrain.config import load_config

    if smoke:
        base = [
            "model.vocab_size=512",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.ffn_hidden=128",
            "model.seq_len=32",
            "train.micro_batch_size=2",
            "train.grad_accum=2",
            "train.dtype=float32",
            "train.device=cpu",
            "optim.impl=torch",
        ]
        return load_config(REPO / "configs" / f"{name}.yaml", base + list(overrides))
    return load_config(REPO / "configs" / f"{name}.yaml", ["train.device=cuda"] + list(overrides))


def synthetic_data(root: Path, vocab_size: int, tokens: int) -> Path:
    """A data dir of random tokens in the manifest format, so the real TokenStream feeds the steps."""
    import numpy as np

    from evertrain.pretrain.data.stream import MANIFEST, Manifest, Shard, file_sha256, shard_name

    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(b"synthetic: random token ids, no tokenizer")
    rng = np.random.default_rng(0)
    shards = {}
    for split, count in (("train", tokens), ("val", max(tokens // 16, 4096))):
        path = root / shard_name(split, 0)
        rng.integers(0, vocab_size, size=count, dtype=np.uint32).astype("<u4").tofile(path)
        shards[split] = (Shard(file=path.name, tokens=count, sha256=file_sha256(path)),)
    manifest = Manifest(
        data_dir=root,
        version=1,
        tokenizer={"path": "tokenizer.model", "sha256": file_sha256(root / "tokenizer.model")},
        vocab_size=vocab_size,
        eos_id=0,
        bos_id=None,
        dtype="uint32",
        train=shards["train"],
        val=shards["val"],
        history=({"version": 1, "train": 1, "val": 1},),
    )
    (root / MANIFEST).write_text(json.dumps(manifest.to_json()))
    return root


@contextlib.contextmanager
def one_rank_process_group():
    """The environment torchrun would give a world of one, for the FSDP2 engine in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 4. host syncs per step, every engine -------------------------------------------------------------

# tensor methods that bring a value to the host (and .to(cpu), counted apart)
VALUE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class SyncCounter:
    """Counts, per phase and kind, every way the training thread waits for the device:

    value        a tensor method that brings a value to the host (.item(), .tolist(), .cpu(), .to(cpu), ...)
    synchronize  an explicit wait: torch.cuda.synchronize, torch.cuda.Stream.synchronize,
                 torch.cuda.Event.synchronize, torch.accelerator.synchronize (where torch has it)
    implicit     CUDA only: what torch.cuda.set_sync_debug_mode("warn") reports (a sync inside an op)

    Only calls made in the thread that opened the counter while a phase is set count (the Prefetcher's
    and the checkpoint writer's threads may wait: that is their job)."""

    def __init__(self, device):
        import threading

        self.device, self.thread = device, threading.current_thread()
        self.counts: dict[str, dict[str, int]] = {}
        self.phase: str | None = None
        self.patched: list[tuple[object, str, object]] = []

    def _hit(self, kind: str) -> None:
        import threading

        if self.phase is not None and threading.current_thread() is self.thread:
            per = self.counts.setdefault(self.phase, {})
            per[kind] = per.get(kind, 0) + 1

    def _patch(self, owner, name: str, kind: str, when=None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        counter = self

        def counted(*args, **kwargs):
            if when is None or when(args, kwargs):
                counter._hit(kind)
            return original(*args, **kwargs)

        self.patched.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        import torch

        for name in VALUE_READS:
            self._patch(torch.Tensor, name, "value")
        self._patch(torch.Tensor, "to", "value", when=lambda a, k: _to_host(a[0], a[1:], k))
        explicit = [
            (torch.cuda, "synchronize"),
            (torch.cuda.Stream, "synchronize"),
            (torch.cuda.Event, "synchronize"),
        ]
        if hasattr(torch, "accelerator"):  # torch.Stream / torch.Event are C types: they cannot be patched
            explicit.append((torch.accelerator, "synchronize"))
        for owner, name in explicit:
            self._patch(owner, name, "synchronize")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched.clear()

    @contextlib.contextmanager
    def counting(self, phase: str):
        """Count what runs inside under `phase` (CUDA: with the sync debug mode reporting too)."""
        import warnings

        self.counts.setdefault(phase, {})
        self.phase = phase
        try:
            with warnings.catch_warnings(record=True) as caught, sync_debug("warn"):
                warnings.simplefilter("always")
                yield
        finally:
            self.phase = None
        implicit = sum("synchroniz" in str(w.message) for w in caught)
        if implicit:
            self.counts[phase]["implicit"] = self.counts[phase].get("implicit", 0) + implicit


def _to_host(tensor, args, kwargs) -> bool:
    import torch

    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        target = target.device
    return (
        isinstance(target, (str, torch.device))
        and torch.device(target).type == "cpu"
        and getattr(tensor, "device", None) is not None
        and tensor.device.type != "cpu"
    )


def deepspeed_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def audit_engine(cfg, device, work: Path, data: Path, steps: int) -> dict:
    """Phases of one engine's run as the loop drives them, counted: steady steps, a log step (loss and
    grad norm read), an eval, a checkpoint save (the loop's side) and the step after it."""
    import shutil

    from evertrain.pretrain import engines
    from evertrain.pretrain.checkpoint import CheckpointManager
    from evertrain.pretrain.data.prefetch import Prefetcher
    from evertrain.pretrain.data.stream import TokenStream
    from evertrain.pretrain.run.evaluate import evaluate, load_val_batches

    cfg.data.path = str(data)
    cfg.eval.batches = 2
    cfg.checkpoint.keep_last = 1
    engine = engines.create(cfg)
    counter = SyncCounter(device)
    run_dir = work / f"audit_{cfg.engine.name}_{cfg.engine.zero_stage}"
    try:
        stream = TokenStream(data, cfg.model.seq_len, cfg.train.seed)
        windows = cfg.train.micro_batch_size * cfg.train.grad_accum
        batches = Prefetcher(
            stream, windows, 0, 1, depth=cfg.data.prefetch, device=engine.device, limit=steps + 5
        )
        val = load_val_batches(cfg, engine)
        ckpt = CheckpointManager(run_dir, cfg, engine)
        micro = cfg.train.micro_batch_size

        def step():
            return engine.train_step(list(batches.next_batch().split(micro)))

        try:
            with counter:
                for _ in range(2):  # warm-up: first steps allocate and may sync
                    step()
                for _ in range(steps):
                    with counter.counting("train step"):
                        step()
                with counter.counting("log step"):
                    loss, grad_norm = step()
                    logged = (loss.item(), grad_norm.item())
                with counter.counting("eval"):
                    evaluate(engine, val)
                with counter.counting("checkpoint save"):
                    ckpt.save(steps + 3, {"tokens": 0, "data": {}})
                with counter.counting("step after save"):
                    step()
                ckpt.wait()
        finally:
            batches.close()
            ckpt.close()
        synchronize(device)
        return {
            "counts": counter.counts,
            "loss": logged[0],
            "steps": steps,
            "params": sum(p.numel() for p in engine.raw_model.parameters()),
        }
    finally:
        free_engine(engine, device)
        shutil.rmtree(run_dir, ignore_errors=True)


AUDIT_CASES = {
    "single": ["engine.name=single"],
    "fsdp": ["engine.name=fsdp"],
    "deepspeed ZeRO-2": ["engine.name=deepspeed", "engine.zero_stage=2"],
    "deepspeed ZeRO-3": ["engine.name=deepspeed", "engine.zero_stage=3"],
}


def audit_shape(smoke: bool) -> tuple[list[str], int]:
    """The 1b shape, 2 layers at seq 1024: the same code paths, small enough for four engines in the
    budget; and the number of counted steady steps."""
    if smoke:
        return [], 3
    return ["model.n_layers=2", "model.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum=2"], 10


def audit_in_child(name: str, data: Path, work: Path, smoke: bool) -> dict:
    import json
    import subprocess

    out = work / f"audit_{name.replace(' ', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--audit-child", name, str(data), str(out)]
    if smoke:
        cmd.append("--cpu-smoke")
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{name}: audit process exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def audit_child(args) -> int:
    """--audit-child CASE DATA JSON: one engine's audit in this process, written to JSON."""
    import torch

    from evertrain import safe_json

    name, data, out = args.audit_child
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    shape, steps = audit_shape(args.cpu_smoke)
    cfg = gpu_config("1b", args.cpu_smoke, shape + AUDIT_CASES[name])
    with tempfile.TemporaryDirectory(prefix="gpu_check_audit_") as tmp, one_rank_process_group():
        result = audit_engine(cfg, device, Path(tmp), Path(data), steps)
    Path(out).write_text(safe_json.dumps(result))
    return 0


def sync_audit(report: Report, device, smoke: bool, work: Path) -> None:
    sec = report.section("sync_audit")
    shape, steps = audit_shape(smoke)
    cases = list(AUDIT_CASES.items())
    probe = gpu_config("1b", smoke, shape)
    data = synthetic_data(work / "sync_data", probe.model.vocab_size, 200_000 if smoke else 20_000_000)
    phases = ("train step", "log step", "eval", "checkpoint save", "step after save")
    sec["rows"] += [
        f"host syncs counted in the training thread, per phase ({steps} train steps after 2 warm-up, "
        "then one of each other phase); kinds: value (.item/.tolist/.cpu/.to(cpu)...), "
        "synchronize (explicit torch.cuda / Stream / Event synchronize), implicit (CUDA sync "
        "debug mode)",
        "",
        "| engine | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for name, overrides in cases:
        if name.startswith("deepspeed") and not deepspeed_present():
            sec["rows"].append(f"| {name} | SKIPPED: deepspeed is not installed" + " |" * len(phases))
            continue
        if name.startswith("deepspeed"):
            # DeepSpeed keeps its process groups in module globals: a second engine in the same process
            # finds the first one's (destroyed) groups. Each DeepSpeed case runs in a process of its own.
            result = audit_in_child(name, data, work, smoke)
        else:
            cfg = gpu_config("1b", smoke, shape + overrides)
            with one_rank_process_group():
                result = audit_engine(cfg, device, work, data, steps)
        counts = result["counts"]
        sec["rows"].append(
            f"| {name} | "
            + " | ".join(audit_cell(counts.get(p, {}), steps if p == "train step" else 1) for p in phases)
            + " |"
        )
        sec["raw"][name] = result
        if not name.startswith("deepspeed"):
            steady = counts.get("train step", {})
            report.check(
                "sync_audit", not steady, f"{name}: no host sync in a steady-state step ({steady or 0})"
            )
        report.check("sync_audit", math.isfinite(result["loss"]), f"{name}: finite loss")
    sec["rows"] += [
        "",
        "DeepSpeed's rows are what it does, not a check: on CUDA its ZeRO-1/2 (overlap_comm) and "
        "ZeRO-3 reductions synchronize after every micro-batch (docs/performance.md).",
    ]
    if device.type != "cuda":
        sec["rows"].append(
            "- on CPU: no implicit-sync column (set_sync_debug_mode needs CUDA), and DeepSpeed "
            "skips its CUDA-only synchronize calls"
        )


def audit_cell(per: dict, steps: int) -> str:
    """ "value 3, synchronize 2 /step": one phase's counts by kind (per step when over several steps)."""
    text = ", ".join(f"{k} {v / steps:g}" for k, v in sorted(per.items()))
    return (text + (" /step" if steps > 1 else "")) if text else "0"


def free_engine(engine, device) -> float:
    """Close an engine and drop what it holds, so the next variant starts from an empty device: FSDP2's
    modules sit in reference cycles (hooks <-> states), which only gc.collect frees. Returns the GiB still
    allocated on the device afterwards."""
    import gc

    import torch

    try:
        engine.close()
    finally:
        for attr in ("model", "raw_model", "optimizer", "ds_engine"):
            if hasattr(engine, attr):
                setattr(engine, attr, None)
        gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


@contextlib.contextmanager
def sync_debug(mode: str):
    import torch

    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# -- 5. throughput and MFU ---------------------------------------------------------------------------------


def throughput_variants(cfg_fields: set[str]) -> list[tuple[str, list[str]]]:
    """eager / compiled x no / full activation checkpointing, where the config has the knobs."""
    variants = [("eager", [])]
    if "train.compile" in cfg_fields:
        variants.append(("compile", ["train.compile=true"]))
    if "model.activation_checkpointing" in cfg_fields:
        variants.append(("eager + AC full", ["model.activation_checkpointing=full"]))
        if "train.compile" in cfg_fields:
            variants.append(
                ("compile + AC full", ["train.compile=true", "model.activation_checkpointing=full"])
            )
    return variants


def config_fields() -> set[str]:
    import dataclasses

    from evertrain.pretrain.config import Config

    cfg = Config()
    return {
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(cfg)
        if dataclasses.is_dataclass(getattr(cfg, s.name))
        for f in dataclasses.fields(getattr(cfg, s.name))
    }


def throughput(report: Report, device, smoke: bool, args) -> None:
    import torch

    from evertrain.pretrain import engines
    from evertrain.pretrain.model.hardware import peak_tflops
    from evertrain.pretrain.model.plan import make_plan
    from evertrain.pretrain.model.transformer import flops_per_token, flops_per_token_torchtitan

    sec = report.section("throughput")
    peak = peak_tflops(device, args.peak_tflops)
    sec["rows"] += [
        f"configs/1b.yaml, FSDP2 world size 1, bf16; MFU against {peak or 'n/a'} TFLOP/s dense bf16. "
        "MFU: ours (causal attention FLOPs halved, a tied head counted); torchtitan's (attention not "
        "halved, embedding and tied head left out). Each variant's engine is freed before the next; "
        "'left' is what stayed allocated after freeing it; 'plan' is `evertrain plan`'s total for the "
        "run (tensors only: the reserve is not in it), 'reserved' the allocator's peak.",
        "",
        "| variant | step s | tokens/s | MFU (ours) | MFU (torchtitan) | peak memory GiB | reserved GiB "
        "| plan GiB | left GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    warmup, timed = (1, 2) if smoke else (3, 8)
    for name, overrides in throughput_variants(config_fields()):
        if smoke and "train.compile=true" in overrides:
            # inductor takes minutes to compile on CPU; tests/test_scale.py covers compile there (aot_eager)
            sec["rows"].append(f"| {name} | skipped on CPU | | | | | | | |")
            continue
        cfg = gpu_config("1b", smoke, overrides + ["engine.name=fsdp"])
        with one_rank_process_group():
            engine = engines.create(cfg)
            try:
                windows = cfg.train.micro_batch_size * cfg.train.grad_accum
                gen = torch.Generator().manual_seed(0)
                batch = torch.randint(
                    0, cfg.model.vocab_size, (windows, cfg.model.seq_len + 1), generator=gen
                )
                micro = list(
                    batch.pin_memory().split(cfg.train.micro_batch_size)
                    if device.type == "cuda"
                    else batch.split(cfg.train.micro_batch_size)
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(warmup):
                    engine.train_step(micro)
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(timed):
                    loss, _ = engine.train_step(micro)
                synchronize(device)
                step_s = (time.perf_counter() - t0) / timed
                tokens_per_s = windows * cfg.model.seq_len / step_s
                n_params = engine.raw_model.num_params()
                loss = loss.item()
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                held = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
                accumulate = engine.accumulate  # as the engine resolved auto on this GPU
            finally:
                left = free_engine(engine, device)
                del engine
        mfu = flops_per_token(cfg.model) * tokens_per_s / (peak * 1e12) if peak else None
        mfu_tt = flops_per_token_torchtitan(cfg.model) * tokens_per_s / (peak * 1e12) if peak else None
        planned = make_plan(cfg, 1, 1, engine="fsdp", accumulate=accumulate).total / 2**30
        sec["rows"].append(
            f"| {name} | {step_s:.3f} | {tokens_per_s:,.0f} | {percent(mfu)} | {percent(mfu_tt)} | "
            f"{'n/a' if mem is None else f'{mem:.1f}'} | {'n/a' if held is None else f'{held:.1f}'} | "
            f"{planned:.1f} | {left:.2f} |"
        )
        sec["raw"][name] = {
            "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "mfu_torchtitan": mfu_tt,
            "peak_gib": mem,
            "reserved_gib": held,
            "plan_gib": planned,
            "left_gib": left,
            "params": n_params,
            "loss": loss,
        }
        report.check("throughput", math.isfinite(loss), f"{name}: finite loss")
        report.check(
            "throughput", left < 1.0, f"{name}: engine freed ({left:.2f} GiB left allocated, goal < 1)"
        )


def percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# -- 6. checkpoint: blocked per save ---------------------------------------------------------------------


CHECKPOINT_BUDGET = 15 * 10**9  # bytes the checkpoint section may have on disk at once


def checkpoint_layers(n_params_of, layers: int, budget: int, free: int) -> tuple[int, int]:
    """(layers, bytes of one checkpoint): the config's layer count, or fewer until one single-engine
    checkpoint (fp32 weights and AdamW's two fp32 moments: 12 bytes a parameter) fits both the budget
    and half the free disk. Only one checkpoint is on disk at a time: each is deleted once timed."""
    limit = min(budget, free // 2)
    for n in range(layers, 0, -1):
        size = 12 * n_params_of(n)
        if size <= limit:
            return n, size
    raise RuntimeError(
        f"checkpoint: not even one layer fits {limit / 1e9:.1f} GB "
        f"(budget {budget / 1e9:.0f} GB, {free / 1e9:.1f} GB free)"
    )


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def checkpoint_cost(report: Report, device, smoke: bool, work: Path, budget: int = CHECKPOINT_BUDGET) -> None:
    import shutil

    from evertrain.pretrain import engines
    from evertrain.pretrain.checkpoint import CheckpointManager
    from evertrain.pretrain.checkpoint.store import step_dir_name
    from evertrain.pretrain.model.plan import parameter_shapes

    sec = report.section("checkpoint")
    full = gpu_config("1b", smoke)

    def n_params_of(layers: int) -> int:
        return sum(
            math.prod(s)
            for s in parameter_shapes(gpu_config("1b", smoke, [f"model.n_layers={layers}"])).values()
        )

    layers, planned = checkpoint_layers(
        n_params_of, full.model.n_layers, budget, shutil.disk_usage(work).free
    )
    cfg = gpu_config("1b", smoke, ["engine.name=single", f"model.n_layers={layers}"])
    engine = engines.create(cfg)
    largest = 0
    try:
        rows = {}
        for mode in ("sync", "async"):
            cfg.checkpoint.async_save = mode == "async"
            run_dir = work / f"ckpt_{mode}"
            ckpt = CheckpointManager(run_dir, cfg, engine)
            blocked = []
            try:
                for step in (1, 2):
                    synchronize(device)
                    t0 = time.perf_counter()
                    ckpt.save(step, {"tokens": 0, "data": {}})
                    if mode == "sync":
                        ckpt.wait()
                    blocked.append(time.perf_counter() - t0)
                    ckpt.wait()  # the next save's blocked time is its own, not the previous write's
                    largest = max(largest, disk_bytes(run_dir))
                    shutil.rmtree(ckpt.dir / step_dir_name(step))  # one checkpoint on disk at a time
            finally:
                ckpt.close()
                shutil.rmtree(run_dir, ignore_errors=True)
            rows[mode] = min(blocked)
        ratio = rows["async"] / rows["sync"]
        n_params = engine.raw_model.num_params()
    finally:
        free_engine(engine, device)
        del engine
    sec["rows"] += [
        f"{n_params / 1e6:,.1f}M parameters ({layers} of {full.model.n_layers} layers, so that one "
        f"checkpoint fits the {budget / 1e9:.0f} GB disk budget), single engine, best of 2 saves; "
        f"largest on disk {largest / 1e9:.2f} GB (planned {planned / 1e9:.2f}), deleted after each save",
        "",
        "| save | loop blocked (s) |",
        "|---|---:|",
        f"| synchronous | {rows['sync']:.3f} |",
        f"| asynchronous | {rows['async']:.3f} |",
        f"| ratio | {100 * ratio:.1f}% |",
    ]
    sec["raw"] = {
        "sync_s": rows["sync"],
        "async_s": rows["async"],
        "ratio": ratio,
        "layers": layers,
        "disk_bytes": largest,
        "planned_bytes": planned,
        "budget_bytes": budget,
    }
    report.check(
        "checkpoint", largest <= budget, f"on disk at most {largest / 1e9:.2f} GB (budget {budget / 1e9:.0f})"
    )
    if not smoke:
        report.check(
            "checkpoint", ratio <= 0.03, f"async blocks {100 * ratio:.1f}% of a sync save (goal <= 3%)"
        )


# -- driver ------------------------------------------------------------------------------------------------

SECTIONS = ("adamw_match", "adamw_bench", "sdpa_backend", "sync_audit", "throughput", "checkpoint")


def version_of(module: str) -> str:
    """A package's version without importing it (importing deepspeed takes seconds), or "absent"."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return "absent"
    for dist in (module, f"pytorch-{module}"):  # CUDA torch may ship Triton as pytorch-triton
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "present (version unknown)"


def versions(device) -> dict:
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or ("ROCm " + torch.version.hip if torch.version.hip else "none"),
        "triton": version_of("triton"),
        "deepspeed": version_of("deepspeed"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU smoke run)",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first jitted
    if args.audit_child:
        return audit_child(args)
    try:  # a machine without one of our dependencies gets one line, not a traceback
        import torch

        import evertrain.pretrain.config  # noqa: F401  (yaml and the rest of what every section needs)
    except ImportError as exc:
        print(
            f"gpu_check: cannot run: {exc} (install it, or run with the interpreter that has it: "
            "make gpu-check PY=...)",
            file=sys.stderr,
        )
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    found = versions(device)
    print("gpu_check: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    if found["deepspeed"] == "absent":
        print(
            "gpu_check: deepspeed absent: its sync_audit rows are skipped (to add it offline: "
            "scripts/gpu_wheels.sh DIR elsewhere, then pip install --no-index --find-links DIR deepspeed)",
            flush=True,
        )
    if found["triton"] == "absent":
        print(
            "gpu_check: triton absent: the Triton AdamW rows are skipped; the torch paths still run",
            flush=True,
        )
    if device.type == "cuda":
        from evertrain.pretrain.model.hardware import use_tf32

        use_tf32(device)  # as the training loop does: fp32 matmuls (none in a bf16 step) on TF32
    name = f"CPU ({torch.get_num_threads()} threads)" if args.cpu_smoke else found["gpu"]
    report = Report(
        device=f"{name}; " + ", ".join(f"{k} {v}" for k, v in found.items() if k != "gpu"),
        smoke=args.cpu_smoke,
    )
    out = args.out or REPO / "docs"
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else SECTIONS
    unknown = [w for w in wanted if w not in SECTIONS]
    if unknown:
        print(
            f"gpu_check: --only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}",
            file=sys.stderr,
        )
        return 2
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        runners = {
            "adamw_match": lambda: adamw_match(report, device, args.cpu_smoke),
            "adamw_bench": lambda: adamw_bench(report, device, args.cpu_smoke),
            "sdpa_backend": lambda: sdpa_backend(report, device, args.cpu_smoke),
            "sync_audit": lambda: sync_audit(report, device, args.cpu_smoke, work),
            "throughput": lambda: throughput(report, device, args.cpu_smoke, args),
            "checkpoint": lambda: checkpoint_cost(report, device, args.cpu_smoke, work),
        }
        for section in wanted:
            entry = report.section(section)
            t0 = time.perf_counter()
            print(f"gpu_check: {section} ...", flush=True)
            try:
                runners[section]()
            except Exception:  # one broken section must not hide the others' figures
                entry["error"] = traceback.format_exc()
                report.failures.append(f"{section}: {traceback.format_exc().strip().splitlines()[-1]}")
            entry["seconds"] = time.perf_counter() - t0
            print(
                f"gpu_check: {section} done in {entry['seconds']:.1f} s"
                + (" (FAILED)" if entry["error"] else ""),
                flush=True,
            )
    write_report(out, report, found, time.perf_counter() - t_start)
    print(report.markdown())
    return 1 if report.failures else 0


def write_report(out: Path, report: Report, found: dict, seconds: float) -> None:
    """gpu_check.md and gpu_check.json; a NaN loss or timing must not cost the report, so the JSON
    writes non-finite numbers as null and lists where they were under "nonfinite"."""
    from evertrain import safe_json

    (out / "gpu_check.md").write_text(report.markdown())
    raw = {
        "device": report.device,
        "versions": found,
        "smoke": report.smoke,
        "seconds": seconds,
        "failures": report.failures,
        "sections": {
            k: {"seconds": v["seconds"], "raw": v["raw"], "error": v["error"]}
            for k, v in report.sections.items()
        },
    }
    (out / "gpu_check.json").write_text(safe_json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
