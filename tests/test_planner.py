"""The plan is pure: the same (seed, epoch) gives the same batches on every machine. Global
batches, strided shards and start offsets; the order as a keyed permutation; compact ids."""

from __future__ import annotations

import bson
import numpy as np
import pytest
from bson import Int64, ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from mongofeed.daemon.planner import WHOLE, BatchCut, Ids, IdsBuilder, Plan, Shard, sort_key
from mongofeed.daemon.planner.ids import INT64, OBJECTID, OBJECTS, IdsDigest, parse_reply
from mongofeed.daemon.planner.order import Permutation, epoch_order
from mongofeed.daemon.planner.plans import ORDER_CHUNK, ORDER_CHUNKS_KEPT


def epoch_batches(plan: Plan, epoch: int, shard: Shard = WHOLE, offset: int = 0) -> list:
    return [plan.batch_ids(epoch, plan.global_index(shard, offset, j))
            for j in range(plan.shard_batches(shard, offset))]


@given(n=st.integers(1, 300), size=st.integers(1, 40), drop_last=st.booleans(),
       seed=st.integers(-2**40, 2**40), epoch=st.integers(0, 1000))
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


def test_the_order_is_the_same_on_every_machine_and_version():
    """Pinned values: a change here changes every user's batches (and must change
    ``order.ORDER_VERSION``, which the plan identity announces)."""
    assert epoch_order(0, 0, 10).at(np.arange(10)).tolist() == [5, 3, 1, 0, 2, 8, 9, 6, 4, 7]
    assert epoch_order(7, 3, 10**8).at([0, 1, 99_999_999]).tolist() == [
        54_189_523, 99_033_960, 19_816_187]


def test_the_kept_order_chunks_give_the_permutation_itself():
    """``order_at`` serves positions from kept chunks of the order: across chunk borders,
    strided (shards), out of order and after chunks were dropped, the values are those of
    the permutation computed directly."""
    n = 5 * ORDER_CHUNK + 123
    plan = Plan(list(range(n)), 64, seed=4)
    order = epoch_order(4, 2, n)
    rng = np.random.default_rng(0)
    requests = [np.arange(ORDER_CHUNK - 10, ORDER_CHUNK + 10), np.arange(0, n, 997),
                rng.permutation(n)[:300], np.arange(n - 5, n), np.array([3])]
    for _ in range(3):  # more chunks than are kept are asked for between repeats
        for positions in requests:
            assert plan.order_at(2, positions).tolist() == order.at(positions).tolist()
        for epoch in range(3, 3 + ORDER_CHUNKS_KEPT):
            plan.order_at(epoch, np.array([0]))
    assert len(plan._chunks) == ORDER_CHUNKS_KEPT
    assert plan.batch_ids(2, 70) == order.at(np.arange(70 * 64, 71 * 64)).tolist()


def test_unshuffled_plan_is_id_order():
    plan = Plan(list(range(25)), 10, shuffle=False)
    assert epoch_batches(plan, 5) == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


