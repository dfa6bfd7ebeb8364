"""Reading pickle-bearing checkpoint files without letting them run code.

A run dir is data, and data may come from anyone (a copied run, a shared filesystem): no file in it
may execute code when we read it. meta.json's checksums do not help, since an attacker rewrites
them along with the file. Three kinds of pickle reach us:

  DCP `.metadata`        torch's FileSystemReader.read_metadata is a plain `pickle.load`:
                         `SafeFileSystemReader` replaces it with an allow-listed unpickler that
                         knows only DCP's own metadata classes, torch dtypes/sizes and paths.
  DCP non-tensor items   DefaultLoadPlanner.load_bytes is `torch.load(weights_only=False)`:
                         `SafeLoadPlanner` loads them weights_only.
  DeepSpeed files        DeepSpeed's loaders (ds_to_universal, zero_to_fp32, the universal loader)
                         call `torch.load(weights_only=False)` deep inside: `weights_only_loads`
                         forces torch's weights_only unpickler on every torch.load in its scope
                         (TORCH_FORCE_WEIGHTS_ONLY_LOAD, read by torch at each call and inherited by
                         worker processes) with DeepSpeed's few plain classes allowed.

A refused file is a one-line CheckpointError naming it; nothing from it has run.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from evertrain import torch_compat
from evertrain.pretrain.checkpoint.store import CheckpointError, confined_path

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

# Everything a DCP `.metadata` written by torch 2.x refers to. Each is a plain data class, an enum,
# a path or a constructor that only builds a value; none can reach a shell or the filesystem.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
    if hasattr(dcp_metadata, name)
}
_DCP_CLASSES.update(
    {
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "Path"): pathlib.Path,
    }
)
# private names a torch version's metadata pickles refer to: allowed where this torch has them
_DCP_CLASSES.update(
    {
        (module.__name__, name): getattr(module, name)
        for module, name in ((dcp_filesystem, "_StorageInfo"), (torch.serialization, "_get_layout"))
        if hasattr(module, name)
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the allow-listed names (and torch dtypes)."""

    def find_class(self, module: str, name: str):
        allowed = _DCP_CLASSES.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint's metadata may not use")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP `.metadata` file through the allow-list; a one-line CheckpointError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a DCP checkpoint)") from None
    except Exception as exc:  # any unpickling failure: truncated, wrong protocol, forbidden name
        raise CheckpointError(f"{path}: refused: {first_line(exc)}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: refused: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def check_storage_paths(step_dir: Path, metadata: Metadata) -> None:
    """Every file the `.metadata` sends reads to lies in the step dir itself: a rewritten path
    (`../step_.../__0_0.distcp`, an absolute one) would load another checkpoint's tensors."""
    storage = getattr(metadata, "storage_data", None) or {}
    if not isinstance(storage, dict):
        raise CheckpointError(
            f"{step_dir / '.metadata'}: refused: storage_data is a {type(storage).__name__}"
        )
    for info in storage.values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or "/" in relative or os.sep in relative:
            raise CheckpointError(
                f"{step_dir / '.metadata'}: refused: data file {relative!r} is not a file "
                f"name inside {step_dir}"
            )
        confined_path(step_dir, relative, f"{step_dir / '.metadata'}: refused: data file")


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, with `read_metadata` going through the allow-listed unpickler.

    The metadata is read once, when the reader is made, so a refused file is our CheckpointError
    here rather than an exception DCP would log with a traceback and wrap into its own."""

    def __init__(self, path: str | Path, **kwargs):
        super().__init__(str(path), **kwargs)
        self.metadata = read_dcp_metadata(torch_compat.dcp_metadata_path(self))
        check_storage_paths(Path(path), self.metadata)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        # As FileSystemReader.read_metadata (torch 2.13), apart from the unpickler.
        rank = kwargs.get("rank")
        metadata = (
            self.metadata if rank is None else read_dcp_metadata(torch_compat.dcp_metadata_path(self, rank))
        )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"item '{read_item.dest_index.fqn}': refused: {first_line(exc)}") from None
        if self.flatten_state_dict:
            torch_compat.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def weights_only_loads(source: str | Path, safe_globals: list | tuple = ()):
    """Every torch.load in this scope (other libraries' too, and their worker processes) is
    weights_only, with `safe_globals` allowed; a refused pickle becomes a CheckpointError naming
    `source`. Process-wide while it lasts: use it around loads, in the thread that loads."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    # torch's safe_globals removes its names on exit even if an outer scope added them: add only
    # the missing ones, so nesting (DeepSpeed's load calling our load_trusted) keeps the outer list.
    missing = [g for g in safe_globals if g not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(missing):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{source}: refused a file that is not plain tensors and data: {first_line(exc)}"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def deepspeed_safe_globals() -> list:
    """The non-tensor objects DeepSpeed pickles into its ZeRO files; allowed explicitly so that every
    load stays weights_only=True, ours and DeepSpeed's own (through weights_only_loads). Imported
    here, when asked: reading a DCP checkpoint needs no DeepSpeed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_trusted(path: str | Path, map_location=None, mmap: bool = False):
    """torch.load of a DeepSpeed checkpoint file, weights_only with DeepSpeed's few plain classes
    (mmap: tensors are paged in when read, see checkpoint/slices.py)."""
    with weights_only_loads(path, deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except (RuntimeError, EOFError, ValueError, OSError) as exc:  # a plain pickle, a cut or garbage file
            raise CheckpointError(f"{path}: not a readable torch.save file ({first_line(exc)})") from None


TORCH_PREFIX = "Weights only load failed."
REASON_TAG = "WeightsUnpickler error:"


def first_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong. torch's weights_only errors wrap the reason
    (wherever their wording puts it) in advice to load with weights_only=False, which would run the
    file's code: that advice is never shown. DCP's CheckpointException is unwrapped to a rank's own error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(exc, CheckpointError):
            return str(exc)
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for (
        line
    ) in text:  # "...: WeightsUnpickler error: <reason>" (the reason may also follow on the next lines)
        reason = line.split(REASON_TAG, 1)[1].strip() if REASON_TAG in line else ""
        if reason:
            return reason
    reasons = [line.removeprefix(TORCH_PREFIX).strip() for line in text if not torch_advice(line)]
    reasons = [line for line in reasons if line]
    return reasons[0] if reasons else exc.__class__.__name__


def torch_advice(line: str) -> bool:
    """A line of torch's weights_only boilerplate rather than the reason."""
    return (
        "weights_only" in line
        or line.endswith(REASON_TAG)
        or line.startswith(("Check the documentation", "Please file an issue", "(1)", "(2)"))
    )
