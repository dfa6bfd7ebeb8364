"""Token shards on disk, the manifest that lists them, and the training stream over them.

A data dir (written by `evertrain data prepare|append`, see docs/data.md) holds flat little-endian token
files `train-000000.bin`, `val-000000.bin`, ... and `manifest.json`, which lists them in append order
with their token counts and sha256. The training stream is a fixed function of the manifest, the seed
and the epoch: each shard is cut into non-overlapping seq_len+1 windows; within an epoch every source's
windows are shuffled across all its shards and the sources are interleaved by weight at every position
(order.py). One global window cursor is the whole position, so a run resumes on any world size without
repeating or skipping a window; shards appended mid-epoch join the rest of the epoch, interleaved, as a
new segment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evertrain.errors import EvertrainError
from evertrain.pretrain.data.order import EpochOrder, Layout

if TYPE_CHECKING:  # imported where batches are made: the manifest side needs no torch
    import torch

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on every machine
DEFAULT_SOURCE = "main"
OPEN_SHARDS = 16  # memmaps kept open per stream; a stream reads one or two shards at a time


class DataError(EvertrainError, ValueError):
    """A problem with a data dir, its manifest, its shards or the input files; names the file."""


def shard_name(split: str, index: int) -> str:
    """A shard's file name is its position, so a reordered or dropped shard shows in the manifest."""
    return f"{split}-{index:06d}.bin"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the data dir
    tokens: int
    sha256: str
    source: str = DEFAULT_SOURCE  # which mixture source it belongs to (manifest["weights"])


@dataclass(frozen=True)
class Manifest:
    data_dir: Path
    version: int  # 1 after prepare, +1 on every append
    tokenizer: dict  # {"path": relative file, "sha256": hex}
    vocab_size: int
    eos_id: int
    bos_id: int | None
    dtype: str  # "uint16" | "uint32"
    train: tuple[Shard, ...]
    val: tuple[Shard, ...]
    weights: dict[str, float] = field(default_factory=dict)  # per source; a missing source weighs 1
    history: tuple[dict, ...] = ()  # per version: {"version", "train", "val"} shard counts after it

    def shards(self, split: str) -> tuple[Shard, ...]:
        return getattr(self, split)

    def weight(self, source: str) -> float:
        return self.weights.get(source, 1.0)

    def at_version(self, version: int) -> Manifest:
        """The manifest as it was at `version`: every split cut back to the shard counts of then."""
        if version == self.version:
            return self
        record = next((r for r in self.history if r["version"] == version), None)
        if record is None:
            raise DataError(
                f"{self.data_dir / MANIFEST}: has no version {version} in its history "
                f"(it is at version {self.version}); is data.path the directory the run used?"
            )
        return dataclasses.replace(
            self,
            version=version,
            train=self.train[: record["train"]],
            val=self.val[: record["val"]],
            history=self.history[: self.history.index(record) + 1],
        )

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "dtype": self.dtype,
            "weights": self.weights,
            "history": list(self.history),
            **{split: [dataclasses.asdict(s) for s in self.shards(split)] for split in SPLITS},
        }


