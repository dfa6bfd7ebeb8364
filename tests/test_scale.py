"""Scaling: seed-only sharded init, meta builds of 8B/70B under a 64-rank fake process group, activation
checkpointing, chunked loss and per-block compile equal to eager, the memory plan against measurement,
`evertrain plan`, and DeepSpeed ZeRO-3 built under zero.Init training like the single engine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from evertrain.pretrain.config import from_dict, load_config
from evertrain.pretrain.model.plan import GIB, block_activation_bytes, make_plan
from evertrain.pretrain.model.transformer import _SAVE_OPS, Transformer

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=250, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, seq_len=32, ffn_hidden=160)


def tiny_cfg(**model):
    return from_dict({"model": {**TINY, **model}, "train": {"seed": 11}})


def loss_and_grads(model: Transformer, windows: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model.loss(windows)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


WINDOWS = torch.randint(0, 250, (4, 33), generator=torch.Generator().manual_seed(0))


# -- checkpointing, chunked loss and compile match eager -------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        {"activation_checkpointing": "full"},
        {"activation_checkpointing": "selective"},  # op-level: matmul and attention outputs saved
        {"activation_checkpointing": "selective", "activation_checkpointing_every": 2},
        {"loss_chunk_tokens": 20},  # 128 positions in chunks of 20 (the last one short)
    ],
)
def test_checkpointing_and_chunked_loss_give_eager_loss_and_gradients(model):
    reference = loss_and_grads(Transformer(tiny_cfg().model, seed=11), WINDOWS)
    changed = Transformer(tiny_cfg(**model).model, seed=11)
    loss, grads = loss_and_grads(changed, WINDOWS)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-6)
    for name, grad in reference[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_never_builds_the_full_logits():
    """The largest tensor the head produces is one chunk's logits, in forward and in backward."""
    cfg = tiny_cfg(loss_chunk_tokens=16)
    model = Transformer(cfg.model, seed=11)
    widest = []
    model.lm_head.register_forward_hook(lambda module, args, out: widest.append(out.shape[0]))
    model.loss(WINDOWS).backward()
    assert widest and max(widest) == 16  # 4 x 32 = 128 positions, 8 chunks, recomputed in backward
    assert len(widest) == 2 * 8


