"""Continuous checkpoints: asynchronous, atomic, retained, exactly resumable, reshardable.

    ckpt = CheckpointManager(run_dir, cfg, engine)
    extra = ckpt.resume()             # None on a fresh run dir; else the saved `extra` plus "step"
    ckpt.save(step, {"tokens": ..., "data": stream.state_dict()})   # returns once staged
    ckpt.close()                      # waits for the save in flight

A save gathers this rank's state dict in the caller's thread (engine collectives happen here,
nowhere else) and starts copying it to host memory without waiting for the copy (checkpoint/staging.py:
on CUDA a side stream the next optimizer step waits on, on CPU a thread the next optimizer step waits
for). One background thread does the rest: wait for the copy, write the shards (hashing them with
xxh3_128 on the way: store.HashingFile), leave a `done.<rank>` marker; rank 0 then waits for every
marker, writes meta.json, renames the temp dir into place, replaces LATEST and applies retention
(checkpoint/store.py, checkpoint/retention.py).
At most one save is in flight: the next `save` first waits for the last (once a stop was asked for,
only until the stop's deadline: then the stuck save is abandoned, see save()).

Engine state: `single` and `fsdp` write DCP (checkpoint/dcp.py), `deepspeed` its own layout
(checkpoint/deepspeed.py). Each rank also writes `train_state.<rank>.pt`: its RNG states and the
optimizer's device step. Loading picks the cheapest correct path:
  same family (single/fsdp, any world size)          -> DCP load, resharded by DCP
  deepspeed -> deepspeed, same world size and stage  -> DeepSpeed's load_checkpoint
  anything else (stage, world size or engine change) -> checkpoint/slices.py: every rank reads only
                                                        the slices of each parameter it will hold
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import evertrain
from evertrain.pretrain.checkpoint import retention, store
from evertrain.pretrain.checkpoint.retention import apply_retention, is_pinned, pin, unpin
from evertrain.pretrain.checkpoint.safe_load import first_line
from evertrain.pretrain.checkpoint.store import CheckpointError, latest_checkpoint, read_meta
from evertrain.pretrain.config import Config, config_hash, model_hash, model_shape, to_dict
from evertrain.pretrain.distributed import collective_failed

__all__ = [
    "CheckpointManager",
    "CheckpointError",
    "SaveTimings",
    "load_consolidated",
    "check_model",
    "latest_checkpoint",
    "read_meta",
    "pin",
    "unpin",
    "is_pinned",
    "apply_retention",
]

DCP_ENGINES = ("single", "fsdp")
STOP_POLL_S = 0.05  # how soon a save waiting for the previous one notices a stop


@dataclass
class SaveTimings:
    """Where a save's seconds went; the background parts are complete once `wait()` returned."""

    blocked: float = 0.0  # save() held up the caller: waiting for the previous save, gathering the state
    copy: float = 0.0  # the writer waited for the host copy (which runs while training goes on)
    write: float = 0.0  # this rank's shards and train_state on disk, fsynced
    write_cpu: float = 0.0  # CPU seconds the writer thread spent on that (bench/checkpoint.py (c))
    hash: float = 0.0  # the done marker (the content hash is computed while writing, in `write`)
    commit: float = 0.0  # rank 0: the other ranks' markers, meta.json, rename, LATEST, retention


