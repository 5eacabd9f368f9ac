"""The core guarantees of `mongofeed serve`, against the real server and real processes."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest

from mongofeed import Consumer, FeedError, FeedTimeout
from mongofeed.testing import Daemon, free_port_pair, parse_prometheus, pid_alive, wait_until
from tests.support import insert_samples, sample_config, write_toml

TRAIN_DOCS = 61  # a prime: every batch size below leaves a short last batch
VAL_DOCS = 11


def epoch_ids(consumer: Consumer) -> list[list[int]]:
    """The ``idx`` values of each batch of one epoch, in delivery order."""
    return [batch.arrays["idx"].tolist() for batch in consumer.epoch()]


def run_daemon(tmp_path, mongo_uri, db, workers=2, **config):
    path = write_toml(tmp_path / "feed.toml", sample_config(mongo_uri, db.name, **config))
    return Daemon(path, workers=workers)


@pytest.fixture
def samples(db):
    insert_samples(db.samples, TRAIN_DOCS + VAL_DOCS, val=VAL_DOCS)
    return db


@pytest.mark.parametrize("workers,size,drop_last", [
    (1, 8, False), (2, 7, False), (8, 16, False), (2, 10, True),
])
def test_every_document_exactly_once_per_epoch(tmp_path, mongo_uri, samples, workers, size,
                                                drop_last):
    batch = {"size": size, "drop_last": drop_last}
    with run_daemon(tmp_path, mongo_uri, samples, workers, batch=batch) as daemon:
        with Consumer(daemon.bind, feed="train", timeout=30) as consumer:
            expected_batches = TRAIN_DOCS // size if drop_last else -(-TRAIN_DOCS // size)
            assert consumer.batches_per_epoch == expected_batches
            orders = []
            for _ in range(3):
                batches = epoch_ids(consumer)
                ids = [i for b in batches for i in b]
                assert len(batches) == expected_batches
                assert all(len(b) == size for b in batches[:-1])
                if drop_last:
                    assert len(ids) == expected_batches * size
                    assert len(set(ids)) == len(ids)
                else:
                    assert sorted(ids) == list(range(TRAIN_DOCS))  # each exactly once
                    assert len(batches[-1]) == (TRAIN_DOCS % size or size)
                orders.append(ids)
            assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch


def test_unordered_delivery_keeps_epochs_exact(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples, workers=4, serve={"ordered": False}) as daemon, \
            Consumer(daemon.bind, timeout=30) as consumer:
        for epoch in range(3):
            batches = list(consumer.epoch())
            assert {b.epoch for b in batches} == {epoch}
            assert sorted(b.index for b in batches) == list(range(consumer.batches_per_epoch))
            assert sorted(i for b in batches for i in b.arrays["idx"].tolist()) == list(
                range(TRAIN_DOCS))


def test_arrays_follow_the_config(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples) as daemon, \
            Consumer(daemon.bind, feed="val", timeout=30) as consumer:
        batch = consumer.get()
        assert batch.epoch == 0 and batch.index == 0
        assert batch.arrays["x"].dtype == np.float32 and batch.arrays["x"].shape == (8, 4)
        # val is not shuffled: plan order is _id order, which is insertion order here
        assert batch.arrays["idx"].tolist() == list(range(TRAIN_DOCS, TRAIN_DOCS + 8))
        assert np.array_equal(batch.arrays["x"][:, 0], batch.arrays["idx"].astype(np.float32))
        labels = batch.arrays["label"]
        assert labels.dtype == np.float32 and labels.shape == (8, 3)
        assert labels.argmax(axis=1).tolist() == [i % 3 for i in batch.arrays["idx"]]


def test_same_seed_same_batches_whatever_the_worker_count(tmp_path, mongo_uri, samples):
    runs = []
    for workers in (1, 4):
        with run_daemon(tmp_path, mongo_uri, samples, workers) as daemon, \
                Consumer(daemon.bind, timeout=30) as consumer:
            runs.append([epoch_ids(consumer) for _ in range(2)])
    assert runs[0] == runs[1]
    with run_daemon(tmp_path, mongo_uri, samples, batch={"seed": 1}) as daemon, \
            Consumer(daemon.bind, timeout=30) as consumer:
        assert epoch_ids(consumer) != runs[0][0]


def test_connections_do_not_grow_with_epochs(tmp_path, mongo_uri, samples, accepted_connections,
                                              mongo_client):
    """W workers open W clients for life; epochs and documents add no connection."""
    before = accepted_connections()
    with run_daemon(tmp_path, mongo_uri, samples, workers=3) as daemon, \
            Consumer(daemon.bind, timeout=30) as consumer:
        epoch_ids(consumer)
        after_first_epoch = accepted_connections()
        for _ in range(5):
            epoch_ids(consumer)
        after_six_epochs = accepted_connections()
    assert after_six_epochs == after_first_epoch
    # Per client pymongo opens its monitoring connection(s) plus the pooled one; the
    # supervisor's planning client is the one fixed extra client.
    per_client = (after_first_epoch - before) / 4
    assert per_client <= 3, f"{after_first_epoch - before} connections for 4 clients"


def test_a_slow_trainer_wakes_one_worker_not_all(tmp_path, mongo_uri, samples):
    """A trainer slower than the daemon has every batch it asked for when new tasks are
    planned: they join one busy worker (read with one query) instead of waking every worker
    for one batch each, which on a small host takes CPU from the trainer."""
    def made(daemon) -> list[int]:
        return [w["batches"] for w in daemon.status()["workers"]]

    with run_daemon(tmp_path, mongo_uri, samples, workers=4, batch={"size": 4}) as daemon, \
            Consumer(daemon.bind, feed="train", timeout=30, prefetch=2) as consumer:
        ids = []
        for epoch in range(3):
            if epoch == 1:  # past the start, when the daemon fills its read-ahead
                before = made(daemon)
            for batch in consumer.epoch():
                ids += batch.arrays["idx"].tolist()
                time.sleep(0.05)  # training on it
        during = [after - start for after, start in zip(made(daemon), before, strict=True)]
    assert sorted(ids) == sorted(3 * list(range(TRAIN_DOCS)))
    print(f"batches made per worker in epochs 1 and 2: {during}")
    assert max(during) >= 0.75 * sum(during) > 0, during  # spread, each would make a quarter


def test_departed_consumer_does_not_affect_the_next(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples, serve={"session_timeout": 3}) as daemon:
        # A training script killed mid-epoch: no goodbye, its heartbeats just end.
        script = (f"from mongofeed import Consumer\nc = Consumer({daemon.bind!r}, timeout=30)\n"
                  "[c.get() for _ in range(3)]\nprint('took 3', flush=True)\n"
                  "import time; time.sleep(60)\n")
        first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert first.stdout.readline().strip() == "took 3"
        first.kill()
        first.wait()
        first.stdout.close()
        second = Consumer(daemon.bind, timeout=30)
        assert [sorted(sum(epoch_ids(second), [])) for _ in range(2)] == [
            list(range(TRAIN_DOCS))] * 2
        assert wait_until(lambda: len(daemon.status()["sessions"]) == 1, timeout=15)
        second.close()
        assert wait_until(lambda: not daemon.status()["sessions"], timeout=5)


def get_in_child(consumer: Consumer, answers):
    try:
        consumer.get()
        answers.put("a batch")
    except RuntimeError as exc:
        answers.put(str(exc))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="this system has no fork")
def test_a_forked_child_is_refused_and_the_parent_reads_on(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples) as daemon, \
            Consumer(daemon.bind, timeout=30) as consumer:
        ids = consumer.get().arrays["idx"].tolist()
        fork = multiprocessing.get_context("fork")
        answers = fork.SimpleQueue()
        child = fork.Process(target=get_in_child, args=(consumer, answers))
        child.start()
        child.join(30)
        assert "cannot be used in a forked child process" in answers.get()
        for batch in consumer.epoch():
            ids += batch.arrays["idx"].tolist()
        assert sorted(ids) == list(range(TRAIN_DOCS))


def test_two_consumers_of_one_feed_each_see_full_epochs(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples) as daemon, \
            Consumer(daemon.bind, timeout=30) as a, Consumer(daemon.bind, timeout=30) as b:
        for _ in range(2):
            a_ids, b_ids = epoch_ids(a), epoch_ids(b)
            assert a_ids == b_ids  # same feed, same seed, same epoch: the same batches
            assert sorted(sum(a_ids, [])) == list(range(TRAIN_DOCS))


def test_start_epoch_resumes_the_same_order(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples) as daemon:
        with Consumer(daemon.bind, timeout=30) as consumer:
            first_run = [epoch_ids(consumer) for _ in range(3)]
        with Consumer(daemon.bind, timeout=30, start_epoch=2) as resumed:
            batch = resumed.get()
            assert (batch.epoch, batch.index) == (2, 0)
            assert batch.arrays["idx"].tolist() == first_run[2][0]


def test_bad_document_fails_the_session_with_its_id(tmp_path, mongo_uri, samples):
    bad = samples.samples.find_one({"i": 5})
    samples.samples.update_one({"_id": bad["_id"]}, {"$set": {"x": b"short"}})
    with run_daemon(tmp_path, mongo_uri, samples, feeds={"all": {"shuffle": False}}) as daemon, \
            Consumer(daemon.bind, feed="all", timeout=30) as consumer:
        with pytest.raises(FeedError) as failure:
            epoch_ids(consumer)
        message = str(failure.value)
        assert str(bad["_id"]) in message and "'x'" in message and "16 bytes" in message
        # The trainer gets the first bad batch it would reach, even when the next epoch's,
        # planned ahead, failed first; status shows what the workers hit.
        assert "feed 'all', epoch 0, batch " in message
        status = daemon.status()
        assert 1 <= sum(worker["errors"] for worker in status["workers"]) <= 2
        assert all(str(bad["_id"]) in error for error in status["errors"])


def test_status_shows_where_a_session_will_fail_before_its_trainer_gets_there(
        tmp_path, mongo_uri, samples):
    bad = samples.samples.find_one({"i": 40})  # batch 5 of an unshuffled epoch of 8s
    samples.samples.update_one({"_id": bad["_id"]}, {"$set": {"x": b"short"}})
    # prefetch=1: the daemon holds the batches before the bad one until the trainer asks, so
    # the session lives on, failing (with more credit they would all be sent at once).
    path = write_toml(tmp_path / "feed.toml", sample_config(
        mongo_uri, samples.name, feeds={"all": {"shuffle": False}}))
    metrics_port = free_port_pair()
    with Daemon(path, workers=2, args=["--metrics-port", str(metrics_port)]) as daemon, \
            Consumer(daemon.bind, feed="all", timeout=30, prefetch=1) as consumer:
        taken = [consumer.get().index for _ in range(2)]

        def failing():
            sessions = daemon.status()["sessions"]
            return sessions[0]["failing"] if sessions else None

        assert wait_until(failing, timeout=30)
        assert failing()["epoch"] == 0 and failing()["batch"] == 5
        assert str(bad["_id"]) in failing()["error"]
        result = subprocess.run([sys.executable, "-m", "mongofeed", "status", "--control",
                                 daemon.control], capture_output=True, text=True, timeout=60)
        assert "fails at epoch 0, batch 5, when its consumer gets there" in result.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as reply:
            assert parse_prometheus(reply.read().decode(), "mongofeed_failing_sessions") == 1
        with pytest.raises(FeedError, match=str(bad["_id"])):
            while True:
                taken.append(consumer.get().index)
        assert taken == [0, 1, 2, 3, 4]


def test_skipped_documents_are_counted(tmp_path, mongo_uri, samples):
    """Two bad documents in the last batch of an unshuffled epoch; one batch produced ahead
    at most, so the counters see exactly one epoch's skips."""
    last = TRAIN_DOCS + VAL_DOCS - 1
    samples.samples.update_many({"i": {"$in": [last - 1, last]}},
                                {"$set": {"y": "not a number"}})
    with run_daemon(tmp_path, mongo_uri, samples, batch={"on_error": "skip"},
                    feeds={"all": {"shuffle": False}}, serve={"max_pending": 1}) as daemon, \
            Consumer(daemon.bind, feed="all", timeout=30) as consumer:
        ids = sum(epoch_ids(consumer), [])
        assert ids == list(range(last - 1))
        status = daemon.status()
        assert sum(w["skips"] for w in status["workers"]) == 2
        assert status["sessions"][0]["skips"] == 2


