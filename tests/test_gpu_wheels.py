"""scripts/gpu_wheels.sh: its arguments, and the pip commands it runs (a fake pip on PATH records them
and writes the wheel a real build would). The real build needs a package index: opt in with
EVERTRAIN_NETWORK_TESTS=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_wheels.sh"

FAKE_PIP = """#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(json.dumps({"args": args, "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS")}) + "\\n")
if args[0] == "wheel" and os.environ.get("FAKE_PIP_BUILDS", "1") == "1":
    out = args[args.index("-w") + 1]
    version = [a for a in args if a.startswith("deepspeed==")][0].split("==")[1]
    open(os.path.join(out, f"deepspeed-{version}-py3-none-any.whl"), "w").close()
"""


def run(tmp_path, *args, builds=True):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "pip").write_text(FAKE_PIP)
    (bin_dir / "pip").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_PIP_LOG": str(log),
        "FAKE_PIP_BUILDS": "1" if builds else "0",
    }
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_builds_deepspeed_without_ops_and_downloads_its_dependencies_for_the_target(tmp_path):
    out = tmp_path / "wheels"
    proc, calls = run(tmp_path, str(out))
    assert proc.returncode == 0, proc.stderr
    wheel, download = calls
    assert wheel["args"][0] == "wheel" and wheel["DS_BUILD_OPS"] == "0"
    assert {"--no-deps", "--no-build-isolation", "deepspeed==0.19.8"} <= set(wheel["args"])
    assert wheel["args"][wheel["args"].index("-w") + 1] == str(out)
    args = download["args"]
    assert args[0] == "download" and "--only-binary=:all:" in args
    assert args[args.index("--python-version") + 1] == "3.12" and args[args.index("--abi") + 1] == "cp312"
    assert "manylinux2014_x86_64" in args and args[args.index("-d") + 1] == str(out)
    assert {"hjson", "msgpack", "ninja", "py-cpuinfo", "pydantic>=2.0.0", "einops", "psutil"} <= set(args)
    assert not {"torch", "numpy"} & set(args)  # the image's own: never replaced
    assert f"pip install --no-index --find-links {out} deepspeed" in proc.stdout


def test_options_reach_pip(tmp_path):
    proc, calls = run(
        tmp_path,
        str(tmp_path / "w"),
        "--deepspeed",
        "0.18.0",
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_28_aarch64",
    )
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed==0.18.0" in calls[0]["args"]
    args = calls[1]["args"]
    assert args[args.index("--python-version") + 1] == "3.11" and args[args.index("--abi") + 1] == "cp311"
    assert (
        args[args.index("--platform") + 1] == "manylinux_2_28_aarch64" and "manylinux2014_x86_64" not in args
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "usage: scripts/gpu_wheels.sh DIR"),
        (("a", "b"), "one DIR only"),
        (("a", "--bogus"), "unknown option --bogus"),
        (("a", "--deepspeed"), "usage:"),
        (("a", "--python-version", "312"), "--python-version must look like 3.12"),
    ],
)
def test_bad_arguments_are_one_error_and_run_no_pip(tmp_path, args, message):
    proc, calls = run(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr and calls == []


def test_a_build_that_left_no_wheel_fails(tmp_path):
    proc, _ = run(tmp_path, str(tmp_path / "w"), builds=False)
    assert proc.returncode == 1 and "no deepspeed-0.19.8 wheel" in proc.stderr


@pytest.mark.skipif(
    os.environ.get("EVERTRAIN_NETWORK_TESTS") != "1",
    reason="needs a package index; opt in with EVERTRAIN_NETWORK_TESTS=1",
)
def test_real_build_gives_an_installable_deepspeed_wheel(tmp_path):
    out = tmp_path / "wheels"
    env = {**os.environ, "PIP": f"{sys.executable} -m pip"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert any(n.startswith("deepspeed-0.19.8-") and n.endswith("none-any.whl") for n in names), names
    assert any(n.startswith("pydantic_core-") and "cp312" in n for n in names), names
