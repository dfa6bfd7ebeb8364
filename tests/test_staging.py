"""Checkpoint staging off the training thread (checkpoint/staging.py) and the fast integrity hash.

The ordering proof: save() returns before the copy is made, the next step's forward and backward run,
and its optimizer step waits for the copy, so the checkpoint holds exactly the saved step's weights
and moments. The copy is held back by a gate here, so the test does not depend on timing luck.
"""

import hashlib
import json
import threading

import pytest
import torch
from test_checkpoint import config, resume_error, toy_engine, train_step

from evertrain import torch_compat
from evertrain.pretrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_consolidated,
    staging,
    store,
)


def test_the_next_step_waits_for_the_copy_and_the_checkpoint_is_the_saved_step(tmp_path, monkeypatch):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    for _ in range(2):
        train_step(engine)
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(engine.optimizer.state.values())}

    gate, copying = threading.Event(), threading.Event()
    stager_class = type(torch_compat.state_dict_stager(pin_memory=False))  # DCP's, or our fallback
    copy = stager_class.stage

    def held_back(self, *args, **kwargs):
        copying.set()
        assert gate.wait(30)
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(stager_class, "stage", held_back)

    ckpt.save(2, {"tokens": 2})  # returns with the copy not made yet
    assert copying.wait(30) and not ckpt.state.stager.copy_done.done()
    step3 = threading.Thread(target=train_step, args=(engine,))
    step3.start()
    step3.join(0.5)
    assert step3.is_alive()  # held at its optimizer step...
    assert all(
        torch.equal(v, weights[k]) for k, v in engine.model.state_dict().items()
    )  # ...before any write
    gate.set()
    step3.join(30)
    assert not step3.is_alive()
    assert not all(
        torch.equal(v, weights[k]) for k, v in engine.model.state_dict().items()
    )  # step 3 happened
    ckpt.close()

    full = load_consolidated(tmp_path / "checkpoints" / "step_000000002")
    assert all(torch.equal(full["model"][k], v) for k, v in weights.items())
    saved_moments = [full["optim"][name] for name in ("0.weight", "0.bias", "2.weight", "2.bias")]
    for saved, expected in zip(saved_moments, moments.values()):
        assert all(torch.equal(saved[k], expected[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_meta_names_the_hash_and_every_file_carries_it(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    train_step(engine)
    ckpt.save(1, {})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "step_000000001"
    meta = store.read_meta(step_dir)
    assert meta["hash"] == store.HASH == "xxh3_128"
    for name, entry in meta["files"].items():
        assert set(entry) == {"size", "xxh3_128"} and store.file_digest(step_dir / name) == entry


def sha256_checkpoint(step_dir) -> None:
    """Rewrite a checkpoint's meta.json as evertrain wrote it before xxh3: sha256 per file, no "hash"."""
    meta = json.loads((step_dir / "meta.json").read_text())
    meta.pop("hash")
    meta["files"] = {
        name: {"size": e["size"], "sha256": hashlib.sha256((step_dir / name).read_bytes()).hexdigest()}
        for name, e in meta["files"].items()
    }
    (step_dir / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def two_steps(tmp_path):
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path, config(), engine)
    train_step(engine)
    train_step(engine)
    ckpt.save(2, {"tokens": 2})
    ckpt.close()
    return tmp_path


def test_old_sha256_checkpoints_still_verify_and_load(two_steps):
    step_dir = two_steps / "checkpoints" / "step_000000002"
    sha256_checkpoint(step_dir)
    ckpt = CheckpointManager(two_steps, config(), toy_engine(seed=5))
    assert ckpt.resume()["step"] == 2
    ckpt.close()
    shard = next(step_dir.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        store.verify_files(step_dir, store.read_meta(step_dir))


def test_verify_size_skips_the_read_back_but_not_the_sizes(two_steps):
    from types import SimpleNamespace

    step_dir = two_steps / "checkpoints" / "step_000000002"
    shard = next(step_dir.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, other bytes
    shard.write_bytes(bytes(data))
    run = SimpleNamespace(dir=two_steps, cfg=config())
    assert "xxh3_128 does not match" in resume_error(run)
    store.verify_files(step_dir, store.read_meta(step_dir), mode="size")  # passes: sizes are right
    shard.write_bytes(bytes(data[:-4]))
    assert "size" in resume_error(SimpleNamespace(dir=two_steps, cfg=config("checkpoint.verify=size")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_on_a_side_stream_is_ordered_before_the_next_update():
    weight = torch.nn.Parameter(torch.randn(4096, 1024, device="cuda"))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    stager = staging.BackgroundStager(torch.device("cuda"), optimizer)
    try:
        for _ in range(3):
            weight.grad = torch.randn_like(weight)
            with torch.no_grad():
                weight.mul_(1.5)  # queued on the compute stream right before the save, like a step
            expected = weight.detach().clone()  # on the device, no host sync: the mul_ may still be queued
            copy = stager.stage({"w": weight.detach()})  # the side stream first waits for it
            optimizer.step()  # its pre-hook makes the compute stream wait for the copy
            staged = copy.result()["w"]
            assert staged.is_pinned() and torch.equal(staged, expected.cpu())
    finally:
        stager.close()
