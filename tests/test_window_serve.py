"""The windowed order (``shuffle = "window"``) through real daemons and FerretDB: every
document once per epoch, the same batches for the same seed across daemon runs, worker
counts, windows read ahead and workers killed mid-window, sharded and resumed at an epoch;
a window read with one query."""

from __future__ import annotations

import os
import signal
from collections import Counter

from mongofeed import Consumer
from mongofeed.daemon.config import parse_config
from mongofeed.daemon.planning import document_bytes
from mongofeed.testing import Daemon, ServerCounters
from tests.support import insert_samples, sample_config, write_toml

COUNT, BATCH = 203, 4  # 51 batches, the last short


def config(mongo_uri, db, **serve) -> dict:
    raw = sample_config(mongo_uri, db.name, batch={"size": BATCH, "seed": 11},
                        feeds={"train": {"filter": {}, "shuffle": "window"}},
                        serve={"plan_cache": "off", **serve})
    # windows of 24 documents: 6 ranges of 4 (one batch each), 9 windows per epoch
    raw["batch"]["window_bytes"] = 24 * document_bytes(parse_config(raw))
    return raw


def epochs(consumer: Consumer, count: int) -> list[list[list[int]]]:
    return [[b.arrays["idx"].tolist() for b in consumer.epoch()] for _ in range(count)]


def check_exactly_once(epoch: list[list[int]]):
    seen = Counter(i for batch in epoch for i in batch)
    assert max(seen.values()) == 1 and set(seen) == set(range(COUNT))
    assert [len(b) for b in epoch] == [BATCH] * (COUNT // BATCH) + [COUNT % BATCH]


def test_windowed_order_is_exact_and_the_same_across_runs_crashes_and_shards(
        mongo_uri, test_server, db, tmp_path):
    insert_samples(db.samples, COUNT)
    path = write_toml(tmp_path / "c.toml", config(mongo_uri, db))
    # fewer batches ahead than a window holds: the next window is read ahead
    ahead = write_toml(tmp_path / "ahead.toml", config(mongo_uri, db, max_pending=2))
    counters = ServerCounters(test_server.uri, test_server.metrics_url)
    with Daemon(path, workers=1) as daemon:
        planned = daemon.status()["feeds"]["train"]["planned"]
        assert (planned["range_docs"], planned["window_ranges"],
                planned["windows_per_epoch"]) == (4, 6, 9)
        before = counters.read()["queries"]
        with Consumer(daemon.bind) as consumer:
            reference = epochs(consumer, 2)
        queries = counters.read()["queries"]
    for epoch in reference:
        check_exactly_once(epoch)
    assert reference[0] != reference[1]
    if before is not None:
        assert queries - before <= 2 * 9 + 4  # a query per window (and a few getMores)

    with Daemon(ahead, workers=2) as daemon:
        with Consumer(daemon.bind) as consumer:
            first = [consumer.get().arrays["idx"].tolist() for _ in range(7)]
            # Each worker killed mid-window (its tasks re-issued, its window re-read), one
            # after the other: between the kills the trainer reads more batches than can be
            # on their way or in production (credit and max_pending, 2 each), so the first
            # victim's tasks are delivered before the second dies (killed at once, a task
            # re-issued to the second could die twice: failed as poison, by design).
            victims = daemon.status()["workers"]
            os.kill(victims[0]["pid"], signal.SIGKILL)
            first += [consumer.get().arrays["idx"].tolist() for _ in range(8)]
            os.kill(victims[1]["pid"], signal.SIGKILL)
            rest = [consumer.get().arrays["idx"].tolist() for _ in range(2 * 51 - len(first))]
        assert first + rest == reference[0] + reference[1]
        status = daemon.status()
        assert sum(w["restarts"] for w in status["workers"]) == 2
        assert status["counters"]["windows_read_ahead"] > 0
        with Consumer(daemon.bind, start_epoch=1) as consumer:  # a resume at epoch 1
            assert epochs(consumer, 1) == reference[1:]
        parts = []
        for rank in range(2):
            with Consumer(daemon.bind, shard=(rank, 2)) as consumer:
                parts.append(epochs(consumer, 1)[0])
        # rank r takes global batches r, r + 2, ...: 25 each, the 51st sits out
        assert parts == [reference[0][0:50:2], reference[0][1:50:2]]