def test_unknown_feed_is_refused_by_name(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples) as daemon:
        with pytest.raises(FeedError, match="unknown feed 'test'.*train, val"):
            Consumer(daemon.bind, feed="test", timeout=10)


def test_consumer_without_daemon_times_out_naming_the_endpoint():
    with pytest.raises(FeedTimeout, match="tcp://127.0.0.1:2.*mongofeed serve.*control endpoint of tcp://127.0.0.1:1"):
        Consumer("tcp://127.0.0.1:1", timeout=0.5)


def test_clean_shutdown_leaves_no_process(tmp_path, mongo_uri, samples):
    daemon = run_daemon(tmp_path, mongo_uri, samples, workers=3).start()
    pids = [w["pid"] for w in daemon.status()["workers"]]
    assert all(pid_alive(pid) for pid in pids)
    assert daemon.stop() == 0
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=5)


def test_gridfs_field(tmp_path, mongo_uri, db):
    """FerretDB v1 does not promise GridFS; this runs where the server supports it."""
    import gridfs

    fs = gridfs.GridFSBucket(db)
    try:
        file_ids = [fs.upload_from_stream(f"f{i}", np.full(4, i, np.float32).tobytes())
                    for i in range(10)]
    except Exception as exc:  # noqa: BLE001 - any server-side refusal means "not supported"
        pytest.skip(f"the test server does not support GridFS: {exc}")
    db.samples.insert_many([{"i": i, "blob": file_ids[i]} for i in range(10)])
    fields = {"idx": {"path": "i", "decode": "scalar", "dtype": "int64"},
              "x": {"path": "blob", "decode": "raw", "dtype": "float32", "shape": [4],
                    "gridfs": True}}
    with run_daemon(tmp_path, mongo_uri, db, feeds={"all": {"shuffle": False}}, fields=fields,
                    output={"inputs": ["x"]}) as daemon, \
            Consumer(daemon.bind, feed="all", timeout=30) as consumer:
        batches = list(consumer.epoch())
    counts = Counter()
    for batch in batches:
        assert np.array_equal(batch.arrays["x"][:, 0], batch.arrays["idx"].astype(np.float32))
        counts.update(batch.arrays["idx"].tolist())
    assert counts == Counter(range(10))


def test_status_command_shows_workers_feeds_and_sessions(tmp_path, mongo_uri, samples):
    with run_daemon(tmp_path, mongo_uri, samples, workers=2) as daemon, \
            Consumer(daemon.bind, feed="train", timeout=30) as consumer:
        epoch_ids(consumer)
        done = subprocess.run([sys.executable, "-m", "mongofeed", "status", "--control",
                               daemon.control], capture_output=True, text=True, timeout=60)
        pids = [w["pid"] for w in daemon.status()["workers"]]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for pid in pids:
        assert any(line.split()[1:2] == [str(pid)] for line in lines), done.stdout
    assert any(line.split()[:3] == ["train", str(TRAIN_DOCS), "8"] for line in lines)
    assert any(consumer.session in line and "train" in line for line in lines)
    assert "memory bound" in done.stdout and mongo_uri.split("@")[-1] in done.stdout
