"""Each private torch API evertrain uses has a public fallback (evertrain/torch_compat.py): hide the
private name, as a torch release without it would, and the fallback must give what the private one
gives."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from evertrain import torch_compat
from evertrain.kernels.adamw import adamw_torch

REPO = Path(__file__).resolve().parents[1]


def _twin_steps(dtype, found_inf_at: int | None):
    """Four steps of the torch twin (the only user of the foreach/fused ops) on two tensors."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(37, generator=gen).to(dtype), torch.randn(8, 5, generator=gen).to(dtype)]
    m = [torch.zeros(p.shape) for p in params]
    v = [torch.zeros(p.shape) for p in params]
    for step in range(1, 5):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        found_inf = None if found_inf_at is None else torch.tensor(float(step == found_inf_at))
        adamw_torch(
            params,
            grads,
            m,
            v,
            [0.1, 0.0],
            lr=torch.tensor(1e-2),
            step=torch.tensor(step),
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            grad_scale=torch.tensor(0.5),
            found_inf=found_inf,
        )
    return [t.clone() for t in params + m + v]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("found_inf_at", [None, 3])
def test_adamw_twin_without_private_foreach_and_fused_ops(monkeypatch, dtype, found_inf_at):
    expected = _twin_steps(dtype, found_inf_at)
    for name in ("_fused_adamw_", "_foreach_mul", "_foreach_copy_"):
        monkeypatch.delattr(torch, name)
    got = _twin_steps(dtype, found_inf_at)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 2**-8)


def test_state_dict_stager_without_dcp_stager(monkeypatch):
    source = {
        "model": {"w": torch.randn(4, 6), "t": torch.randn(6, 4).t()},
        "steps": [1, torch.tensor(3)],
        "extra": ("a", 2.5),
    }
    expected = torch_compat.state_dict_stager(pin_memory=False).stage(source)
    monkeypatch.setitem(sys.modules, "torch.distributed.checkpoint._state_dict_stager", None)  # import fails
    stager = torch_compat.state_dict_stager(pin_memory=False)
    assert isinstance(stager, torch_compat.CopyStager)
    staged = stager.stage(source)
    source["model"]["w"].add_(1.0)  # a copy, not a view
    torch.testing.assert_close(staged["model"]["w"], expected["model"]["w"])
    torch.testing.assert_close(staged["model"]["t"], expected["model"]["t"])
    assert staged["model"]["t"].stride() == source["model"]["t"].stride()
    assert staged["steps"][0] == 1 and int(staged["steps"][1]) == 3 and tuple(staged["extra"]) == ("a", 2.5)


@pytest.mark.parametrize("path", [("a", "b", "c"), ("a", 2, "x"), ("opt", "state", 0), ("x",)])
def test_set_element_without_dcp_traverse(monkeypatch, path):
    expected = {"a": {"b": {}}}
    torch_compat.set_element(expected, path, 7)
    monkeypatch.setitem(sys.modules, "torch.distributed.checkpoint._traverse", None)
    got = {"a": {"b": {}}}
    torch_compat.set_element(got, path, 7)
    assert got == expected


@pytest.mark.parametrize("rank", [None, 3])
def test_dcp_metadata_path_without_reader_method(monkeypatch, tmp_path, rank):
    expected = torch_compat.dcp_metadata_path(FileSystemReader(str(tmp_path)), rank)
    monkeypatch.delattr(FileSystemReader, "_get_metadata_path")
    assert Path(torch_compat.dcp_metadata_path(FileSystemReader(str(tmp_path)), rank)) == Path(expected)


def test_aten_ops_leaves_out_what_this_build_lacks():
    ops = torch_compat.aten_ops(
        ["mm", "_scaled_dot_product_flash_attention_for_cpu", "_no_such_attention_op"]
    )
    assert ops == {
        torch.ops.aten.mm.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }


DTENSOR_CHILD = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from evertrain import torch_compat

    world, rank = 6, int(sys.argv[1])
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    flat, grid = init_device_mesh("cpu", (6,)), init_device_mesh("cpu", (2, 3), mesh_dim_names=("r", "s"))
    cases = [(flat, (Shard(0),), (13, 5)), (flat, (Shard(1),), (4, 3)), (flat, (Replicate(),), (7,)),
             (flat, (Shard(0),), (2, 9)), (grid, (Replicate(), Shard(0)), (10, 4)),
             (grid, (Shard(0), Shard(0)), (11, 3)), (grid, (Shard(1), Shard(0)), (7, 5))]
    out = []
    for mesh, placements, shape in cases:
        private = torch_compat.local_shape_and_offset(shape, mesh, placements)
        sys.modules["torch.distributed.tensor._utils"] = None  # hide it: the public fallback runs
        public = torch_compat.local_shape_and_offset(shape, mesh, placements)
        del sys.modules["torch.distributed.tensor._utils"]
        out.append([list(map(list, private)), list(map(list, public))])
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def test_local_shape_and_offset_without_dtensor_utils():
    """Uneven and empty last shards, two placements on one dim: every rank of a fake 6-rank world."""
    for rank in (0, 4, 5):
        proc = subprocess.run(
            [sys.executable, "-c", DTENSOR_CHILD, str(rank)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for private, public in json.loads(proc.stdout.strip().splitlines()[-1]):
            assert public == private, (rank, private, public)


STORE_CHILD = textwrap.dedent("""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d
    from evertrain import torch_compat

    dist.init_process_group("gloo", rank=0, world_size=1)  # env://, as every launcher evertrain supports
    private = torch_compat.default_store(30)
    private.set("from_private", "1")
    del distributed_c10d._get_default_store  # hide it: the public fallback runs
    public = torch_compat.default_store(30)
    public.set("from_public", "2")
    print(public.get("from_private").decode(), private.get("from_public").decode())
    dist.destroy_process_group()
""")


def test_default_store_without_get_default_store():
    """The fallback reaches the default group's own keys, both ways."""
    from conftest import free_port

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", STORE_CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "MASTER_PORT": free_port(), "RANK": "0", "WORLD_SIZE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "1 2"


ALLOW_LIST_CHILD = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem

    dcp.save({"w": torch.ones(4)}, checkpoint_id=sys.argv[1])  # this torch's metadata pickle
    del filesystem._StorageInfo, torch.serialization._get_layout  # a torch without them
    from evertrain.pretrain.checkpoint import safe_load
    from evertrain.pretrain.checkpoint.store import CheckpointError

    assert not {k for k in safe_load._DCP_CLASSES if k[1] in ("_StorageInfo", "_get_layout")}
    try:
        safe_load.read_dcp_metadata(sys.argv[1] + "/.metadata")
    except CheckpointError as exc:
        print(exc)
    else:
        print("read")
""")


def test_metadata_allow_list_without_private_storage_names(tmp_path):
    """The allow-list names torch's private `_StorageInfo` / `_get_layout` only where this torch has
    them: without them safe_load still imports, and a metadata pickle that refers to one is refused in
    one line naming it (not an AttributeError at import, not an unpickler that resolves a missing name)."""
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", ALLOW_LIST_CHILD, str(tmp_path / "ckpt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert "refused: refers to torch." in line and ("_get_layout" in line or "_StorageInfo" in line), line
