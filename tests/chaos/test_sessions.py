"""Training jobs crash and restart from a checkpoint; consumers are slow for a long time; over
the daemon's shared memory and over tcp."""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from mongofeed import Consumer
from mongofeed.daemon.config.schema import DEFAULT_MAX_HELD_BATCHES
from mongofeed.portable import CAN_SUSPEND
from mongofeed.testing import Daemon, wait_until
from tests.chaos.support import (
    BATCHES,
    BOTH_PATHS,
    assert_exactly_once,
    feed_config,
    one_region,
    private_tmp,
    read_batches,
    regions,
)

SESSION_TIMEOUT_S = 3

CRASHING_TRAINER = """
import sys, time
from mongofeed import Consumer
consumer = Consumer(sys.argv[1], "train", timeout=30, start_epoch=1,
                    shared_memory=sys.argv[2] == "True")
held = [consumer.get() for _ in range(5)]  # over shared memory: views of its slabs
print("read", consumer.shared_memory, flush=True)
time.sleep(600)
"""


PAUSED_TRAINER = """
import sys
from mongofeed import Consumer, FeedError
consumer = Consumer(sys.argv[1], "train", timeout=30, shared_memory=sys.argv[2] == "True")
taken = [consumer.get().index for _ in range(3)]
print("read", flush=True)
sys.stdin.readline()  # frozen here, then let go
try:
    while True:
        taken.append(consumer.get().index)
except FeedError as exc:
    print(len(taken), len(set(taken)), exc, flush=True)
"""


PREEMPTED_TRAINER = """
import json, signal, sys
from mongofeed import Consumer
consumer = Consumer(sys.argv[1], "train", timeout=60, shared_memory=sys.argv[2] == "True")
taken = 0

def preempted(signum, frame):  # a cluster's notice: save the state, close, leave
    print(json.dumps({"taken": taken, "state": consumer.state_dict()}), flush=True)
    consumer.close()
    sys.exit(0)

signal.signal(signal.SIGTERM, preempted)
while True:
    consumer.get()
    taken += 1
    if taken == 5:
        print("read", flush=True)
"""


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.skipif(not CAN_SUSPEND, reason="freezes a trainer with SIGSTOP, which this "
                    "platform lacks")
@BOTH_PATHS
def test_restart_from_checkpoint_gets_the_same_epoch_and_nothing_of_the_dead_run(
        tmp_path, mongo_uri, db, shared_memory):
    config = feed_config(tmp_path, mongo_uri, db,
                         serve={"session_timeout": SESSION_TIMEOUT_S, "max_pending": 4})
    tmp, env = private_tmp(tmp_path)
    with Daemon(config, workers=2, env=env) as daemon:
        with Consumer(daemon.bind, "train", timeout=30, shared_memory=shared_memory) as first:
            reference = read_batches(first, 2 * BATCHES)
        assert_exactly_once(reference, epochs=(0, 1))

        # A trainer resumes at epoch 1, reads a little, holding what it read, and hangs (no
        # heartbeats, its connection stays open), as a job that the cluster has frozen or
        # lost; then it is killed, still holding its slabs.
        crashed = subprocess.Popen([sys.executable, "-c", CRASHING_TRAINER, daemon.bind,
                                    str(shared_memory)], stdout=subprocess.PIPE, text=True)
        try:
            assert crashed.stdout.readline() == f"read {shared_memory}\n"
            crashed.send_signal(signal.SIGSTOP)
            assert len(daemon.status()["sessions"]) == 1 and len(regions(tmp)) == one_region()
            frozen = time.monotonic()
            assert wait_until(lambda: not daemon.status()["sessions"], SESSION_TIMEOUT_S + 10)
            print(f"silent session ended {time.monotonic() - frozen:.1f} s after its last "
                  f"heartbeat (timeout {SESSION_TIMEOUT_S} s)")
            assert daemon.status()["pending_tasks"] == 0  # no work for the departed
            assert regions(tmp) == []  # nor memory: its region is gone with it
            crashed.kill()

            # Its replacement resumes at the same checkpoint: the same epoch, from batch 0.
            with Consumer(daemon.bind, "train", timeout=30, start_epoch=1,
                          shared_memory=shared_memory) as resumed:
                again = read_batches(resumed, BATCHES)
                assert again == [b for b in reference if b[0] == 1]
        finally:
            crashed.kill()
            crashed.wait()
            crashed.stdout.close()


@pytest.mark.skipif(not CAN_SUSPEND, reason="freezes a trainer with SIGSTOP, which this "
                    "platform lacks")
