"""The daemon's shared memory under faults: arrays a trainer holds never change while workers
write and die; the batches the Keras adapter keeps to hand again stay views however few
batches the daemon makes ahead; a trainer that cannot map the region (another host) is
served over tcp; a daemon without a shared-memory folder serves everyone with messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mongofeed import Consumer
from mongofeed.daemon.config.schema import DEFAULT_MAX_HELD_BATCHES
from mongofeed.testing import Daemon
from tests.chaos.support import (
    BATCHES,
    assert_exactly_once,
    feed_config,
    kill_quietly,
    private_tmp,
    read_batches,
    regions,
)
from tests.support import REPO

READ_EPOCH = """
import json, sys
from mongofeed import Consumer
with Consumer(sys.argv[1], "train", timeout=30) as consumer:
    batches = [[b.epoch, b.index, b.arrays["idx"].tolist()] for b in consumer.epoch()]
    print(json.dumps({"shared_memory": consumer.shared_memory, "batches": batches}))
"""


def test_held_arrays_never_change_while_workers_write_and_die(tmp_path, mongo_uri, db):
    kept = BATCHES // 2
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": BATCHES})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30, held_batches=kept) as consumer:
        held = [consumer.get() for _ in range(BATCHES)]  # epoch 0, every batch kept
        assert consumer.shared_memory
        assert all(not b.arrays["x"].flags.writeable for b in held[:kept])  # views, read-only
        assert all(b.arrays["x"].flags.writeable for b in held[kept:])  # held too many: copies
        snapshot = [{name: a.copy() for name, a in b.arrays.items()} for b in held]
        batches = [(b.epoch, b.index, b.arrays["idx"].tolist()) for b in held]
        # Workers die while writing the next epochs' slabs. Between the two kills the trainer
        # reads 2 x max_pending batches: the daemon makes at most max_pending ahead of what it
        # sent and sends at most max_pending ahead of what was read, in order, so every task
        # worker 0 held is delivered before worker 1 dies and no task dies twice (that is a
        # poison task, failed by design).
        batches += read_batches(consumer, BATCHES // 2)
        kill_quietly(daemon.status()["workers"][0]["pid"])
        batches += read_batches(consumer, 2 * BATCHES)
        kill_quietly(daemon.status()["workers"][1]["pid"])
        batches += read_batches(consumer, 4 * BATCHES - len(batches))
        for batch, before in zip(held, snapshot, strict=True):
            for name, array in batch.arrays.items():
                assert np.array_equal(array, before[name]), (batch.epoch, batch.index, name)
            # each row's x is its idx four times: no slab was written twice or torn
            assert (batch.arrays["x"] == batch.arrays["idx"][:, None]).all()
        session = daemon.status()["sessions"][0]
    assert_exactly_once(batches, epochs=(0, 1, 2, 3))
    assert session["transport"] == "shared memory"
    assert session["slabs"]["lent"] >= kept  # still lent: still held


def test_the_batches_keras_keeps_to_hand_again_are_views_with_a_small_max_pending(
        tmp_path, mongo_uri, db):
    from mongofeed.keras import MongoFeedSequence
    from mongofeed.replay import DEFAULT_REPLAY_BATCHES

    max_pending = 2  # what 2 workers read ahead of batches over 32 MiB
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": max_pending})
    with Daemon(config, workers=2) as daemon:
        seq = MongoFeedSequence(daemon.bind, "train", timeout=30)
        try:
            seq.on_epoch_begin()
            # A pass Keras may still drop: all of it is kept, and each batch is a view.
            kept = [seq[i] for i in range(DEFAULT_REPLAY_BATCHES)]
            assert seq.consumer.shared_memory
            assert not any(x.flags.writeable for x, _ in kept)  # no copy among them
            slabs = daemon.status()["sessions"][0]["slabs"]
            assert slabs["slabs"] == 2 * max_pending + DEFAULT_MAX_HELD_BATCHES
            assert slabs["lent"] >= DEFAULT_REPLAY_BATCHES
            rest = [seq[i] for i in range(DEFAULT_REPLAY_BATCHES, len(seq))]
            seq.on_epoch_end()
        finally:
            seq.close()
    # each row's x is its document's i four times
    assert_exactly_once([(0, j, x[:, 0].astype(int).tolist())
                         for j, (x, _) in enumerate(kept + rest)], epochs=(0,))


def test_a_trainer_that_cannot_map_the_region_is_served_over_tcp(tmp_path, mongo_uri, db):
    """The trainer runs in a mount namespace of its own, where the daemon's shared-memory
    folder is an empty tmpfs: as on another host, the region is not there to map."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root, or user namespaces)")
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    with Daemon(config, workers=2, env=env) as daemon:
        elsewhere = subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
             str(tmp.parent / "shm"), sys.executable, "-c", READ_EPOCH, daemon.bind],
            capture_output=True, text=True, timeout=60, cwd=REPO)
        assert elsewhere.returncode == 0, elsewhere.stderr
        result = json.loads(elsewhere.stdout)
        assert result["shared_memory"] is False
        assert_exactly_once([tuple(b) for b in result["batches"]], epochs=(0,))
        assert daemon.status()["counters"]["sessions_opened"] == 1
        assert regions(tmp) == []  # its session ended with its region


def test_a_daemon_without_a_shared_memory_folder_sends_batches_as_messages(
        tmp_path, mongo_uri, db, monkeypatch):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2, env={"MONGOFEED_SHM_DIR": ""}) as daemon:
        with Consumer(daemon.bind, "train", timeout=30) as consumer:
            assert "no folder for shared memory" in consumer.info["shared_memory_refused"]
            batches = read_batches(consumer, BATCHES)
            assert daemon.status()["sessions"][0]["transport"] == "frames"
        assert_exactly_once(batches, epochs=(0,))
        assert not consumer.shared_memory
    monkeypatch.setenv("MONGOFEED_SHARED_MEMORY", "0")  # a trainer that refuses it
    with Daemon(config, workers=1) as daemon, Consumer(daemon.bind, "train") as consumer:
        assert "shared_memory" not in consumer.info and not consumer.shared_memory
        assert_exactly_once(read_batches(consumer, BATCHES), epochs=(0,))
        assert daemon.status()["sessions"][0]["transport"] == "tcp"
