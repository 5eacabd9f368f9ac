"""Training jobs crash and restart from a checkpoint; consumers are slow for a long time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from mongofeed import Consumer
from mongofeed.portable import CAN_SUSPEND
from mongofeed.testing import Daemon, wait_until
from tests.chaos.support import BATCHES, assert_exactly_once, feed_config, read_batches

SESSION_TIMEOUT_S = 3

CRASHING_TRAINER = """
import sys, time
from mongofeed import Consumer
consumer = Consumer(sys.argv[1], "train", timeout=30, start_epoch=1)
for _ in range(5):
    consumer.get()
print("read", flush=True)
time.sleep(600)
"""


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.skipif(not CAN_SUSPEND, reason="freezes a trainer with SIGSTOP, which this "
                    "platform lacks")
def test_restart_from_checkpoint_gets_the_same_epoch_and_nothing_of_the_dead_run(
        tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db,
                         serve={"session_timeout": SESSION_TIMEOUT_S, "max_pending": 4})
    with Daemon(config, workers=2) as daemon:
        with Consumer(daemon.bind, "train", timeout=30) as first_run:
            reference = read_batches(first_run, 2 * BATCHES)
        assert_exactly_once(reference, epochs=(0, 1))

        # A trainer resumes at epoch 1, reads a little and hangs (no heartbeats, its
        # connection stays open), as a job that the cluster has frozen or lost.
        crashed = subprocess.Popen([sys.executable, "-c", CRASHING_TRAINER, daemon.bind],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert crashed.stdout.readline() == "read\n"
            crashed.send_signal(signal.SIGSTOP)
            assert len(daemon.status()["sessions"]) == 1
            frozen = time.monotonic()
            assert wait_until(lambda: not daemon.status()["sessions"], SESSION_TIMEOUT_S + 10)
            print(f"silent session ended {time.monotonic() - frozen:.1f} s after its last "
                  f"heartbeat (timeout {SESSION_TIMEOUT_S} s)")
            assert daemon.status()["pending_tasks"] == 0  # no work for the departed

            # Its replacement resumes at the same checkpoint: the same epoch, from batch 0.
            with Consumer(daemon.bind, "train", timeout=30, start_epoch=1) as resumed:
                again = read_batches(resumed, BATCHES)
                assert again == [b for b in reference if b[0] == 1]
        finally:
            crashed.kill()
            crashed.wait()
            crashed.stdout.close()


def test_slow_consumer_keeps_daemon_memory_bounded(tmp_path, mongo_uri, db):
    max_pending = 4
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": max_pending})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30, prefetch=2) as consumer:
        status = daemon.status()
        bound = status["session_memory_bound_bytes"]
        # max_pending batches produced ahead, as many sent and not yet read
        assert bound == 2 * status["batch_bytes"] * max_pending
        batches, rss = [], []
        pids = [status["pid"]] + [w["pid"] for w in status["workers"]]
        for _epoch in range(3):
            for _ in range(BATCHES):
                batches += read_batches(consumer, 1)
                time.sleep(0.08)  # training is slower than loading
                if len(batches) % 10 == 0:
                    session = daemon.status()["sessions"][0]
                    held = session["waiting"] + session["in_production"]
                    assert held <= max_pending, session
                    assert held * status["batch_bytes"] <= bound
            rss.append(sum(rss_bytes(p) for p in pids))
    assert_exactly_once(batches, epochs=(0, 1, 2))
    print(f"memory bound {bound} bytes; daemon RSS per epoch {rss}")
    assert rss[-1] - rss[0] < 8 * 2**20, f"daemon memory grows per epoch: {rss}"
