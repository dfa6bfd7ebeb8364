"""Run by tests/test_scale.py in a subprocess (the fake process group must not leak into other tests):

    python tests/fake_pg_build.py WORLD RANK JOBS_JSON

One fake process group of WORLD ranks (this process plays RANK). Each job
{"config": path, "overrides": [...], "replicate": R, "materialize": bool} builds the config's model
on the meta device and fully_shards it as the FSDP2 engine does; the output (one JSON line) has, per
job, this rank's local shard numel per parameter, the plan's, and the seconds taken, plus the
process's peak RSS. A job small enough to materialise is also materialised and initialised shard by
shard, and its shards are compared with the slices of a single-process model.
"""

import json
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.testing._internal.distributed.fake_pg import FakeStore

from evertrain.pretrain.config import load_config
from evertrain.pretrain.engines.base import meta_model
from evertrain.pretrain.engines.fsdp import fsdp_mesh, shard_model
from evertrain.pretrain.model.plan import make_plan, shard_numel
from evertrain.pretrain.model.transformer import Transformer


def run_job(world: int, job: dict) -> dict:
    replicate = job.get("replicate", 1)
    cfg = load_config(job["config"], [f"engine.replicate={replicate}", *job.get("overrides", [])])
    start = time.perf_counter()
    model = meta_model(cfg)
    shard_model(
        model,
        fsdp_mesh("cpu", world, replicate),
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    local = {name: p.to_local().numel() for name, p in model.named_parameters()}
    seconds = time.perf_counter() - start
    plan = make_plan(cfg, 1, world, engine="fsdp")
    out = {
        "local": local,
        "seconds": seconds,
        "plan_parameters_bytes": plan.device["parameters"],
        "planned": {
            name: shard_numel(tuple(p.shape), plan.shard_group) for name, p in model.named_parameters()
        },
    }
    if job.get("materialize"):
        model.to_empty(device="cpu")
        model.init_weights(cfg.train.seed)
        reference = Transformer(cfg.model, seed=cfg.train.seed).state_dict()
        out["mismatched"] = []
        for name, p in model.named_parameters():
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            expected = reference[name][tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            if not torch.equal(p.to_local(), expected):
                out["mismatched"].append(name)
        out["tied"] = model.lm_head.weight is model.embed_tokens.weight
    return out


def main(world: int, rank: int, jobs: list[dict]) -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    results = [run_job(world, job) for job in jobs]
    dist.destroy_process_group()
    print(
        json.dumps({"jobs": results, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
