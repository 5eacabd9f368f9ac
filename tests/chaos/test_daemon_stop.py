"""The daemon stops (SIGTERM, SIGINT) or dies (SIGKILL): nothing is left running, bound, or
in the shared-memory folder."""

from __future__ import annotations

import signal
import time

import pytest

from mongofeed import Consumer, FeedTimeout
from mongofeed.testing import Daemon, pid_alive, wait_until
from tests.chaos.support import (
    BOTH_PATHS,
    feed_config,
    kill_quietly,
    port_free,
    private_tmp,
    read_batches,
    regions,
)

EXIT_WITHIN_S = 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_ends_every_child_and_releases_everything(tmp_path, mongo_uri, db, sig):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=2, env=env).start()
    with Consumer(daemon.bind, "train", timeout=30) as consumer:
        read_batches(consumer, 3)  # stop it while it is busy
        workers = [w["pid"] for w in daemon.status()["workers"]]
        assert len(list(tmp.glob("mongofeed-*"))) == 1 and len(regions(tmp)) == 1
        started = time.monotonic()
        assert daemon.stop(sig) == 0
        assert wait_until(lambda: not any(pid_alive(p) for p in workers), EXIT_WITHIN_S)
        print(f"{sig.name}: daemon and workers gone in {time.monotonic() - started:.2f} s")
        with pytest.raises(Exception, match="daemon stopped|no batch"):
            for _ in range(10):
                consumer.get(timeout=5)
    assert [p.name for p in tmp.iterdir()] == ["shm"] and regions(tmp) == []
    assert port_free(daemon.port) and port_free(daemon.port + 1)


@BOTH_PATHS
def test_sigkilled_daemon_leaves_no_orphans_and_consumer_gets_a_clear_error(
        tmp_path, mongo_uri, db, shared_memory):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=2, env=env).start()
    with Consumer(daemon.bind, "train", timeout=3, shared_memory=shared_memory) as consumer:
        held = read_batches(consumer, 3)
        workers = [w["pid"] for w in daemon.status()["workers"]]
        assert len(regions(tmp)) == 1
        started = time.monotonic()
        daemon.stop(signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in workers), EXIT_WITHIN_S), \
            "workers outlived their killed daemon"
        print(f"orphans gone {time.monotonic() - started:.2f} s after SIGKILL")
        assert regions(tmp) == []  # the workers removed their daemon's region on their way out
        with pytest.raises(FeedTimeout, match="is the daemon running"):
            for _ in range(10):  # what was prefetched comes first
                held += read_batches(consumer, 1)  # readable although the file is gone
    assert port_free(daemon.port) and port_free(daemon.port + 1)


def test_regions_of_a_daemon_killed_with_its_workers_are_removed_by_the_next(
        tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=1, env=env).start()
    with Consumer(daemon.bind, "train", timeout=3) as consumer:
        read_batches(consumer, 1)
        left = regions(tmp)
        workers = daemon.status()["workers"]
        daemon.process.send_signal(signal.SIGSTOP)  # so that it restarts no worker
        for worker in workers:  # all of them: nobody is left to clean up
            kill_quietly(worker["pid"])
        daemon.stop(signal.SIGKILL)
    assert regions(tmp) == left and len(left) == 1
    with Daemon(config, workers=1, env=env):
        assert regions(tmp) == []


def test_consumer_of_an_absent_daemon_fails_clearly(tmp_path):
    started = time.monotonic()
    with pytest.raises(FeedTimeout, match="no answer from the mongofeed daemon"):
        Consumer("tcp://127.0.0.1:9", "train", timeout=2)
    assert time.monotonic() - started < EXIT_WITHIN_S
