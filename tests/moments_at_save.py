"""Run by tests/test_checkpoint.py under torchrun (2 CPU ranks):

    torchrun --nproc_per_node 2 tests/moments_at_save.py OUT DATA LAYOUT...

For each LAYOUT (zero0..zero3: DeepSpeed at that ZeRO stage; fsdp: FSDP2), in one process group:
build the engine on configs/tiny.yaml, train 2 steps, take the full Adam moments the engine holds
right then (gathered with the engine's own means: DeepSpeed's safe_get_full_optimizer_state, a
DTensor's full_tensor, or the plain tensor), save a checkpoint in OUT/LAYOUT, and (rank 0) write the
moments to OUT/LAYOUT/moments.pt for the test to compare with what the checkpoint readers return.
Then each checkpoint is loaded into the next LAYOUT's engine (the last into the first's), and the
moments that engine holds after the load go to OUT/LAYOUT/reloaded.pt.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's evertrain, not an installed one
from evertrain.pretrain import engines
from evertrain.pretrain.checkpoint import CheckpointManager
from evertrain.pretrain.config import load_config
from evertrain.pretrain.data.stream import TokenStream

REPO = Path(__file__).resolve().parents[1]
MOMENTS = ("exp_avg", "exp_avg_sq")


def held_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {moment: full flat fp32 tensor}} as the engine holds them now (collective: every rank)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero_optimizer = engine.ds_engine.optimizer if engine.name == "deepspeed" else None
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its moments' fragments after the first step of the first
        # param group, before the other groups' moments exist: link again now that all do
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.raw_model.named_parameters():
        if engine.name == "deepspeed" and engine.ds_engine.zero_optimization_stage() > 0:
            values = {key: safe_get_full_optimizer_state(p, key) for key in MOMENTS}
        else:
            state = engine.optimizer.state[p]
            values = {
                key: state[key].full_tensor() if isinstance(state[key], DTensor) else state[key]
                for key in MOMENTS
            }
        out[name] = {key: value.detach().float().cpu().reshape(-1).clone() for key, value in values.items()}
    return out


def make_engine(layout: str, data: str):
    engine_name = "fsdp" if layout == "fsdp" else "deepspeed"
    overrides = [
        f"data.path={data}",
        "model.vocab_size=512",
        f"engine.name={engine_name}",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
    ]
    if layout != "fsdp":
        overrides.append(f"engine.zero_stage={int(layout.removeprefix('zero'))}")
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    return cfg, engines.create(cfg, launcher="deepspeed" if engine_name == "deepspeed" else "torchrun")


def drop(engine) -> None:
    if engine.ds_engine is not None:
        engine.ds_engine.destroy()  # the process group stays for the next layout
    engine.barrier()


def main(out: Path, data: str, layouts: list[str]) -> None:
    for layout in layouts:
        cfg, engine = make_engine(layout, data)
        stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
        for _ in range(2):
            engine.train_step([stream.next_batch(2 * engine.world_size, engine.rank, engine.world_size)])
        moments = held_moments(engine)
        ckpt = CheckpointManager(out / layout, cfg, engine)
        ckpt.save(2, {"tokens": 0, "data": stream.state_dict()})
        ckpt.close()
        if engine.rank == 0:
            torch.save(moments, out / layout / "moments.pt")
        drop(engine)
    # each checkpoint loaded into the next layout's engine (a reshard: read by parameter slices)
    for layout, target in zip(layouts, layouts[1:] + layouts[:1]):
        cfg, engine = make_engine(target, data)
        ckpt = CheckpointManager(out / f"{layout}_into_{target}", cfg, engine)
        ckpt.load(out / layout / "checkpoints" / "step_000000002")
        moments = held_moments(engine)
        ckpt.close()
        if engine.rank == 0:
            torch.save(moments, out / layout / "reloaded.pt")
        drop(engine)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
