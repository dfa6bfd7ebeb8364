"""Host syncs per steady-state training step, per engine, counted side by side in one run.

    python bench/host_syncs.py                 # single, FSDP2 x2, DeepSpeed ZeRO 0/1/2/3 x2, on CPU
    python bench/host_syncs.py --steps 10

Every way a device value reaches the host is counted in the training thread of rank 0, per call of
`engine.train_step` (after 2 warm-up steps): `Tensor.item/tolist/__bool__/__float__/__int__/__index__`,
`.cpu()`, `.numpy()`, and `.to(cpu)` of a tensor on another device. Our loop adds none on steps that
do not log (tests/test_train.py); what remains is the engine's own. On CPU the same Python calls are made
as on a GPU, where each one waits for the device to drain its queue.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "to")
CASES = (
    ("single", None, 1),
    ("fsdp", None, 2),
    ("deepspeed", 0, 2),
    ("deepspeed", 1, 2),
    ("deepspeed", 2, 2),
    ("deepspeed", 3, 2),
)
TINY = [
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.seq_len=32",
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "train.device=cpu",
    "train.dtype=float32",
]


def count_syncs(engine, cfg, steps: int, warmup: int = 2) -> collections.Counter:
    """Calls per kind over `steps` train steps of random batches (host-side inputs are not counted)."""
    import torch

    t, m = cfg.train, cfg.model
    gen = torch.Generator().manual_seed(engine.rank)
    batches = [
        torch.randint(0, m.vocab_size, (t.micro_batch_size * t.grad_accum, m.seq_len + 1), generator=gen)
        for _ in range(warmup + steps)
    ]
    inputs = {b.untyped_storage().data_ptr() for b in batches}
    counts, counting = collections.Counter(), {"on": False}
    main = threading.current_thread()
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if (
                counting["on"]
                and threading.current_thread() is main
                and not _is_input(self, inputs)
                and (name != "to" or _to_host(self, args, kwargs))
            ):
                counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        for i, batch in enumerate(batches):
            counting["on"] = i >= warmup
            engine.train_step(list(batch.split(t.micro_batch_size)))
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def _is_input(tensor, inputs: set[int]) -> bool:
    try:
        return tensor.untyped_storage().data_ptr() in inputs
    except RuntimeError:  # a tensor subclass without storage of its own (DTensor, FSDP2's params)
        return False


def _to_host(tensor, args, kwargs) -> bool:
    import torch

    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        target = target.device
    return (
        isinstance(target, (str, torch.device))
        and torch.device(target).type == "cpu"
        and tensor.device.type != "cpu"
    )


def child(args) -> None:
    """Runs under the launcher: build the engine, count, rank 0 prints one JSON line."""
    sys.path.insert(0, str(REPO))
    from evertrain.pretrain import engines
    from evertrain.pretrain.config import load_config

    overrides = (
        TINY
        + [f"engine.name={args.engine}"]
        + ([f"engine.zero_stage={args.stage}"] if args.stage is not None else [])
    )
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    engine = engines.create(cfg)
    try:
        counts = count_syncs(engine, cfg, args.steps)
        if engine.is_main:
            print("HOST_SYNCS " + json.dumps({"counts": dict(counts), "steps": args.steps}), flush=True)
    finally:
        engine.close()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(engine: str, stage: int | None, ranks: int, steps: int) -> dict:
    me = [str(Path(__file__).resolve()), "--child", "--engine", engine, "--steps", str(steps)]
    if stage is not None:
        me += ["--stage", str(stage)]
    bin_dir = Path(sys.executable).parent
    if engine == "deepspeed":
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", free_port(), *me]
    elif engine == "fsdp":
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", free_port(), *me]
    else:
        cmd = [sys.executable, *me]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    line = next((text for text in proc.stdout.splitlines() if "HOST_SYNCS " in text), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{engine} stage {stage}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(line.split("HOST_SYNCS ", 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from deepspeed
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"# Host syncs per steady-state train_step (rank 0, CPU, {args.steps} steps after 2 warm-up)\n")
    print("| engine | ranks | syncs / step | by kind |")
    print("|---|---:|---:|---|")
    for engine, stage, ranks in CASES:
        result = launch(engine, stage, ranks, args.steps)
        counts = result["counts"]
        per_step = sum(counts.values()) / result["steps"]
        kinds = ", ".join(f"{k} {v / result['steps']:g}" for k, v in sorted(counts.items())) or "-"
        name = engine if stage is None else f"deepspeed ZeRO-{stage}"
        print(f"| {name} | {ranks} | {per_step:g} | {kinds} |", flush=True)


if __name__ == "__main__":
    main()