def load_manifest(data_dir: str | Path, verify_checksums: bool = False, stamps=None) -> Manifest:
    """Read and check data_dir/manifest.json: its fields, that old shards are in place (positional names,
    counts matching the history), every shard's size, and, when asked, every sha256. With `stamps`
    (datastamps.VerifiedStamps) a file already hashed on this node and unchanged since is not hashed
    again, and what was hashed is recorded."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest (make one with `evertrain data prepare --out {data_dir} ...`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    manifest = _parse(raw, data_dir, path)
    for split in SPLITS:
        _check_order(manifest, split, path)
        for shard in manifest.shards(split):
            _check_shard(data_dir, shard, manifest.dtype, verify_checksums, stamps)
    if verify_checksums:
        tokenizer_path = data_dir / manifest.tokenizer["path"]
        if not tokenizer_path.is_file() or not _hash_matches(
            tokenizer_path, manifest.tokenizer["path"], manifest.tokenizer["sha256"], stamps
        ):
            raise DataError(
                f"{tokenizer_path}: missing or not the tokenizer manifest.json names (sha256 differs)"
            )
        if stamps is not None:
            stamps.save()
    return manifest


def _hash_matches(path: Path, name: str, sha256: str, stamps) -> bool:
    if stamps is not None and stamps.verified(path, name, sha256):
        return True
    matches = file_sha256(path) == sha256
    if stamps is not None:
        stamps.hashed += 1
        if matches:
            stamps.mark(path, name, sha256)
    return matches


def _parse(raw, data_dir: Path, path: Path) -> Manifest:
    def get(obj, key, kind, where=""):
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{path}: missing key '{where}{key}'")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{path}: '{where}{key}' should be {kind.__name__}, got {value!r}")
        return value

    dtype = get(raw, "dtype", str)
    if dtype not in DTYPES:
        raise DataError(f"{path}: 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    vocab_size = get(raw, "vocab_size", int)
    capacity = 1 << (8 * DTYPES[dtype].itemsize)
    if vocab_size > capacity:
        raise DataError(
            f"{path}: tokenizer vocab_size {vocab_size} does not fit token dtype {dtype} "
            f"(at most {capacity} ids); use uint32"
        )
    eos_id = get(raw, "eos_id", int)
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"{path}: 'eos_id' {eos_id} is outside the vocab of {vocab_size}")
    bos_id = raw.get("bos_id")
    if bos_id is not None and not (
        isinstance(bos_id, int) and not isinstance(bos_id, bool) and 0 <= bos_id < vocab_size
    ):
        raise DataError(f"{path}: 'bos_id' {bos_id!r} is not null or an id of the vocab of {vocab_size}")
    tokenizer = get(raw, "tokenizer", dict)
    for key in ("path", "sha256"):
        get(tokenizer, key, str, "tokenizer.")
    weights = raw.get("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights.values()
    ):
        raise DataError(f"{path}: 'weights' must map source names to finite numbers >= 0, got {weights!r}")
    shards = {}
    for split in SPLITS:
        entries = get(raw, split, list)
        shards[split] = tuple(
            Shard(
                get(e, "file", str, f"{split}[{i}]."),
                get(e, "tokens", int, f"{split}[{i}]."),
                get(e, "sha256", str, f"{split}[{i}]."),
                get(e, "source", str, f"{split}[{i}].") if "source" in e else DEFAULT_SOURCE,
            )
            for i, e in enumerate(entries)
        )
    version = get(raw, "version", int)
    history = raw.get("history") or [{"version": version, **{s: len(shards[s]) for s in SPLITS}}]
    if not isinstance(history, list):
        raise DataError(f"{path}: 'history' should be list, got {history!r}")
    history = tuple(history)
    for i, record in enumerate(history):
        for key in ("version", *SPLITS):
            get(record, key, int, f"history[{i}].")
    return Manifest(
        data_dir,
        version,
        tokenizer,
        vocab_size,
        eos_id,
        bos_id,
        dtype,
        shards["train"],
        shards["val"],
        {k: float(v) for k, v in weights.items()},
        history,
    )


def _check_order(manifest: Manifest, split: str, path: Path) -> None:
    """Old shards must stay where they were: the stream's past is defined by their order."""
    shards = manifest.shards(split)
    for index, shard in enumerate(shards):
        if shard.file != shard_name(split, index):
            raise DataError(
                f"{path}: {split} shard {index} is '{shard.file}' but should be "
                f"'{shard_name(split, index)}': shards cannot be reordered or dropped, only appended"
            )
    last = manifest.history[-1]
    if last["version"] != manifest.version:
        raise DataError(
            f"{path}: 'history' ends at version {last['version']}, 'version' is {manifest.version}"
        )
    recorded = last[split]
    if recorded > len(shards):
        raise DataError(
            f"{path}: {split} shard '{shard_name(split, len(shards))}' is missing (version "
            f"{manifest.version} has {recorded} {split} shards): shards cannot be dropped"
        )
    if recorded < len(shards):
        raise DataError(
            f"{path}: lists {len(shards)} {split} shards but its history records {recorded}; "
            "add shards with `evertrain data append`, not by hand"
        )


