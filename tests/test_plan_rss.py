"""The plan (evertrain/pretrain/model/plan.py) against memory measured on CPU, where a run's memory is the
process's resident set: build a small model with the single engine, train a few steps, and compare the
growth of the peak RSS with the plan's total for that run.

Stated tolerance: plan total <= measured growth <= 2 x plan total. The lower bound catches a plan that
counts memory a run does not use (a double count); the upper bound one that misses a component as large
as everything it counts. What lies between is what the plan leaves to its reserve: the backward's
transient activation gradients, the torch AdamW's scaled-gradient copy and the allocator's overhead
(measured here: about 1.45x)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys
import torch
from evertrain.pretrain import engines
from evertrain.pretrain.config import load_config
from evertrain.pretrain.model.plan import make_plan

cfg = load_config(None, sys.argv[1:])
plan = make_plan(cfg, 1, 1, engine="single")
t, m = cfg.train, cfg.model
gen = torch.Generator().manual_seed(0)
batches = [torch.randint(0, m.vocab_size, (t.micro_batch_size * t.grad_accum, m.seq_len + 1), generator=gen)
           for _ in range(3)]
def peak_rss():  # VmHWM, this process's own peak: getrusage's ru_maxrss carries the (large) pytest parent's over exec
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

before = peak_rss()
engine = engines.create(cfg)
for batch in batches:
    engine.train_step(list(batch.split(t.micro_batch_size)))
after = peak_rss()
print(json.dumps({"growth": after - before, "plan": plan.total, "n_params": plan.n_params}))
"""

# 0.85M parameters; 4 blocks of saved activations at 4 x 1024 tokens dominate, as on a GPU
SHAPE = [
    "model.vocab_size=512",
    "model.d_model=128",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=384",
    "model.seq_len=1024",
    "train.micro_batch_size=4",
    "train.grad_accum=1",
    "train.device=cpu",
    "train.dtype=float32",
    "optim.impl=torch",
]


def test_cpu_plan_accounts_for_the_measured_peak_rss_within_the_stated_tolerance():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *SHAPE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["n_params"] <= 1_000_000
    assert r["plan"] <= r["growth"] <= 2 * r["plan"], (r["growth"] / r["plan"], r)
