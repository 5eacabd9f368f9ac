"""The supervisor's loop against faults from its own side of the sockets: a task that kills
every worker that makes it (issue 9, the poison task), garbage on the internal sockets, and
a local stranger on them when they are tcp.
The loop runs in a thread of the test with a stand-in worker process (no database), and a
real Consumer reads from it."""

from __future__ import annotations

import contextlib
import functools
import json
import threading

import numpy as np
import pytest
import zmq

from mongofeed import Consumer, FeedError
from mongofeed.daemon.config import parse_config
from mongofeed.daemon.supervisor import Supervisor
from mongofeed.daemon.worker import worker_identity
from mongofeed.portable import resolve_internal_transport
from mongofeed.testing import (
    STUB_CRASH_EXIT_CODE,
    MemorySource,
    free_port_pair,
    internal_transport,
    stub_worker,
    wait_until,
    write_documents,
)
from mongofeed.wire import READY, BatchMeta, WorkerEvent, pack_batch

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
        endpoints = supervisor.pool.endpoints  # ipc, or tcp with the run's password
        sink = context.socket(zmq.PUSH)
        endpoints.connect(sink, endpoints.sink)
        impostor = context.socket(zmq.DEALER)
        impostor.identity = b"impostor"
        endpoints.connect(impostor, endpoints.tasks)
        for frames in garbage_batches:
            sink.send_multipart(frames)
        for frames in garbage_events:
            impostor.send_multipart(frames)
        batches = [consumer.get() for _ in range(2 * consumer.batches_per_epoch)]
        # The trainer can be done first: over tcp each connection's handshake asks the
        # authenticator thread, so the garbage may still be on its way.
        garbage = len(garbage_batches) + len(garbage_events)
        wait_until(lambda: supervisor.counters["rejected_messages"] >= garbage, READY_TIMEOUT_S)
        rejected = supervisor.counters["rejected_messages"]
    for epoch in (0, 1):
        ids = sorted(int(i) for b in batches if b.epoch == epoch for i in b.arrays["idx"])
        assert ids == healthy
    assert rejected == garbage


@pytest.mark.skipif(resolve_internal_transport(internal_transport()) == "ipc",
                    reason="over ipc the daemon's private folder keeps other users out")
def test_a_local_stranger_on_the_internal_tcp_sockets_can_take_no_task_nor_push_a_batch(
        tmp_path, context):
    """On tcp the internal sockets are loopback ports any local user can reach. A stranger
    without the run's password, taking worker 0's identity (a ROUTER hands a reconnecting
    identity over) and pushing a forged batch, must get no task and put nothing into a
    trainer's stream: refused at the handshake, so not even counted."""
    healthy = [i for i in range(DOCS + 1) if i != POISON_ID]
    with running_supervisor(tmp_path, healthy) as supervisor, \
            Consumer(supervisor.config.serve.bind, "train", timeout=30) as consumer:
        endpoints = supervisor.pool.endpoints
        # What they send can never leave (no handshake): without linger 0 a socket
        # collected after the test would hold the context's end forever.
        impostor = context.socket(zmq.DEALER)
        impostor.linger = 0
        impostor.identity = worker_identity(0)
        impostor.connect(endpoints.tasks)
        impostor.send_multipart(WorkerEvent(READY, 0, pid=1).pack())
        sink = context.socket(zmq.PUSH)
        sink.linger = 0
        sink.connect(endpoints.sink)
        forged = pack_batch(0, 0, {"idx": np.full(BATCH, -1, np.int64)},
                            [a.spec() for a in supervisor.config.arrays.values()])
        for task in range(1, 4):
            sink.send_multipart([BatchMeta(task, 0, 1, docs=BATCH).pack(), *forged],
                                flags=zmq.NOBLOCK)
        batches = [consumer.get() for _ in range(2 * consumer.batches_per_epoch)]
        assert not impostor.poll(100)  # no task came to it
        rejected = supervisor.counters["rejected_messages"]
    for epoch in (0, 1):
        ids = sorted(int(i) for b in batches if b.epoch == epoch for i in b.arrays["idx"])
        assert ids == healthy
    assert rejected == 0