def _check_shard(data_dir: Path, shard: Shard, dtype: str, verify_checksum: bool, stamps=None) -> None:
    path = data_dir / shard.file
    if not path.is_file():
        raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
    expected = shard.tokens * DTYPES[dtype].itemsize
    if path.stat().st_size != expected:
        raise DataError(
            f"{path}: shard is {path.stat().st_size} bytes, {MANIFEST} says {shard.tokens} "
            f"{dtype} tokens = {expected} bytes (truncated or overwritten?)"
        )
    if verify_checksum and not _hash_matches(path, shard.file, shard.sha256, stamps):
        raise DataError(f"{path}: shard sha256 does not match {MANIFEST} (corrupted or overwritten)")


def check_extends(old: Manifest, new: Manifest) -> None:
    """`new` must be `old` plus shards at the end: same tokenizer and dtype, old shards and the weights
    of their sources unchanged. Raises DataError naming what changed."""
    path = new.data_dir / MANIFEST
    if new.version < old.version:
        raise DataError(f"{path}: went back from version {old.version} to {new.version}")
    if (new.tokenizer["sha256"], new.dtype) != (old.tokenizer["sha256"], old.dtype):
        raise DataError(
            f"{path}: tokenizer or dtype changed since version {old.version}; "
            "a data dir keeps one tokenizer (prepare a new one instead)"
        )
    for split in SPLITS:
        before, after = old.shards(split), new.shards(split)
        for index, shard in enumerate(before):
            if index >= len(after):
                raise DataError(
                    f"{path}: {split} shard '{shard.file}' was dropped: shards can only be appended"
                )
            if after[index] != shard:
                raise DataError(
                    f"{path}: {split} shard '{shard.file}' changed since version {old.version} "
                    f"(now {after[index]}): shards can only be appended"
                )
    for source in {s.source for split in SPLITS for s in old.shards(split)}:
        if new.weight(source) != old.weight(source):
            raise DataError(
                f"{path}: weight of source '{source}' changed from {old.weight(source)} to "
                f"{new.weight(source)}; the stream already trained on it with the old weight"
            )


def shards_digest(shards) -> str:
    """sha256 over a split's shard list (names and contents' sha256, in order)."""
    blob = json.dumps([[shard.file, shard.sha256] for shard in shards]).encode()
    return hashlib.sha256(blob).hexdigest()


def data_identity(manifest: Manifest, split: str) -> dict:
    """What a checkpoint records of the data it trained on: the tokenizer and the shard list."""
    return {
        "tokenizer_sha256": manifest.tokenizer["sha256"],
        "shards_digest": shards_digest(manifest.shards(split)),
        "shards": len(manifest.shards(split)),
    }


def check_identity(state: dict, then: Manifest, split: str) -> None:
    """A resumed stream reads the data it was saved with: the same tokenizer, and the same shards up
    to the saved manifest version (appends after it are the only change allowed). States written
    before the identity was recorded have no keys to compare and pass."""
    if "tokenizer_sha256" not in state:
        return
    here = data_identity(then, split)
    path = then.data_dir / MANIFEST
    if state["tokenizer_sha256"] != here["tokenizer_sha256"]:
        raise DataError(
            f"{path}: tokenizer sha256 {here['tokenizer_sha256'][:12]} is not the one the checkpoint "
            f"trained with ({state['tokenizer_sha256'][:12]}); is data.path the directory the run used?"
        )
    if state.get("shards_digest") != here["shards_digest"]:
        raise DataError(
            f"{path}: its first {here['shards']} {split} shards (digest {here['shards_digest'][:12]}) "
            f"are not the {state.get('shards')} the checkpoint trained on (digest "
            f"{str(state.get('shards_digest'))[:12]}); is data.path the directory the run used?"
        )


