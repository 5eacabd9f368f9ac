"""The plan of a feed of sources, without a database: how many draws each weight gives, that
every epoch draws exactly that from each source (each copy of a source once), that the
sources are spread through the epoch, and that the order is a pure function of the seed,
the epoch and the sources (the same on every daemon, at any restart and in any shard)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mongofeed.daemon.planner import WHOLE, Ids, MixSource, MixturePlan, Shard, Weight
from mongofeed.daemon.planner.mixture import draw_counts
from mongofeed.daemon.planner.order import Permutation, permute_many


def source(name: str, ids, kind: str, value, collection: str = "c") -> MixSource:
    ids = Ids.from_values(ids)
    return MixSource(name, collection, ids, ids.digest(), Weight(kind, value))


def epoch_samples(plan: MixturePlan, epoch: int, shard: Shard = WHOLE) -> list:
    return [sample for j in range(plan.shard_batches(shard))
            for sample in plan.batch_ids(epoch, plan.global_index(shard, 0, j))]


def test_proportions_round_to_counts_that_sum_to_the_epoch_size():
    """Largest remainders: each count is its quota rounded down or up, the sum exact, ties
    to the source declared first."""
    names = ["a", "b", "c"]
    thirds = [Weight("proportion", 0.3333333333333333)] * 3
    assert draw_counts(names, thirds, [10, 10, 10], 100) == [34, 33, 33]
    assert draw_counts(names, [Weight("proportion", p) for p in (0.1, 0.2, 0.7)],
                       [5, 5, 5], 999) == [100, 200, 699]  # quotas 99.9, 199.8, 699.3
    assert sum(draw_counts(names, [Weight("proportion", p) for p in (0.15, 0.35, 0.5)],
                           [1, 1, 1], 7)) == 7


def test_repeat_rounds_half_up_and_choose_is_exact():
    weights = [Weight("repeat", 2.5), Weight("repeat", 0.5), Weight("choose", 4)]
    assert draw_counts(["a", "b", "c"], weights, [3, 3, 9], None) == [8, 2, 4]  # 7.5, 1.5


@pytest.mark.parametrize("weights, sizes, epoch_size, message", [
    ([Weight("choose", 11)], [10], None, "source 'a' has choose = 11, more than the 10"),
    ([Weight("repeat", 0.01)], [10], None, r"source 'a' \(repeat = 0.01\) draws no document"),
    ([Weight("proportion", 1.0)], [0], 10, "source 'a' selects no document"),
    ([Weight("proportion", 1.0)], [5], None, "epoch_size"),
])
def test_counts_a_source_cannot_give_are_refused_naming_it(weights, sizes, epoch_size,
                                                           message):
    with pytest.raises(ValueError, match=message):
        draw_counts(["a"], weights, sizes, epoch_size)


def test_proportion_shares_hold_in_every_epoch_and_are_spread_through_it():
    """Over 20 epochs each source's share is its proportion to within one sample of the
    epoch (the rounding), and in each quarter of an epoch to within 0.06 (the mixing
    permutation spreads them: a quarter of 250 samples holds a hypergeometric count)."""
    plan = MixturePlan([source("big", range(900), "proportion", 0.7),
                        source("small", range(1000, 1100), "proportion", 0.3)],
                       batch_size=10, seed=3, epoch_size=1000)
    for epoch in range(20):
        samples = [name for name, _ in epoch_samples(plan, epoch)]
        shares = Counter(samples)
        assert shares == {"big": 700, "small": 300}
        for quarter in range(4):
            part = samples[quarter * 250:(quarter + 1) * 250]
            assert abs(part.count("small") / 250 - 0.3) < 0.06, (epoch, quarter)


def test_each_copy_of_a_source_is_drawn_once_and_subsets_change_per_epoch():
    plan = MixturePlan([source("twice", range(10), "repeat", 2.5),
                        source("some", range(100, 120), "choose", 5),
                        source("once", range(200, 207), "repeat", 1)],
                       batch_size=4, seed=1)
    chosen = []
    for epoch in range(3):
        drawn = Counter(epoch_samples(plan, epoch))
        twice = {i: drawn[("twice", i)] for i in range(10)}
        assert sorted(twice.values()) == [2] * 5 + [3] * 5  # 2 copies and a seeded half
        some = [i for (name, i), n in drawn.items() if name == "some"]
        assert len(some) == 5 and all(drawn[("some", i)] == 1 for i in some)
        assert all(drawn[("once", i)] == 1 for i in range(200, 207))
        assert sum(drawn.values()) == 25 + 5 + 7
        chosen.append(set(some))
    assert chosen[0] != chosen[1] or chosen[1] != chosen[2]


def test_a_proportion_larger_than_its_source_repeats_it():
    plan = MixturePlan([source("rare", range(10), "proportion", 0.5),
                        source("common", range(100, 200), "proportion", 0.5)],
                       batch_size=8, seed=0, epoch_size=50)
    drawn = Counter(i for name, i in epoch_samples(plan, 0) if name == "rare")
    assert sorted(drawn.values()) == [2] * 5 + [3] * 5
    assert plan.describe_sources()[0]["copies"] == 2.5


def test_the_order_is_a_function_of_seed_epoch_and_sources():
    def make(seed=5, weight=0.4):
        return MixturePlan([source("a", range(50), "proportion", weight),
                            source("b", range(100, 150), "proportion", 1 - weight)],
                           batch_size=7, seed=seed, epoch_size=60)
    assert epoch_samples(make(), 4) == epoch_samples(make(), 4)  # two daemons, a restart
    assert epoch_samples(make(), 4) != epoch_samples(make(), 5)
    assert epoch_samples(make(), 4) != epoch_samples(make(seed=6), 4)
    assert make().identity() == make().identity()
    assert make().identity()["ids_digest"] != make(weight=0.5).identity()["ids_digest"]


def test_shards_split_the_mixture_as_a_plain_feed():
    plan = MixturePlan([source("a", range(40), "repeat", 1),
                        source("b", range(100, 130), "repeat", 1)], batch_size=6, seed=2)
    whole = epoch_samples(plan, 1)  # 70 samples, 12 batches: the last two sit out of 5 ranks
    parts = [epoch_samples(plan, 1, Shard(r, 5)) for r in range(5)]
    assert [len(part) for part in parts] == [12] * 5
    assert sorted(s for part in parts for s in part) == sorted(whole[:-10])


def test_batch_parts_list_each_sources_ids_and_their_places():
    plan = MixturePlan([source("a", range(20), "repeat", 1),
                        source("b", [f"k{i}" for i in range(9)], "repeat", 2)],
                       batch_size=8, seed=9)
    for g, parts in enumerate(plan.batch_parts(2, list(range(plan.global_batches())))):
        batch = [None] * sum(len(p.at) for p in parts)
        for part in parts:
            rows = plan.sources[plan.source_names.index(part.source)].ids
            for place, row in zip(part.at.tolist(), list(part.ids), strict=True):
                batch[place] = (part.source, row if rows.kind == "objects" else int(row))
        assert batch == plan.batch_ids(2, g)
        assert all(isinstance(p.ids, np.ndarray) or p.source == "b" for p in parts)


def test_the_copies_of_a_source_are_permuted_in_one_pass_as_one_by_one():
    keys = [("source", 1, 2, "a", copy) for copy in range(5)]
    which, positions = np.array([0, 3, 3, 1, 4, 2, 0, 4]), np.arange(8) % 7
    assert permute_many(7, keys, which, positions).tolist() == [
        Permutation(7, keys[w]).at([p])[0] for w, p in zip(which, positions, strict=True)]
