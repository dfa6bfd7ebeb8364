"""Scaling costs, side by side in one run (CPU only, no GPU needed):

  (a) building 8B and 70B for FSDP2 on the meta device under a fake process group of 64 ranks (the
      engine's construction path up to `to_empty`): seconds and the process's peak RSS, next to the
      bytes a full fp32 build per rank (what every rank did before) would have needed;
  (b) saved activation bytes per token per block under activation_checkpointing none / selective
      (op-level) / full, measured with saved-tensor hooks on one block of the 1B shape in fp32, next
      to the plan's formula (evertrain/pretrain/model/plan.py) and what it gives in bf16 for 8B and 70B.

    python bench/scale.py            # results go to docs/scaling.md by hand

Each build runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def build_child(config: str, world: int) -> None:
    """Runs in a subprocess: meta build + fully_shard as rank 0 of `world` fake ranks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from evertrain.pretrain.config import load_config
    from evertrain.pretrain.engines.base import meta_model
    from evertrain.pretrain.engines.fsdp import fsdp_mesh, shard_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = load_config(REPO / config)
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    model = meta_model(cfg)
    shard_model(
        model,
        fsdp_mesh("cpu", world, 1),
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    shard = sum(p.to_local().numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss_after_import": before,
                "params": n_params,
                "shard": shard,
                "largest": largest,
            }
        )
    )


def construction(world: int) -> None:
    print(f"(a) FSDP2 construction on the meta device, fake process group of {world} ranks (rank 0)")
    print(
        f"{'config':<8}{'params':>9}{'build s':>9}{'peak RSS GiB':>14}{'RSS of torch import':>21}"
        f"{'shard GiB (fp32)':>18}{'largest param GiB':>19}{'old full build GiB':>20}"
    )
    for config in ("configs/8b.yaml", "configs/70b.yaml"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", config, "--world", str(world)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{Path(config).stem:<8}{r['params'] / 1e9:>8.2f}B{r['seconds']:>9.2f}{r['rss'] / GIB:>14.2f}"
            f"{r['rss_after_import'] / GIB:>21.2f}{4 * r['shard'] / GIB:>18.2f}{4 * r['largest'] / GIB:>19.2f}"
            f"{4 * r['params'] / GIB:>20.1f}"
        )
    print(
        "   after to_empty a rank holds its fp32 shard; init draws one full parameter at a time (largest param)."
    )


def block_saved_bytes(cfg, mode: str, tokens: int) -> int:
    """Bytes one block keeps for backward, measured (see tests/test_scale.py for the same method)."""
    from evertrain.pretrain.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model, init=False)
    block = model.layers[0].to_empty(device="cpu")
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block.checkpointing = mode
    from evertrain.pretrain.model.transformer import rope_cos_sin

    cos, sin = rope_cos_sin(tokens, cfg.model.d_model // cfg.model.n_heads, cfg.model.rope_theta)
    owned = {p.untyped_storage().data_ptr() for p in block.parameters()} | {
        cos.untyped_storage().data_ptr(),
        sin.untyped_storage().data_ptr(),
    }
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, cfg.model.d_model, requires_grad=True)
    outputs = op_outputs_counter() if mode == "op" else None  # the dispatch mode only where needed
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if outputs is not None:
            with outputs:
                block(x, cos, sin)
        else:
            block(x, cos, sin)
    return sum(seen.values()) + (outputs.total if outputs is not None else 0)


def op_outputs_counter():
    """A dispatch mode adding up the bytes of the outputs op-level checkpointing saves (_SAVE_OPS)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from evertrain.pretrain.model.transformer import _SAVE_OPS

    class Outputs(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in _SAVE_OPS:
                for t in out if isinstance(out, tuple) else (out,):
                    if isinstance(t, torch.Tensor):
                        self.total += t.untyped_storage().nbytes()
            return out

    return Outputs()


def activations(tokens: int, op_level: bool = True) -> None:
    from evertrain.pretrain.config import load_config
    from evertrain.pretrain.model.plan import block_activation_bytes

    cfg = load_config(REPO / "configs" / "1b.yaml", [f"model.seq_len={tokens}"])
    print(
        f"\n(b) saved activation bytes per token per block; measured on one 1B-shape block, {tokens} tokens, fp32"
    )
    print(
        f"{'checkpointing':<22}{'measured fp32':>14}{'plan fp32':>11}{'plan bf16 1b':>14}{'plan bf16 8b':>14}"
        f"{'plan bf16 70b':>15}"
    )
    shapes = {n: load_config(REPO / "configs" / f"{n}.yaml") for n in ("1b", "8b", "70b")}
    for mode, label in (("none", "none"), ("op", "selective (op-level)"), ("full", "full")):
        if mode == "op" and not op_level:
            print(f"{label:<22}skipped: this torch has no torch.utils._python_dispatch.TorchDispatchMode")
            continue
        measured = block_saved_bytes(cfg, mode, tokens) / tokens
        planned = [block_activation_bytes(c, mode, 2) for c in shapes.values()]
        print(
            f"{label:<22}{measured:>14.0f}{block_activation_bytes(cfg, mode, 4):>11}"
            + "".join(f"{p:>14}" if i < 2 else f"{p:>15}" for i, p in enumerate(planned))
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        build_child(args.child, args.world)
        return
    # Both measurements lean on torch internals with no public equivalent (the fake process group is
    # registered by a testing module; the op-level count needs a dispatch mode): a torch without them
    # gets one line per measurement it cannot make, not a traceback.
    from evertrain.torch_compat import _private

    if _private("torch.testing._internal.distributed.fake_pg", "FakeStore") is None:
        print(
            "(a) skipped: this torch has no fake process group (torch.testing._internal.distributed.fake_pg)"
        )
    else:
        construction(args.world)
    activations(
        args.tokens, op_level=_private("torch.utils._python_dispatch", "TorchDispatchMode") is not None
    )


if __name__ == "__main__":
    main()
