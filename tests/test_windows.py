"""The windowed order, pure: split points kept from a sorted listing, windows of ranges,
each window read as a range query would select it, and the batches cut from its order.
Exactly once per epoch, deterministic, shardable and resumable like the full order."""

from __future__ import annotations

import bson
import pytest
from bson import ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from mongofeed.daemon.planner import WHOLE, Ids, Shard, SplitsBuilder, WindowPlan
from mongofeed.daemon.planner.ids import MixedIdTypes
from mongofeed.daemon.planner.plans import window_shape
from mongofeed.daemon.windows import Window, WindowChanged, expect_count


def window_plan(ids: list, batch_size: int, range_docs: int, ranges: int, seed: int = 0,
                drop_last: bool = False) -> WindowPlan:
    builder = SplitsBuilder(range_docs)
    ordered = sorted(ids)
    for start in range(0, len(ordered), 7):  # replies of 7 documents
        builder.add_reply(b"".join(bson.encode({"_id": i}) for i in ordered[start:start + 7]))
    splits, last, count, digest = builder.finish()
    return WindowPlan(splits, last, count, batch_size, seed, drop_last, range_docs, ranges,
                      digest)


def read(ids: list, spec) -> Window:
    """The window as the server's range query selects it, in an arbitrary order."""
    inside = [i for i in ids if any(low <= i and (i <= high if inclusive else i < high)
                                     for low, high, inclusive in spec.ranges)]
    return expect_count(spec, Window([b"".join(bson.encode({"_id": i, "v": str(i)})
                                               for i in reversed(inside))]))


def batches(plan: WindowPlan, ids: list, epoch: int, shard: Shard = WHOLE,
            offset: int = 0) -> list[list]:
    out = []
    for j in range(plan.shard_batches(shard, offset)):
        spec = plan.batch_window(epoch, plan.global_index(shard, offset, j))
        found, docs = read(ids, spec).batch(spec, plan.seed, epoch, "c")
        assert [d["_id"] for d in docs] == found and all(d["v"] == str(d["_id"]) for d in docs)
        out.append(found)
    return out


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 400), size=st.integers(1, 8), range_batches=st.integers(1, 4),
       ranges=st.integers(1, 5), drop_last=st.booleans(), epoch=st.integers(0, 100))
def test_each_document_once_per_epoch(n, size, range_batches, ranges, drop_last, epoch):
    ids = list(range(0, 3 * n, 3))  # gaps between ids: ranges are of ids, not of values
    plan = window_plan(ids, size, size * range_batches, ranges, seed=4, drop_last=drop_last)
    got = batches(plan, ids, epoch)
    flat = [i for b in got for i in b]
    assert len(flat) == len(set(flat))
    assert all(len(b) == size for b in got[:-1])
    if drop_last:
        assert len(flat) == n // size * size
    else:
        assert sorted(flat) == ids


def test_windows_of_ranges_and_the_tail_in_the_last():
    ids = list(range(100))
    plan = window_plan(ids, 4, 8, 3)  # 12 full ranges of 8 and a tail of 4: 4 windows
    assert (plan.full_ranges, plan.tail, plan.windows, plan.window_batches) == (12, 4, 4, 6)
    specs = [plan.batch_window(0, g) for g in range(plan.global_batches())]
    assert [s.window for s in specs] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 7
    assert all(0 <= s.start < s.stop <= s.count for s in specs)  # never across windows
    last = specs[-1]
    assert last.count == 3 * 8 + 4 and last.ranges[-1][1:] == (99, True)
    for epoch in (0, 1):  # the windows' ranges partition the ids, differently each epoch
        held = [sorted(d["_id"] for d in read(ids, plan.batch_window(epoch, w * 6)).documents(
            range(plan.batch_window(epoch, w * 6).count), "c")[1]) for w in range(4)]
        assert sorted(i for w in held for i in w) == ids
    assert plan.window_ranges_of(0, 0) != plan.window_ranges_of(1, 0)


def test_same_seed_same_order_other_epoch_other_order():
    ids = [ObjectId() for _ in range(200)]
    a = window_plan(ids, 5, 10, 4, seed=3)
    b = window_plan(list(reversed(ids)), 5, 10, 4, seed=3)
    assert a.identity() == b.identity()
    assert batches(a, ids, 2) == batches(b, ids, 2)
    assert batches(a, ids, 2) != batches(a, ids, 3)
    assert batches(a, ids, 2) != batches(window_plan(ids, 5, 10, 4, seed=4), ids, 2)


def test_shards_and_a_resume_with_another_world_size():
    ids = list(range(300))
    plan = window_plan(ids, 4, 8, 2, seed=9)  # 75 global batches
    every = batches(plan, ids, 0)
    shards = [batches(plan, ids, 0, Shard(r, 3)) for r in range(3)]
    assert [s[j] for j in range(25) for s in shards] == every
    before = [b for r in range(3) for b in batches(plan, ids, 0, Shard(r, 3))[:10]]
    after = [b for r in range(2) for b in batches(plan, ids, 0, Shard(r, 2), offset=30)]
    assert sorted(map(tuple, before + after)) == sorted(map(tuple, every[:74]))  # 1 left out


def test_a_window_that_changed_is_refused():
    ids = list(range(40))
    plan = window_plan(ids, 4, 8, 2)
    spec = plan.batch_window(0, 0)
    with pytest.raises(WindowChanged, match=f"window 0 changed.*held {spec.count} when"):
        read(ids + [spec.ranges[0][0] + 0.5], spec)


def test_the_listing_keeps_split_points_and_refuses_two_types():
    builder = SplitsBuilder(3)
    builder.add_reply(b"".join(bson.encode({"_id": i}) for i in range(7)))
    splits, last, count, digest = builder.finish()
    assert [splits[i] for i in range(len(splits))] == [0, 3, 6] and (last, count) == (6, 7)
    assert digest == Ids.from_values(range(7)).digest()
    builder = SplitsBuilder(3)
    builder.add_reply(bson.encode({"_id": 1}) + bson.encode({"_id": 2.5}))  # numbers: one type
    with pytest.raises(MixedIdTypes, match="ObjectId and number"):
        builder.add_reply(bson.encode({"_id": ObjectId()}))


def test_window_shape_fits_the_bytes_in_ranges_that_are_whole_batches():
    assert window_shape(64, 1_000_000) == (15616, 64)  # 64 ranges of 244 batches
    assert window_shape(4, 32) == (4, 8)
    assert window_shape(100, 10) == (100, 1)  # at least one batch per range
