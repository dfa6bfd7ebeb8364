"""Run by tests/test_bf16_chain.py under a launcher (several engines in one launch: start-ups are
what costs time on CPU). The fp32 master weights are read from each engine through DeepSpeed's,
FSDP2's or torch's own handles, never through evertrain's checkpoint readers, so the test can hold
those readers to them.

    deepspeed --num_gpus 2 tests/bf16_chain.py train ROOT PRETRAIN_ARGS...
        for each ZeRO stage S in 0-3: pretrain.py PRETRAIN_ARGS engine.zero_stage=S into ROOT/zeroS,
        writing the masters DeepSpeed holds at each save to ROOT/captured/zeroS_step_X.pt
    deepspeed --num_gpus 1 tests/bf16_chain.py load ROOT STEP     (or torchrun ... load ROOT STEP)
        for each stage S: a deepspeed engine of ZeRO stage (S + 1) % 4 (under torchrun: an FSDP2
        engine) loads ROOT/zeroS's checkpoint at STEP; its masters go to ROOT/captured/ENGINE_from_zeroS.pt,
        and one training step must give a finite loss
    torchrun --nproc_per_node 2 tests/bf16_chain.py load ROOT STEP PRETRAIN_ARGS...
        the same, then pretrain.py PRETRAIN_ARGS into ROOT/fsdp (FSDP2's bf16 loss curve)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the launchers start us in the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = (0, 1, 2, 3)


def masters(engine) -> dict[str, torch.Tensor]:
    """{name: fp32 master weight} as the engine holds them (collective: every rank calls it)."""
    params = [(name, p) for name, p in engine.raw_model.named_parameters() if p.requires_grad]
    if engine.name == "fsdp":  # fp32 sharded parameters; MixedPrecisionPolicy casts copies for compute
        return {name: p.full_tensor().detach().clone() for name, p in params}
    if engine.name == "single":
        return {name: p.detach().clone() for name, p in params}
    ds = engine.ds_engine
    if ds.zero_optimization_stage() > 0:
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone() for name, p in params}
    optimizer = ds.optimizer  # stage 0 + bf16: FP16_UnfusedOptimizer's fp32 copies; fp32: the params
    if hasattr(optimizer, "fp32_groups"):
        by_id = {
            id(lp): hp
            for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for lp, hp in zip(lps, hps)
        }
        return {name: by_id[id(p)].detach().clone() for name, p in params}
    return {name: p.detach().float().clone() for name, p in params}


def keep_process_group(engine_class) -> None:
    """Several engines in one launch: closing one must not end the process group the next one uses."""

    def close(self):
        if self.ds_engine is not None:
            self.ds_engine.destroy()

    engine_class.close = close


def train(root: Path, pretrain_args: list[str]) -> None:
    from evertrain.pretrain.checkpoint.deepspeed import DeepSpeedState
    from evertrain.pretrain.engines.base import Engine

    from conftest import load_pretrain

    keep_process_group(Engine)
    captured = root / "captured"
    captured.mkdir(exist_ok=True)
    original = DeepSpeedState.stage
    for stage in STAGES:

        def stage_and_capture(self, tmp_dir, stage=stage):
            held = masters(self.engine)
            if self.engine.is_main:
                torch.save(held, captured / f"zero{stage}_{tmp_dir.name.split('.')[0]}.pt")
            return original(self, tmp_dir)

        DeepSpeedState.stage = stage_and_capture
        code = load_pretrain().main(
            [*pretrain_args, "--run-dir", str(root / f"zero{stage}"), f"engine.zero_stage={stage}"]
        )
        assert code == 0, f"zero stage {stage}: pretrain.py exited {code}"


def load(root: Path, step: int, pretrain_args: list[str]) -> None:
    from evertrain.pretrain import engines
    from evertrain.pretrain.checkpoint import CheckpointManager
    from evertrain.pretrain.config import load_config
    from evertrain.pretrain.distributed import detect_launcher, init_process_group
    from evertrain.pretrain.engines.base import Engine

    from conftest import load_pretrain

    keep_process_group(Engine)
    launcher = detect_launcher()
    for stage in STAGES:
        run_dir = root / f"zero{stage}"
        if launcher == "torchrun":
            overrides, label = ["engine.name=fsdp"], "fsdp"
        else:
            target = (stage + 1) % len(STAGES)
            overrides, label = ["engine.name=deepspeed", f"engine.zero_stage={target}"], f"zero{target}"
        cfg = load_config(run_dir / "config.yaml", overrides)
        engine = engines.create(cfg, launcher=launcher)
        scratch = root / f"scratch_{label}_from_zero{stage}"
        ckpt = CheckpointManager(scratch, cfg, engine)
        ckpt.load(run_dir / "checkpoints" / f"step_{step:09d}")
        held = masters(engine)
        if engine.is_main:
            torch.save(held, root / "captured" / f"{label}_from_zero{stage}.pt")
        windows = torch.randint(
            0,
            cfg.model.vocab_size,
            (cfg.train.micro_batch_size, cfg.model.seq_len + 1),
            generator=torch.Generator().manual_seed(engine.rank),
        )
        loss, _ = engine.train_step([windows])
        assert torch.isfinite(loss), (label, stage, loss)
        ckpt.close()
        engine.close()
    if pretrain_args:
        code = load_pretrain().main([*pretrain_args, "--run-dir", str(root / "fsdp")])
        assert code == 0, f"fsdp: pretrain.py exited {code}"
    init_process_group(torch.device("cpu"), 600)  # no-op: the group is up; end it once, at the very end
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    mode, root = args[0], Path(args[1])
    if mode == "train":
        train(root, args[2:])
    else:
        load(root, int(args[2]), args[3:])