class CheckpointManager:
    """Saves and restores one engine's full training state in `run_dir/checkpoints/`."""

    def __init__(self, run_dir: str | Path, cfg: Config, engine):
        self.cfg = cfg
        self.engine = engine
        self.dir = Path(run_dir) / "checkpoints"
        with engine.roll_call.guard("the checkpoint manager's start-up"):  # a broadcast, a new group
            self.nonce = shared_nonce(engine.world_size)  # names this process's temp dirs
            if engine.name == "deepspeed":
                from evertrain.pretrain.checkpoint.deepspeed import DeepSpeedState

                self.state = DeepSpeedState(engine, self.dir, self.nonce)
            else:
                from evertrain.pretrain.checkpoint.dcp import DcpState

                self.state = DcpState(engine, cfg.train.collective_timeout_s)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evertrain-ckpt")
        self._in_flight: Future | None = None
        self._in_flight_step = 0
        self._cleaned = False
        self.timings = SaveTimings()  # of the last save
        self.bytes_read = 0  # checkpoint bytes this rank read in its last slice-wise load
        self.abandoned = False  # a save was given up at a stop: exit without waiting for its thread
        self.stop_committed = False  # the stop's checkpoint is committed: a further signal loses nothing
        self.pin_watch = retention.PinWatch()  # lease expiry on this process's clock

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, extra: dict, stop: Callable[[], float | None] | None = None) -> bool:
        """Stage this rank's state for `step` and write it in the background. Every rank calls it.

        It first waits for the previous save. `stop`, if given, returns the stop's deadline
        (time.monotonic()) once a stop was asked for, else None: from then on that wait ends at the
        deadline, and if any rank's previous save is still not written by then it is abandoned (all
        ranks decide together) and nothing is staged: False, the caller stops at once (a stuck write
        must not hold the stop past the launcher's grace). True otherwise."""
        started = time.perf_counter()
        if not self._wait_unless_stopped(stop):
            return False
        if step <= 0:
            return True  # nothing trained: the step-0 weights are the seeded init
        if (self.dir / store.step_dir_name(step) / store.META).is_file():
            return True  # committed already (a run resumed at its last step and stopped at once)
        json.dumps(extra)  # meta.json holds it: fail here, in the caller, if it is not JSON-able
        if self.engine.is_main and not self._cleaned:
            store.remove_stale_tmp_dirs(self.dir, self.nonce)  # on the first save: resume reads only
            self._cleaned = True
        tmp = store.tmp_dir_for(self.dir, step, self.nonce)
        tmp.mkdir(parents=True, exist_ok=True)
        copy, write = self.state.stage(tmp)
        train_state = {
            "step": step,
            "optimizer_step": int(self.engine.optimizer.step_count),
            "rng": rng_state(),
        }
        meta = self._meta(step, extra) if self.engine.is_main else None
        self.timings = SaveTimings()
        self._in_flight = self._writer.submit(
            self._write_and_commit, tmp, copy, write, train_state, meta, self.timings
        )
        self._in_flight_step = step
        if not self.cfg.checkpoint.async_save:
            self.wait()
        self.timings.blocked = time.perf_counter() - started
        return True

    def _wait_unless_stopped(self, stop: Callable[[], float | None] | None) -> bool:
        """Wait for the save in flight; once `stop()` names a deadline, only until then. Polled,
        because a signal handler cannot cut short a thread's wait on a future."""
        if stop is None:
            return self.wait()
        written = True
        while self._in_flight is not None and not self._in_flight.done():
            deadline = stop()
            if deadline is not None:
                written = self.wait(deadline)
                break
            futures_wait([self._in_flight], timeout=STOP_POLL_S)
        if written:
            self.wait()  # done already: clears it, re-raises its error
        # a rank that gave up must not leave the others in the next collective of a save it skips
        return not self.engine.min_max_over_ranks(int(not written))[1]

    def _meta(self, step: int, extra: dict) -> dict:
        cfg = to_dict(self.cfg)
        return {
            "step": step,
            "tokens": extra.get("tokens"),
            "data": extra.get("data"),
            "extra": extra,
            "schedule": cfg["optim"],
            "model": cfg["model"],
            "engine": self.engine.name,
            "world_size": self.engine.world_size,
            "zero_stage": self.state.zero_stage if self.engine.name == "deepspeed" else None,
            "config_hash": config_hash(self.cfg),
            "model_hash": model_hash(self.cfg),
            "hash": store.HASH,
            "created": time.time(),
            "evertrain_version": evertrain.__version__,
        }

    def _write_and_commit(
        self, tmp: Path, copy: Future, write, train_state: dict, meta: dict | None, timings: SaveTimings
    ) -> None:
        """Background thread: no collectives but DCP's own on its gloo group, only files."""
        try:
            self._write_and_commit_files(tmp, copy, write, train_state, meta, timings)
        except OSError:
            if self.engine.world_size == 1:  # no other rank writes there: free what a full disk needs
                shutil.rmtree(tmp, ignore_errors=True)
            raise  # wait() reports it in one line; the previous checkpoint stays LATEST

    def _write_and_commit_files(
        self, tmp: Path, copy: Future, write, train_state: dict, meta: dict | None, timings: SaveTimings
    ) -> None:
        started = time.perf_counter()
        staged = copy.result()
        timings.copy, started = time.perf_counter() - started, time.perf_counter()
        rank = self.engine.rank
        own = f"train_state.{rank}.pt"
        cpu = time.thread_time()
        with zip_crc32_off():
            hashed = write(staged)  # {name: digest}, hashed on the way to the files
            with store.HashingFile(tmp / own, hashed) as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
        timings.write, started = time.perf_counter() - started, time.perf_counter()
        timings.write_cpu = time.thread_time() - cpu
        files = {name: hashed[name] for name in [*self.state.own_files(tmp), own]}
        store.write_done_marker(tmp, rank, files)
        timings.hash, started = time.perf_counter() - started, time.perf_counter()
        if meta is None:
            return
        files = store.wait_for_done_markers(tmp, self.engine.world_size)
        for path in sorted(tmp.rglob("*")):  # what no rank claimed, e.g. DeepSpeed's recovery script
            name = path.relative_to(tmp).as_posix()
            if path.is_file() and name not in files and not name.startswith("done."):
                files[name] = store.file_digest(path)
        store.commit(tmp, {**meta, "files": files})
        c = self.cfg.checkpoint
        try:  # the checkpoint is committed: a filesystem hiccup in cleaning up must not kill training
            retention.apply_retention(self.dir, c.keep_last, c.keep_every, watch=self.pin_watch)
        except OSError as exc:
            retention.report(f"skipped at step {meta['step']} ({exc}); retrying at the next save")
        timings.commit = time.perf_counter() - started

    def wait(self, deadline: float | None = None) -> bool:
        """Block until the save in flight (if any) is written; re-raise its error here. With a
        `deadline` (time.monotonic()), give up waiting then: False, and the save is abandoned."""
        if self._in_flight is None:
            return True
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            self._in_flight.result(timeout=timeout)
        except FutureTimeout:
            self.abandoned = True
            return False
        except OSError as exc:  # a full or failing disk: the previous checkpoint stays LATEST
            where = exc.filename or self.dir
            raise CheckpointError(
                f"{where}: checkpoint write failed ({exc.strerror or exc}); the previous "
                f"checkpoint is intact and stays LATEST"
            ) from None
        except RuntimeError as exc:  # the write's collectives (DCP's group) gave up: name who is missing
            if not collective_failed(exc):
                raise
            step = self._in_flight_step
            self.engine.roll_call.check(f"the write of checkpoint step {step}", exc)
            raise CheckpointError(  # all ranks came: the collective failed for another reason
                f"{self.dir}: checkpoint write of step {step} failed ({first_line(exc)}); the previous "
                f"checkpoint is intact and stays LATEST"
            ) from None
        finally:
            if not self.abandoned:
                self._in_flight = None
        return True

    def save_before(self, step: int, extra: dict, deadline: float) -> bool:
        """The stop's save, within a budget: finish the save in flight, save `step` unless the last
        save took longer than the time left (all ranks decide together), and wait for it until
        `deadline`. False when a write was abandoned: the last committed checkpoint stays LATEST."""
        if not self.wait(deadline):
            self.engine.min_max_over_ranks(1)  # the others may still be deciding whether to save
            return False
        last = self.timings
        needed = last.copy + last.write + last.hash + last.commit  # the previous save's background time
        skip = int(needed > deadline - time.monotonic())
        if self.engine.min_max_over_ranks(skip)[1]:
            self.stop_committed = True  # the newest committed checkpoint is the one to resume from
            return True
        self.save(step, extra)
        self.stop_committed = self.wait(deadline)
        return self.stop_committed

    def close(self) -> None:
        """Wait for the save in flight, except one abandoned at a stop (see pretrain.py)."""
        try:
            if not self.abandoned:
                self.wait()
        finally:
            self._writer.shutdown(wait=not self.abandoned)
            self.state.close()

    # -- loading ---------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        return store.latest_checkpoint(self.dir)

    def resume(self) -> dict | None:
        """Load the run's latest checkpoint, if any; returns its `extra` with "step"."""
        self.wait()
        step_dir = self.latest()
        return None if step_dir is None else self.load(step_dir)

    def load(self, step_dir: str | Path) -> dict:
        """Load any committed checkpoint (another run's too, e.g. a fork's source) into the engine.

        Checked first, before anything changes: the model shape and every file's checksum. The run
        dir is left as it was (conversions go through temp dirs that are removed).
        """
        step_dir = Path(step_dir)
        meta = store.read_meta(step_dir)
        check_model(step_dir, meta, self.cfg)
        # every rank loads together (checks, DCP's or DeepSpeed's collectives): one that does not is named
        with self.engine.roll_call.guard(f"the load of checkpoint {step_dir.name}"):
            self._verify(step_dir, meta)
            source, target = meta["engine"], self.engine.name
            if source in DCP_ENGINES and target in DCP_ENGINES:
                self.state.load(step_dir)
            elif source == target == "deepspeed" and self._deepspeed_native(meta):
                self.state.load(step_dir)
            else:
                from evertrain.pretrain.checkpoint.slices import open_reader

                reader = open_reader(step_dir, meta)
                self.state.load_slices(reader, source=step_dir)
                self.bytes_read = reader.bytes_read
            self._restore_train_state(step_dir, meta)
            self.engine.barrier(f"the end of loading checkpoint {step_dir.name}")
        return {**meta["extra"], "step": meta["step"]}

    def _deepspeed_native(self, meta: dict) -> bool:
        """DeepSpeed's own load_checkpoint: same stage and world size (without ZeRO, any world size)."""
        stage = self.state.zero_stage
        return meta["zero_stage"] == stage and (meta["world_size"] == self.engine.world_size or stage == 0)

    def _verify(self, step_dir: Path, meta: dict) -> None:
        """Every file's size, and its content hash unless checkpoint.verify=size; the work split
        over the ranks; all ranks raise together."""
        names = sorted(meta["files"])[self.engine.rank :: self.engine.world_size]
        error = None
        try:
            store.verify_files(step_dir, meta, names, mode=self.cfg.checkpoint.verify)
        except CheckpointError as exc:
            error = str(exc)
        if self.engine.world_size > 1:
            errors = [None] * self.engine.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise CheckpointError(error)

    def _restore_train_state(self, step_dir: Path, meta: dict) -> None:
        """The optimizer's step, and this rank's RNG streams when the world size is unchanged."""
        self.engine.optimizer.set_step(meta["step"])
        own = step_dir / f"train_state.{self.engine.rank}.pt"
        if (
            meta["world_size"] == self.engine.world_size
            and meta["engine"] == self.engine.name
            and own.is_file()
        ):
            try:
                state = torch.load(own, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{own}: refused: {first_line(exc)}") from None
            set_rng_state(state["rng"])


def load_consolidated(step_dir: str | Path, verify: bool = True) -> dict:
    """Any checkpoint as engine-neutral full CPU tensors, in this process:
    {"model": {name: tensor}, "optim": {name: {"exp_avg", "exp_avg_sq"}}, "step", "extra", "meta"}.
    For exports and tools; loading into an engine reads only each rank's slices instead."""
    from evertrain.pretrain.checkpoint.slices import open_reader

    step_dir = Path(step_dir)
    meta = store.read_meta(step_dir)
    if verify:
        store.verify_files(step_dir, meta)
    full = open_reader(step_dir, meta).read_full()
    return {**full, "step": meta["step"], "extra": meta["extra"], "meta": meta}


@contextlib.contextmanager
def zip_crc32_off():
    """torch.save without the CRC32 of every record in its zip container, for the checkpoint writer.

    That CRC is a second pass over every byte, in one thread (0.4 GB: ~0.3 s of a ~0.6 s write here),
    and protects nothing we rely on: torch.load does not check it, and meta.json's per-file hash
    (store.HASH), verified on load, covers the whole file. The files stay torch.save zips, so every
    reader is unchanged and old checkpoints load as before. torch keeps this setting per thread
    (its config overrides are thread-local, torch/utils/_config_module.py): it is off only in the
    writer thread, while it writes; a torch.save in any other thread keeps its CRC. (Were it
    process-wide, as in older torch, another thread's torch.save meanwhile would only write zero
    CRCs, which torch.load reads alike.)"""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def check_model(step_dir: Path, meta: dict, cfg: Config) -> None:
    """A checkpoint loads only into the model shape it was written for."""
    if meta["model_hash"] == model_hash(cfg):
        return
    ours = model_shape(cfg)
    theirs = meta.get("model", {})
    diffs = [f"{key} {theirs.get(key)} vs {ours[key]}" for key in ours if theirs.get(key) != ours[key]]
    raise CheckpointError(
        f"{step_dir}: written for a different model: {', '.join(diffs) or 'model hash differs'} "
        "(checkpoint vs config)"
    )


def shared_nonce(world_size: int) -> str:
    """A random tag for this process group's temp dirs, the same on every rank (main thread)."""
    nonce = [secrets.token_hex(4)]
    if world_size > 1:
        dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


def rng_state() -> dict:
    """Every RNG a training step might draw from, in a form torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
