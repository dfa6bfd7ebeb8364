"""Model and optimizer state of the `deepspeed` engine, in DeepSpeed's own sharded layout.

`ds_engine.save_checkpoint(checkpoints/, tag=step_X.tmp-<nonce>)` writes its usual files straight into
our temp dir (`mp_rank_00_model_states.pt`, `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, the
zero_to_fp32.py recovery script), so `ds_to_universal` and `zero_to_fp32` work on a step dir as is.

Asynchronous: DeepSpeed writes every file through `ds_engine.checkpoint_engine`. Ours,
`StagingCheckpointEngine`, keeps the state dicts DeepSpeed hands it and leaves the torch.save for
later; once `save_checkpoint` returns (its barriers run in the caller's thread, as always) they are
all handed to checkpoint/staging.py at once, which copies them to host memory without the caller
waiting (the next optimizer step waits for the copy; the inner optimizer's step is where DeepSpeed's
writes to weights and moments begin), and the returned function writes the files from a background
thread once the copy is complete. DeepSpeed 0.19.8's own asynchronous path (`checkpoint.writer.decoupled`) does not
stage: it hands the live tensors to a writer process and waits for it at the next optimizer step,
before the weights change, so any write longer than one forward/backward stalls training (and its
default FAST writer needs the async_io op, which is not built on these machines).

`universal_checkpoint_info` goes into the client state, so the checkpoint converts with
`python -m deepspeed.checkpoint.ds_to_universal` (no --inject_missing_state needed). We do not load
through that format, though: its loader reads every parameter whole on every rank and its stage 3
path wants a per-parameter `step`. A different world size, ZeRO stage (0-3) or engine is loaded by
`load_slices`: each rank reads only the pieces of each parameter that its partition holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from evertrain.pretrain.checkpoint.safe_load import deepspeed_safe_globals, load_trusted, weights_only_loads
from evertrain.pretrain.checkpoint.slices import KEYS, MOMENTS, WEIGHT, Slice
from evertrain.pretrain.checkpoint.staging import BackgroundStager
from evertrain.pretrain.checkpoint.store import CheckpointError, HashingFile

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
DEEPSPEED_SAFE_GLOBALS = deepspeed_safe_globals()


class StagingCheckpointEngine(CheckpointEngine):
    """DeepSpeed's file writer, made asynchronous: `save` collects, `take_staged` starts the copy of
    everything collected (one BackgroundStager copy into buffers kept between saves), `write_staged`
    writes later.
    """

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.name = "evertrain.StagingCheckpointEngine"
        self.stager = BackgroundStager(device, optimizer)
        self.staged: list[tuple[str, object]] = []

    def create(self, info):
        self.staged = []

    def save(self, state_dict, path: str):
        self.staged.append((path, state_dict))  # live tensors: copied by take_staged, before the next step

    def load(self, path: str, map_location=None):
        return load_trusted(path, map_location)

    def commit(self, info):
        return True

    def take_staged(self):
        """(the paths, a Future of their host copies in the same order)."""
        staged, self.staged = self.staged, []
        paths = [path for path, _ in staged]
        return paths, self.stager.stage({"files": [state for _, state in staged]})


def create_moments(optimizer, flat_partitions) -> None:
    """ZeRO creates the optimizer state of its flat fp32 partitions at the first step; a load comes
    before that. Zeros, as our AdamW would create them (it keeps a state that is there)."""
    for flat in flat_partitions:
        state = optimizer.state[flat]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(flat, dtype=torch.float32)


def write_staged(paths: list[str], staged: dict) -> dict[str, dict]:
    """torch.save each file, fsynced; {file name: digest}, hashed while writing (store.HashingFile)."""
    digests: dict[str, dict] = {}
    for path, state in zip(paths, staged["files"]):
        with HashingFile(Path(path), digests) as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    return digests


class DeepSpeedState:
    """Saves and loads a DeepSpeed engine's state; a step dir is a DeepSpeed checkpoint 'tag' dir."""

    def __init__(self, engine, ckpt_dir: Path, nonce: str):
        self.engine = engine
        self.ds = engine.ds_engine
        self.ckpt_dir = Path(ckpt_dir)  # temp dirs for conversions go beside the checkpoints
        self.nonce = nonce
        self.writer = StagingCheckpointEngine(engine.device, engine.optimizer)
        self.ds.checkpoint_engine = self.writer  # DeepSpeed's documented extension point
        self.written: list[str] = []

    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    def stage(self, tmp_dir: Path):
        """Run DeepSpeed's save (collectives here, in the caller's thread) and start the host copy:
        (a Future of the copy, the function that writes it)."""
        universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.ds.save_checkpoint(
            str(tmp_dir.parent),
            tag=tmp_dir.name,
            save_latest=False,
            client_state={UNIVERSAL_CHECKPOINT_INFO: universal_info},
        )
        paths, copy = self.writer.take_staged()
        self.written = sorted(Path(path).name for path in paths)
        if (
            self.engine.is_main
        ):  # DeepSpeed drops its recovery scripts into save_dir: keep them with the shards
            for script in RECOVERY_SCRIPTS:
                if (tmp_dir.parent / script).is_file():
                    os.replace(tmp_dir.parent / script, tmp_dir / script)
        return copy, lambda staged: write_staged(paths, staged)

    def own_files(self, tmp_dir: Path) -> list[str]:
        return self.written

    def close(self) -> None:
        self.writer.stager.close()

    def load(self, step_dir: Path) -> None:
        """Native load: same world size and ZeRO stage as the checkpoint."""
        with weights_only_loads(step_dir, DEEPSPEED_SAFE_GLOBALS):
            path, _ = self.ds.load_checkpoint(
                str(step_dir.parent),
                tag=step_dir.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise CheckpointError(f"{step_dir}: DeepSpeed found no checkpoint to load")

    def load_slices(self, reader, source: Path) -> None:
        """Another world size, ZeRO stage or engine: each rank reads only what it holds (see
        checkpoint/slices.py) and writes it into DeepSpeed's partitions through DeepSpeed's own handles:
        stage 3 its local partition (`safe_set_local_*`), stages 1/2 its fragment of the flat fp32
        group (`param._hp_mapping`) plus the whole low-precision weights every rank keeps, stage 0
        everything."""
        if not reader.has_moments:
            raise CheckpointError(
                f"{source}: has no optimizer moments; resume it with the engine that wrote it"
            )
        params = [(name, p) for name, p in self.ds.module.named_parameters() if p.requires_grad]
        for name, p in params:
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if name not in reader.shapes or tuple(reader.shapes[name]) != shape:
                raise CheckpointError(f"{source}: has no parameter '{name}' of shape {shape}")
        with torch.no_grad():
            if self.zero_stage == 3:
                self._fill_stage3(reader, params)
            elif self.zero_stage in (1, 2):
                self._fill_stage12(reader, params)
            else:
                self._fill_whole(reader, params)
        self.engine.barrier()

    def _fill_stage3(self, reader, params) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        create_moments(self.ds.optimizer.optimizer, self.ds.optimizer.fp32_partitioned_groups_flat)
        requests, rank = [], self.engine.rank
        for name, p in params:  # the rank's piece: [rank * part, (rank + 1) * part), the last one padded
            part, numel = p.ds_tensor.numel(), p.ds_numel
            start, stop = min(rank * part, numel), min((rank + 1) * part, numel)
            requests += [Slice(name, key, start, stop) for key in KEYS]
        values = iter(reader.read(requests))
        for _, p in params:
            for key in KEYS:
                piece = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device)
                data = next(values)
                piece[: data.numel()] = data
                if key == WEIGHT:
                    safe_set_local_fp32_param(p, piece)  # the fp32 master partition
                    p.ds_tensor.data.copy_(piece)  # the (low-precision) partition the forward gathers
                else:
                    safe_set_local_optimizer_state(p, piece, key)

    def _fill_stage12(self, reader, params) -> None:
        # DeepSpeedZeroOptimizer, or with bf16 at stage 1 BF16_Optimizer: either way our AdamW runs on
        # one flat fp32 partition per param group, under the name each of them gives it
        optimizer = self.ds.optimizer
        flat_groups = getattr(optimizer, "single_partition_of_fp32_groups", None)
        if flat_groups is None:
            flat_groups = optimizer.fp32_groups_flat_partition  # runtime/bf16_optimizer.py
        create_moments(optimizer.optimizer, flat_groups)
        requests = [Slice(name, WEIGHT, 0, p.numel()) for name, p in params]  # every rank keeps whole weights
        fragments = []
        for name, p in params:
            fragment = getattr(p, "_hp_mapping", None)  # None: no element of p in this rank's partition
            if fragment is not None:
                start = fragment.lp_fragment_address.start
                fragments.append((p, fragment))
                requests += [
                    Slice(name, key, start, start + fragment.lp_fragment_address.numel) for key in MOMENTS
                ]
        values = iter(reader.read(requests))
        weights = {}
        for _, p in params:
            weights[p] = next(values)  # fp32: the master fragment is cut from it, not from a bf16 copy
            p.data.copy_(weights[p].view(p.shape))
        for p, fragment in fragments:
            address = fragment.lp_fragment_address
            fragment.hp_fragment.data.copy_(weights[p].narrow(0, address.start, address.numel))
            flat = flat_groups[fragment.param_group_index]
            state = optimizer.optimizer.state[flat]
            for key in MOMENTS:
                hp = fragment.hp_fragment_address
                state[key].narrow(0, hp.start, hp.numel).copy_(next(values))

    def _fill_whole(self, reader, params) -> None:
        """Stage 0: every rank holds everything. Our AdamW steps the parameters themselves in fp32;
        with bf16, DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py) gives it an
        fp32 master per parameter instead (`fp32_groups`, beside the bf16 `fp16_groups` the forward
        uses): the masters and the moments keyed by them are written, and the bf16 copies cast from them."""
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        optimizer = self.ds.optimizer
        if isinstance(optimizer, FP16_UnfusedOptimizer):
            masters = {
                id(lp): hp
                for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                for lp, hp in zip(lps, hps)
            }
        else:
            masters = {id(p): p for _, p in params}
        create_moments(self.engine.optimizer, [masters[id(p)] for _, p in params])
        requests = [Slice(name, key, 0, p.numel()) for name, p in params for key in KEYS]
        values = iter(reader.read(requests))
        for _, p in params:
            master = masters[id(p)]
            for key in KEYS:
                value = next(values).view(p.shape)
                if key == WEIGHT:
                    master.data.copy_(value)
                    if master is not p:
                        p.data.copy_(value)
                else:
                    self.engine.optimizer.state[master][key].copy_(value)
