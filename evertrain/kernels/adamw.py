"""AdamW whose step reads the learning rate and the step number from device tensors.

The math is torch.optim.AdamW's (decoupled weight decay, bias correction):

    g = g * grad_scale                       (optional: the clip coefficient, a device tensor)
    (no update at all when the optional device flag found_inf is 1: a non-finite gradient's step)
    p = p * (1 - lr * wd)
    m = lerp(m, g, 1 - beta1)                 v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

lr and t live on the device (`opt.lr`, `opt.step_count`, written by the schedule each step), so a
step never waits for the host and never needs the run's length. Moments are always float32; bf16/fp16
parameters are read, updated in float32 and rounded once when stored.

Two implementations of that one update, picked by `impl`:
- `adamw_triton`: one Triton launch per (param dtype, grad dtype) over all tensors of the step.
- `adamw_torch` (the twin): torch's own fused AdamW op, which takes the lr and step as tensors.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor

from evertrain import torch_compat
from evertrain.errors import EvertrainError

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; elsewhere the torch twin is the implementation
    triton = tl = None

IMPLS = ("auto", "triton", "torch")
STATE_KEYS = ("exp_avg", "exp_avg_sq")  # DeepSpeed's universal checkpoints look for these names
BLOCK = 1024  # elements per loop iteration of one program (4 warps x 32 threads x 8)
CHUNK = 16 * BLOCK  # elements per program: big enough to amortise reading the tables, small enough to balance


class OptimizerError(EvertrainError, ValueError):
    """Bad optimizer arguments or parameters; the message names the argument."""


# -- the Triton kernel ---------------------------------------------------------------------------------
#
# Multi-tensor layout: a table with one row per tensor (pointers to p, g, m, v and the numel) plus a
# table of (tensor, start) for each CHUNK-sized piece of work; program i updates chunk i. We chose
# pointer tables over flat buffers because the tensors belong to others: autograd allocates the
# gradients, DeepSpeed and FSDP2 own the parameters, so nothing can be made to live in one buffer. A
# chunk table rather than a (tensor x chunk) grid keeps every program busy when one embedding is 1000x
# the size of a norm weight. Only pointers change between steps (new gradient tensors); the tables are
# rebuilt and uploaded only when they do.


def _adamw_kernel(
    tensor_table,
    weight_decays,
    chunk_table,
    lr_ptr,
    step_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    beta1,
    beta2,
    eps,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * chunk)
    start = tl.multiple_of(tl.load(chunk_table + 2 * chunk + 1), BLOCK)  # chunks start at multiples of CHUNK
    row = tensor_table + 5 * tensor
    param_ptr = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 4)
    if ALIGNED:
        # Pointers read from memory carry no alignment facts, unlike kernel arguments (which Triton
        # specializes on 16-byte alignment), and a mask against an arbitrary numel may change within
        # a vector. The host checked both (pointers 16-byte aligned, numels multiples of 16): say so,
        # and the loads and stores become 128-bit vector accesses (checked in the PTX for sm_90).
        numel = tl.multiple_of(numel, 16)
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)

    lr = tl.load(lr_ptr)
    step = tl.load(step_ptr).to(tl.float32)
    # beta^t as exp2(t log2 beta): no pow in tl
    step_size = tl.div_rn(lr, 1.0 - tl.exp2(step * tl.log2(beta1)))
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * tl.log2(beta2)))
    decay = 1.0 - lr * tl.load(weight_decays + tensor)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr)
    limit = numel
    if HAS_FOUND_INF:  # a skipped step: every access masked off, so nothing is read or written
        limit = tl.where(tl.load(found_inf_ptr) != 0.0, 0, numel)
        if ALIGNED:
            limit = tl.multiple_of(limit, 16)  # 0 or numel: the alignment facts still hold

    for offset in range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < limit
        p = tl.load(param_ptr + idx, mask=mask).to(tl.float32)
        g = tl.load(grad_ptr + idx, mask=mask).to(tl.float32)
        m = tl.load(exp_avg_ptr + idx, mask=mask)
        v = tl.load(exp_avg_sq_ptr + idx, mask=mask)
        if HAS_GRAD_SCALE:
            g = g * grad_scale
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        # IEEE sqrt and division like torch (tl.sqrt and / are approximate on GPUs); free when memory-bound
        p = p * decay - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps)
        tl.store(param_ptr + idx, p.to(PARAM_DTYPE), mask=mask)
        tl.store(exp_avg_ptr + idx, m, mask=mask)
        tl.store(exp_avg_sq_ptr + idx, v, mask=mask)


_jitted: dict[bool, object] = {}


def _kernel():
    """The jitted kernel. Decorated on first use, not at import, because triton.jit reads
    TRITON_INTERPRET when it decorates: a process that sets it later (a test) still gets the
    interpreter, and one that never does gets the compiler."""
    interpret = _interpreting()
    if interpret not in _jitted:
        _jitted[interpret] = triton.jit(_adamw_kernel)
    return _jitted[interpret]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# the parameter dtypes we update, by their name in triton.language (moments are always float32)
PARAM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def adamw_triton(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    weight_decays,
    *,
    lr,
    step,
    beta1,
    beta2,
    eps,
    grad_scale=None,
    found_inf=None,
    cache=None,
    chunk=CHUNK,
    block=BLOCK,
):
    """One AdamW update of the given tensors (plain local tensors, contiguous) in one launch per
    (param dtype, grad dtype). `cache` (a dict the caller keeps) saves re-uploading unchanged tables."""
    if chunk % block:
        raise OptimizerError(f"adamw_triton: chunk={chunk} must be a multiple of block={block}")
    by_dtype = defaultdict(list)
    for i, (p, g) in enumerate(zip(params, grads)):
        by_dtype[p.dtype, g.dtype].append(i)
    for (param_dtype, grad_dtype), idx in by_dtype.items():
        tensors = [(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]) for i in idx]
        cache_key = (param_dtype, grad_dtype, beta1, beta2, eps)
        tensor_table, wd_table, chunk_table, aligned = _tables(
            tensors, [weight_decays[i] for i in idx], chunk, params[idx[0]].device, cache, cache_key
        )
        if chunk_table.shape[0] == 0:
            continue  # only empty tensors (e.g. an FSDP2 rank's share of a small tensor)
        # FMA, as torch's CUDA kernels; explicit, so Triton 3.9 does not warn
        _kernel()[(chunk_table.shape[0],)](
            tensor_table,
            wd_table,
            chunk_table,
            lr,
            step,
            lr if grad_scale is None else grad_scale,  # any pointer when unused: HAS_GRAD_SCALE=False
            lr if found_inf is None else found_inf,
            float(beta1),
            float(beta2),
            float(eps),
            PARAM_DTYPE=getattr(tl, PARAM_DTYPES[param_dtype]),
            GRAD_DTYPE=getattr(tl, PARAM_DTYPES[grad_dtype]),
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned,
            CHUNK=chunk,
            BLOCK=block,
            enable_fp_fusion=True,
        )


def _tables(tensors, weight_decays, chunk, device, cache, cache_key):
    """(tensor table int64 [n, 5]: p, g, m, v pointers + numel; weight decays float32 [n];
    chunk table int64 [chunks, 2]: tensor index + first element) on `device`, and whether every
    pointer is 16-byte aligned and every numel a multiple of 16 (the kernel's vector-access hints;
    views into flat buffers, e.g. ZeRO partitions, need not be aligned)."""
    rows = [(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel()) for p, g, m, v in tensors]
    key = (tuple(rows), tuple(weight_decays), chunk)
    if cache is not None and cache_key in cache and cache[cache_key][0] == key:
        return cache[cache_key][1]
    numels = torch.tensor([r[4] for r in rows], dtype=torch.int64)
    per_tensor = (numels + chunk - 1) // chunk
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(rows)), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]) * chunk
    tables = tuple(
        _upload(t, device)
        for t in (
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(weight_decays, dtype=torch.float32),
            torch.stack([tensor_of_chunk, start], dim=1),
        )
    )
    tables += (
        all(ptr % 16 == 0 for row in rows for ptr in row[:4]) and all(row[4] % 16 == 0 for row in rows),
    )
    if cache is not None:
        cache[cache_key] = (key, tables)
    return tables


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return host
    # from pinned memory the copy is asynchronous; from pageable memory CUDA would sync the stream first
    return host.pin_memory().to(device, non_blocking=True)


# -- the torch twin --------------------------------------------------------------------------------------


def adamw_torch(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    weight_decays,
    *,
    lr,
    step,
    beta1,
    beta2,
    eps,
    grad_scale=None,
    found_inf=None,
):
    """The same update through torch's fused AdamW op (CPU, CUDA, MPS), which reads lr and the step
    from tensors. It wants one dtype across p, g, m, v, so bf16/fp16 params are updated through a
    float32 copy; and one weight decay per call."""
    step = step.to(torch.float32).reshape(())
    buckets = defaultdict(list)
    for i, p in enumerate(params):
        buckets[weight_decays[i], p.dtype].append(i)
    for (weight_decay, dtype), idx in buckets.items():
        ps = [params[i] for i in idx]
        ps32 = ps if dtype == torch.float32 else [p.float() for p in ps]
        gs32 = [grads[i].float() for i in idx]  # no copy when already float32
        if grad_scale is not None:
            # Out of place, so the caller's gradients stay as they were (as with the Triton kernel).
            # Not the op's own grad_scale: that one divides, and writes the result into the gradients.
            gs32 = torch_compat.foreach_mul(gs32, grad_scale.to(torch.float32).reshape(()))
        torch_compat.fused_adamw_(
            ps32,
            gs32,
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [step] * len(idx),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            found_inf=None if found_inf is None else found_inf.to(torch.float32).reshape(()),
        )
        if ps32 is not ps:
            torch_compat.foreach_copy_(ps, ps32)


# -- the optimizer -----------------------------------------------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """AdamW with the LR from `schedule(step_count)`, computed on the device at every step.

    `schedule` is a callable int64 step tensor -> float32 LR tensor with a float `max_lr`
    (evertrain.pretrain.schedule.Schedule). `param_groups[i]["lr"]` holds max_lr as a plain float for
    code that reads it (DeepSpeed's logging); the LR actually applied is `self.lr`. Groups may override
    betas, eps and weight_decay.

    Works as a DeepSpeed client optimizer (ZeRO hands it flat fp32 partitions) and under FSDP2
    (DTensor parameters: the update runs on each rank's local shard).
    """

    def __init__(self, params, schedule, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, impl="auto"):
        max_lr = getattr(schedule, "max_lr", None)
        if not callable(schedule) or not isinstance(max_lr, (int, float)):
            raise OptimizerError(
                f"AdamW schedule: expected a Schedule (callable, with a float max_lr), got {schedule!r}"
            )
        if not (math.isfinite(max_lr) and max_lr > 0):
            raise OptimizerError(f"AdamW schedule: max_lr must be a finite number > 0, got {max_lr}")
        super().__init__(params, dict(lr=float(max_lr), betas=betas, eps=eps, weight_decay=weight_decay))
        devices = {p.device for p in self._all_params()}
        if len(devices) != 1:
            raise OptimizerError(
                f"AdamW params: all parameters must be on one device, got {sorted(map(str, devices))}"
            )
        device = devices.pop()
        self.impl = resolve_impl(impl, device)
        self.schedule = schedule
        self.step_count = torch.zeros((), dtype=torch.int64, device=device)  # updates done
        self.lr = schedule(self.step_count).reshape(1).to(device=device, dtype=torch.float32)
        self.grad_scale: torch.Tensor | None = None  # set per step by the caller, e.g. the clip coefficient
        self.found_inf: torch.Tensor | None = None  # set per step by the caller: 1.0 drops the update
        self._updated: set[int] = set()  # ids of the tensors updated at the current step_count
        self._tables: dict = {}  # the Triton launch tables of the last step, per launch

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise OptimizerError(f"AdamW betas: expected two numbers, got {betas!r}")
        for i, beta in enumerate(betas):
            if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
                raise OptimizerError(f"AdamW betas[{i}]: must be in [0, 1), got {beta!r}")
        if not (isinstance(group["eps"], (int, float)) and math.isfinite(group["eps"]) and group["eps"] > 0):
            raise OptimizerError(f"AdamW eps: must be a finite number > 0, got {group['eps']!r}")
        wd = group["weight_decay"]
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise OptimizerError(f"AdamW weight_decay: must be a finite number >= 0, got {wd!r}")
        for p in group["params"]:
            if not (p.is_floating_point() and p.dtype in PARAM_DTYPES):
                raise OptimizerError(
                    f"AdamW params: dtype {p.dtype} is not supported (float32, bfloat16, float16)"
                )
            if not _local(p).is_contiguous():
                raise OptimizerError(f"AdamW params: a parameter of shape {tuple(p.shape)} is not contiguous")

    def _all_params(self):
        return itertools.chain.from_iterable(group["params"] for group in self.param_groups)

    def set_step(self, step: int) -> None:
        """Resume at `step` updates done (the checkpoint's host step is the authority)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise OptimizerError(f"AdamW set_step: step must be an integer >= 0, got {step!r}")
        self.step_count.fill_(step)
        self.lr.copy_(self.schedule(self.step_count))
        self._updated = set()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        for _, p in work:  # checked before anything is written
            if p.grad.layout != torch.strided:
                raise OptimizerError(
                    f"AdamW: sparse gradients are not supported ({p.grad.layout} gradient of a "
                    f"parameter of shape {tuple(p.shape)}); use a dense nn.Embedding"
                )
        if not work:
            return loss
        # DeepSpeed's ZeRO calls step() once per param group (stage 1/2) or sub-group (stage 3) for one
        # training step. So a call advances the step only when it would update a tensor a second time
        # at the current step: each tensor is updated exactly once per step_count.
        ids = {id(p) for _, p in work}
        if not self._updated or not self._updated.isdisjoint(ids):
            self.step_count += 1
            self.lr.copy_(self.schedule(self.step_count))
            self._updated = set()
        self._updated |= ids

        buckets = defaultdict(lambda: ([], [], [], [], []))
        for group, p in work:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            bucket = buckets[(*group["betas"], group["eps"])]
            for values, tensor in zip(bucket, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                values.append(_local(tensor))
            bucket[4].append(float(group["weight_decay"]))
        for (beta1, beta2, eps), (ps, gs, ms, vs, wds) in buckets.items():
            if self.impl == "triton":
                adamw_triton(
                    ps,
                    [g.contiguous() for g in gs],
                    ms,
                    vs,
                    wds,
                    lr=self.lr,
                    step=self.step_count,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    grad_scale=self.grad_scale,
                    found_inf=self.found_inf,
                    cache=self._tables,
                )
            else:
                adamw_torch(
                    ps,
                    gs,
                    ms,
                    vs,
                    wds,
                    lr=self.lr,
                    step=self.step_count,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    grad_scale=self.grad_scale,
                    found_inf=self.found_inf,
                )
        return loss

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        if p.device != self.step_count.device:
            raise OptimizerError(
                f"AdamW: a parameter is on {p.device} but the optimizer runs on "
                f"{self.step_count.device} (optimizer offload is not supported)"
            )
        for key in STATE_KEYS:  # zeros_like keeps a DTensor's sharding
            state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype; our moments stay float32 for bf16/fp16
        # parameters, so take those again from the saved float32 values.
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for saved_id, p in zip(saved_ids, self._all_params()):
            saved = state_dict["state"].get(saved_id, {})
            for key in STATE_KEYS:
                if key in saved and self.state[p][key].dtype != torch.float32:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)


def resolve_impl(impl: str, device: torch.device) -> str:
    """auto: Triton on CUDA, the torch twin elsewhere. triton off CUDA only in Triton's interpreter."""
    if impl not in IMPLS:
        raise OptimizerError(f"optim.impl: must be one of {'|'.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton is not None and not _interpreting() else "torch"
    if impl == "triton":
        if triton is None:
            raise OptimizerError(
                "optim.impl=triton: Triton is not installed (it ships for Linux); use auto or torch"
            )
        if device.type == "cuda" and _interpreting():
            raise OptimizerError(
                "optim.impl=triton: TRITON_INTERPRET=1 runs kernels on the CPU, but the "
                "parameters are on CUDA; unset it"
            )
        if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _interpreting()):
            raise OptimizerError(
                f"optim.impl=triton: needs a CUDA device, the parameters are on {device} "
                f"(set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)"
            )
    return impl


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), a view that in-place updates write through."""
    return t.to_local() if isinstance(t, DTensor) else t