@settings(max_examples=200)
@given(n=st.integers(0, 3000), key=st.tuples(st.integers(), st.integers()))
def test_permutation_is_a_bijection(n, key):
    values = Permutation(n, key).at(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_permutation_mixes():
    """Where position 0 lands over 4,000 keys is uniform over 16 values (chi-square, 15
    degrees of freedom, p = 0.001 at 37.7), and an epoch's order does not follow the ids
    (rank correlation near 0 for 100,000 ids)."""
    landings = np.bincount([Permutation(16, ("t", k)).at([0])[0] for k in range(4000)],
                           minlength=16)
    chi2 = ((landings - 250) ** 2 / 250).sum()
    assert chi2 < 37.7, landings
    order = epoch_order(1, 2, 100_000).at(np.arange(100_000))
    assert abs(np.corrcoef(np.arange(100_000), order)[0, 1]) < 0.02
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02


@given(n=st.integers(1, 200), world=st.integers(1, 6), size=st.integers(1, 20),
       epoch=st.integers(0, 50), drop_last=st.booleans())
def test_shards_are_strided_equal_and_leave_out_at_most_the_last_batches(
        n, world, size, epoch, drop_last):
    plan = Plan(list(range(n)), size, seed=1, drop_last=drop_last)
    shards = [epoch_batches(plan, epoch, Shard(r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal batch counts
    every = epoch_batches(plan, epoch)
    left_out = plan.global_batches() % world
    # rank r's j-th batch is global batch r + world * j: the union, read round-robin, is
    # the epoch's order up to the batches left over, which are the last ones
    assert [s[j] for j in range(len(shards[0])) for s in shards] == \
        every[:len(every) - left_out]
    assert sum(plan.samples_per_epoch(Shard(r, world)) for r in range(world)) == \
        sum(len(b) for b in every[:len(every) - left_out])


@given(n=st.integers(1, 400), size=st.integers(1, 9), world=st.integers(1, 5),
       new_world=st.integers(1, 5), taken=st.integers(0, 40))
def test_a_job_resumed_with_another_world_size_continues_the_epoch(
        n, size, world, new_world, taken):
    """R ranks took k batches each: the job consumed global batches [0, k*R). Ranks of any
    R' started at offset k*R take the rest, each batch once."""
    plan = Plan(list(range(n)), size, seed=5)
    taken = min(taken, plan.shard_batches(Shard(0, world)))
    before = [b for r in range(world) for b in epoch_batches(plan, 0, Shard(r, world))[:taken]]
    offset = taken * world
    after = [b for r in range(new_world)
             for b in epoch_batches(plan, 0, Shard(r, new_world), offset)]
    every = epoch_batches(plan, 0)
    assert sorted(map(tuple, before)) == sorted(map(tuple, every[:offset]))
    left_out = (plan.global_batches() - offset) % new_world
    assert sorted(map(tuple, after)) == sorted(map(tuple, every[offset:len(every) - left_out]))


def test_consumer_shards_compose_within_a_daemon_shard():
    assert Shard(1, 2).within(Shard(2, 3)) == Shard(5, 6)
    plan = Plan(list(range(120)), 5, seed=2)  # 24 global batches
    daemon = Shard(1, 3)
    outer = epoch_batches(plan, 0, daemon)
    nested = [epoch_batches(plan, 0, Shard(r, 2).within(daemon)) for r in range(2)]
    assert nested == [outer[0::2], outer[1::2]]  # every other batch of the daemon's


def test_shard_parse_refuses_nonsense():
    assert Shard.parse("2/4") == Shard(2, 4)
    for text in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(text)


def test_batch_cut_counts_the_short_batch_where_it_goes():
    cut = BatchCut(10, 4)  # batches of 4, 4, 2
    assert [cut.shard_samples(Shard(r, 3)) for r in range(3)] == [4, 4, 2]
    assert [cut.shard_samples(Shard(r, 2)) for r in range(2)] == [4, 4]  # the third sits out
    assert cut.shard_batches(WHOLE, offset=2) == 1 and cut.shard_samples(WHOLE, 2) == 2
    assert BatchCut(10, 4, drop_last=True).shard_samples() == 8
    with pytest.raises(IndexError):
        cut.span(3)
    with pytest.raises(IndexError):
        cut.global_index(Shard(0, 2), 0, 1)


def test_mixed_id_types_sort_without_comparing_across_types():
    assert sorted(["b", 3, "a", 1], key=sort_key) == [1, 3, "a", "b"]
    plan = Plan(["b", 3, "a", 1, 2.5], 2, shuffle=False)
    assert plan.ids.kind == OBJECTS
    assert epoch_batches(plan, 0) == [[2.5, 1], [3, "a"], ["b"]]  # type name, then value


def test_plan_identity_names_order_cut_and_the_exact_ids():
    ids = list(range(100))
    identity = Plan(ids, 10, seed=7, shuffle=True, drop_last=True).identity()
    assert {k: v for k, v in identity.items() if k != "ids_digest"} == {
        "seed": 7, "batch_size": 10, "drop_last": True, "shuffle": True,
        "order": "feistel6-splitmix64", "window": None, "ids": 100}
    assert Plan(list(ids), 10).ids_digest == Plan(ids, 4, seed=1).ids_digest
    for other in (ids[:-1] + [1000], ids[:-1] + ["99"], ids[1:]):
        assert Plan(other, 10).ids_digest != identity["ids_digest"], other


# -- compact ids -------------------------------------------------------------------------------

def reply(values) -> bytes:
    return b"".join(bson.encode({"_id": v}) for v in values)


def test_objectids_are_12_byte_rows_sorted_as_mongodb_orders_them():
    oids = [ObjectId() for _ in range(1000)]
    shuffled = [oids[i] for i in np.random.default_rng(0).permutation(1000)]
    builder = IdsBuilder()
    for start in range(0, 1000, 300):  # four replies
        builder.add_reply(reply(shuffled[start:start + 300]))
    ids = builder.finish()
    assert ids.kind == OBJECTID and ids.nbytes == 12 * 1000
    assert [ids[i] for i in range(1000)] == sorted(oids)  # ObjectIds compare byte-wise
    assert ids.take([5, 0]) == [sorted(oids)[5], sorted(oids)[0]]
    # an ObjectId whose last bytes are 0 (numpy drops an S12's trailing NULs)
    zero = ObjectId(b"\x01" + b"\x00" * 11)
    assert Ids.from_values([zero])[0] == zero


def test_int32_and_int64_ids_are_one_int64_array():
    values = [5, Int64(2**40), -3, 0]
    builder = IdsBuilder()
    builder.add_reply(reply(values[:2]))  # int32 and int64 in one reply: the slow path
    builder.add_reply(reply([-3]))
    builder.add_reply(bson.encode({"_id": Int64(0)}))
    ids = builder.finish()
    assert ids.kind == INT64 and ids.nbytes == 8 * 4
    assert [ids[i] for i in range(4)] == [-3, 0, 5, 2**40]


def test_a_reply_of_another_kind_turns_the_ids_into_the_fallback_list():
    oid = ObjectId()
    builder = IdsBuilder()
    builder.add_reply(reply([3, 1]))
    builder.add_reply(reply([oid, "x", True]))
    ids = builder.finish()
    assert ids.kind == OBJECTS
    assert [ids[i] for i in range(5)] == [oid, True, 1, 3, "x"]  # type name, then value


def test_replies_are_parsed_without_decoding_when_every_document_is_alike():
    kind, values = parse_reply(reply([ObjectId(b"a" * 12), ObjectId(b"b" * 12)]))
    assert kind == OBJECTID and isinstance(values, np.ndarray)
    kind, values = parse_reply(reply([7, 8]))
    assert kind == INT64 and values.tolist() == [7, 8]
    kind, values = parse_reply(bson.encode({"_id": 7, "other": 1}))  # not {_id} alone
    assert kind == INT64 and values.tolist() == [7]


def test_the_digest_does_not_depend_on_how_the_replies_were_cut():
    values = [1, 2, 3.5, 4, "z"]
    whole, pieces = IdsDigest(), IdsDigest()
    whole.update(*parse_reply(reply(values)))
    for value in values:
        pieces.update(*parse_reply(reply([value])))
    assert whole.hexdigest() == pieces.hexdigest()
    assert Ids.from_values(list(range(10))).digest() == Ids.from_values(
        [Int64(i) for i in range(10)]).digest()
