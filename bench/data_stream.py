"""Cost of the interleaved, globally shuffled window order, side by side with plainly reading windows.

    python bench/data_stream.py                     # seq_len 1024, batches of 512 windows
    python bench/data_stream.py --batch 64 --repeats 9

Columns (windows/s, median of --repeats, each variant alternating with the others):
  locate 1e6 / 1e9   EpochOrder.locate on fake shard metadata only (no files): three sources
                     (0.5/0.3/0.2 of the windows) in shards of 2^24 tokens, ~61 and ~61,000 shards,
                     with an append joined mid-epoch (two segments), at batches of consecutive positions
                     from a random place in the epoch: the pure cost of the order, O(1) per window
  one shard          windows read in sequence from one memmapped shard and stacked (no order at all)
  stream             TokenStream.next_batch on a real 4-shard data dir: order + reading
and the ratio of each to `one shard`. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from evertrain.pretrain.data.order import EpochOrder, Layout
from evertrain.pretrain.data.shards import write_manifest
from evertrain.pretrain.data.stream import Manifest, Shard, ShardReader, TokenStream, shard_name

SHARD_TOKENS = 1 << 24
SHARES = {"web": 0.5, "code": 0.3, "books": 0.2}


def fake_order(windows: int, seq_len: int, seed: int = 0) -> EpochOrder:
    """An epoch of ~`windows` windows in 2^24-token shards of three sources, with a second version
    (5% more shards) joined at a third of the epoch."""
    per_shard = SHARD_TOKENS // (seq_len + 1)
    shards = max(len(SHARES), round(windows / per_shard))
    names = [name for name, share in SHARES.items() for _ in range(max(1, round(share * shards)))]
    grown = names + [
        name for name, share in SHARES.items() for _ in range(max(1, round(0.05 * share * shards)))
    ]
    first = Layout.of(names, [per_shard] * len(names), {})
    second = Layout.of(grown, [per_shard] * len(grown), {})
    return EpochOrder(seed, 0, [0, first.length // 3], [first, second])


def time_call(fn, n_windows: int, repeats: int) -> float:
    """Median windows/s of fn() (which yields n_windows windows)."""
    fn()  # warm: caches, page faults
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n_windows / (time.perf_counter() - start))
    return statistics.median(rates)


def make_data_dir(root: Path, seq_len: int, shards: int, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for i in range(shards):
        data = rng.integers(0, 4096, tokens, dtype=np.uint16)
        data.tofile(root / shard_name("train", i))
        entries.append(
            Shard(
                shard_name("train", i),
                tokens,
                hashlib.sha256(data.tobytes()).hexdigest(),
                "a" if i % 2 else "b",
            )
        )
    (root / "tokenizer.model").write_bytes(b"fake")
    manifest = Manifest(
        root,
        1,
        {"path": "tokenizer.model", "sha256": hashlib.sha256(b"fake").hexdigest()},
        4096,
        2,
        1,
        "uint16",
        tuple(entries),
        (),
        {"a": 1.0, "b": 1.0},
        ({"version": 1, "train": shards, "val": 0},),
    )
    write_manifest(manifest, root)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512, help="windows per next_batch / locate call")
    p.add_argument("--calls", type=int, default=20, help="calls per measurement")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    window = args.seq_len + 1
    rng = np.random.default_rng(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_data_dir(Path(tmp), args.seq_len, shards=4, tokens=SHARD_TOKENS // 4)
        manifest_shard = Shard(shard_name("train", 0), SHARD_TOKENS // 4, "", "b")
        reader = ShardReader(data_dir, "uint16", window)
        per_shard = manifest_shard.tokens // window
        stream = TokenStream(data_dir, args.seq_len, seed=0)
        orders = {size: fake_order(size, args.seq_len) for size in (10**6, 10**9)}

        def locate(order: EpochOrder):
            def run():
                for _ in range(args.calls):
                    first = int(rng.integers(0, order.length - args.batch))
                    order.locate(np.arange(first, first + args.batch))

            return run

        def one_shard():
            for c in range(args.calls):
                first = (c * args.batch) % max(1, per_shard - args.batch)
                np.stack([reader.read(manifest_shard, i) for i in range(first, first + args.batch)])

        def next_batch():
            for _ in range(args.calls):
                stream.next_batch(args.batch)

        variants = {
            "locate 1e6": locate(orders[10**6]),
            "locate 1e9": locate(orders[10**9]),
            "one shard": one_shard,
            "stream": next_batch,
        }
        for name in variants:
            results[name] = []
        for r in range(args.repeats):  # interleaved, so drift on a shared machine hits every variant
            for name, fn in variants.items() if r % 2 == 0 else reversed(variants.items()):
                results[name].append(time_call(fn, args.calls * args.batch, 1))
    print(f"seq_len {args.seq_len}, {args.batch} windows per call, median of {args.repeats}")
    print(f"epochs: 1e6 -> {orders[10**6].length:,} windows, 1e9 -> {orders[10**9].length:,} windows")
    base = statistics.median(results["one shard"])
    print(f"{'variant':<12} {'windows/s':>12} {'vs one shard':>13}")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:<12} {rate:>12,.0f} {rate / base:>12.2f}x")


if __name__ == "__main__":
    main()
