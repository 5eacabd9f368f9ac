"""The daemon stops (SIGTERM, SIGINT; Ctrl-Break on Windows) or dies (SIGKILL): nothing is
left running or bound, and its ipc folder (when it uses ipc) and its shared memory are
gone."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from mongofeed import Consumer, FeedError, FeedTimeout
from mongofeed.dev.portable import port_is_free
from mongofeed.portable import (
    CAN_SUSPEND,
    CONSOLE_INTERRUPTS,
    STOP_REQUESTS,
    resolve_internal_transport,
    signal_pid,
    stoppable,
)
from mongofeed.testing import PACKAGE_ROOT, Daemon, internal_transport, pid_alive, wait_until
from tests.chaos.support import (
    BOTH_PATHS,
    SHARED_MEMORY,
    feed_config,
    kill_quietly,
    one_region,
    private_tmp,
    read_batches,
    regions,
)
from tests.support import sample_config, write_toml

EXIT_WITHIN_S = 10
PLANNED_FEEDS = 12         # each one a listing of the whole collection: seconds on FerretDB
PLANNED_DOCS = 20_000


@pytest.mark.parametrize("sig", STOP_REQUESTS, ids=lambda sig: signal.Signals(sig).name)
def test_stop_signal_ends_every_child_and_releases_everything(tmp_path, mongo_uri, db, sig):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=2, env=env).start()
    ipc_folders = 1 if resolve_internal_transport(internal_transport()) == "ipc" else 0
    with Consumer(daemon.bind, "train", timeout=30) as consumer:
        read_batches(consumer, 3)  # stop it while it is busy
        workers = [w["pid"] for w in daemon.status()["workers"]]
        assert len(list(tmp.glob("mongofeed-*"))) == ipc_folders
        assert len(regions(tmp)) == one_region()
        started = time.monotonic()
        if sig in CONSOLE_INTERRUPTS:  # a terminal's Ctrl-C reaches the workers too
            for pid in workers:
                signal_pid(pid, sig)
        assert daemon.stop(sig) == 0
        assert wait_until(lambda: not any(pid_alive(p) for p in workers), EXIT_WITHIN_S)
        assert "Traceback" not in daemon.stderr_path.read_text()  # workers and daemon
        print(f"{signal.Signals(sig).name}: daemon and workers gone in "
              f"{time.monotonic() - started:.2f} s")
        with pytest.raises(Exception, match="daemon stopped|waited"):
            for _ in range(10):
                consumer.get(timeout=5)
    assert list(tmp.iterdir()) == [] and regions(tmp) == []
    assert port_is_free(daemon.port) and port_is_free(daemon.port + 1)


@BOTH_PATHS
def test_sigkilled_daemon_leaves_no_orphans_and_consumer_gets_a_clear_error(
        tmp_path, mongo_uri, db, shared_memory):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=2, env=env).start()
    with Consumer(daemon.bind, "train", timeout=3, shared_memory=shared_memory) as consumer:
        read_batches(consumer, 3)
        workers = [w["pid"] for w in daemon.status()["workers"]]
        assert len(regions(tmp)) == one_region()
        started = time.monotonic()
        daemon.kill()
        assert wait_until(lambda: not any(pid_alive(p) for p in workers), EXIT_WITHIN_S), \
            "workers outlived their killed daemon"
        print(f"orphans gone {time.monotonic() - started:.2f} s after SIGKILL")
        assert regions(tmp) == []  # the workers removed their daemon's region on their way out
        # Over tcp the consumer can only wait; over shared memory its channel says at once
        error, message = ((FeedError, "is gone .*Connection refused.*is it running") if
                          consumer.shared_memory else (FeedTimeout, "is the daemon running"))
        with pytest.raises(error, match=message):
            for _ in range(10):  # what was prefetched comes first, readable without the file
                read_batches(consumer, 1)
    assert port_is_free(daemon.port) and port_is_free(daemon.port + 1)


@pytest.mark.skipif(not (CAN_SUSPEND and SHARED_MEMORY), reason="needs SIGSTOP and shared "
                    "memory")
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
        daemon.kill()
    assert regions(tmp) == left and len(left) == 1
    with Daemon(config, workers=1, env=env):
        assert regions(tmp) == []


def test_consumer_of_an_absent_daemon_fails_clearly(tmp_path):
    started = time.monotonic()
    with pytest.raises(FeedTimeout, match="no answer from the mongofeed daemon"):
        Consumer("tcp://127.0.0.1:9", "train", timeout=2)
    assert time.monotonic() - started < EXIT_WITHIN_S


@pytest.mark.parametrize("sig", STOP_REQUESTS, ids=lambda sig: signal.Signals(sig).name)
def test_stop_signal_while_planning_stops_it_and_never_says_ready(tmp_path, mongo_uri, db,
                                                                  sig):
    """Issue 9, item 13: the signal used to wait for the end of planning, then "ready" was
    printed. Planning PLANNED_FEEDS feeds takes seconds here; the daemon must stop within
    the first one."""
    db["many"].insert_many([{"i": i, "g": i % PLANNED_FEEDS} for i in range(PLANNED_DOCS)])
    config = write_toml(tmp_path / "many.toml", sample_config(
        mongo_uri, db.name, "many",
        feeds={f"g{k}": {"filter": {"g": k}} for k in range(PLANNED_FEEDS)},
        fields={"idx": {"path": "i", "decode": "scalar", "dtype": "int64"}},
        output={"inputs": ["idx"]}))
    tmp, env = private_tmp(tmp_path)
    daemon = Daemon(config, workers=1, args=("--log-level", "info"), env=env)
    process = subprocess.Popen(daemon.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=PACKAGE_ROOT, env=daemon.env, **stoppable())
    planning = threading.Event()
    log = []

    def read_log():
        for line in process.stderr:
            log.append(line)
            if "planning feed g0" in line:
                planning.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert planning.wait(60), "".join(log)
        process.send_signal(sig)
        stdout, _ = process.communicate(timeout=EXIT_WITHIN_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    planned = [line for line in log if "planning feed" in line]
    print(f"{signal.Signals(sig).name} during planning: stopped after {len(planned)} of "
          f"{PLANNED_FEEDS} feeds")
    assert process.returncode == 0, "".join(log)
    assert "mongofeed ready" not in stdout and "mongofeed stopped" in stdout
    assert len(planned) < PLANNED_FEEDS  # it did not finish planning first
    assert "Traceback" not in "".join(log)
    assert list(tmp.iterdir()) == []  # its ipc folder is gone
    assert port_is_free(daemon.port) and port_is_free(daemon.port + 1)
