"""A run's console: a banner, one plain line per log step when stderr is not a terminal (batch logs:
no `\\r`), a tqdm bar on a terminal, and a closing line that says why it stopped and where it saved."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from evertrain.pretrain.observe.console import Console, closing_line, human, start_banner, step_line

REPO = Path(__file__).resolve().parents[1]
RECORD = {
    "kind": "train",
    "step": 20,
    "tokens": 40960,
    "loss": 5.69812,
    "lr": 0.00225,
    "grad_norm": 0.9123,
    "tokens_per_s": 7312.4,
    "time": 0.0,
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_formatting():
    assert [human(n) for n in (512, 40960, 5_500_000, 1_040_000_000)] == ["512", "41K", "5.5M", "1.04B"]
    assert step_line(RECORD, 600, 3725.0) == (
        "step 20/600 | tokens 41K | loss 5.6981 | lr 0.00225 | "
        "grad_norm 0.912 | 7.31K tok/s | elapsed 1:02:05"
    )
    assert step_line(RECORD, None, 1.0).startswith("step 20 | ")
    banner = start_banner(
        params=5_500_000,
        tokens_per_step=2048,
        engine="deepspeed ZeRO-2",
        world_size=2,
        dtype="float32",
        device="cpu",
        start_step=400,
        data_path="data/x",
        data_version=3,
        run_dir="runs/demo",
    )
    assert banner == (
        "evertrain: 5.5M parameters | 2.05K tokens/step | deepspeed ZeRO-2 x2 | float32 on cpu | "
        "resumed from step 400 | data data/x v3 | run runs/demo"
    )
    assert (
        closing_line(7, "stop signal", None, "r")
        == "evertrain: stopped at step 7 (stop signal); no checkpoint saved"
    )


def test_plain_lines_off_a_terminal_and_a_bar_on_one():
    plain = io.StringIO()
    console = Console(True, 0, 40, stream=plain)
    for step in range(1, 41):
        console.advance()
        if step % 20 == 0:
            console.record({**RECORD, "step": step})
    console.record({"kind": "eval", "step": 40, "tokens": 1, "val_loss": 4.25})
    console.close()
    console.say("bye")
    lines = plain.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 20/40", "step 40/40", "step 40", "bye"]
    assert "\r" not in plain.getvalue() and lines[2] == "step 40 | eval | val_loss 4.2500"

    tty = Terminal()
    console = Console(True, 0, 40, stream=tty)
    for _ in range(40):
        console.advance()
    console.record(RECORD)
    console.close()
    assert "\r" in tty.getvalue() and "40/40" in tty.getvalue() and "step 20/40" not in tty.getvalue()

    quiet = io.StringIO()
    Console(False, 0, 40, stream=quiet).say("not on this rank")
    assert quiet.getvalue() == ""


def test_a_run_with_stderr_in_a_file_logs_one_line_per_log_step(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "stderr.log"
    argv = [
        sys.executable,
        "pretrain.py",
        "--config",
        "configs/tiny.yaml",
        "--run",
        str(run_dir),
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "train.micro_batch_size=2",
        "train.log_every=5",
        "eval.every_steps=20",
        "eval.batches=1",
        "checkpoint.every_steps=10",
        "engine.name=single",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.run(
            [*argv, "train.max_steps=20"],
            cwd=REPO,
            env=env,
            stderr=err,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    banner = next(line for line in lines if line.startswith("evertrain: ") and "parameters" in line)
    assert re.search(
        r"^evertrain: [0-9.]+K parameters \| 128 tokens/step \| single x1 \| float32 on cpu \| "
        r"fresh start \| data .* v1 \| run ",
        banner,
    ), banner
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" |")[:2] for line in steps] == [
        ["step 5/20", " tokens 640"],
        ["step 10/20", " tokens 1.28K"],
        ["step 15/20", " tokens 1.92K"],
        ["step 20/20", " tokens 2.56K"],
        ["step 20", " eval"],
    ]
    assert all(key in steps[0] for key in ("loss ", "lr ", "grad_norm ", "tok/s", "elapsed 0:00:"))
    assert lines[-1] == (
        f"evertrain: stopped at step 20 (train.max_steps=20); "
        f"last checkpoint: step 20 in {run_dir / 'checkpoints'}"
    )


def test_throughput_mfu_and_skipped_steps_on_lines_and_on_the_bar():
    record = {**RECORD, "mfu": 0.3812, "nonfinite_steps": 3}
    assert step_line(record, 600, 6.0) == (
        "step 20/600 | tokens 41K | loss 5.6981 | lr 0.00225 | grad_norm 0.912 | "
        "7.31K tok/s | MFU 38.1% | elapsed 0:00:06"
    )
    assert step_line(record, 600, 6.0, skipped=True).endswith(
        "7.31K tok/s | MFU 38.1% | skipped 3 | elapsed 0:00:06"
    )
    assert "MFU" not in step_line(RECORD, 600, 6.0)  # no peak known (CPU): no MFU, rather than a made-up one
    tty = Terminal()
    console = Console(True, 0, 40, stream=tty, skipped=True)
    console.advance()
    console.record(record)
    console.close()
    assert "tok/s=7.31K" in tty.getvalue() and "MFU=38.1%" in tty.getvalue() and "skipped=3" in tty.getvalue()


def test_a_run_started_from_a_hugging_face_checkpoint_says_so():
    common = {
        "params": 1000,
        "tokens_per_step": 128,
        "engine": "single",
        "world_size": 1,
        "dtype": "float32",
        "device": "cpu",
        "data_path": "data/x",
        "data_version": 1,
        "run_dir": "runs/ft",
    }
    banner = start_banner(start_step=0, init_from="hf:hf/llama", **common)
    assert "| initialized from hf/llama |" in banner and "fresh start" not in banner
    assert "| resumed from step 5 |" in start_banner(start_step=5, init_from="hf:hf/llama", **common)
    assert "| fresh start |" in start_banner(start_step=0, **common)


def test_appended_data_joining_the_run_is_said_once():
    plain = io.StringIO()
    console = Console(True, 0, 40, stream=plain)
    for step, version in ((10, 1), (20, 1), (30, 2), (40, 2)):
        console.record({**RECORD, "step": step, "data_version": version})
    lines = plain.getvalue().splitlines()
    said = [line for line in lines if "data v" in line]
    assert said == [
        "step 30 | data v2: the shards appended to the data dir joined the stream at the last checkpoint"
    ]
    assert lines.index(said[0]) == 2  # before the step line of the first record on the new data
