"""The supervisor's loop, stepped one iteration at a time by the test, with a stub worker
process that speaks the internal protocol and no database: tasks go out, batches come back
and are delivered once, in plan order, also after the worker is killed mid-epoch. Over the
internal transport that $MONGOFEED_INTERNAL_TRANSPORT asks for (the test runner's tcp pass)."""

from __future__ import annotations

import time

import pytest
import zmq

from mongofeed.daemon.config import parse_config
from mongofeed.daemon.pool import WorkerState
from mongofeed.daemon.supervisor import Supervisor
from mongofeed.portable import resolve_internal_transport
from mongofeed.testing import (
    MemorySource,
    free_port_pair,
    internal_transport,
    stub_worker,
    write_documents,
)
from mongofeed.wire import (
    PROTOCOL_VERSION,
    decode_json,
    encode_json,
    hello_schema,
    pack_credit,
    unpack_batch,
)

DOCS, BATCH = 20, 4
STEP_BUDGET_S = 30.0


@pytest.fixture
def supervisor(tmp_path):
    documents = write_documents(({"_id": i, "i": i} for i in range(DOCS)),
                                str(tmp_path / "docs.bson"))
    config = parse_config({
        "source": {"database": "none", "collection": "none"},
        "batch": {"size": BATCH, "seed": 3},
        "fields": {"idx": {"path": "i", "decode": "scalar", "dtype": "int64"}},
        "serve": {"workers": 1, "bind": f"tcp://127.0.0.1:{free_port_pair()}",
                  "max_pending": 2, "internal_transport": internal_transport()},
    })
    running = Supervisor(config, source=MemorySource(documents), worker_main=stub_worker)
    running.start()
    step_until(running, running.pool.all_ready)
    yield running
    running.stop()


def step_until(supervisor: Supervisor, condition):
    deadline = time.monotonic() + STEP_BUDGET_S
    while not condition():
        assert time.monotonic() < deadline, "the loop made no progress"
        supervisor.loop_once(timeout_ms=10)


class RawConsumer:
    """The consumer's side of the public protocol, driven by the test between loop steps."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.context = zmq.Context()
        control = self.context.socket(zmq.DEALER)
        control.connect(supervisor.config.serve.control)
        control.send(encode_json({"op": "hello", "protocol": PROTOCOL_VERSION,
                                  "feed": "train"}))
        step_until(supervisor, lambda: control.poll(0))
        self.reply = decode_json(control.recv(), 2**20, "reply")
        self.schema = hello_schema(self.reply)
        self.data = self.context.socket(zmq.DEALER)
        self.data.identity = self.reply["token"].encode()
        self.data.connect(supervisor.config.serve.bind)
        self.data.send(pack_credit(1000))
        self.surplus = []

    def take(self, count: int) -> list:
        """The next ``count`` batches as (epoch, index, ids), stepping the loop meanwhile."""
        batches = self.surplus

        def received():
            while self.data.poll(0):
                head, arrays = unpack_batch(self.data.recv_multipart(), self.schema)
                batches.append((head.epoch, head.index, arrays["idx"].tolist()))
                self.data.send(pack_credit(1))  # credit is a window: one more per batch
            return len(batches) >= count

        step_until(self.supervisor, received)
        self.surplus = batches[count:]
        return batches[:count]

    def close(self):
        self.context.destroy(linger=0)


def expected(supervisor: Supervisor, epoch: int) -> list:
    plan = supervisor.plans["train"]
    return [(epoch, i, plan.batch_ids(epoch, i)) for i in range(plan.batches_per_epoch())]


@pytest.fixture
def consumer(supervisor):
    raw = RawConsumer(supervisor)
    yield raw
    raw.close()


def test_workers_are_reached_over_the_requested_internal_transport(supervisor):
    internal = supervisor.pool.endpoints
    endpoints = (internal.tasks, internal.sink)
    if resolve_internal_transport(internal_transport()) == "ipc":
        assert all(e.startswith(f"ipc://{supervisor.sockets.runtime_dir}") for e in endpoints)
        assert internal.password is None  # the private folder is the lock
    else:  # as on Windows: loopback only, no folder, and a password of this run
        assert all(e.startswith("tcp://127.0.0.1:") for e in endpoints), endpoints
        assert supervisor.sockets.runtime_dir is None
        assert len(internal.password) == 32


def test_stepped_loop_delivers_each_batch_once_in_plan_order(supervisor, consumer):
    assert consumer.reply["batches_per_epoch"] == DOCS // BATCH
    batches = consumer.take(2 * DOCS // BATCH)
    assert batches == expected(supervisor, 0) + expected(supervisor, 1)
    assert sorted(i for _, _, ids in batches[:DOCS // BATCH] for i in ids) == list(range(DOCS))
    assert supervisor.pool.records[0].batches >= len(batches)


def test_a_killed_worker_is_restarted_and_its_tasks_reissued(supervisor, consumer):
    first = consumer.take(2)
    record = supervisor.pool.records[0]
    record.process.kill()
    step_until(supervisor, lambda: record.state == WorkerState.BACKOFF)
    assert record.inflight == []  # handed back to the session table
    rest = consumer.take(2 * DOCS // BATCH - len(first))
    assert record.restarts == 1
    assert first + rest == expected(supervisor, 0) + expected(supervisor, 1)
