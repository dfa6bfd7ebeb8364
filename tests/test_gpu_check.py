"""bench/gpu_check.py must not rot between the rare days a GPU is lent: its CPU smoke run walks every
section's code path at toy sizes (Triton under its interpreter) and must finish with no failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("adamw_match", "adamw_bench", "sdpa_backend", "no_host_sync", "throughput", "checkpoint")


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["smoke"] is True and raw["failures"] == []
    assert list(raw["sections"]) == list(SECTIONS)
    for name, section in raw["sections"].items():
        assert section["error"] is None, (name, section["error"])
    # the figures each section exists to produce are there
    assert raw["sections"]["adamw_match"]["raw"]["float32/unaligned"]["param"] <= 1e-5
    assert raw["sections"]["adamw_match"]["raw"]["bfloat16/aligned"]["reference"] == "our torch twin"
    assert {"ours triton", "torch fused"} <= {k.split("/")[1] for k in raw["sections"]["adamw_bench"]["raw"]}
    assert raw["sections"]["sdpa_backend"]["raw"]["8b"] != "math"
    assert "eager" in raw["sections"]["throughput"]["raw"]
    assert raw["sections"]["checkpoint"]["raw"]["async_s"] > 0
    report = (tmp_path / "gpu_check.md").read_text()
    assert "all checks held" in report and "CPU smoke run" in report


def test_gpu_check_without_cuda_refuses_the_full_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "gpu_check.md").exists()
