"""ZeRO-3 trains like the single engine, and its checkpoints fork and reshard like every other, and
every load reads only its slices.

One real 2-rank DeepSpeed ZeRO-3 run on CPU (4 steps, a large weight decay so that decaying the
wrong parameters shows) is compared with the single engine, and forked onto one process (single engine),
onto FSDP2 (torchrun, 2 ranks) and onto one DeepSpeed ZeRO-3 rank: every fork finishes with
result.json and all three compute the same cooldown (same losses within 1e-5). The slice readers
are checked in-process: a rank of a 2-rank target reads about half the checkpoint, never all of it.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from evertrain.pretrain.checkpoint import CheckpointManager, load_consolidated
from evertrain.pretrain.checkpoint.slices import KEYS, Slice, open_reader
from evertrain.pretrain.checkpoint.store import read_meta

from conftest import launcher, pretrain_tiny, run_ok

STEPS, COOLDOWN = 4, 2
# a large weight decay at a large LR from step 1: 4 steps shrink every decayed matrix by ~3%
DECAY = ["optim.weight_decay=0.5", "optim.max_lr=0.02", "optim.warmup_steps=1"]
pytestmark = pytest.mark.slow


def run(cmd: list[str]) -> None:
    run_ok(cmd, timeout=600)  # a 2-rank DeepSpeed start-up takes minutes on a loaded machine


@pytest.fixture(scope="module")
def zero3_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    run(
        [
            *launcher("deepspeed", 2),
            "pretrain.py",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            f"train.max_steps={STEPS}",
            f"checkpoint.every_steps={STEPS}",
            "eval.every_steps=0",
            "train.log_every=1",
            "engine.zero_stage=3",
            *DECAY,
        ]
    )
    assert read_meta(run_dir / "checkpoints" / f"step_{STEPS:09d}")["zero_stage"] == 3
    return run_dir


def fork(zero3_run: Path, tmp_path: Path, prefix: list[str], engine: str) -> dict[int, float]:
    """Fork the ZeRO-3 checkpoint (in a copy of the run) with `prefix`: a launcher ending in its module flag."""
    run_dir = tmp_path / "run"
    shutil.copytree(zero3_run, run_dir)
    run(
        [
            *prefix,
            "evertrain.launch.fork",
            "--run-dir",
            str(run_dir),
            "--step",
            str(STEPS),
            "--cooldown-steps",
            str(COOLDOWN),
            "--engine",
            engine,
            "--eval-batches",
            "1",
        ]
    )
    out = run_dir / "cooldowns" / f"from_{STEPS:09d}_1-sqrt_{COOLDOWN}"
    assert json.loads((out / "result.json").read_text())["from_step"] == STEPS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_zero3_decays_every_matrix_but_the_embedding(zero3_run):
    """ZeRO-3 builds the optimizer after partitioning, when every parameter is an empty 1-D
    placeholder: the groups must come from the real shapes (DeepSpeed records them per group)."""
    from evertrain.pretrain.checkpoint.deepspeed import load_trusted

    step_dir = zero3_run / "checkpoints" / f"step_{STEPS:09d}"
    shapes = load_trusted(step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    optim = load_trusted(step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    decays = [group["weight_decay"] for group in optim["optimizer_state_dict"]["param_groups"]]
    assert decays == [0.5, 0.0] and len(shapes) == 2
    decayed, undecayed = shapes
    assert all(len(shape) == 2 for shape in decayed.values()) and "embed_tokens.weight" not in decayed
    assert set(undecayed) == {"embed_tokens.weight"} | {
        name for name, shape in undecayed.items() if len(shape) == 1
    }
    assert len(decayed) == 2 * 7 + 1  # per block q, k, v, o, gate, up, down; the untied head


def test_zero3_shrinks_the_weights_as_the_single_engine_does(zero3_run, tiny_data, tmp_path):
    """Same global batch (2 ranks x 4 windows = 8) and seed: every matrix ends with the single
    engine's norm (fp32, only the reduction order differs: ~1e-6); without decay on ZeRO-3 the
    decayed matrices' norms come out ~3% larger."""
    single = tmp_path / "single"
    assert (
        pretrain_tiny(
            single,
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=8",
            f"train.max_steps={STEPS}",
            f"checkpoint.every_steps={STEPS}",
            "eval.every_steps=0",
            "--engine",
            "single",
            *DECAY,
        )
        == 0
    )
    ours = load_consolidated(zero3_run / "checkpoints" / f"step_{STEPS:09d}")["model"]
    reference = load_consolidated(single / "checkpoints" / f"step_{STEPS:09d}")["model"]
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].norm().item() == pytest.approx(tensor.norm().item(), rel=1e-4), name


