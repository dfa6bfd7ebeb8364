"""scripts/demo.sh end to end, as a newcomer runs it but small: DeepSpeed x2 trains the tiny config for
100 steps into a run dir that does not exist yet (not even its parent); a file is appended to its data
dir once it has a checkpoint at step 20, and the run takes it at a later checkpoint (a checkpoint every
20 steps leaves the append 60 steps to land); the forker started beside it waits for the run dir and
forks cooldowns from steps 20, 60 and 100; the report marks the data versions and draws its PNG; the
script prints its own wall time."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_appends_forks_and_reports(tiny_data, corpus_files, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    more = tmp_path / "more.txt"  # a play the tiny data does not hold
    more.write_text(corpus_files.train[-1].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLL_S": "0.5", "APPEND": str(more)}
    proc = subprocess.run(
        [
            "bash",
            "scripts/demo.sh",
            "--config",
            "configs/tiny.yaml",
            "--steps",
            "100",
            "--at",
            "20,60,100",
            "--append-at",
            "20",
            "--run",
            str(run_dir),
            "--data",
            str(data),
            "--bin",
            str(Path(sys.executable).parent),
            "--",
            "model.vocab_size=512",
            "eval.every_steps=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "[forker] forker: waiting up to" in output  # it really started before the run dir existed
    assert f"[append] appended to {data}: version 2" in output
    for step in (20, 60, 100):
        result = json.loads(
            (run_dir / "cooldowns" / f"from_{step:09d}_1-sqrt_{step // 5}" / "result.json").read_text()
        )
        assert result["from_step"] == step and result["cooldown_steps"] == step // 5
        assert result["val_loss"] > 0 and result["tokens"] > 0

    # the run took the appended shards at a checkpoint after the append, said so, and the report marks it
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    versions = [r["data_version"] for r in records if r["kind"] == "train"]
    assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
    first_v2 = next(r["step"] for r in records if r["kind"] == "train" and r["data_version"] == 2)
    assert 20 < first_v2 <= 100  # from a checkpoint after the one at step 20 that triggered the append
    assert re.search(r"step \d+ \| data v2: the shards appended to the data dir joined the stream", output)
    first = next(r["step"] for r in records if r["kind"] == "train")
    assert f"data: v1 from step {first}, v2 from step {first_v2}" in proc.stdout
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: " in proc.stdout
    assert re.search(r"^== demo done in \d+m\d\ds wall", proc.stdout, re.MULTILINE)
    # what a user sees of DeepSpeed has none of the noise that does not apply to this run
    assert "untested optimizer" not in output and "FutureWarning" not in output
