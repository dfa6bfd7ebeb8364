"""bench/gpu_check.py must not rot between the rare days a GPU is lent: its CPU smoke run walks every
section's code path at toy sizes (Triton under its interpreter) and must finish with no failure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402  (bench/ is not a package)

SECTIONS = ("adamw_match", "adamw_bench", "sdpa_backend", "sync_audit", "throughput", "checkpoint")
LAYOUTS = ("aligned", "unaligned", "fsdp_last_shard", "ds_partition")


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("gpu_check: python ") and ", deepspeed " in proc.stdout.splitlines()[0]
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["smoke"] is True and raw["failures"] == []
    assert list(raw["sections"]) == list(SECTIONS)
    for name, section in raw["sections"].items():
        assert section["error"] is None, (name, section["error"])
    # the figures each section exists to produce are there
    match = raw["sections"]["adamw_match"]["raw"]
    assert {f"{d}/{layout}" for d in ("float32", "bfloat16") for layout in LAYOUTS} == set(match)
    assert match["float32/unaligned"]["param"] <= 1e-5 and match["float32/fsdp_last_shard"]["param"] <= 1e-5
    assert match["float32/aligned"]["vector_path"] and not match["float32/unaligned"]["vector_path"]
    assert all(n % 16 == 0 for n in match["float32/aligned"]["sizes"])
    assert raw["sections"]["adamw_match"]["raw"]["bfloat16/aligned"]["reference"] == "our torch twin"
    assert {"ours triton", "torch fused"} <= {k.split("/")[1] for k in raw["sections"]["adamw_bench"]["raw"]}
    assert all(
        r["back_to_back_ms"] > 0 and r["host_issue_ms"] > 0
        for r in raw["sections"]["adamw_bench"]["raw"].values()
    )
    audit = raw["sections"]["sync_audit"]["raw"]
    assert {"single", "fsdp", "deepspeed ZeRO-2", "deepspeed ZeRO-3"} == set(
        audit
    )  # deepspeed is in the venv
    for name in ("single", "fsdp"):
        assert audit[name]["counts"]["train step"] == {} and audit[name]["counts"]["log step"]["value"] >= 2
    assert set(audit["deepspeed ZeRO-3"]["counts"]) == {
        "train step",
        "log step",
        "eval",
        "checkpoint save",
        "step after save",
    }
    assert raw["sections"]["sdpa_backend"]["raw"]["8b"] != "math"
    assert "eager" in raw["sections"]["throughput"]["raw"]
    assert raw["sections"]["checkpoint"]["raw"]["async_s"] > 0
    assert (
        0
        < raw["sections"]["checkpoint"]["raw"]["disk_bytes"]
        <= raw["sections"]["checkpoint"]["raw"]["budget_bytes"]
    )
    assert all(r["left_gib"] == 0.0 for r in raw["sections"]["throughput"]["raw"].values())
    report = (tmp_path / "gpu_check.md").read_text()
    assert "all checks held" in report and "CPU smoke run" in report


def test_gpu_check_without_cuda_refuses_the_full_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_sync_counter_counts_explicit_synchronize_and_value_reads_of_this_thread_only(monkeypatch):
    # as on a CUDA machine: the explicit waits exist and return at once
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", lambda self: None)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", lambda self: None)
    x = torch.ones(3)
    with gpu_check.SyncCounter(torch.device("cpu")) as counter:
        torch.cuda.synchronize()  # outside a phase: not counted
        with counter.counting("step"):
            torch.cuda.synchronize()
            torch.cuda.Stream.synchronize(object())  # what stream.synchronize() calls
            torch.cuda.Event.synchronize(object())
            x.sum().item()
            other = threading.Thread(target=lambda: (torch.cuda.synchronize(), x.sum().item()))
            other.start()
            other.join()  # another thread's waits are its own (the Prefetcher, the checkpoint writer)
    assert counter.counts == {"step": {"synchronize": 3, "value": 1}}
    assert torch.cuda.synchronize.__name__ == "<lambda>"  # restored on exit


def test_checkpoint_disk_budget_keeps_layers_until_one_checkpoint_does_not_fit():
    per_layer = 10**8  # parameters per layer: 1.2 GB of checkpoint per layer

    def n_params_of(layers):
        return layers * per_layer

    assert gpu_check.checkpoint_layers(n_params_of, 12, 15 * 10**9, 10**12) == (12, 12 * 12 * per_layer)
    assert gpu_check.checkpoint_layers(n_params_of, 16, 15 * 10**9, 10**12) == (12, 12 * 12 * per_layer)
    assert gpu_check.checkpoint_layers(n_params_of, 16, 15 * 10**9, 10 * 10**9)[0] == 4  # half the free disk
    with pytest.raises(RuntimeError, match="not even one layer fits"):
        gpu_check.checkpoint_layers(n_params_of, 16, 10**9, 10**12)


def test_report_json_survives_a_nan_loss(tmp_path):
    report = gpu_check.Report(device="test", smoke=True)
    report.section("throughput")["raw"]["eager"] = {"loss": float("nan"), "step_s": float("inf"), "mfu": None}
    report.check("throughput", False, "eager: finite loss")
    gpu_check.write_report(tmp_path, report, {"deepspeed": "absent"}, 1.0)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    raw = json.loads((tmp_path / "gpu_check.json").read_text(), parse_constant=refuse)
    assert raw["sections"]["throughput"]["raw"]["eager"]["loss"] is None
    assert "sections.throughput.raw.eager.loss" in raw["nonfinite"] and raw["failures"]


def test_versions_line_and_a_missing_deepspeed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() would set it for the rest of this process
    real = gpu_check.version_of
    monkeypatch.setattr(gpu_check, "version_of", lambda m: "absent" if m == "deepspeed" else real(m))
    assert gpu_check.main(["--cpu-smoke", "--only", "sdpa_backend", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}")
    assert "deepspeed absent" in lines[0] and "gpu none (CPU smoke run)" in lines[0]
    assert lines[1].startswith("gpu_check: deepspeed absent: its sync_audit rows are skipped")
    assert real("surely_no_such_package_here") == "absent"
    assert gpu_check.main(["--cpu-smoke", "--only", "nope", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_match_layouts_are_the_shard_layouts_they_claim(layout):
    sizes, how = gpu_check.match_layouts(smoke=False)[layout]
    params = gpu_check.place([torch.zeros(n) for n in sizes], how, torch.device("cpu"), torch.float32)
    if layout == "aligned":
        assert all(n % 16 == 0 for n in sizes) and all(p.data_ptr() % 16 == 0 for p in params)
    if layout == "unaligned":
        assert all(p.storage_offset() == 1 for p in params[:1])
    if layout == "fsdp_last_shard":  # shorter than the others, and one of them not a multiple of 16
        assert any(n % 16 for n in sizes)
    if layout == "ds_partition":
        assert len(params) == 1 and params[0].storage_offset() == sizes[0] > 0
        assert sizes[0] * gpu_check.MATCH_WORLD >= sum(gpu_check.match_layouts(False)["unaligned"][0])
    assert math.prod(params[0].shape) == sizes[0]


def test_a_missing_triton_skips_the_kernel_rows_in_one_line_each(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    real = gpu_check.version_of
    monkeypatch.setattr(gpu_check, "version_of", lambda m: "absent" if m == "triton" else real(m))
    assert gpu_check.main(["--cpu-smoke", "--only", "adamw_match", "--out", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    assert raw["versions"]["triton"] == "absent" and raw["failures"] == []
    assert "SKIPPED: triton is not installed" in (tmp_path / "gpu_check.md").read_text()
