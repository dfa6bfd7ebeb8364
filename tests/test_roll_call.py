"""The roll call names exactly the missing ranks, on every rank that is left, for more than 2 ranks.

Three plain Python processes in a gloo group over a FileStore (no pretrain.py): rank 2 is stopped or
killed before a wait that `RollCall.guard` wraps, and ranks 0 and 1 must each fail with an error
naming rank 2 and the point; when every rank arrives but the collective failed for another reason,
that error is re-raised as it was.
"""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

TIMEOUT_S = 5

CHILD = textwrap.dedent("""
    import os, signal, sys
    from datetime import timedelta
    import torch.distributed as dist
    from evertrain.pretrain.distributed import MissingRankError
    from evertrain.pretrain.roll_call import RollCall

    rank, mode, store_path, timeout_s = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    store = dist.FileStore(store_path, 3)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timedelta(seconds=timeout_s))
    roll_call = RollCall.for_default_group(timeout_s)
    with roll_call.guard("an earlier wait"):  # passes: the count of each point is its own
        dist.barrier()
    if rank == 2 and mode in ("stop", "kill"):
        os.kill(os.getpid(), signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
    try:
        with roll_call.guard("the test's wait"):
            if mode == "other":
                raise dist.DistError("a collective failed on every rank")
            dist.barrier()
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        os._exit(1)  # without destroying the group: a peer is gone
    print("passed", flush=True)
""")


def run_three(mode: str, tmp_path) -> dict[int, str]:
    """Each rank's last line of output (what it printed about the wrapped wait)."""
    store = tmp_path / "store"
    procs = {
        rank: subprocess.Popen(
            [sys.executable, "-c", CHILD, str(rank), mode, str(store), str(TIMEOUT_S)],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(3)
    }
    out = {}
    try:
        for rank in (0, 1) if mode != "other" else (0, 1, 2):
            text, _ = procs[rank].communicate(timeout=300)
            out[rank] = (text.strip().splitlines() or [""])[-1]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()  # the stopped rank 2
                proc.wait()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "kill"])
def test_every_rank_left_names_the_missing_one(mode, tmp_path):
    out = run_three(mode, tmp_path)
    for rank in (0, 1):
        assert out[rank].startswith("MissingRankError: rank(s) 2 did not reach the test's wait"), out
        assert f"train.collective_timeout_s={TIMEOUT_S}s" in out[rank]


@pytest.mark.slow
def test_a_collective_that_failed_with_every_rank_there_keeps_its_error(tmp_path):
    out = run_three("other", tmp_path)
    assert out == {rank: "DistError: a collective failed on every rank" for rank in range(3)}, out
