"""scripts/demo.sh end to end, as a newcomer runs it but small: DeepSpeed x2 trains the tiny config for
60 steps into a run dir that does not exist yet (not even its parent), the forker started beside it
waits for it and forks cooldowns from steps 20, 40 and 60, and the report draws its PNG."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_from_a_run_dir_that_does_not_exist(tiny_data, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLL_S": "0.5"}
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", "--config", "configs/tiny.yaml", "--steps", "60", "--at", "20,40,60",
         "--run", str(run_dir), "--bin", str(Path(sys.executable).parent), "--",
         f"data.path={tiny_data}", "model.vocab_size=512", "eval.every_steps=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "[forker] forker: waiting up to" in output  # it really started before the run dir existed
    for step in (20, 40, 60):
        result = json.loads((run_dir / "cooldowns" / f"from_{step:09d}_1-sqrt_{step // 5}" / "result.json").read_text())
        assert result["from_step"] == step and result["cooldown_steps"] == step // 5
        assert result["val_loss"] > 0 and result["tokens"] > 0
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: " in proc.stdout
