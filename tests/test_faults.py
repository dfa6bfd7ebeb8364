"""Faults and hostile input: crafted pickles, non-finite training, two trainers, swapped data,
injection strings, kills and a full disk. Each test names the defect of issue 13 it guards."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evertrain.pretrain.checkpoint import CheckpointError, CheckpointManager, load_consolidated, store
from evertrain.pretrain.checkpoint.safe_load import read_dcp_metadata, weights_only_loads
from evertrain.pretrain.config import load_config


# -- 1. no code runs from a run dir -----------------------------------------------------------------

class RunsCode:
    """A pickle that, if unpickled with plain pickle, creates `marker` (a stand-in for any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def toy_engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step_count = torch.zeros((), dtype=torch.int64)
    optimizer.set_step = lambda n: optimizer.step_count.fill_(n)
    return SimpleNamespace(name="single", rank=0, world_size=1, is_main=True, device=torch.device("cpu"),
                           model=model, raw_model=model, optimizer=optimizer, barrier=lambda: None)


def committed_checkpoint(run_dir: Path):
    cfg = load_config(None, ["model.d_model=64"])
    engine = toy_engine()
    ckpt = CheckpointManager(run_dir, cfg, engine)
    ckpt.save(1, {"tokens": 1, "data": {}})
    ckpt.close()
    return cfg, run_dir / "checkpoints" / store.step_dir_name(1)


def replace_file(step_dir: Path, name: str, data: bytes) -> None:
    """Swap a checkpoint file and fix meta.json's size and sha256, as an attacker would."""
    (step_dir / name).write_bytes(data)
    meta = json.loads((step_dir / store.META).read_text())
    meta["files"][name] = store.file_digest(step_dir / name)
    (step_dir / store.META).write_text(json.dumps(meta))


def test_crafted_dcp_metadata_runs_nothing(tmp_path):
    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    assert read_dcp_metadata(step_dir / ".metadata").state_dict_metadata  # the real one reads
    marker = tmp_path / "ran"
    replace_file(step_dir, ".metadata", pickle.dumps(RunsCode(marker)))
    for load in (lambda: CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume(),
                 lambda: load_consolidated(step_dir)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert "\n" not in str(err.value) and ".metadata: refused" in str(err.value)
    assert not marker.exists()


def test_crafted_torch_files_run_nothing_even_where_deepspeed_asks_for_a_full_unpickle(tmp_path):
    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        with weights_only_loads(evil):
            torch.load(evil, weights_only=False)  # what DeepSpeed's loaders call
    replace_file(step_dir, "train_state.0.pt", evil.read_bytes())
    with pytest.raises(CheckpointError, match="train_state.0.pt: refused"):
        CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume()
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the scope is restored
