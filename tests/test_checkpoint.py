"""Checkpoints in one process: the commit protocol, exact resume, retention and pins, bad input.

A small plain module and a minimal AdamW with our optimizer's contract stand in for an engine, so
these run in seconds; tests/test_resume.py drives the real engines through pretrain.py.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evertrain.pretrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    is_pinned,
    load_consolidated,
    pin,
    store,
    unpin,
)
from evertrain.pretrain.checkpoint.retention import steps_to_keep
from evertrain.pretrain.config import load_config
from evertrain.pretrain.roll_call import RollCall


class StepCountAdamW(torch.optim.Optimizer):
    """evertrain's optimizer contract in a few lines: a step counter tensor drives the bias
    correction, `set_step` restores it, and the per-parameter state is exp_avg / exp_avg_sq."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.step_count = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def step(self, closure=None):
        self.step_count += 1
        t = int(self.step_count)
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))

    def set_step(self, n: int) -> None:
        self.step_count.fill_(n)


def toy_engine(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    optimizer = StepCountAdamW(model.parameters())
    return SimpleNamespace(
        name="single",
        rank=0,
        world_size=1,
        is_main=True,
        device=torch.device("cpu"),
        model=model,
        raw_model=model,
        optimizer=optimizer,
        barrier=lambda where="a barrier": None,
        roll_call=RollCall(None, 0, 1, 0.0),  # alone: every roll call passes
    )


def train_step(engine) -> float:
    """A step that draws from the torch RNG, so a resume must restore the RNG to match."""
    x = torch.randn(8, 16)
    loss = (engine.model(x) - x.flip(1)).pow(2).mean()
    loss.backward()
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def config(*overrides):
    return load_config(None, ["model.d_model=64", "checkpoint.keep_last=100", *overrides])


def snapshot(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def saved_run(tmp_path):
    """A run dir with checkpoints at steps 2 and 4, and the losses of steps 5..8 that followed."""
    cfg = config()
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, cfg, engine)
    for step in range(1, 5):
        train_step(engine)
        if step % 2 == 0:
            ckpt.save(step, {"tokens": step * 128, "data": {"cursor": step}})
    later = [train_step(engine) for _ in range(4)]
    ckpt.close()
    return SimpleNamespace(dir=tmp_path, cfg=cfg, later_losses=later, engine=engine)


def test_save_commits_step_dir_with_meta_and_latest(saved_run):
    ckpt_dir = saved_run.dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["LATEST", "step_000000002", "step_000000004"]
    assert (ckpt_dir / "LATEST").read_text().strip() == "step_000000004"
    meta = json.loads((ckpt_dir / "step_000000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["tokens"] == 512 and meta["data"] == {"cursor": 4}
    assert meta["engine"] == "single" and meta["world_size"] == 1 and meta["schedule"]["max_lr"] == 1e-3
    on_disk = {p.name for p in (ckpt_dir / "step_000000004").iterdir()} - {"meta.json"}
    assert set(meta["files"]) == on_disk and "train_state.0.pt" in on_disk  # no done.* markers left
    for name, expected in meta["files"].items():
        assert store.file_digest(ckpt_dir / "step_000000004" / name) == expected


def test_resume_continues_bitwise(saved_run):
    engine = toy_engine(seed=99)  # different init: everything must come from the checkpoint
    ckpt = CheckpointManager(saved_run.dir, saved_run.cfg, engine)
    extra = ckpt.resume()
    assert extra == {"tokens": 512, "data": {"cursor": 4}, "step": 4}
    assert int(engine.optimizer.step_count) == 4
    assert [train_step(engine) for _ in range(4)] == saved_run.later_losses
    ckpt.close()


def test_resume_of_empty_run_dir_is_none(tmp_path):
    assert CheckpointManager(tmp_path, config(), toy_engine()).resume() is None


def test_save_returns_once_staged_and_one_save_at_a_time(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    train_step(engine)
    expected = {k: v.clone() for k, v in engine.model.state_dict().items()}
    ckpt.save(1, {})
    train_step(engine)  # training goes on while the save is written (its optimizer step waits for the copy)
    ckpt.save(2, {})  # waits for step 1's save first
    assert (tmp_path / "checkpoints" / "step_000000001" / "meta.json").is_file()
    ckpt.close()
    full = load_consolidated(tmp_path / "checkpoints" / "step_000000001")
    assert all(torch.equal(full["model"][k], v) for k, v in expected.items())
    assert set(full["optim"]) == set(expected) and set(full["optim"]["0.weight"]) >= {"exp_avg", "exp_avg_sq"}
    assert full["step"] == 1 and full["meta"]["step"] == 1


def test_synchronous_save_is_committed_on_return(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config("checkpoint.async_save=false"), engine)
    train_step(engine)
    ckpt.save(1, {})
    assert (tmp_path / "checkpoints" / "step_000000001" / "meta.json").is_file()
    ckpt.close()


def test_crash_before_commit_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    train_step(engine)
    ckpt.save(1, {})
    ckpt.wait()

    def crash(tmp_dir, meta):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(store, "commit", crash)
    train_step(engine)
    ckpt.save(2, {})
    with pytest.raises(CheckpointError, match="simulated"):
        ckpt.wait()  # a failed background save surfaces in the caller, as one line
    monkeypatch.undo()
    ckpt_dir = tmp_path / "checkpoints"
    leftovers = [p.name for p in ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert (
        leftovers == []
    )  # a single process's failed save removes its own temp dir (a full disk needs the space)
    assert store.latest_checkpoint(ckpt_dir).name == "step_000000001"
    (ckpt_dir / "step_000000002.tmp-0123abcd").mkdir()  # what a crash (no chance to clean up) leaves

    restarted = CheckpointManager(tmp_path, config(), toy_engine())
    assert restarted.resume()["step"] == 1
    train_step(restarted.engine)
    restarted.save(2, {})  # the first save of the new process sweeps the stale temp dir
    restarted.close()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["LATEST", "step_000000001", "step_000000002"]


def test_latest_prefers_a_complete_dir_newer_than_latest(saved_run):
    """A crash between the rename and the LATEST update: the renamed dir is whole, so it wins."""
    ckpt_dir = saved_run.dir / "checkpoints"
    (ckpt_dir / "LATEST").write_text("step_000000002\n")
    assert store.latest_checkpoint(ckpt_dir).name == "step_000000004"
    (ckpt_dir / "step_000000009.tmp-dead").mkdir()  # never a checkpoint, whatever it holds
    (ckpt_dir / "step_000000009.tmp-dead" / "meta.json").write_text("{}")
    assert store.latest_checkpoint(ckpt_dir).name == "step_000000004"


def test_save_of_a_committed_step_is_a_no_op(saved_run):
    engine = toy_engine()
    ckpt = CheckpointManager(saved_run.dir, saved_run.cfg, engine)
    ckpt.resume()
    before = snapshot(saved_run.dir)
    ckpt.save(4, {"tokens": 0})
    ckpt.close()
    assert snapshot(saved_run.dir) == before


def test_extra_must_be_json(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    train_step(engine)
    with pytest.raises(TypeError):
        ckpt.save(1, {"tensor": torch.zeros(1)})
    ckpt.close()


# -- retention and pins ----------------------------------------------------------------------------


def test_steps_to_keep_rule():
    assert steps_to_keep([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], keep_last=2, keep_every=4) == {4, 8, 9, 10}
    assert steps_to_keep([5, 10, 15], keep_last=1, keep_every=0) == {15}


def test_retention_keeps_last_every_and_pinned(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config("checkpoint.keep_last=2", "checkpoint.keep_every=4"), engine)
    ckpt_dir = tmp_path / "checkpoints"
    pins = {}
    for step in range(1, 11):
        train_step(engine)
        ckpt.save(step, {})
        ckpt.wait()
        if step == 3:
            pins[3] = pin(ckpt_dir / "step_000000003", "fork-a", ttl_s=3600)
        if step == 5:
            pins[5] = pin(ckpt_dir / "step_000000005", "fork-b", ttl_s=0.01)  # expires at once
    steps = sorted(store.step_of(p) for p in store.complete_checkpoints(ckpt_dir))
    assert steps == [3, 4, 8, 9, 10]
    assert is_pinned(ckpt_dir / "step_000000003") and not pins[5].exists()
    unpin(pins[3])
    train_step(engine)
    ckpt.save(11, {})  # deletion happens only after a newer commit
    ckpt.close()
    assert sorted(store.step_of(p) for p in store.complete_checkpoints(ckpt_dir)) == [4, 8, 10, 11]


def test_pin_checks_its_arguments_and_the_checkpoint(saved_run, tmp_path):
    step_dir = saved_run.dir / "checkpoints" / "step_000000004"
    with pytest.raises(CheckpointError, match="holder"):
        pin(step_dir, "../escape", ttl_s=10)
    with pytest.raises(CheckpointError, match="ttl"):
        pin(step_dir, "fork", ttl_s=0)
    with pytest.raises(CheckpointError, match="step_000000007"):
        pin(saved_run.dir / "checkpoints" / "step_000000007", "fork", ttl_s=10)
    assert not (saved_run.dir / "checkpoints" / "step_000000007").exists()  # not recreated
    path = pin(step_dir, "fork", ttl_s=10)
    assert is_pinned(step_dir) and json.loads(path.read_text())["holder"] == "fork"
    unpin(path)
    unpin(path)  # twice is fine
    assert not is_pinned(step_dir)


def test_unreadable_pin_counts_as_pinned(saved_run):
    step_dir = saved_run.dir / "checkpoints" / "step_000000002"
    (step_dir / "pins").mkdir()
    (step_dir / "pins" / "half-written.json").write_text("{")
    assert is_pinned(step_dir)


# -- bad input: one clear error, nothing changed ---------------------------------------------------


def resume_error(run: SimpleNamespace, cfg=None) -> str:
    before = snapshot(run.dir)
    ckpt = CheckpointManager(run.dir, cfg or run.cfg, toy_engine())
    with pytest.raises(CheckpointError) as info:
        ckpt.resume()
    ckpt.close()
    assert snapshot(run.dir) == before  # the run dir is left as it was
    message = str(info.value)
    assert "\n" not in message
    return message


def test_corrupt_shard_is_refused(saved_run):
    shard = next((saved_run.dir / "checkpoints" / "step_000000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = resume_error(saved_run)
    assert str(shard) in message and "xxh3_128" in message


def test_truncated_and_missing_shards_are_refused(saved_run):
    step_dir = saved_run.dir / "checkpoints" / "step_000000004"
    state = step_dir / "train_state.0.pt"
    state.write_bytes(state.read_bytes()[:-10])
    assert str(state) in resume_error(saved_run) and "size" in resume_error(saved_run)
    state.unlink()
    message = resume_error(saved_run)
    assert str(state) in message and "missing" in message


def test_other_model_shape_is_refused(saved_run):
    message = resume_error(saved_run, config("model.d_model=128", "model.n_layers=3"))
    assert "step_000000004" in message and "d_model 64 vs 128" in message and "n_layers 2 vs 3" in message


def test_broken_meta_and_latest_are_refused(saved_run):
    ckpt_dir = saved_run.dir / "checkpoints"
    (ckpt_dir / "step_000000004" / "meta.json").write_text("{not json")
    assert "meta.json" in resume_error(saved_run)  # LATEST names a dir whose meta is unreadable
    (ckpt_dir / "LATEST").write_text("step_000000777\n")
    message = resume_error(saved_run)
    assert "LATEST" in message and "step_000000777" in message


def test_retention_looks_again_after_moving_a_checkpoint_aside(saved_run, monkeypatch):
    """A reader pins between retention's check and its rename: the checkpoint is put back."""
    from evertrain.pretrain.checkpoint import retention

    ckpt_dir = saved_run.dir / "checkpoints"
    step_dir = ckpt_dir / "step_000000002"
    pin(step_dir, "late-reader", ttl_s=60)
    real_is_pinned = retention.is_pinned
    monkeypatch.setattr(
        retention, "is_pinned", lambda d, watch=None: d != step_dir and real_is_pinned(d, watch)
    )
    assert retention.apply_retention(ckpt_dir, keep_last=1, keep_every=0) == []
    assert (step_dir / "meta.json").is_file() and not list(ckpt_dir.glob("*.tmp-deleting"))


def test_deepspeed_staging_copies_tensors_into_reused_buffers():
    from collections import OrderedDict

    from evertrain.pretrain.checkpoint.deepspeed import StagingCheckpointEngine

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    state = {"module": OrderedDict(w=weight.data), "shapes": [torch.Size([3])], "step": 7}
    writer = StagingCheckpointEngine(torch.device("cpu"), optimizer)
    writer.save(state, "a.pt")
    paths, copy = writer.take_staged()
    weight.grad = torch.full((3,), -1.0)
    optimizer.step()  # training goes on: its step waits for the copy
    (first,) = copy.result()["files"]
    assert (
        paths == ["a.pt"]
        and type(first["module"]) is OrderedDict
        and torch.equal(first["module"]["w"], torch.ones(3))
    )
    assert first["shapes"] == [torch.Size([3])] and first["step"] == 7
    writer.save(state, "a.pt")  # the next save refills the same CPU buffer
    (second,) = writer.take_staged()[1].result()["files"]
    assert torch.equal(second["module"]["w"], torch.full((3,), 2.0))
    assert second["module"]["w"].data_ptr() == first["module"]["w"].data_ptr() != weight.data_ptr()
    writer.stager.close()


def test_writer_skips_the_zip_crc_and_its_files_load_back_exactly(tmp_path, monkeypatch):
    """The writer's torch.save zips carry no CRC32 (meta.json's hash covers each file); the switch is
    off only in the writer thread while it writes (another thread meanwhile keeps it, the writer
    thread has it back afterwards); what was written loads back bit for bit: through the safe DCP
    reader into an engine, and through load_consolidated."""
    import io
    import threading
    import zipfile

    from evertrain.pretrain.checkpoint.dcp import DcpState
    from evertrain.pretrain.checkpoint.safe_load import read_dcp_metadata

    seen = {}
    real_stage = DcpState.stage

    def stage(self, tmp_dir):
        copy, write = real_stage(self, tmp_dir)

        def write_and_look(staged):
            seen["writer"] = torch.serialization.get_crc32_options()
            other = threading.Thread(
                target=lambda: seen.update(other=torch.serialization.get_crc32_options())
            )
            other.start()
            other.join()
            return write(staged)

        return copy, write_and_look

    monkeypatch.setattr(DcpState, "stage", stage)
    engine = toy_engine()
    for _ in range(2):
        train_step(engine)
    saved = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    moments = {
        name: {k: v.clone() for k, v in engine.optimizer.state[p].items()}
        for name, p in engine.model.named_parameters()
    }
    ckpt = CheckpointManager(tmp_path, config(), engine)
    ckpt.save(2, {"tokens": 0})
    ckpt.wait()
    assert seen == {"writer": False, "other": True}
    assert ckpt._writer.submit(torch.serialization.get_crc32_options).result()  # restored
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "step_000000002"
    zips = [(step_dir / "train_state.0.pt").read_bytes()]
    for info in read_dcp_metadata(step_dir / ".metadata").storage_data.values():
        data = (step_dir / info.relative_path).read_bytes()
        zips.append(data[info.offset : info.offset + info.length])
    crcs = [record.CRC for data in zips for record in zipfile.ZipFile(io.BytesIO(data)).infolist()]
    assert len(zips) == 1 + 3 * len(saved) and len(crcs) > len(zips) and set(crcs) == {0}

    fresh = toy_engine(seed=99)
    CheckpointManager(tmp_path, config(), fresh).load(step_dir)
    full = load_consolidated(step_dir)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, saved[name]) and torch.equal(full["model"][name], saved[name])
        for key, value in moments[name].items():
            assert torch.equal(fresh.optimizer.state[p][key], value)
            assert torch.equal(full["optim"][name][key], value)


# -- the moments a checkpoint holds are the engine's --------------------------------------------------

MOMENT_LAYOUTS = ("zero0", "zero1", "zero2", "zero3", "fsdp")


@pytest.fixture(scope="module")
def moments_at_save(tiny_data, tmp_path_factory) -> Path:
    """One torchrun launch (2 CPU ranks) that trains and saves under DeepSpeed ZeRO 0-3 and FSDP2 in
    turn, keeping the full Adam moments each engine held when it saved, then loads each checkpoint into
    the next layout's engine and keeps its moments too (tests/moments_at_save.py)."""
    from conftest import launcher, run_ok

    out = tmp_path_factory.mktemp("moments")
    run_ok(
        [*launcher("fsdp", 2), "tests/moments_at_save.py", str(out), str(tiny_data), *MOMENT_LAYOUTS],
        timeout=900,
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", MOMENT_LAYOUTS)
def test_checkpointed_moments_are_those_the_engine_held_when_it_saved(moments_at_save, layout):
    """Read back whole (load_consolidated), as the two halves a 2-rank FSDP2 target reads, and loaded
    into another layout's engine (the next in MOMENT_LAYOUTS: a reshard), each moment of each parameter
    equals, bit for bit, the one the engine held when it saved: not only the other readers'."""
    from evertrain.pretrain.checkpoint.slices import Slice, open_reader

    held = torch.load(moments_at_save / layout / "moments.pt", weights_only=True)
    step_dir = moments_at_save / layout / "checkpoints" / store.step_dir_name(2)
    full = load_consolidated(step_dir)
    assert full["meta"]["engine"] == ("fsdp" if layout == "fsdp" else "deepspeed")
    assert full["meta"].get("zero_stage") == (None if layout == "fsdp" else int(layout[-1]))
    assert set(full["optim"]) == set(held) and len(held) > 10
    reader = open_reader(step_dir, full["meta"])
    for name, moments in held.items():
        for key, value in moments.items():
            assert value.abs().sum() > 0, (name, key)  # two steps: no moment is still zero
            loaded = full["optim"][name][key].reshape(-1)
            assert torch.equal(loaded, value), f"{layout}: {name} {key} is not the moment the engine held"
            half = (len(value) + 1) // 2
            halves = reader.read([Slice(name, key, 0, half), Slice(name, key, half, len(value))])
            assert torch.equal(torch.cat(halves), value), f"{layout}: {name} {key} read by halves differs"
    reloaded = torch.load(moments_at_save / layout / "reloaded.pt", weights_only=True)
    for name, moments in held.items():
        for key, value in moments.items():
            assert torch.equal(reloaded[name][key], value), (
                f"{layout}: {name} {key} differs once loaded into an engine"
            )