@pytest.fixture(scope="module")
def single_fork(zero3_run, tmp_path_factory) -> dict[int, float]:
    return fork(zero3_run, tmp_path_factory.mktemp("single"), [sys.executable, "-m"], "single")


def test_zero3_run_forks_onto_one_process(single_fork):
    assert sorted(single_fork) == [STEPS + 1, STEPS + COOLDOWN]  # log_every=1: both cooldown steps


def test_zero3_run_forks_onto_fsdp2_with_the_same_losses(zero3_run, single_fork, tmp_path):
    losses = fork(zero3_run, tmp_path, [*launcher("fsdp", 2), "-m"], "fsdp")
    assert losses == pytest.approx(single_fork, abs=1e-5)


def test_zero3_run_reshards_onto_one_zero3_rank_with_the_same_losses(zero3_run, single_fork, tmp_path):
    losses = fork(zero3_run, tmp_path, [*launcher("deepspeed", 1), "--module"], "deepspeed")
    assert losses == pytest.approx(single_fork, abs=1e-5)


def test_load_consolidated_has_the_moments_of_a_zero3_checkpoint(zero3_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir = zero3_run / "checkpoints" / f"step_{STEPS:09d}"
    full = load_consolidated(step_dir)
    reference = get_fp32_state_dict_from_zero_checkpoint(
        str(step_dir.parent), tag=step_dir.name
    )  # DeepSpeed's own
    assert set(reference) >= set(full["model"])
    assert all(torch.equal(full["model"][name], reference[name]) for name in full["model"])
    assert set(full["optim"]) == set(full["model"])
    for name, moments in full["optim"].items():
        assert moments["exp_avg"].shape == full["model"][name].shape
        assert moments["exp_avg_sq"].min() >= 0 and moments["exp_avg_sq"].abs().sum() > 0


def two_rank_slices(shapes: dict, rank: int, layout: str) -> list[Slice]:
    """What rank `rank` of a 2-rank target asks for: FSDP2 rows (dim 0 in ceil-sized chunks) or
    its ZeRO-3 flat partition (ceil(n / 2) elements)."""
    slices = []
    for name, shape in shapes.items():
        n = shape.numel()
        if layout == "fsdp":
            rows, row = shape[0], n // shape[0]
            per = math.ceil(rows / 2)
            start, stop = min(rank * per, rows) * row, min((rank + 1) * per, rows) * row
        else:
            per = math.ceil(n / 2)
            start, stop = min(rank * per, n), min((rank + 1) * per, n)
        slices += [Slice(name, key, start, stop) for key in KEYS]
    return slices


def single_engine_checkpoint(zero3_run: Path, tmp_path: Path) -> Path:
    """The ZeRO-3 checkpoint moved into the single engine (in this process) and saved as DCP."""
    from evertrain.pretrain import engines
    from evertrain.pretrain.config import load_config

    cfg = load_config(zero3_run / "config.yaml", ["engine.name=single"])
    engine = engines.create(cfg, launcher=None)
    ckpt = CheckpointManager(tmp_path, cfg, engine)
    try:
        extra = ckpt.load(zero3_run / "checkpoints" / f"step_{STEPS:09d}")
        ckpt.save(STEPS, {key: extra[key] for key in ("tokens", "data")})
    finally:
        ckpt.close()
        engine.close()
    return tmp_path / "checkpoints" / f"step_{STEPS:09d}"


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_each_rank_of_a_reshard_reads_only_its_slices(zero3_run, tmp_path, layout):
    zero3 = zero3_run / "checkpoints" / f"step_{STEPS:09d}"
    full = load_consolidated(zero3)
    total = sum(t.numel() * 4 for t in full["model"].values()) * len(KEYS)
    for step_dir in (zero3, single_engine_checkpoint(zero3_run, tmp_path)):  # DeepSpeed and DCP sources
        meta = read_meta(step_dir)
        pieces = {}
        for rank in (0, 1):
            reader = open_reader(step_dir, meta)
            slices = two_rank_slices(reader.shapes, rank, layout)
            for s, values in zip(slices, reader.read(slices)):
                pieces.setdefault((s.name, s.key), []).append(values)
            # its share, plus at most one row per tensor where a ZeRO-3 piece cuts a row of a DCP chunk
            slack = sum(shape[1:].numel() * 4 * len(KEYS) for shape in reader.shapes.values())
            assert reader.bytes_read <= total / 2 + slack, (meta["engine"], rank, reader.bytes_read, total)
        for (name, key), parts in pieces.items():  # the two ranks' slices make up the whole
            expected = full["model"][name] if key == "weight" else full["optim"][name][key]
            assert torch.equal(torch.cat(parts), expected.reshape(-1)), (meta["engine"], name, key)
