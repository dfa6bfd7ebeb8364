"""The epoch order on shard metadata alone (order.py): the Feistel shuffle is a bijection, the blend
keeps every source at its share in every 1,000 consecutive windows, appends joining an epoch at any
cursors still give every item exactly once, and a trillion-window epoch needs no per-window table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from evertrain.pretrain.data.order import Blend, EpochOrder, Layout, permute


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_permute_is_a_bijection_that_the_key_changes(n):
    out = permute(np.arange(n), n, 11)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert out.tolist() != list(range(n)) and out.tolist() != permute(np.arange(n), n, 12).tolist()


def test_permute_takes_one_domain_and_key_per_element():
    n = np.array([5] * 5 + [9] * 9)
    keys = np.array([3] * 5 + [4] * 9, dtype=np.uint64)
    x = np.concatenate([np.arange(5), np.arange(9)])
    out = permute(x, n, keys)
    assert out[:5].tolist() == permute(np.arange(5), 5, 3).tolist()
    assert out[5:].tolist() == permute(np.arange(9), 9, 4).tolist()


def test_blend_keeps_each_source_at_its_share_in_every_1000_windows():
    counts = [50_000, 30_000, 15_000, 5_000, 7]
    blend = Blend(counts)
    source, rank = blend.pick(np.arange(blend.total))
    for k, count in enumerate(counts):
        assert sorted(rank[source == k].tolist()) == list(range(count))  # each pick of k once, all of them
        runs = np.convolve(source == k, np.ones(1000), mode="valid") / 1000
        assert np.abs(runs - count / blend.total).max() <= 0.02
    for q in (0, 1, 999, 54_321, blend.total):
        assert blend.taken(q) == [int(np.sum(source[:q] == k)) for k in range(len(counts))]


def test_a_trillion_window_epoch_is_located_without_tables():
    """1e12 windows in 60,000 shards of two sources: positions anywhere in the epoch are located
    exactly (Python ints where int64 would overflow), and taken() is exact at the end."""
    shards = 60_000
    windows = [1_000_000_000_000 // shards] * shards
    layout = Layout.of(["web"] * 40_000 + ["code"] * 20_000, windows, {"web": 1.0, "code": 1.0})
    order = EpochOrder(seed=3, epoch=0, starts=[0], layouts=[layout])
    assert order.length == sum(windows)
    positions = np.array([0, 1, 2, order.length // 2, order.length - 2, order.length - 1])
    shard, window = order.locate(positions)
    assert ((0 <= shard) & (shard < shards)).all() and ((0 <= window) & (window < windows[0])).all()
    assert len(set(zip(shard.tolist(), window.tolist()))) == len(positions)
    blend = order.segments[0].blend
    assert blend.taken(order.length) == [layout.total("code"), layout.total("web")]


def fake_layout(shards: list[tuple[str, int]], weights: dict[str, float]) -> Layout:
    return Layout.of([s for s, _ in shards], [n for _, n in shards], weights)


def test_appends_joining_anywhere_give_every_item_exactly_once():
    """Epoch positions read before each join keep their windows; the whole epoch is each window once
    per unit of weight (weight 2: twice; 0.5: half of them, distinct), for joins at the start, in the
    middle, twice at one cursor and at the very end."""
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    versions = [
        [("a", 300), ("a", 120)],
        [("a", 300), ("a", 120), ("b", 90)],
        [("a", 300), ("a", 120), ("b", 90), ("a", 50), ("c", 80)],
        [("a", 300), ("a", 120), ("b", 90), ("a", 50), ("c", 80), ("b", 33)],
    ]
    layouts = [fake_layout(v, weights) for v in versions]
    for starts in ([0, 0, 0, 0], [0, 200, 201, 500], [0, 420, 420, 600], [0, 17, 300, layouts[2].length]):
        order = EpochOrder(seed=5, epoch=2, starts=starts, layouts=layouts)
        assert order.length == layouts[-1].length
        shard, window = order.locate(np.arange(order.length))
        got = Counter(zip(shard.tolist(), window.tolist()))
        for s, (source, n) in enumerate(versions[-1]):
            mine = {w: c for (sh, w), c in got.items() if sh == s}
            assert all(0 <= w < n for w in mine)
            if source == "b":
                assert mine == {w: 2 for w in range(n)}
            elif source == "c":
                assert len(mine) == round(0.5 * n) and set(mine.values()) == {1}
            else:
                assert mine == {w: 1 for w in range(n)}
        assert sum(got.values()) == sum(round(weights[s] * n) for s, n in versions[-1])
        for g in range(1, len(starts)):  # what was read before a join is what the earlier order read
            before = EpochOrder(seed=5, epoch=2, starts=starts[:g], layouts=layouts[:g])
            old = before.locate(np.arange(starts[g]))
            assert (old[0] == shard[: starts[g]]).all() and (old[1] == window[: starts[g]]).all()


def test_the_order_is_a_fixed_function_of_seed_and_epoch():
    layout = fake_layout([("a", 500), ("b", 500)], {})
    first = EpochOrder(1, 0, [0], [layout]).locate(np.arange(1000))
    assert all((x == y).all() for x, y in zip(first, EpochOrder(1, 0, [0], [layout]).locate(np.arange(1000))))
    for other in (EpochOrder(2, 0, [0], [layout]), EpochOrder(1, 1, [0], [layout])):
        assert not (other.locate(np.arange(1000))[1] == first[1]).all()