@BOTH_PATHS
def test_a_trainer_paused_past_the_session_timeout_is_told_which_setting_ended_it(
        tmp_path, mongo_uri, db, shared_memory):
    """A debugger or SIGSTOP holds a trainer longer than ``serve.session_timeout``: the
    daemon ends its session, and the trainer, let go, gets the batches that were already
    on their way, then an error that names the setting rather than 'unknown session'."""
    config = feed_config(tmp_path, mongo_uri, db,
                         serve={"session_timeout": SESSION_TIMEOUT_S, "max_pending": 4})
    with Daemon(config, workers=2) as daemon:
        trainer = subprocess.Popen(
            [sys.executable, "-c", PAUSED_TRAINER, daemon.bind, str(shared_memory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert trainer.stdout.readline() == "read\n"
            trainer.send_signal(signal.SIGSTOP)
            assert wait_until(lambda: not daemon.status()["sessions"], SESSION_TIMEOUT_S + 10)
            trainer.send_signal(signal.SIGCONT)
            out, _ = trainer.communicate("go\n", timeout=60)
        finally:
            trainer.kill()
            trainer.wait()
        taken, distinct, error = out.split(" ", 2)
        assert taken == distinct and 3 <= int(taken) < BATCHES, out  # none twice
        assert "no heartbeat for 3 s (serve.session_timeout)" in error, out
        assert "create a new consumer" in error or "larger serve.session_timeout" in error


@pytest.mark.skipif(not CAN_SUSPEND, reason="freezes the daemon with SIGSTOP, which this "
                    "platform lacks")
@BOTH_PATHS
def test_a_preemption_handler_saves_the_state_while_get_waits(tmp_path, mongo_uri, db,
                                                              shared_memory):
    """A SIGTERM handler (a cluster's preemption notice) calls ``state_dict`` and ``close``
    while the trainer's thread waits in ``get`` for a daemon that sends nothing: the
    state comes at once and counts exactly the batches ``get`` returned."""
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": 4})
    with Daemon(config, workers=2) as daemon:
        status = daemon.status()
        daemon_pids = [status["pid"]] + [w["pid"] for w in status["workers"]]
        trainer = subprocess.Popen(
            [sys.executable, "-c", PREEMPTED_TRAINER, daemon.bind, str(shared_memory)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert trainer.stdout.readline() == "read\n"
            for pid in daemon_pids:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(1.0)  # the trainer takes what was on its way, then waits in get
            trainer.send_signal(signal.SIGTERM)
            out, _ = trainer.communicate(timeout=20)
        finally:
            for pid in daemon_pids:
                os.kill(pid, signal.SIGCONT)
            trainer.kill()
            trainer.wait()
        saved = json.loads(out)
        state = saved["state"]
        assert trainer.returncode == 0 and saved["taken"] >= 5, out
        assert state["epoch"] * BATCHES + state["taken"] == saved["taken"], out


@pytest.mark.skipif(not CAN_SUSPEND, reason="freezes the daemon with SIGSTOP, which this "
                    "platform lacks")
def test_ctrl_c_while_get_waits_is_a_keyboard_interrupt_and_the_consumer_goes_on(
        tmp_path, mongo_uri, db):
    """Ctrl-C in a notebook while ``get`` waits for the daemon: a KeyboardInterrupt, not a
    FeedError, and the same consumer then finishes the epoch, every batch once."""
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": 4})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        status = daemon.status()
        daemon_pids = [status["pid"]] + [w["pid"] for w in status["workers"]]
        taken = read_batches(consumer, 3)
        for pid in daemon_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            threading.Timer(1.0, _thread.interrupt_main).start()
            with pytest.raises(KeyboardInterrupt):
                while True:  # what was on its way, then a wait
                    taken += read_batches(consumer, 1)
        finally:
            for pid in daemon_pids:
                os.kill(pid, signal.SIGCONT)
        taken += read_batches(consumer, BATCHES - len(taken))
        assert_exactly_once(taken, epochs=(0,))


@BOTH_PATHS
def test_slow_consumer_keeps_daemon_memory_bounded(tmp_path, mongo_uri, db, shared_memory):
    max_pending, prefetch, held_batches = 4, 2, 1
    config = feed_config(tmp_path, mongo_uri, db, serve={"max_pending": max_pending})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30, prefetch=prefetch,
                     shared_memory=shared_memory, held_batches=held_batches) as consumer:
        status = daemon.status()
        bound = status["session_memory_bound_bytes"]
        # max_pending batches produced ahead, as many sent and not yet read, and the views
        # a consumer on the host may keep
        assert bound == status["batch_bytes"] * (2 * max_pending + DEFAULT_MAX_HELD_BATCHES)
        slabs = status["sessions"][0]["slabs"]
        if slabs is not None:  # the region: a slab for each of those batches it asked for
            assert slabs["slabs"] == 2 * max_pending + (held_batches if shared_memory else 0)
            assert slabs["slab_bytes"] < status["batch_bytes"] + 64 * 3  # each array aligned
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
                    if slabs is not None:  # lent or being sent: within the rest
                        lent = session["slabs"]["lent"] + session["slabs"]["sending"]
                        assert lent <= max_pending + held_batches, session
            rss.append(sum(rss_bytes(p) for p in pids))
    assert_exactly_once(batches, epochs=(0, 1, 2))
    print(f"memory bound {bound} bytes; daemon RSS per epoch {rss}")
    assert rss[-1] - rss[0] < 8 * 2**20, f"daemon memory grows per epoch: {rss}"
