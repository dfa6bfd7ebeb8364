"""Model and optimizer state of the `deepspeed` engine, in DeepSpeed's own sharded layout.

`ds_engine.save_checkpoint(checkpoints/, tag=step_X.tmp-<nonce>)` writes its usual files straight into
our temp dir (`mp_rank_00_model_states.pt`, `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, the
zero_to_fp32.py recovery script), so `ds_to_universal` and `zero_to_fp32` work on a step dir as is.

Asynchronous: DeepSpeed writes every file through `ds_engine.checkpoint_engine`. Ours,
`StagingCheckpointEngine`, copies each state dict's tensors to CPU memory when DeepSpeed hands it
over and leaves the torch.save for later; `save_checkpoint` thus returns once staged (its barriers
run in the caller's thread, as always) and the returned function writes the files from a
background thread. DeepSpeed 0.19.8's own asynchronous path (`checkpoint.writer.decoupled`) does not
stage: it hands the live tensors to a writer process and waits for it at the next optimizer step,
before the weights change, so any write longer than one forward/backward stalls training (and its
default FAST writer needs the async_io op, which is not built on these machines).

`universal_checkpoint_info` goes into the client state, so the checkpoint converts with
`python -m deepspeed.checkpoint.ds_to_universal` (no --inject_missing_state needed). A different
world size or ZeRO stage is loaded by converting to the universal format first (into a temp dir
beside the checkpoint) and loading that with DeepSpeed's universal loader.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (PARAM, UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from evertrain.pretrain.checkpoint.dcp import reusable_stager
from evertrain.pretrain.checkpoint.safe_load import weights_only_loads
from evertrain.pretrain.checkpoint.store import CheckpointError

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
# ZeRO stages whose checkpoints convert through the universal format with our AdamW. Stage 3's
# universal loader expects a per-parameter `step` in the optimizer state (ours keeps one step
# counter) and gives every param group the first group's hyperparameters; stage 0 has no ZeRO files.
CONVERTIBLE_STAGES = (1, 2)
UNIVERSAL = "universal"  # the tag (subdir) a conversion is written to
# The non-tensor objects DeepSpeed pickles into its ZeRO files; allowed explicitly so that every
# load stays weights_only=True, ours and DeepSpeed's own (through safe_load.weights_only_loads).
DEEPSPEED_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


def load_trusted(path: str | Path, map_location=None):
    """torch.load of a DeepSpeed checkpoint file, weights_only with DeepSpeed's few plain classes."""
    with weights_only_loads(path, DEEPSPEED_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


class StagingCheckpointEngine(CheckpointEngine):
    """DeepSpeed's file writer, made asynchronous: `save` stages, `write_staged` writes later.

    Staging is DCP's DefaultStager: a deep copy whose tensors land in CPU buffers that are kept and
    refilled at the next save (the previous write has finished by then).
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.name = "evertrain.StagingCheckpointEngine"
        self.stager = reusable_stager(device)
        self.staged: list[tuple[str, object]] = []

    def create(self, info):
        self.staged = []

    def save(self, state_dict, path: str):
        self.staged.append((path, self.stager.stage(state_dict)))

    def load(self, path: str, map_location=None):
        return load_trusted(path, map_location)

    def commit(self, info):
        return True

    def take_staged(self) -> list[tuple[str, object]]:
        staged, self.staged = self.staged, []
        return staged


def write_staged(staged: list[tuple[str, object]]) -> None:
    for path, state in staged:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


class DeepSpeedState:
    """Saves and loads a DeepSpeed engine's state; a step dir is a DeepSpeed checkpoint 'tag' dir."""

    def __init__(self, engine, ckpt_dir: Path, nonce: str):
        self.engine = engine
        self.ds = engine.ds_engine
        self.ckpt_dir = Path(ckpt_dir)  # temp dirs for conversions go beside the checkpoints
        self.nonce = nonce
        self.writer = StagingCheckpointEngine(engine.device)
        self.ds.checkpoint_engine = self.writer  # DeepSpeed's documented extension point
        self.written: list[str] = []

    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    def stage(self, tmp_dir: Path):
        """Run DeepSpeed's save (collectives here, in the caller's thread) and return the writer."""
        universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.ds.save_checkpoint(str(tmp_dir.parent), tag=tmp_dir.name, save_latest=False,
                                client_state={UNIVERSAL_CHECKPOINT_INFO: universal_info})
        staged = self.writer.take_staged()
        self.written = sorted(Path(path).name for path, _ in staged)
        if self.engine.is_main:  # DeepSpeed drops its recovery scripts into save_dir: keep them with the shards
            for script in RECOVERY_SCRIPTS:
                if (tmp_dir.parent / script).is_file():
                    os.replace(tmp_dir.parent / script, tmp_dir / script)
        return lambda: write_staged(staged)

    def own_files(self, tmp_dir: Path) -> list[str]:
        return self.written

    def close(self) -> None:
        self.writer.stager.close()

    def load(self, step_dir: Path) -> None:
        """Native load: same world size and ZeRO stage as the checkpoint."""
        with weights_only_loads(step_dir, DEEPSPEED_SAFE_GLOBALS):
            path, _ = self.ds.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint to load")

    def load_resharded(self, step_dir: Path, meta: dict) -> None:
        """Another world size or ZeRO stage: rank 0 converts to universal beside it, all load that."""
        if meta["zero_stage"] not in CONVERTIBLE_STAGES or self.zero_stage not in CONVERTIBLE_STAGES:
            raise CheckpointError(
                f"{step_dir}: written by ZeRO stage {meta['zero_stage']} on {meta['world_size']} ranks; load it with "
                f"exactly that (here: stage {self.zero_stage} on {self.engine.world_size}), or convert between "
                f"stages {' and '.join(map(str, CONVERTIBLE_STAGES))} only")
        work = self.ckpt_dir / f"{step_dir.name}.tmp-universal-{self.nonce}"
        self._on_main(lambda: convert_to_universal(step_dir, work))
        self._load_universal(work, source=step_dir)

    def load_full(self, full: dict, source: Path) -> None:
        """Fill this engine from an engine-neutral consolidated state (another engine's checkpoint).

        DeepSpeed is filled through one of its own layouts, and the universal one is keyed by
        parameter name: save this engine's own state as a template, convert it, swap in the
        consolidated tensors, and load that.
        """
        if self.zero_stage not in CONVERTIBLE_STAGES:
            raise CheckpointError(f"{source}: written by another engine; DeepSpeed loads that only with "
                                  f"engine.zero_stage 1 or 2, not {self.zero_stage}")
        work = self.ckpt_dir / f"consolidated.tmp-universal-{self.nonce}"
        self.stage(work / "template")()  # every rank writes its shard of the template
        self.engine.barrier()

        trained = [name for name, p in self.ds.module.named_parameters() if p.requires_grad]

        def convert_and_fill():
            write_universal_params(convert_to_universal(work / "template", work), full, trained)

        self._on_main(convert_and_fill)
        self._load_universal(work, source=work)

    def _on_main(self, fn) -> None:
        """Run `fn` on rank 0 while the others wait; if it fails, every rank raises its error."""
        error = [None]
        if self.engine.is_main:
            try:
                fn()
            except CheckpointError as exc:
                error = [str(exc)]
        if self.engine.world_size > 1:
            dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise CheckpointError(error[0])

    def _load_universal(self, work: Path, source: Path) -> None:
        try:
            self.ds._config.load_universal_checkpoint = True  # what `checkpoint.load_universal` sets
            with weights_only_loads(source, DEEPSPEED_SAFE_GLOBALS):
                path, _ = self.ds.load_checkpoint(str(work), tag=UNIVERSAL, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        self.engine.barrier()  # everyone has read it
        if self.engine.is_main:
            shutil.rmtree(work, ignore_errors=True)
        if path is None:
            raise CheckpointError(f"{source}: DeepSpeed could not load its universal conversion")


def write_universal_params(universal: Path, full: dict, trained: list[str]) -> None:
    """Replace the per-parameter files of a universal checkpoint with `full`'s tensors. Every
    trained parameter needs its moments; a tied alias (a second name of one tensor) only weights."""
    for name in trained:
        if name not in full["optim"]:
            raise CheckpointError(f"the checkpoint has no optimizer state for parameter '{name}'")
    for param_dir in sorted(p for p in (universal / "zero").iterdir() if p.is_dir()):
        name = param_dir.name
        if name not in full["model"]:
            raise CheckpointError(f"the checkpoint has no weights for parameter '{name}'")
        torch.save({PARAM: full["model"][name].float()}, param_dir / "fp32.pt")
        for key in ("exp_avg", "exp_avg_sq") if name in full["optim"] else ():
            torch.save({PARAM: full["optim"][name][key].float()}, param_dir / f"{key}.pt")


def convert_to_universal(step_dir: Path, work: Path) -> Path:
    """`ds_to_universal` in this process (one worker, no process pool), quietly; returns
    `work/universal` (the tool also drops a `latest_universal` file into `work`)."""
    from deepspeed.checkpoint import ds_to_universal

    universal = work / UNIVERSAL
    shutil.rmtree(universal, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(universal), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads(step_dir, DEEPSPEED_SAFE_GLOBALS):
            ds_to_universal.main(args)
    except CheckpointError:
        shutil.rmtree(universal, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(universal, ignore_errors=True)
        raise CheckpointError(f"{step_dir}: ds_to_universal failed: {exc}".splitlines()[0]) from exc
    return universal


def read_full_state(step_dir: Path, zero_stage: int) -> dict:
    """A DeepSpeed checkpoint as full CPU tensors by parameter name, read without writing into the
    run dir: {"model": {name: fp32}, "optim": {name: {"exp_avg", "exp_avg_sq"}}}. Stages 1-2 go through
    the universal format (in a system temp dir); of stages 0 and 3 only the weights are read."""
    if zero_stage == 0:  # no ZeRO: the weights are whole in the model states file
        module = load_trusted(step_dir / "mp_rank_00_model_states.pt")["module"]
        return {"model": {name: t.float() for name, t in module.items()}, "optim": {}}
    if zero_stage not in CONVERTIBLE_STAGES:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), weights_only_loads(step_dir, DEEPSPEED_SAFE_GLOBALS):
            model = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        return {"model": dict(model), "optim": {}}
    with tempfile.TemporaryDirectory(prefix="evertrain-universal-") as scratch:
        universal = convert_to_universal(step_dir, Path(scratch))
        full: dict = {"model": {}, "optim": {}}
        for param_dir in sorted(p for p in (universal / "zero").iterdir() if p.is_dir()):
            name = param_dir.name
            full["model"][name] = load_trusted(param_dir / "fp32.pt")[PARAM]
            moments = {key: load_trusted(param_dir / f"{key}.pt")[PARAM]
                       for key in ("exp_avg", "exp_avg_sq") if (param_dir / f"{key}.pt").is_file()}
            if moments:
                full["optim"][name] = moments
        return full
