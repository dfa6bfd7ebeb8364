"""Any checkpoint read by parameter slice: each rank reads only what it will own.

    reader = open_reader(step_dir, meta)     # DCP (single/fsdp) or DeepSpeed ZeRO stage 0-3
    reader.shapes                            # {param name: full shape}, trained parameters only
    reader.read([Slice(name, "exp_avg", start, stop), ...])   # flat fp32 elements [start, stop)
    reader.bytes_read                        # checkpoint bytes copied out so far

A slice is a range of a parameter's flattened elements, in the full (unsharded) parameter's
coordinates, for one of KEYS: the fp32 weights or one Adam moment. Targets ask for their own piece:
an FSDP2 rank for its rows, a ZeRO-3 rank for its flat partition, a ZeRO-1/2 rank for its fragment
of the flat group. So moving a run to another world size or engine needs per rank about its shard
of host memory and I/O, never the whole model and optimizer state.

- DCP checkpoints are read by DCP itself, with a planner that asks for the row blocks covering each
  slice (`create_read_items_for_chunk_list`, the resharding DCP does for DTensors).
- DeepSpeed files are torch.load'ed with mmap=True: a slice copies, and pages in, only its bytes.
  The layouts are DeepSpeed's (deepspeed/utils/zero_to_fp32.py): stage 3 splits every parameter
  into world_size equal padded pieces, concatenated per rank; stages 1/2 split each param group's
  flat vector and record each rank's fragments in `param_slice_mappings`; stage 0 keeps everything
  whole in the model states file, with our AdamW's own state dict. With bf16 the ZeRO files are
  named `bf16_zero_pp_rank_*` (stage 1 then runs DeepSpeed's BF16_Optimizer, whose file has the
  stage 1/2 keys), and stage 0 keeps fp32 masters beside the bf16 module: the masters are read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from evertrain.pretrain.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, load_trusted
from evertrain.pretrain.checkpoint.store import CheckpointError

WEIGHT = "weight"
KEYS = (WEIGHT, "exp_avg", "exp_avg_sq")
MOMENTS = KEYS[1:]
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Slice:
    name: str  # parameter name in our Transformer
    key: str  # one of KEYS
    start: int  # flat element range of the full parameter
    stop: int


class SliceReader:
    """What every reader offers; `has_moments` is False only for a checkpoint without optimizer state."""

    shapes: dict[str, torch.Size]
    has_moments: bool = True
    bytes_read: int = 0

    def read(self, slices: list[Slice]) -> list[torch.Tensor]:
        raise NotImplementedError

    def read_full(self) -> dict:
        """{"model": {name: tensor}, "optim": {name: {moment: tensor}}}: everything, in this process."""
        names = list(self.shapes)
        keys = KEYS if self.has_moments else (WEIGHT,)
        slices = [Slice(name, key, 0, self.shapes[name].numel()) for name in names for key in keys]
        flat = iter(self.read(slices))
        full: dict = {"model": {}, "optim": {}}
        for name in names:
            for key in keys:
                tensor = next(flat).view(self.shapes[name])
                if key == WEIGHT:
                    full["model"][name] = tensor
                else:
                    full["optim"].setdefault(name, {})[key] = tensor
        return full


def open_reader(step_dir: Path, meta: dict) -> SliceReader:
    if meta["engine"] == "deepspeed":
        try:
            return ZeroReader(step_dir, meta)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:  # files of another layout
            raise CheckpointError(
                f"{step_dir}: not the layout of a DeepSpeed checkpoint ({type(exc).__name__}: {exc})"
            ) from None
    return DcpReader(step_dir)


# -- DCP -----------------------------------------------------------------------------------------


class _RowBlockPlanner(SafeLoadPlanner):
    """Reads given row blocks of given tensors into given buffers (instead of whole state dict entries)."""

    def __init__(self, blocks: dict[str, tuple[int, torch.Tensor]]):
        super().__init__()
        self.blocks = blocks  # flattened DCP key -> (first row, buffer of the block's shape)
        self.bytes = 0

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (row, buffer) in self.blocks.items():
            offsets = torch.Size([row] + [0] * (buffer.ndim - 1))
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=buffer.size())
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        self.bytes = sum(
            math.prod(item.lengths) * self.blocks[item.dest_index.fqn][1].element_size() for item in items
        )
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.blocks[index.fqn][1]


class DcpReader(SliceReader):
    """The checkpoints of the `single` and `fsdp` engines (checkpoint/dcp.py's layout)."""

    def __init__(self, step_dir: Path):
        self.step_dir = Path(step_dir)
        self.metadata = SafeFileSystemReader(step_dir).metadata  # allow-listed unpickling (safe_load.py)
        self.keys: dict[tuple[str, str], str] = {}  # (name, KEYS entry) -> flattened DCP key
        self.shapes, self.dtypes = {}, {}
        for key, item in self.metadata.state_dict_metadata.items():
            if not isinstance(item, TensorStorageMetadata):
                continue
            path = self.metadata.planner_data[key]  # ("model", name) or ("optim", name, moment)
            if path[0] == "model":
                self.keys[(path[1], WEIGHT)] = key
                self.shapes[path[1]], self.dtypes[key] = item.size, item.properties.dtype
            elif path[0] == "optim" and path[2] in MOMENTS:
                self.keys[(path[1], path[2])] = key
                self.dtypes[key] = item.properties.dtype
        self.has_moments = all((name, m) in self.keys for name in self.shapes for m in MOMENTS)

    def read(self, slices: list[Slice]) -> list[torch.Tensor]:
        blocks, cuts = {}, []
        for i, s in enumerate(slices):
            key = self.keys.get((s.name, s.key))
            if key is None:
                raise CheckpointError(f"{self.step_dir}: has no {s.key} for parameter '{s.name}'")
            shape = self.shapes[s.name]
            row = math.prod(shape[1:])  # elements per row of dim 0 (1 for a vector)
            first, last = s.start // row, -(-s.stop // row)
            buffer = torch.empty((last - first, *shape[1:]), dtype=self.dtypes[key])
            blocks[f"{key}#{i}"] = (key, first, buffer)
            cuts.append((s.start - first * row, s.stop - s.start))
        # one DCP load per distinct key set: a tensor may be asked for twice (two slices of it)
        out: list[torch.Tensor | None] = [None] * len(slices)
        pending = list(enumerate(blocks.values()))
        while pending:
            batch, seen, rest = {}, set(), []
            for i, (key, first, buffer) in pending:
                if key in seen:
                    rest.append((i, (key, first, buffer)))
                else:
                    seen.add(key)
                    batch[key] = (first, buffer, i)
            planner = _RowBlockPlanner({key: (first, buffer) for key, (first, buffer, _) in batch.items()})
            with (
                warnings.catch_warnings()
            ):  # no_dist on purpose (this process reads alone); DCP warns every call
                warnings.filterwarnings(
                    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
                )
                dcp.load(
                    {}, storage_reader=SafeFileSystemReader(self.step_dir), planner=planner, no_dist=True
                )
            self.bytes_read += planner.bytes
            for _first, buffer, i in batch.values():
                offset, numel = cuts[i]
                out[i] = buffer.reshape(-1).narrow(0, offset, numel).float()
            pending = rest
        return out


# -- DeepSpeed -----------------------------------------------------------------------------------


def _load_mmap(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a DeepSpeed checkpoint needs every rank's files)")
    loaded = load_trusted(path, map_location="cpu", mmap=True)
    check_dense(loaded, path)
    return loaded


def check_dense(obj, path: Path) -> None:
    """Every tensor in a loaded file has no more elements than its storage holds and stays inside it:
    a crafted stride of 0 would make a few bytes claim a billion elements, which a copy materializes."""
    if isinstance(obj, torch.Tensor):
        held = obj.untyped_storage().nbytes() // max(obj.element_size(), 1)
        last = obj.storage_offset() + sum((n - 1) * abs(st) for n, st in zip(obj.shape, obj.stride()))
        if obj.numel() and (obj.numel() > held or last >= held):
            raise CheckpointError(
                f"{path}: holds a tensor of shape {tuple(obj.shape)} and strides {obj.stride()} "
                f"that its {obj.untyped_storage().nbytes()} bytes of storage do not back"
            )
    elif isinstance(obj, dict):
        for value in obj.values():
            check_dense(value, path)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            check_dense(value, path)


class _Flat:
    """A rank's flat vector kept as its pieces (sub-groups), so a range is copied without a cat."""

    def __init__(self, pieces: list[torch.Tensor]):
        self.pieces = pieces
        self.starts = [0]
        for piece in pieces:
            self.starts.append(self.starts[-1] + piece.numel())

    def take(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        for piece, lo, hi in zip(self.pieces, self.starts, self.starts[1:]):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                parts.append(piece.narrow(0, a - lo, b - a).float())
        return torch.cat(parts) if len(parts) != 1 else parts[0].clone()


class ZeroReader(SliceReader):
    """A DeepSpeed checkpoint of any ZeRO stage, world size and dtype (fp32 master weights)."""

    def __init__(self, step_dir: Path, meta: dict):
        self.step_dir = Path(step_dir)
        self.stage, self.world_size = int(meta["zero_stage"]), int(meta["world_size"])
        self._flats: dict[tuple[int, str], _Flat] = {}
        self.shapes = {}
        if self.stage == 0:
            self._init_stage0(meta)
        else:
            states = _load_mmap(self._model_states_path())
            groups = states["param_shapes"]
            self.shapes = {name: torch.Size(shape) for group in groups for name, shape in group.items()}
            if self.stage == 3:
                self._init_stage3(groups)
            else:
                self._init_stage12(groups)

    def _model_states_path(self) -> Path:
        if self.stage == 3:
            return self.step_dir / f"zero_pp_rank_0_{MODEL_STATES}"
        return self.step_dir / MODEL_STATES

    def _optim_path(self, rank: int) -> Path:
        """DeepSpeed prefixes the ZeRO optimizer files with `bf16_` whenever bf16 is on (engine.py,
        _get_zero_ckpt_prefix), whichever optimizer wrote them: the layout inside is the same."""
        for prefix in ("zero_pp_rank", "bf16_zero_pp_rank"):
            path = self.step_dir / f"{prefix}_{rank}_mp_rank_00_optim_states.pt"
            if path.is_file():
                return path
        # _load_mmap names it missing
        return self.step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"

    def _optim(self, rank: int) -> dict:
        return _load_mmap(self._optim_path(rank))["optimizer_state_dict"]

    def _flat(self, rank: int, key: str) -> _Flat:
        """Rank `rank`'s flat fp32 weights or moment, opened (mmap) on first use."""
        if (rank, key) not in self._flats:
            sd = self._optim(rank)
            if self.stage == 3:
                state = sd["optimizer_state_dict"]["state"]
                pieces = sd["fp32_flat_groups"] if key == WEIGHT else [state[i][key] for i in sorted(state)]
            else:
                state = sd["base_optimizer_state"]["state"]
                pieces = (
                    sd["single_partition_of_fp32_groups"]
                    if key == WEIGHT
                    else [state[i][key] for i in sorted(state)]
                )
            self._flats[(rank, key)] = _Flat(list(pieces))
        return self._flats[(rank, key)]

    # stage 3: param p (n elements) is cut into world_size pieces of ceil(n / world_size), the last padded;
    # every rank's flat vector is its pieces of all params, in param_shapes order
    def _init_stage3(self, groups) -> None:
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += math.ceil(shape.numel() / self.world_size)

    # stages 1/2: each param group's flat vector is cut into equal rank partitions; a rank's
    # `param_slice_mappings` give, per param, where its fragment lies in the rank's partition
    def _init_stage12(self, groups) -> None:
        self.group_of = {name: g for g, group in enumerate(groups) for name in group}
        self.fragments: dict[str, list[tuple[int, int, int, int]]] = {name: [] for name in self.shapes}
        for rank in range(self.world_size):
            sd = self._optim(rank)
            # this rank's partition of group g starts at flat index 0 of its piece list
            partition_starts = [0]
            for piece in sd["single_partition_of_fp32_groups"]:
                partition_starts.append(partition_starts[-1] + piece.numel())
            for g, mapping in enumerate(sd["param_slice_mappings"]):
                for name, address in mapping.items():
                    # (param offset filled below, rank, flat offset in the rank's vector, numel)
                    self.fragments[name].append((rank, partition_starts[g] + address.start, address.numel))
        for name, pieces in self.fragments.items():
            at, placed = 0, []
            for rank, flat_start, numel in pieces:  # ranks hold a param's pieces in param order
                placed.append((at, rank, flat_start, numel))
                at += numel
            if at != self.shapes[name].numel():
                raise CheckpointError(
                    f"{self.step_dir}: the ZeRO fragments of '{name}' cover {at} of "
                    f"{self.shapes[name].numel()} elements"
                )
            self.fragments[name] = placed

    def _init_stage0(self, meta: dict) -> None:
        from evertrain.pretrain.config import from_dict
        from evertrain.pretrain.engines.base import build_model
        from evertrain.pretrain.optim import param_groups

        states = _load_mmap(self.step_dir / MODEL_STATES)
        # our AdamW's state dict numbers the params in param_groups order: rebuild it on the meta device
        cfg = from_dict({"model": meta["model"]})
        with torch.device("meta"):
            model = build_model(cfg, torch.device("meta"))
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in param_groups(model, 0.1) for p in group["params"]]
        optimizer = states.get("optimizer") or {}
        if "fp32_groups" in optimizer:
            # bf16: DeepSpeed's FP16_UnfusedOptimizer (runtime/fp16/unfused_optimizer.py) keeps an fp32
            # master per parameter, in param_groups order, and wraps our AdamW's state dict; the
            # module holds only the bf16 copies the forward runs on
            masters = [t for group in optimizer["fp32_groups"] for t in group]
            self.whole = dict(zip(order, masters))
            optim_state = optimizer["optimizer_state_dict"].get("state", {})
        else:
            self.whole = dict(states["module"])
            optim_state = optimizer.get("state", {})
        self.moments = {order[i]: s for i, s in optim_state.items()}
        self.shapes = {name: self.whole[name].shape for name in order}
        self.has_moments = all(m in self.moments.get(name, {}) for name in order for m in MOMENTS)

    def read(self, slices: list[Slice]) -> list[torch.Tensor]:
        out = []
        for s in slices:
            if s.name not in self.shapes:
                raise CheckpointError(f"{self.step_dir}: has no parameter '{s.name}'")
            tensor = self._read(s)
            self.bytes_read += tensor.numel() * 4
            out.append(tensor)
        return out

    def _read(self, s: Slice) -> torch.Tensor:
        if self.stage == 0:
            source = self.whole[s.name] if s.key == WEIGHT else self.moments[s.name][s.key]
            return source.reshape(-1).narrow(0, s.start, s.stop - s.start).float()
        parts = []
        if self.stage == 3:
            part = math.ceil(self.shapes[s.name].numel() / self.world_size)
            for rank in range(s.start // part, (s.stop - 1) // part + 1) if s.stop > s.start else ():
                a, b = max(s.start, rank * part), min(s.stop, (rank + 1) * part)
                base = self.offsets[s.name] - rank * part
                parts.append(self._flat(rank, s.key).take(base + a, base + b))
        else:
            for at, rank, flat_start, numel in self.fragments[s.name]:
                a, b = max(s.start, at), min(s.stop, at + numel)
                if a < b:
                    parts.append(self._flat(rank, s.key).take(flat_start + a - at, flat_start + b - at))
        return torch.cat(parts) if parts else torch.empty(0)
