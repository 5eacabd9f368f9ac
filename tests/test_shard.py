"""Sharding with real daemons: `serve --shard r/R` (one daemon per trainer host) and
`Consumer(shard=(r, R))` (several consumers of one daemon) both split every epoch into
disjoint parts with equal batch counts (rank r takes global batches r, r + R, ...) that
together cover it, but for the batches left over by an uneven split (fewer than R)."""

from __future__ import annotations

from mongofeed import Consumer
from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml

COUNT, WORLD, BATCH = 45, 2, 4  # 12 global batches, the last of one document


def one_epoch(consumer: Consumer) -> tuple[int, list[int]]:
    batches = list(consumer.epoch())
    return len(batches), [i for b in batches for i in b.arrays["idx"].tolist()]


def check_shards(parts: list[tuple[int, list[int]]]):
    counts = {count for count, _ in parts}
    assert len(counts) == 1, f"unequal batch counts {counts}"
    seen = [i for _, ids in parts for i in ids]
    assert len(seen) == len(set(seen)), "shards overlap"
    assert set(seen) <= set(range(COUNT))
    assert COUNT - len(seen) <= (WORLD - 1) * BATCH  # at most R - 1 batches sit out


def config_path(mongo_uri, db, tmp_path):
    insert_samples(db.samples, COUNT)
    return write_toml(tmp_path / "c.toml", sample_config(
        mongo_uri, db.name, batch={"size": BATCH},
        feeds={"train": {"filter": {}, "shuffle": True}}))


def test_daemons_with_shards_split_the_epoch(mongo_uri, db, tmp_path):
    path = config_path(mongo_uri, db, tmp_path)
    parts = []
    for rank in range(WORLD):
        with Daemon(path, workers=1, args=["--shard", f"{rank}/{WORLD}"]) as daemon:
            with Consumer(daemon.bind) as consumer:
                parts.append(one_epoch(consumer))
    check_shards(parts)


def test_consumers_with_shards_split_one_daemon(mongo_uri, db, tmp_path):
    path = config_path(mongo_uri, db, tmp_path)
    with Daemon(path, workers=2) as daemon:
        consumers = [Consumer(daemon.bind, shard=(rank, WORLD)) for rank in range(WORLD)]
        try:
            check_shards([one_epoch(c) for c in consumers])
        finally:
            for consumer in consumers:
                consumer.close()


def test_consumer_shards_compose_within_a_daemon_shard(mongo_uri, db, tmp_path):
    path = config_path(mongo_uri, db, tmp_path)
    with Daemon(path, workers=1, args=["--shard", "1/2"]) as daemon:
        with Consumer(daemon.bind) as whole, Consumer(daemon.bind, shard=(0, 2)) as a, \
                Consumer(daemon.bind, shard=(1, 2)) as b:
            _, daemon_part = one_epoch(whole)
            (count_a, ids_a), (count_b, ids_b) = one_epoch(a), one_epoch(b)
    assert count_a == count_b and not set(ids_a) & set(ids_b)
    assert set(ids_a) | set(ids_b) <= set(daemon_part)
