"""The order of one epoch of training windows: a global shuffle per source, blended by weight.

Pure arithmetic on shard metadata (window counts per shard), never a per-window table, so a position's
window costs O(log sources + log shards) time and O(1) memory however big the corpus is:

    position p of the epoch
      -> segment g (a stretch read at one manifest version; a new one starts where an append joined)
      -> source s and rank r of this pick among s's picks (Blend: deterministic blending by weight)
      -> item of s (Permutation: a seeded Feistel bijection over s's items, so the shuffle spans
         every shard of the source)
      -> (shard, window) (Items: a shard with n windows owns round(weight * n) consecutive items;
         item offset o is window o mod n, through a per-shard permutation when the weight is not 1)

Everything is a fixed function of (seed, epoch, the segments' manifests, where they joined).
docs/data.md states the rule; data.py's TokenStream holds the cursor and the segments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 4  # Feistel rounds (even, so unequal halves end where they began); 4 make a PRP (Luby-Rackoff)
SMALL_TOTAL = 1 << 31  # below this, q * count fits int64 in the blender; above it Python ints are used


def key_of(*parts) -> int:
    """A 64-bit key from seed, epoch, source name, ...: the same on every machine and Python."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic is the point)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(x: np.ndarray, n: np.ndarray | int, key: np.ndarray | int) -> np.ndarray:
    """A bijection of [0, n) applied to x (elementwise n and key allowed): a Feistel network on the bit
    width of n - 1 (halves of unequal width when it is odd, which swap sides every round), cycle-walked
    back into [0, n). The covering domain is < 2n, so fewer than 2 passes are expected."""
    x = np.asarray(x, dtype=np.int64)
    shape = x.shape
    x = x.ravel()
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), shape).ravel()
    if x.size == 0:
        return x.reshape(shape)
    bits = np.maximum(2, np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.int64))
    bits = np.where(np.left_shift(1, bits) < n, bits + 1, bits).astype(np.uint64)  # float log2 near 2^k
    high0 = bits // np.uint64(2)
    low0 = bits - high0
    unique_key = np.ndim(key) == 0
    keys = np.asarray(key, dtype=np.uint64).reshape(-1)  # arrays, never numpy scalars: they warn on wrapping
    round_keys = [mix64(keys + np.uint64((r + 1) * 0x9E3779B97F4A7C15 & MASK64)) for r in range(ROUNDS)]

    def network(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
        high, low = high0[idx], low0[idx]  # v = (left: high bits) << low | (right: low bits)
        for rk in round_keys:
            left, right = v >> low, v & ((np.uint64(1) << low) - np.uint64(1))
            f = mix64(right ^ (rk if unique_key else rk[idx])) & ((np.uint64(1) << high) - np.uint64(1))
            v = (right << high) | (left ^ f)  # right moves up: the halves trade widths
            high, low = low, high
        return v

    y = network(x.astype(np.uint64), np.arange(x.size))
    outside = np.nonzero(y >= n.astype(np.uint64))[0]
    while outside.size:  # cycle walking: a permutation of the covering domain comes back into [0, n)
        y[outside] = network(y[outside], outside)
        outside = outside[y[outside] >= n[outside].astype(np.uint64)]
    return y.astype(np.int64).reshape(shape)


class Blend:
    """Which source each position takes, for sources with `counts` windows (all > 0) over sum(counts)
    positions: a balanced binary tree over the sources, each node splitting its positions between its
    two halves like Bresenham's line (left takes position q iff round((q+1) A / T) > round(q A / T)).
    At every prefix each source's count is within ~log2(sources) windows of count * q / total, the
    greedy "furthest below its target" rule of Megatron's blended datasets, but in closed form: a
    position costs O(log sources) and `taken(q)` O(sources), with no scan of the positions before."""

    def __init__(self, counts: list[int]):
        if not counts or min(counts) <= 0:
            raise ValueError(f"blend counts must be positive, got {counts}")
        self.counts = list(counts)
        self.total = sum(counts)
        # nodes: (first source, left total, total) and children; a leaf (one source) has children -1
        self.nodes: list[tuple[int, int, int]] = []
        self.children: list[tuple[int, int]] = []
        self._build(0, len(counts))
        big = self.total >= SMALL_TOTAL  # q * left would overflow int64: exact Python ints instead
        self._kind = object if big else np.int64
        self._first = np.array([n[0] for n in self.nodes], dtype=np.int64)
        self._left_total = np.array([n[1] for n in self.nodes], dtype=self._kind)
        self._node_total = np.array([n[2] for n in self.nodes], dtype=self._kind)
        self._left_child = np.array([c[0] for c in self.children], dtype=np.int64)
        self._right_child = np.array([c[1] for c in self.children], dtype=np.int64)

    def _build(self, lo: int, hi: int) -> int:
        index = len(self.nodes)
        mid = (lo + hi) // 2
        self.nodes.append((lo, sum(self.counts[lo:mid]), sum(self.counts[lo:hi])))
        self.children.append((-1, -1))
        if hi - lo > 1:
            self.children[index] = (self._build(lo, mid), self._build(mid, hi))
        return index

    @staticmethod
    def _before(q, left, total):
        """Positions among the first q of a node that go to its left half (round(q * left / total))."""
        return (q * left + total // 2) // total

    def pick(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, rank of this pick among that source's picks) for positions q in [0, total)."""
        q = np.asarray(q, dtype=np.int64).ravel()
        local = q.astype(self._kind)
        node = np.zeros(q.shape, dtype=np.int64)
        while True:
            internal = np.nonzero(self._left_child[node] >= 0)[0]
            if not internal.size:
                break
            at, lq = node[internal], local[internal]
            left, total = self._left_total[at], self._node_total[at]
            before = self._before(lq, left, total)
            goes_left = (self._before(lq + 1, left, total) > before).astype(bool)
            local[internal] = np.where(goes_left, before, lq - before)
            node[internal] = np.where(goes_left, self._left_child[at], self._right_child[at])
        return self._first[node], local.astype(np.int64)

    def taken(self, q: int) -> list[int]:
        """How many of the first q positions each source takes (O(sources), no scan)."""
        out = [0] * len(self.counts)

        def walk(node: int, local: int) -> None:
            lo, left, total = self.nodes[node]
            first, second = self.children[node]
            if first < 0:
                out[lo] = local
                return
            before = self._before(local, left, total)
            walk(first, before)
            walk(second, local - before)

        walk(0, q)
        return out


@dataclass(frozen=True)
class Items:
    """A source's items in one epoch at one manifest version: its shards (indices into the split's
    shard list, manifest order), their windows and the items each owns (round(weight * windows))."""

    shards: np.ndarray
    windows: np.ndarray
    counts: np.ndarray
    starts: np.ndarray  # cumulative counts, len(shards) + 1

    @classmethod
    def of(cls, shards: list[int], windows: list[int], weight: float) -> Items:
        counts = np.array([round(weight * n) for n in windows], dtype=np.int64)
        return cls(
            np.array(shards, dtype=np.int64),
            np.array(windows, dtype=np.int64),
            counts,
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def locate(self, items: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in the split, window index in that shard) of items in [0, total)."""
        j = np.searchsorted(self.starts, items, side="right") - 1
        offset = items - self.starts[j]
        n, count = self.windows[j], self.counts[j]
        window = offset % n
        resampled = count != n  # weight != 1: which windows repeat or are left out is drawn per epoch
        if resampled.any():
            shard_keys = mix64(
                np.uint64(key) ^ mix64(self.shards[j[resampled]].astype(np.uint64) + np.uint64(1))
            )
            window[resampled] = permute(window[resampled], n[resampled], shard_keys)
        return self.shards[j], window


@dataclass(frozen=True)
class Layout:
    """Per source (sorted by name, only those with items): its Items at one manifest version."""

    sources: tuple[str, ...]
    items: tuple[Items, ...]

    @classmethod
    def of(cls, shard_sources: list[str], shard_windows: list[int], weights: dict[str, float]) -> Layout:
        names = sorted(set(shard_sources))
        sources, items = [], []
        for name in names:
            idx = [i for i, s in enumerate(shard_sources) if s == name]
            source_items = Items.of(idx, [shard_windows[i] for i in idx], weights.get(name, 1.0))
            if source_items.total > 0:
                sources.append(name)
                items.append(source_items)
        return cls(tuple(sources), tuple(items))

    def total(self, source: str) -> int:
        return self.items[self.sources.index(source)].total if source in self.sources else 0

    @property
    def length(self) -> int:
        return sum(i.total for i in self.items)


@dataclass(frozen=True)
class Segment:
    start: int  # epoch position where it begins
    layout: Layout
    taken: dict[str, int]  # picks of each source before `start`
    remaining: dict[str, int]  # picks of each source from `start` to the end of the epoch
    added: dict[str, int]  # items of each source that this segment's version added
    blend: Blend | None  # over the sources with remaining picks (None: nothing remains)
    keys: dict[str, int]


class EpochOrder:
    """Epoch `epoch`'s windows, position by position, for a stream that read `layouts[g]` from
    position `starts[g]` on (starts[0] == 0; an append joins as a new segment at the cursor).

    Segment g's picks of source s are a fresh permutation of a pool: the picks of s that segment g-1
    had not yet made at starts[g] (in that segment's order), followed by the items of s that g's
    version added. So what was read before a join is untouched, and every item of the epoch is read
    exactly once: each pool is a bijection onto what is left."""

    def __init__(self, seed: int, epoch: int, starts: list[int], layouts: list[Layout]):
        self.seed, self.epoch = seed, epoch
        self.segments: list[Segment] = []
        for g, (start, layout) in enumerate(zip(starts, layouts)):
            if g == 0:
                taken = {s: 0 for s in layout.sources}
                previous_total = {}
            else:
                prev = self.segments[-1]
                if not prev.start <= start <= self.length_of(prev):
                    raise ValueError(f"segment {g} starts at {start}, outside segment {g - 1}")
                taken = dict(prev.taken)
                if prev.blend is not None:
                    names = [s for s in prev.layout.sources if prev.remaining[s] > 0]
                    for name, count in zip(names, prev.blend.taken(start - prev.start)):
                        taken[name] += count
                previous_total = {s: prev.layout.total(s) for s in prev.layout.sources}
            totals = {s: layout.total(s) for s in layout.sources}
            for s, t in previous_total.items():
                if totals.get(s, 0) < t:
                    raise ValueError(f"source {s!r} shrank from {t} to {totals.get(s, 0)} items")
            remaining = {s: totals[s] - taken.get(s, 0) for s in layout.sources}
            added = {s: totals[s] - previous_total.get(s, 0) for s in layout.sources}
            live = [remaining[s] for s in layout.sources if remaining[s] > 0]
            keys = {s: key_of(seed, epoch, g, s) for s in layout.sources}
            self.segments.append(
                Segment(
                    start,
                    layout,
                    {s: taken.get(s, 0) for s in layout.sources},
                    remaining,
                    added,
                    Blend(live) if live else None,
                    keys,
                )
            )
        self.length = self.length_of(self.segments[-1])
        # which windows a weight != 1 repeats or leaves out is drawn per epoch, not per segment:
        # an item must be the same window whichever segment reads it
        self.window_keys = {s: key_of(seed, epoch, "windows", s) for s in self.segments[-1].layout.sources}
        self.starts = np.array([s.start for s in self.segments], dtype=np.int64)

    @staticmethod
    def length_of(segment: Segment) -> int:
        return segment.start + sum(segment.remaining.values())

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index in the split, window index in the shard) for epoch positions in [0, length)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.length):
            raise IndexError(f"epoch positions must be in [0, {self.length})")
        last = self.segments[-1].layout
        shard = np.zeros(positions.shape, dtype=np.int64)
        window = np.zeros(positions.shape, dtype=np.int64)
        segment_of = np.searchsorted(self.starts, positions, side="right") - 1
        for g in np.unique(segment_of):
            here = segment_of == g
            seg = self.segments[g]
            names = [s for s in seg.layout.sources if seg.remaining[s] > 0]
            source, rank = seg.blend.pick(positions[here] - seg.start)
            sh, wi = np.zeros(rank.shape, np.int64), np.zeros(rank.shape, np.int64)
            for k, name in enumerate(names):
                mine = source == k
                items = self._item(int(g), name, rank[mine])
                sh[mine], wi[mine] = last.items[last.sources.index(name)].locate(
                    items, self.window_keys[name]
                )
            shard[here], window[here] = sh, wi
        return shard, window

    def _item(self, g: int, source: str, rank: np.ndarray) -> np.ndarray:
        """The item of `source` that segment g's rank-th pick of it reads (walks back through the pools)."""
        seg = self.segments[g]
        pooled = permute(rank, seg.remaining[source], seg.keys[source])
        if g == 0:
            return pooled
        old = seg.remaining[source] - seg.added[source]  # the earlier segment's picks still to make
        prev = self.segments[g - 1]
        out = np.empty_like(pooled)
        carried = pooled < old
        if carried.any():
            out[carried] = self._item(
                g - 1, source, seg.taken[source] - prev.taken.get(source, 0) + pooled[carried]
            )
        out[~carried] = prev.layout.total(source) + pooled[~carried] - old
        return out
