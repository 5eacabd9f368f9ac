"""The supervisor's loop against faults from its own side of the sockets: a task that kills
every worker that makes it (issue 9, the poison task), and garbage on the internal sockets.
The loop runs in a thread of the test with a stand-in worker process (no database), and a
real Consumer reads from it."""

from __future__ import annotations

import contextlib
import functools
import json
import threading

import pytest
import zmq

from mongofeed import Consumer, FeedError
from mongofeed.daemon.config import parse_config
from mongofeed.daemon.supervisor import Supervisor
from mongofeed.testing import (
    STUB_CRASH_EXIT_CODE,
    MemorySource,
    free_port_pair,
    internal_transport,
    stub_worker,
    write_documents,
)

DOCS, BATCH = 40, 4
POISON_ID = 13
READY_TIMEOUT_S = 60


@contextlib.contextmanager
def running_supervisor(tmp_path, ids=range(DOCS)):
    """A supervisor with one stub worker serving documents ``ids``, its loop in a thread;
    yields it once ready."""
    documents = write_documents(({"_id": i, "i": i} for i in ids), str(tmp_path / "docs.bson"))
    config = parse_config({
        "source": {"database": "none", "collection": "none"},
        "batch": {"size": BATCH, "seed": 5},
        "fields": {"idx": {"path": "i", "decode": "scalar", "dtype": "int64"}},
        "serve": {"workers": 1, "bind": f"tcp://127.0.0.1:{free_port_pair()}",
                  "internal_transport": internal_transport()},
    })
    # A batch that holds POISON_ID kills its worker, as a document that crashes a decoder would.
    supervisor = Supervisor(config, source=MemorySource(documents),
                            worker_main=functools.partial(stub_worker, exit_on_id=POISON_ID))
    ready, failure = threading.Event(), []

    def run():
        try:
            supervisor.start()
            supervisor.wait_ready()
            ready.set()
            while not supervisor.stopping:
                supervisor.loop_once()
            supervisor.stop()
        except BaseException as exc:  # the test reports it
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(READY_TIMEOUT_S) and not failure, failure
    try:
        yield supervisor
    finally:
        supervisor.stopping = True
        thread.join(READY_TIMEOUT_S)
    assert not failure, failure  # the loop itself never raised


def test_a_task_that_kills_its_worker_twice_fails_its_session_naming_the_batch(tmp_path):
    with running_supervisor(tmp_path) as supervisor, \
            Consumer(supervisor.config.serve.bind, "train", timeout=30) as consumer:
        plan = supervisor.plans["train"]
        poisoned = next(i for i in range(plan.batches_per_epoch())
                        if POISON_ID in plan.batch_ids(0, i))
        received = []
        with pytest.raises(FeedError) as failed:
            for _ in range(2 * plan.batches_per_epoch()):
                received.append(consumer.get().index)
        restarts = supervisor.pool.records[0].restarts
        counters = dict(supervisor.counters)
    print(f"poison task failed its session after {restarts} worker restarts: {failed.value}")
    assert (f"feed 'train', epoch 0, batch {poisoned}: the worker making it died 2 times "
            f"(last: worker 0") in str(failed.value)
    assert f"exited with code {STUB_CRASH_EXIT_CODE}" in str(failed.value)
    assert received == list(range(poisoned))  # everything before it, once, in order
    assert counters["poison_tasks"] == 1 and restarts >= 1


def test_garbage_on_the_internal_sockets_is_refused_and_counted(tmp_path, context):
    """The internal sockets sit in the daemon's private folder (or, over tcp, on a loopback
    port any local process can reach), and a bug in a worker must show as a counted
    rejection, not a dead loop."""
    deep = b"[" * 30_000 + b"]" * 30_000
    garbage_batches = [[deep], [b"{}"], [json.dumps({"task": 1, "slot": 99}).encode()],
                       [json.dumps({"task": 1, "slot": 2**62, "error": "x"}).encode()],
                       [b'{"task": 1, "slot": 0, "docs": 1' + b"0" * 5000 + b"}"], [b""]]
    garbage_events = [[b"ready", deep], [b"event", b'{"slot": 1e999}'], [b"nonsense"],
                      [b"ready", b'{"slot": 7}'], [b"event", b"\xff"]]
    healthy = [i for i in range(DOCS + 1) if i != POISON_ID]
    with running_supervisor(tmp_path, healthy) as supervisor, \
            Consumer(supervisor.config.serve.bind, "train", timeout=30) as consumer:
        task_endpoint, sink_endpoint = supervisor.pool.endpoints  # ipc or tcp
        sink = context.socket(zmq.PUSH)
        sink.connect(sink_endpoint)
        impostor = context.socket(zmq.DEALER)
        impostor.identity = b"impostor"
        impostor.connect(task_endpoint)
        for frames in garbage_batches:
            sink.send_multipart(frames)
        for frames in garbage_events:
            impostor.send_multipart(frames)
        batches = [consumer.get() for _ in range(2 * consumer.batches_per_epoch)]
        rejected = supervisor.counters["rejected_messages"]
    for epoch in (0, 1):
        ids = sorted(int(i) for b in batches if b.epoch == epoch for i in b.arrays["idx"])
        assert ids == healthy
    assert rejected == len(garbage_batches) + len(garbage_events)