def no_windows_error(manifest: Manifest, split: str, seq_len: int) -> DataError:
    shards = manifest.shards(split)
    if not shards:
        return DataError(
            f"{manifest.data_dir}: has no {split} shards (add some with "
            f"`evertrain data append --data {manifest.data_dir}{' --val' if split == 'val' else ''} FILES`)"
        )
    longest = max(s.tokens for s in shards)
    return DataError(
        f"{manifest.data_dir}: seq_len {seq_len} needs documents/shards of >= {seq_len + 1} tokens; "
        f"the longest {split} shard has {longest}"
    )


class ShardReader:
    """Windows of seq_len+1 tokens out of memmapped shards; only the windows asked for are read."""

    def __init__(self, data_dir: Path, dtype: str, window: int):
        self.data_dir, self.dtype, self.window = data_dir, DTYPES[dtype], window
        self.maps: OrderedDict[str, np.memmap] = OrderedDict()

    def tokens(self, shard: Shard) -> np.memmap:
        tokens = self.maps.pop(shard.file, None)
        if tokens is None:
            tokens = np.memmap(self.data_dir / shard.file, dtype=self.dtype, mode="r", shape=(shard.tokens,))
            if len(self.maps) >= OPEN_SHARDS:
                self.maps.popitem(last=False)
        self.maps[shard.file] = tokens
        return tokens

    def read(self, shard: Shard, window_index: int) -> np.ndarray:
        start = window_index * self.window
        return self.tokens(shard)[start : start + self.window]


def mix_weights(manifest: Manifest, split: str, seq_len: int, mix: dict[str, float]) -> dict[str, float]:
    """Per-source window multipliers that make the stream `mix` (shares of the windows, any positive
    scale): the epoch ends when the source that runs out first has given each of its windows once,
    the others contribute a per-epoch sample of their windows at their share."""
    windows: dict[str, int] = {}
    for shard in manifest.shards(split):
        windows[shard.source] = windows.get(shard.source, 0) + shard.tokens // (seq_len + 1)
    total = sum(mix.values())
    if not total > 0:
        raise DataError(f"mix {mix}: at least one share must be > 0")
    for source, share in mix.items():
        if share > 0 and not windows.get(source):
            have = ", ".join(f"{s} ({n} windows)" for s, n in sorted(windows.items())) or "none"
            raise DataError(
                f"{manifest.data_dir}: mix source '{source}' has no {split} windows of seq_len "
                f"{seq_len} (sources: {have})"
            )
    length = min(windows[s] * total / share for s, share in mix.items() if share > 0)
    return {s: (mix.get(s, 0.0) / total) * length / windows[s] for s in windows if windows[s]}


def parse_mix(text: str) -> dict[str, float]:
    """'hq=0.7,main=0.3' -> {'hq': 0.7, 'main': 0.3}; shares are normalized by the stream."""
    mix = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not sep or not name.strip() or not (math.isfinite(share) and share >= 0) or name.strip() in mix:
            raise DataError(
                f"--data-weights {text!r}: expected SOURCE=SHARE,... with distinct sources and "
                "shares >= 0, e.g. hq=0.7,main=0.3"
            )
        mix[name.strip()] = share
    if not any(mix.values()):
        raise DataError(f"--data-weights {text!r}: at least one share must be > 0")
    return mix