def test_compiled_blocks_have_no_graph_breaks_and_match_eager():
    # aot_eager traces and runs the same graphs as inductor minus code generation, which takes minutes
    # on two shared CPU cores (docs/scaling.md has the inductor measurement).
    cfg = tiny_cfg(activation_checkpointing="selective")
    model = Transformer(cfg.model, seed=11)
    x = torch.randn(2, 16, 64)
    explained = torch._dynamo.explain(model.layers[0].forward)(x, model.rope_cos[:16], model.rope_sin[:16])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    reference = loss_and_grads(Transformer(cfg.model, seed=11), WINDOWS)
    model.compile_blocks(backend="aot_eager")
    loss, grads = loss_and_grads(model, WINDOWS)
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-5)
    for name, grad in reference[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert [name for name, _ in model.named_parameters()] == list(reference[1])  # names unchanged


# -- the plan against measurement ------------------------------------------------------------------


class SavedOutputs(TorchDispatchMode):
    """Bytes of the outputs of the ops op-level checkpointing keeps."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SAVE_OPS:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.untyped_storage().nbytes()
        return out


def measured_block_bytes(mode: str) -> int:
    """Bytes one block keeps for backward (saved-tensor hooks, deduplicated by storage, parameters
    and RoPE buffers excluded; op-level checkpointing keeps its ops' outputs outside the hooks)."""
    cfg = tiny_cfg()
    model = Transformer(cfg.model, seed=11)
    block = model.layers[0]
    block.checkpointing = mode
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 32, 64, requires_grad=True)
    outputs = SavedOutputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "op":
            with outputs:
                block(x, model.rope_cos, model.rope_sin)
        else:
            block(x, model.rope_cos, model.rope_sin)
    return sum(seen.values()) + outputs.bytes


@pytest.mark.parametrize("mode", ["none", "full", "op"])
def test_planned_activation_bytes_equal_saved_tensor_measurement(mode):
    cfg = tiny_cfg()
    assert measured_block_bytes(mode) == 2 * 32 * block_activation_bytes(cfg, mode, dtype_bytes=4)
    if mode == "op":
        assert (
            block_activation_bytes(cfg, "full", 4)
            < block_activation_bytes(cfg, "op", 4)
            < block_activation_bytes(cfg, "none", 4)
        )


def run_fake_pg(world: int, rank: int, jobs: list[dict]) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fake_pg_build.py"), str(world), str(rank), json.dumps(jobs)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_70b_and_8b_build_on_meta_under_64_fake_ranks_with_the_planned_shards():
    """Rank 63 of 64: 70B sharded 64 ways, 8B as HSDP 8 x 8, and a tiny tied model (uneven vocab rows)
    materialised, whose shards are exactly the slices of the single-process weights."""
    result = run_fake_pg(
        64,
        63,
        [
            {"config": "configs/70b.yaml"},
            {"config": "configs/8b.yaml", "replicate": 8},
            {
                "config": "configs/tiny.yaml",
                "replicate": 8,
                "materialize": True,
                "overrides": ["model.vocab_size=250", "model.tie_embeddings=true", "train.seed=5"],
            },
        ],
    )
    big, eight, tiny = result["jobs"]
    for job in (big, eight):
        assert job["local"] == job["planned"]
        assert job["plan_parameters_bytes"] == 4 * sum(job["local"].values())
    assert 8.7e8 < sum(big["local"].values()) < 1.2e9  # 70B / 64
    assert 8.5e8 < sum(eight["local"].values()) < 1.0e9  # 7.2B / 8 (sharded within a node)
    assert result["rss_bytes"] < 2 * GIB  # one full-precision 70B copy would be 263 GiB
    assert tiny["mismatched"] == [] and tiny["tied"]
    assert tiny["local"]["embed_tokens.weight"] == 26 * 64  # the last of 8 shards of 250 rows: 250 - 7 * 32


def test_70b_plan_fits_an_h200_with_the_default_knobs():
    cfg = load_config(REPO / "configs" / "70b.yaml")
    plan = make_plan(cfg, nodes=8, gpus_per_node=8)
    assert plan.engine == "fsdp" and plan.fits and plan.accumulate == "sharded"
    assert 70e9 < plan.n_params < 71e9
    assert plan.tokens_per_step == 1 * 8192 * 8 * 64
    assert 4.4e11 < plan.flops_per_token < 4.6e11  # 6 * (70B - embedding) + causal attention
    # without checkpointing, 80 blocks of activations at 8192 tokens do not fit
    none = make_plan(
        load_config(REPO / "configs" / "70b.yaml", ["model.activation_checkpointing=none"]), 8, 8
    )
    assert not none.fits and none.device["activations"] > 10 * plan.device["activations"]
    # fewer ranks: larger shards; unsharded accumulation would add 4 bytes per parameter
    assert make_plan(cfg, 1, 8).device["optimizer"] == pytest.approx(8 * plan.device["optimizer"], rel=1e-3)


def test_plan_keeps_a_reserve_and_counts_the_root_gradients_so_8b_on_h100_accumulates_sharded():
    from evertrain.pretrain.model.plan import GPUS, RESERVE_FIXED, RESERVE_SHARE, parameter_shapes

    cfg = load_config(REPO / "configs" / "8b.yaml")
    plan = make_plan(cfg, 1, 8, engine="fsdp", gpu="h100")
    assert plan.reserve == int(RESERVE_SHARE * GPUS["h100"]) + RESERVE_FIXED
    assert plan.usable == GPUS["h100"] - plan.reserve and plan.fits
    root = sum(
        math.prod(s)
        for n, s in parameter_shapes(cfg).items()
        if n.startswith(("embed_tokens.", "norm.", "lm_head."))
    )
    assert plan.device["root gradients"] == (2 + 4) * root  # bf16 gradients + their fp32 reduce-scatter copy
    # full fp32 gradients (29 GiB here) would fill the GPU to within the reserve: auto shards them
    assert plan.accumulate == "sharded" and plan.total + 4 * plan.n_params > plan.usable
    assert plan.total + 4 * plan.n_params <= 0.9 * GPUS["h100"]  # what the plan without a reserve allowed
    assert make_plan(cfg, 1, 8, engine="fsdp", gpu="h200").accumulate == "unsharded"  # room to spare there


def test_plan_command_prints_the_table_and_exit_codes():
    from evertrain.launch.cli import main

    env_cfg = str(REPO / "configs" / "70b.yaml")
    assert main(["plan", "--config", env_cfg, "--nodes", "8", "--gpus-per-node", "8"]) == 0
    assert main(["plan", "--config", env_cfg, "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"]) == 1
    assert (
        main(["plan", "--config", env_cfg, "--nodes", "8", "--gpus-per-node", "8", "engine.replicate=3"]) == 2
    )


def test_plan_command_output(capsys):
    from evertrain.launch.cli import main

    main(["plan", "--config", str(REPO / "configs" / "8b.yaml"), "--nodes", "1", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    for line in (
        "parameters",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "checkpoint staging",
        "fits: yes",
        "model FLOPs per token",
        "tokens per step: 524,288",
    ):
        assert line in out


# -- DeepSpeed ----------------------------------------------------------------------------------------


def test_deepspeed_bf16_accumulates_and_reduces_in_fp32():
    from deepspeed.runtime.config import get_communication_data_type

    from evertrain.pretrain.engines.deepspeed import deepspeed_config

    for stage in (1, 2, 3):
        ds = deepspeed_config(from_dict({"engine": {"zero_stage": stage}}), world_size=8, bf16=True)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
        assert get_communication_data_type(ds) == torch.float32
    stage0 = deepspeed_config(from_dict({"engine": {"zero_stage": 0}}), world_size=8, bf16=True)
    assert "data_types" not in stage0 and stage0["communication_data_type"] == "fp32"
    assert "communication_data_type" not in deepspeed_config(from_dict({}), world_size=8, bf16=False)


@pytest.mark.slow
def test_zero3_built_under_zero_init_trains_like_the_single_engine(tiny_data, tmp_path):
    """Partitioned construction + gathered per-parameter init gives the single engine's weights:
    the first steps' losses agree (with checkpointed blocks and a chunked head under ZeRO-3's hooks)."""
    from test_engines import launch, pretrain_args, records

    from conftest import launcher_env, load_pretrain

    ds = subprocess.run(
        [
            *launch(
                "deepspeed",
                tiny_data,
                tmp_path / "ds",
                "train.max_steps=2",
                "eval.every_steps=0",
                "model.activation_checkpointing=full",
                "model.loss_chunk_tokens=100",
            ),  # 256 positions per micro-batch
            "engine.zero_stage=3",
        ],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )  # a 2-rank DeepSpeed start-up takes minutes on a loaded 2-core machine
    assert ds.returncode == 0, ds.stderr[-3000:]
    # the single engine in this process (no process group): pretrain.py's main, without a launch
    pretrain = load_pretrain()
    args = pretrain_args(
        tiny_data,
        tmp_path / "single",
        "train.grad_accum=2",
        "train.max_steps=2",
        "eval.every_steps=0",
        "--engine",
        "single",
    )[1:]
    assert pretrain.main(args) == 0
    a = [r["loss"] for r in records(tmp_path / "ds", "train")]
    b = [r["loss"] for r in records(tmp_path / "single", "train")]
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)


def test_scale_bench_says_what_it_skips_on_a_torch_without_its_internals(monkeypatch, capsys):
    """bench/scale.py leans on two torch internals (the fake process group, a dispatch mode): without
    them it prints one line per measurement it cannot make and measures the rest, which need neither.
    (torch's own lazy imports need TorchDispatchMode, so they run once before it is deleted.)"""
    import importlib.util

    from evertrain import torch_compat

    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    hidden = {"FakeStore", "TorchDispatchMode"}
    real = torch_compat._private
    monkeypatch.setattr(
        torch_compat, "_private", lambda module, name: None if name in hidden else real(module, name)
    )

    def no_dispatch_mode():
        raise AssertionError("the dispatch mode was used for a measurement that does not need it")

    monkeypatch.setattr(bench, "op_outputs_counter", no_dispatch_mode, raising=False)
    cfg = load_config(REPO / "configs" / "1b.yaml", ["model.seq_len=8"])
    for mode in ("none", "full"):  # torch's own lazy imports happen once, while it still has the mode
        bench.block_saved_bytes(cfg, mode, 8)
    monkeypatch.delattr("torch.utils._python_dispatch.TorchDispatchMode")
    monkeypatch.setattr(sys, "argv", ["scale.py", "--tokens", "8"])
    bench.main()
    out = capsys.readouterr().out
    assert "(a) skipped: this torch has no fake process group" in out
    assert "selective (op-level)  skipped: this torch has no" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("none ", "full "))]
    assert [row[0] for row in rows] == ["none", "full"] and all(int(row[1]) > 0 for row in rows)
