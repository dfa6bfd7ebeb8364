"""bf16 on CPU, through every engine: DeepSpeed ZeRO 0-3 train -> checkpoint -> export hf -> average
-> fork into single and FSDP2 -> load into another ZeRO stage on another world size.

With bf16 DeepSpeed keeps fp32 masters apart from the bf16 weights the forward runs on, in a layout
that depends on the stage (stage 0: FP16_UnfusedOptimizer's per-parameter copies; stage 1:
BF16_Optimizer; 2: DeepSpeedZeroOptimizer; 3: stage 3's partitions) and names its optimizer files
`bf16_zero_pp_rank_*`. Every check compares against the masters read out of the live engines by
tests/bf16_chain.py through DeepSpeed's and FSDP2's own handles, not through our readers.

Three launches serve all four stages: one 2-rank DeepSpeed launch trains them one after another,
one 1-rank DeepSpeed launch loads each into the next stage ((S + 1) % 4: every fill path, a world
size of 1 instead of 2), one 2-rank torchrun launch loads each into FSDP2 and then trains FSDP2 in
bf16. With single-engine runs in this process they give the engines' bf16 loss curves.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from evertrain.launch.average import average_checkpoints, average_dir_name
from evertrain.launch.cli import main as cli_main
from evertrain.pretrain.checkpoint import load_consolidated

from conftest import launcher, pretrain_tiny, run_ok

STAGES = (0, 1, 2, 3)
STEPS, EVERY = 20, 10
pytestmark = pytest.mark.slow


def common_args(tiny_data: Path) -> list[str]:
    return [
        "--config",
        "configs/tiny.yaml",
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        f"train.max_steps={STEPS}",
        f"checkpoint.every_steps={EVERY}",
        "eval.every_steps=0",
        "eval.batches=1",
        "train.log_every=1",
        "train.dtype=bfloat16",
    ]


@pytest.fixture(scope="module")
def chain(tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf16_chain")
    script = "tests/bf16_chain.py"
    run_ok(
        [
            *launcher("deepspeed", 2),
            script,
            "train",
            str(root),
            *common_args(tiny_data),
            "train.micro_batch_size=4",
        ],
        timeout=900,
    )
    run_ok([*launcher("deepspeed", 1), script, "load", str(root), str(STEPS)], timeout=600)
    run_ok(
        [
            *launcher("fsdp", 2),
            script,
            "load",
            str(root),
            str(STEPS),
            *common_args(tiny_data),
            "train.micro_batch_size=4",
            "checkpoint.every_steps=0",
            "--engine",
            "fsdp",
        ],
        timeout=600,
    )
    return root


def captured(root: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "captured" / f"{name}.pt", weights_only=True)


def step_dir(root: Path, stage: int, step: int) -> Path:
    return root / f"zero{stage}" / "checkpoints" / f"step_{step:09d}"


def assert_equal(ours: dict, reference: dict, what) -> None:
    assert set(ours) == set(reference), what
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor), (what, name)


@pytest.mark.parametrize("stage", STAGES)
def test_the_checkpoint_holds_the_fp32_masters_deepspeed_held(chain, stage):
    files = sorted(p.name for p in step_dir(chain, stage, STEPS).glob("*optim_states.pt"))
    if stage > 0:  # DeepSpeed's bf16 naming, whatever the stage
        assert files and all(name.startswith("bf16_zero_pp_rank_") for name in files), files
    for step in (EVERY, STEPS):
        full = load_consolidated(step_dir(chain, stage, step))
        assert_equal(full["model"], captured(chain, f"zero{stage}_step_{step:09d}"), (stage, step))
        assert all(m["exp_avg_sq"].abs().sum() > 0 for m in full["optim"].values())


@pytest.mark.parametrize("stage", STAGES)
def test_export_and_average_read_the_masters(chain, stage, tmp_path):
    from evertrain.pretrain.config import load_config
    from evertrain.pretrain.model.hf_llama import load_llama

    run_dir = chain / f"zero{stage}"
    masters = {step: captured(chain, f"zero{stage}_step_{step:09d}") for step in (EVERY, STEPS)}
    out = tmp_path / "hf"
    assert cli_main(["export", "hf", "--run", str(run_dir), "--step", str(STEPS), "--out", str(out)]) == 0
    assert_equal(
        load_llama(f"hf:{out}", load_config(run_dir / "config.yaml", []).model), masters[STEPS], "export"
    )
    result = average_checkpoints(run_dir, [EVERY, STEPS])
    assert result["val_loss"] > 0
    averaged = load_consolidated(run_dir / "averages" / average_dir_name([EVERY, STEPS]) / "final")["model"]
    for name, tensor in averaged.items():
        torch.testing.assert_close(
            tensor, (masters[EVERY][name] + masters[STEPS][name]) / 2, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("stage", STAGES)
def test_another_stage_on_another_world_size_loads_the_masters(chain, stage):
    """ZeRO-S on 2 ranks into ZeRO-(S+1)%4 on 1 rank: 0 -> BF16_Optimizer, 1 -> ZeRO-2's flat
    partitions, 2 -> stage 3's partitions, 3 -> stage 0's per-parameter fp32 copies."""
    target = (stage + 1) % len(STAGES)
    assert_equal(
        captured(chain, f"zero{target}_from_zero{stage}"),
        captured(chain, f"zero{stage}_step_{STEPS:09d}"),
        (stage, target),
    )


@pytest.mark.parametrize("stage", STAGES)
def test_fsdp2_loads_the_masters(chain, stage):
    assert_equal(
        captured(chain, f"fsdp_from_zero{stage}"), captured(chain, f"zero{stage}_step_{STEPS:09d}"), stage
    )


@pytest.mark.parametrize("stage", STAGES)
def test_a_fork_onto_one_process_starts_from_the_masters(chain, stage, tmp_path, monkeypatch):
    """The real fork command (single engine, bf16 autocast), in this process; the weights it starts
    from are read out of the engine right after its load."""
    from evertrain.launch import fork
    from evertrain.pretrain.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    shutil.copytree(chain / f"zero{stage}", run_dir)
    loaded = {}
    original = CheckpointManager.load

    def load_and_capture(self, step_dir):
        extra = original(self, step_dir)
        loaded.update({n: p.detach().clone() for n, p in self.engine.raw_model.named_parameters()})
        return extra

    monkeypatch.setattr(CheckpointManager, "load", load_and_capture)
    assert (
        fork.main(
            [
                "--run",
                str(run_dir),
                "--step",
                str(STEPS),
                "--cooldown-steps",
                "1",
                "--shape",
                "linear",
                "--engine",
                "single",
                "--eval-batches",
                "1",
            ]
        )
        == 0
    )
    assert_equal(loaded, captured(chain, f"zero{stage}_step_{STEPS:09d}"), stage)
    result = json.loads((run_dir / "cooldowns" / f"from_{STEPS:09d}_linear_1" / "result.json").read_text())
    assert result["from_step"] == STEPS and result["val_loss"] > 0


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def bf16_curves(chain, tiny_data, tmp_path_factory) -> dict[str, list[float]]:
    """20 steps of each engine in bf16, same global batch (8 windows) and seed; fp32 single for scale."""
    root = tmp_path_factory.mktemp("bf16_curves")
    args = [
        arg for arg in common_args(tiny_data) if not arg.startswith("--config") and arg != "configs/tiny.yaml"
    ]
    curves = {name: train_losses(chain / name) for name in [f"zero{stage}" for stage in STAGES] + ["fsdp"]}
    for dtype in ("bfloat16", "float32"):
        assert (
            pretrain_tiny(
                root / dtype,
                *args,
                "train.micro_batch_size=8",
                "checkpoint.every_steps=0",
                f"train.dtype={dtype}",
                "--engine",
                "single",
            )
            == 0
        )
    curves["single"], curves["single_fp32"] = train_losses(root / "bfloat16"), train_losses(root / "float32")
    assert all(len(curve) == STEPS for curve in curves.values()), {k: len(v) for k, v in curves.items()}
    return curves


BF16_BOUND = 2e-3


def test_engines_agree_in_bf16_over_20_steps(bf16_curves):
    """Every bf16 engine's loss stays within BF16_BOUND of the single engine's at each of 20 steps.

    Why 2e-3: the engines round to bf16 (8-bit mantissa, ~0.4% relative) in different places:
    autocast keeps fp32 weights and casts per op, FSDP2 casts the gathered parameters, DeepSpeed keeps
    bf16 weights in the module and runs every op (norms included) in bf16. On this model (loss ~6)
    that moves the 20-step curves apart by <= 6e-4 (measured: ZeRO 1-3 4.8e-4, FSDP2 3.3e-4, and bf16
    vs fp32 single 3.5e-4), so 2e-3 leaves a 3x margin. What it caught: the schedule one step ahead
    (DeepSpeed's ZeRO-0 bf16 wrapper runs one optimizer step at construction, which
    engines/deepspeed.undo_init_step undoes) moved ZeRO-0 by 5.5e-2, and by 2.5e-3 at step 2 already.
    Every bf16 curve must also differ from the fp32 one by more than the 1e-5 that fp32 engines agree
    within (tests/test_engines.py): bf16 really ran."""
    curves = dict(bf16_curves)
    fp32, single = curves.pop("single_fp32"), curves.pop("single")
    for name, curve in {**curves, "single": single}.items():
        assert max(abs(a - b) for a, b in zip(curve, fp32)) > 1e-5, (name, "ran in fp32")
    for name, curve in curves.items():
        gap = max(abs(a - b) for a, b in zip(curve, single))
        assert gap <= BF16_BOUND, (name, gap, curve, single)
