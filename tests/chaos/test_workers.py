"""Workers die for real (SIGKILL, crash loops); the epoch still delivers each document once,
whether the consumer maps the daemon's shared memory or reads tcp."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mongofeed import Consumer
from mongofeed.portable import CAN_SUSPEND
from mongofeed.testing import Daemon, pid_alive, wait_until
from tests.chaos.support import (
    BATCHES,
    BOTH_PATHS,
    assert_exactly_once,
    feed_config,
    kill_quietly,
    read_batches,
    transport,
)

needs_suspend = pytest.mark.skipif(not CAN_SUSPEND, reason="freezes a worker with SIGSTOP, "
                                   "which this platform lacks")

@needs_suspend
@BOTH_PATHS
def test_sigkilled_worker_is_replaced_and_its_tasks_reissued(tmp_path, mongo_uri, db,
                                                             shared_memory):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30, shared_memory=shared_memory) as consumer:
        batches = read_batches(consumer, BATCHES // 3)
        assert daemon.status()["sessions"][0]["transport"] == transport(shared_memory)
        victim = daemon.status()["workers"][0]
        # Freeze the victim so tasks pile up on it undelivered, then kill it. The trainer
        # reads on meanwhile, so the daemon plans new tasks (with the whole epoch made
        # ahead, none would reach the victim while nobody reads).
        os.kill(victim["pid"], signal.SIGSTOP)
        reader = threading.Thread(target=lambda: batches.extend(
            read_batches(consumer, 2 * BATCHES - len(batches))))
        reader.start()
        assert wait_until(lambda: daemon.status()["workers"][0]["inflight"] > 0, 10)
        killed_at = time.monotonic()
        kill_quietly(victim["pid"])

        def replaced():
            worker = daemon.status()["workers"][0]
            return worker["restarts"] == 1 and worker["pid"] not in (None, victim["pid"]) \
                and worker["state"] in ("ready", "busy")

        assert wait_until(replaced, 10), daemon.status()["workers"]
        print(f"replacement ready {time.monotonic() - killed_at:.2f} s after SIGKILL")
        assert not pid_alive(victim["pid"])
        reader.join(60)
        assert not reader.is_alive()
        status = daemon.status()
    assert_exactly_once(batches, epochs=(0, 1))
    assert any(f"worker 0 (pid {victim['pid']}) exited" in e for e in status["errors"])


def test_crash_loop_is_backed_off_and_reported(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=1) as daemon:
        pids = set()
        for _ in range(4):  # every start dies at once: a crash loop
            assert wait_until(lambda: daemon.status()["workers"][0]["pid"] not in pids
                              and daemon.status()["workers"][0]["state"] != "backoff", 20)
            pid = daemon.status()["workers"][0]["pid"]
            pids.add(pid)
            kill_quietly(pid)
        worker = daemon.status()["workers"][0]
        time.sleep(3)  # a tight loop would restart many times meanwhile
        later = daemon.status()["workers"][0]
        assert later["restarts"] <= worker["restarts"] + 1, later
        assert later["state"] == "backoff", later
        assert any("keeps dying" in e for e in daemon.status()["errors"])


@needs_suspend
@BOTH_PATHS
def test_hung_worker_is_killed_and_its_tasks_reissued(tmp_path, mongo_uri, db, shared_memory):
    config = feed_config(tmp_path, mongo_uri, db, serve={"stall_timeout": 3})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30, shared_memory=shared_memory) as consumer:
        batches = read_batches(consumer, BATCHES // 3)
        victim = daemon.status()["workers"][0]
        os.kill(victim["pid"], signal.SIGSTOP)  # alive but silent: hung
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        assert wait_until(lambda: daemon.status()["workers"][0]["restarts"] == 1, 10)
        status = daemon.status()
    assert_exactly_once(batches, epochs=(0, 1))
    assert not pid_alive(victim["pid"])
    assert any("without a sign of life" in e for e in status["errors"])


@needs_suspend
def test_with_default_timeouts_a_hung_worker_is_replaced_before_the_consumer_gives_up(
        tmp_path, mongo_uri, db):
    """Issue 9, item 8: serve.stall_timeout's default (then a restart and a re-read) fits
    in the consumer's default timeout, so a hung worker does not end the training."""
    config = feed_config(tmp_path, mongo_uri, db)  # no timeouts set: the defaults
    with Daemon(config, workers=2) as daemon, Consumer(daemon.bind, "train") as consumer:
        batches = read_batches(consumer, BATCHES // 3)
        victim = daemon.status()["workers"][0]
        os.kill(victim["pid"], signal.SIGSTOP)  # alive but silent; the next tasks it gets hang
        stopped = time.monotonic()
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        print(f"the consumer waited out a hung worker: epoch done "
              f"{time.monotonic() - stopped:.1f} s after the worker hung")
        status = daemon.status()
    assert_exactly_once(batches, epochs=(0, 1))
    assert not pid_alive(victim["pid"])
    assert any("without a sign of life" in e for e in status["errors"])


@needs_suspend
@BOTH_PATHS
def test_workers_killed_before_reading_their_tasks_do_not_poison_them(tmp_path, mongo_uri, db,
                                                                       shared_memory):
    """Workers killed together (an OOM kill, a killed process group): a task re-issued to a
    worker that dies before it reads the task has not outlived two workers, so it is made
    again rather than failing the session as poison."""
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon:
        first, second = daemon.status()["workers"]
        os.kill(first["pid"], signal.SIGSTOP)  # idle; the tasks it is sent wait unread
        with Consumer(daemon.bind, "train", timeout=60, shared_memory=shared_memory) as consumer:
            batches, failures = [], []

            def read():
                try:
                    batches.extend(read_batches(consumer, 2 * BATCHES))
                except Exception as exc:  # the test reports it
                    failures.append(exc)

            reader = threading.Thread(target=read)
            reader.start()

            def first_holds_tasks_second_is_idle():
                workers = daemon.status()["workers"]
                return workers[0]["inflight"] > 0 and workers[1]["state"] == "ready"

            assert wait_until(first_holds_tasks_second_is_idle, 20), daemon.status()["workers"]
            os.kill(second["pid"], signal.SIGSTOP)
            kill_quietly(first["pid"])  # its unread tasks go to the frozen second worker
            assert wait_until(lambda: daemon.status()["workers"][1]["inflight"] > 0, 20), \
                daemon.status()["workers"]
            kill_quietly(second["pid"])  # which dies before it reads them
            reader.join(90)
            assert not reader.is_alive()
            status = daemon.status()
    assert not failures, failures
    assert_exactly_once(batches, epochs=(0, 1))
    assert status["counters"]["poison_tasks"] == 0
    assert sum(w["restarts"] for w in status["workers"]) >= 2