class TokenStream:
    """The resumable, world-size-independent stream of training windows (docs/data.md, "The training
    stream"; the order itself is order.py's).

    `next_batch(G, rank, W)` returns rank's contiguous G/W slice of the next G windows and moves the
    global cursor by G on every rank. Past the end of an epoch the next one starts with new shuffles;
    the epoch boundary is taken lazily (only when a window beyond it is needed), so shards appended
    before that are trained in the current epoch. The trainer calls `refresh()` at checkpoint
    boundaries and on restart; between refreshes the stream reads a fixed manifest version, and each
    refresh that brings new shards starts a segment of the epoch at the cursor (`segments`).

    `mix` ({source: share}) replaces the manifest's weights with shares of the stream (a fork's
    cooldown mix); such a stream stays on the manifest version it started with.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        seed: int,
        split: str = "train",
        mix: dict[str, float] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seed < 0:
            raise DataError(f"seed {seed}: the data order needs a seed >= 0")
        self.data_dir, self.seq_len, self.seed, self.split = Path(data_dir), seq_len, seed, split
        self.mix = dict(mix) if mix else None
        self.cursor = self.epoch = self.epoch_start = (
            0  # global windows consumed; epoch number; its first window
        )
        self.orders: OrderedDict[tuple, EpochOrder] = OrderedDict()  # (epoch, segments) -> its order
        self._use(load_manifest(self.data_dir))
        self.segments = [(0, self.manifest.version)]  # (epoch offset, manifest version) read from there on

    def _layout(self, manifest: Manifest) -> Layout:
        shards = manifest.shards(self.split)
        weights = (
            manifest.weights
            if self.mix is None
            else mix_weights(manifest, self.split, self.seq_len, self.mix)
        )
        return Layout.of(
            [s.source for s in shards], [s.tokens // (self.seq_len + 1) for s in shards], weights
        )

    def _use(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.identity = data_identity(manifest, self.split)  # per manifest, not per state_dict() (per batch)
        self.layout = self._layout(manifest)
        if self.layout.length == 0:
            raise no_windows_error(manifest, self.split, self.seq_len)
        self.reader = ShardReader(self.data_dir, manifest.dtype, self.seq_len + 1)

    @property
    def manifest_version(self) -> int:
        return self.manifest.version

    def next_batch(self, global_windows: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if global_windows <= 0 or global_windows % world_size:
            raise ValueError(
                f"global batch of {global_windows} windows does not split over {world_size} ranks"
            )
        per_rank = global_windows // world_size
        first = self.cursor + rank * per_rank
        batch = self._windows(np.arange(first, first + per_rank, dtype=np.int64))
        self.cursor += global_windows
        while self.cursor - self.epoch_start > self.layout.length:  # lazily: an exact end stays in the epoch
            self.epoch, self.epoch_start = self.epoch + 1, self.epoch_start + self.layout.length
            self.segments = [(0, self.manifest_version)]
        import torch  # here, not at the top: manifest readers (`evertrain data`, report) need no torch

        return torch.from_numpy(batch.astype(np.int64))

    def _windows(self, indices: np.ndarray) -> np.ndarray:
        epochs_ahead, positions = np.divmod(indices - self.epoch_start, self.layout.length)
        shards = np.empty_like(positions)
        windows = np.empty_like(positions)
        for ahead in np.unique(epochs_ahead):
            here = epochs_ahead == ahead
            shards[here], windows[here] = self._order(self.epoch + int(ahead)).locate(positions[here])
        split = self.manifest.shards(self.split)
        return np.stack([self.reader.read(split[s], w) for s, w in zip(shards.tolist(), windows.tolist())])

    def _order(self, epoch: int) -> EpochOrder:
        """The epoch's order: the current one through its segments, a later one from its start."""
        segments = tuple(self.segments) if epoch == self.epoch else ((0, self.manifest_version),)
        key = (epoch, segments)
        if key not in self.orders:
            layouts = [
                self.layout if v == self.manifest_version else self._layout(self.manifest.at_version(v))
                for _, v in segments
            ]
            self.orders[key] = EpochOrder(self.seed, epoch, [start for start, _ in segments], layouts)
            if len(self.orders) > 4:
                self.orders.popitem(last=False)
        return self.orders[key]

    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor,
            "epoch": self.epoch,
            "epoch_start": self.epoch_start,
            "manifest_version": self.manifest_version,
            "segments": [list(s) for s in self.segments],
            "mix": self.mix,
            **self.identity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Go back to a saved position and to the manifest version it was read with; `refresh()`
        then brings in whatever was appended since."""
        for key in ("cursor", "epoch", "epoch_start", "manifest_version"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise DataError(f"data state: '{key}' should be an integer >= 0, got {state.get(key)!r}")
        segments = state.get("segments")
        if segments is None:
            raise DataError(
                "data state: no 'segments' (written by an evertrain before the interleaved stream, "
                "whose window order differs); finish that run with the evertrain that started it"
            )
        if (
            not isinstance(segments, list)
            or not segments
            or not all(
                isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) for v in s)
                for s in segments
            )
            or segments[0][0] != 0
            or segments[-1][1] != state["manifest_version"]
            or any(a[0] > b[0] or a[1] >= b[1] for a, b in zip(segments, segments[1:]))
        ):
            raise DataError(
                f"data state: 'segments' should be [[0, version], [offset, later version], ...] "
                f"ending at manifest_version {state['manifest_version']}, got {segments!r}"
            )
        if (state.get("mix") or None) != self.mix:
            raise DataError(f"data state: read with mix {state.get('mix')}, this stream has mix {self.mix}")
        current = load_manifest(self.data_dir)
        if state["manifest_version"] > current.version:
            raise DataError(
                f"{self.data_dir / MANIFEST}: is at version {current.version} but the checkpoint "
                f"read version {state['manifest_version']}; is data.path the directory the run used?"
            )
        then = current.at_version(state["manifest_version"])
        check_identity(state, then, self.split)
        for _, version in segments:
            then.at_version(version)  # each must be in the history
        self._use(then)
        self.cursor, self.epoch, self.epoch_start = state["cursor"], state["epoch"], state["epoch_start"]
        self.segments = [tuple(s) for s in segments]
        self.orders.clear()
        try:
            length = self._order(self.epoch).length
        except ValueError as exc:  # a segment that starts beyond its predecessor's epoch
            raise DataError(f"data state: {exc}") from None
        if not segments[-1][0] <= self.cursor - self.epoch_start <= length:
            raise DataError(
                f"data state: cursor {state['cursor']} is outside epoch {state['epoch']} "
                f"({length} windows of seq_len {self.seq_len} from {self.data_dir})"
            )

    def refresh(self) -> bool:
        """Re-read the manifest; if it grew, the rest of the epoch takes in the new shards (a new segment
        at the cursor). True if it grew. Raises DataError if the shards read so far are no longer an
        unchanged prefix. A mix stream stays on its version (returns False)."""
        latest = load_manifest(self.data_dir)
        check_extends(self.manifest, latest)
        if latest.version == self.manifest_version or self.mix is not None:
            return False
        self._use(latest)
        offset = self.cursor - self.epoch_start
        if self.segments[-1][0] == offset:  # nothing read since the last join: that segment just grows
            self.segments[-1] = (offset, latest.version)
        else:
            self.segments.append((offset, latest.version))
        return True


def val_batches(
    data_dir: str | Path, seq_len: int, n_batches: int, batch_windows: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """The first n_batches * batch_windows windows of the val split, in order (no shuffle, no weights),
    as n_batches global batches; rank gets its contiguous slice of each."""
    if batch_windows % world_size:
        raise ValueError(f"{batch_windows} windows per batch do not split over {world_size} ranks")
    manifest = load_manifest(data_dir)
    reader = ShardReader(Path(data_dir), manifest.dtype, seq_len + 1)
    wanted = n_batches * batch_windows
    in_order = (reader.read(shard, i) for shard in manifest.val for i in range(shard.tokens // (seq_len + 1)))
    windows = list(itertools.islice(in_order, wanted))
    if not windows:
        raise no_windows_error(manifest, "val", seq_len)
    if len(windows) < wanted:
        raise DataError(
            f"{data_dir}: the val split has {len(windows)} windows of seq_len {seq_len}, fewer than "
            f"the {n_batches} batches x {batch_windows} windows asked for; lower eval.batches or "
            "append val data"
        )
    per_rank = batch_windows // world_size
    import torch

    batches = torch.from_numpy(np.stack(windows).astype(np.int64)).view(n_batches, batch_windows, seq_len + 1)
    return [batch[rank * per_rank : (rank + 1) * per_rank].clone() for batch in batches]
