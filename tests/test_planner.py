"""The plan is pure: the same (seed, epoch) gives the same batches on every machine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mongofeed.daemon.planner import WHOLE, Plan, Shard, sort_key


def epoch_batches(plan: Plan, epoch: int, shard: Shard = WHOLE) -> list[list]:
    return [plan.batch_ids(epoch, i, shard) for i in range(plan.batches_per_epoch(shard))]


@given(n=st.integers(1, 300), size=st.integers(1, 40), drop_last=st.booleans(),
       seed=st.integers(0, 2**32), epoch=st.integers(0, 1000))
def test_each_id_once_per_epoch(n, size, drop_last, seed, epoch):
    plan = Plan(list(range(n)), size, seed, shuffle=True, drop_last=drop_last)
    batches = epoch_batches(plan, epoch)
    ids = [i for b in batches for i in b]
    assert len(ids) == len(set(ids))
    assert all(len(b) == size for b in batches[:-1])
    if drop_last:
        assert len(ids) == (n // size) * size and all(len(b) == size for b in batches)
    else:
        assert sorted(ids) == list(range(n))


def test_same_seed_same_order_new_order_each_epoch():
    ids = list(range(100))
    a, b = Plan(ids, 10, seed=7), Plan(ids, 10, seed=7)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    assert epoch_batches(a, 3) != epoch_batches(Plan(ids, 10, seed=8), 3)


def test_unshuffled_plan_is_id_order():
    plan = Plan(list(range(25)), 10, shuffle=False)
    assert epoch_batches(plan, 5) == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


@given(n=st.integers(1, 200), world=st.integers(1, 6), size=st.integers(1, 20),
       epoch=st.integers(0, 50))
def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder(n, world, size, epoch):
    plan = Plan(list(range(n)), size, seed=1)
    shards = [epoch_batches(plan, epoch, Shard(r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal batch counts
    ids = [i for s in shards for b in s for i in b]
    assert len(ids) == len(set(ids)) == (n // world) * world


def test_consumer_shards_compose_within_a_daemon_shard():
    assert Shard(1, 2).within(Shard(2, 3)) == Shard(5, 6)
    plan = Plan(list(range(120)), 5, seed=2)
    nested = [epoch_batches(plan, 0, Shard(r, 2).within(Shard(1, 3))) for r in range(2)]
    outer = epoch_batches(plan, 0, Shard(1, 3))
    assert sorted(i for s in nested for b in s for i in b) == sorted(i for b in outer for i in b)


def test_shard_parse_refuses_nonsense():
    assert Shard.parse("2/4") == Shard(2, 4)
    for text in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(text)


def test_mixed_id_types_sort_without_comparing_across_types():
    assert sorted(["b", 3, "a", 1], key=sort_key) == [1, 3, "a", "b"]


def test_batch_index_out_of_range():
    with pytest.raises(IndexError):
        Plan(list(range(10)), 5).batch_ids(0, 2)


class CountingPlan(Plan):
    """A plan that records each epoch order it computes."""

    def __post_init__(self):
        super().__post_init__()
        self.computed = []

    def compute_order(self, epoch: int):
        self.computed.append(epoch)
        return super().compute_order(epoch)


def test_sessions_at_different_epochs_do_not_thrash_the_order_cache():
    """Five sessions, each halfway through its own epoch, take turns as the daemon plans
    their tasks (one batch each per turn) until each is halfway through its next epoch:
    every epoch's order is computed once, not once per task."""
    plan = CountingPlan(list(range(1000)), 100, seed=3)  # 10 batches per epoch
    cursors = [(epoch, 5) for epoch in range(5)]
    for _ in range(10):
        for session, (epoch, index) in enumerate(cursors):
            plan.batch_ids(epoch, index)
            cursors[session] = (epoch + 1, 0) if index == 9 else (epoch, index + 1)
    assert sorted(plan.computed) == list(range(6))


def test_order_cache_drops_the_least_recently_used_epoch():
    plan = CountingPlan(list(range(50)), 10, seed=1)
    for epoch in range(plan.orders_cached):
        plan.batch_ids(epoch, 0)
    plan.batch_ids(0, 1)                      # epoch 0 is now the most recently used
    plan.batch_ids(plan.orders_cached, 0)     # one more epoch: epoch 1 goes, not epoch 0
    plan.batch_ids(0, 2)
    plan.batch_ids(1, 0)
    assert plan.computed == [*range(plan.orders_cached), plan.orders_cached, 1]


def test_plan_identity_names_seed_cut_and_the_exact_ids():
    ids = list(range(100))
    identity = Plan(ids, 10, seed=7, shuffle=True, drop_last=True).identity()
    assert {k: v for k, v in identity.items() if k != "ids_digest"} == {
        "seed": 7, "batch_size": 10, "drop_last": True, "shuffle": True, "ids": 100}
    assert Plan(list(ids), 10).ids_digest == Plan(ids, 4, seed=1).ids_digest
    for other in (ids[:-1] + [1000], ids[:-1] + ["99"], ids[1:]):
        assert Plan(other, 10).ids_digest != identity["ids_digest"], other
