"""A client that grants all the credit it may and never reads cannot make the daemon hold
more than its stated memory bound (issue 9, item 7), also one that claims to map the
session's shared memory, asks for far more views than the daemon lends and never reads its
channel."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from mongofeed.channel import Channel
from mongofeed.daemon.config.schema import DEFAULT_MAX_HELD_BATCHES
from mongofeed.testing import Daemon
from mongofeed.wire import Credit, HelloRequest
from tests.chaos.support import RawPeer
from tests.support import sample_config, write_toml

DOCS = 600
SAMPLE_BYTES = 16 * 1024
BATCH = 32                     # 512 KiB batches
MAX_PENDING = 32           # what two workers read ahead by default (16 each)
PRODUCTION_S = 20
# What the workers use while producing, which the bound (batches in the supervisor's hands)
# does not count: the documents of the tasks in their hands (MAX_PENDING at most, for one
# session) three times over: the driver's BSON reply, the decoded documents, the arrays.
# A fixed amount that does not grow with time; measured here at about 18 MiB.
ALLOWANCE_BYTES = 3 * MAX_PENDING * BATCH * SAMPLE_BYTES


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.parametrize("shared_memory", [False, True], ids=["tcp", "claims-shared-memory"])
def test_a_client_that_never_reads_cannot_grow_the_daemon(tmp_path, mongo_uri, db, context,
                                                           shared_memory):
    rng = np.random.default_rng(0)
    db["blobs"].insert_many([{"i": i, "blob": rng.bytes(SAMPLE_BYTES)} for i in range(DOCS)])
    config = write_toml(tmp_path / "blobs.toml", sample_config(
        mongo_uri, db.name, "blobs", batch={"size": BATCH},
        feeds={"train": {"filter": {}, "shuffle": True}},
        fields={"blob": {"decode": "raw", "dtype": "uint8", "shape": [SAMPLE_BYTES]}},
        output={"inputs": ["blob"]}, serve={"max_pending": MAX_PENDING}))
    with Daemon(config, workers=2) as daemon:
        status = daemon.status()
        before = tree_rss(daemon.process.pid)
        hello = HelloRequest("train", shared_memory=shared_memory, held_batches=10**6)
        reply = RawPeer(context, daemon.control).request(hello.pack())
        # A consumer that lets nothing in: one message in its queue, a tiny TCP window; or
        # one that says it maps the region and never releases a slab.
        hog = RawPeer(context, daemon.bind, identity=reply["token"].encode(), rcvhwm=1,
                      rcvbuf=4096)
        hog.send(Credit(0, (), attached=True if shared_memory else None).pack())
        if shared_memory:  # its channel's queue fills, and it never reads it either
            channel = Channel(reply["shared_memory"]["channel"], reply["token"])
        peak = before
        deadline = time.monotonic() + PRODUCTION_S
        while time.monotonic() < deadline:
            hog.send(Credit(1_000_000).pack())  # all the credit it may, and a heartbeat
            time.sleep(1)
            peak = max(peak, tree_rss(daemon.process.pid))
        after = daemon.status()
        if shared_memory:
            channel.close()
    [session] = after["sessions"]  # alive all along: it heartbeats
    bound = status["session_memory_bound_bytes"]
    assert bound == (2 * MAX_PENDING + DEFAULT_MAX_HELD_BATCHES) * BATCH * SAMPLE_BYTES
    assert status["memory_bound_bytes"] == status["max_sessions"] * bound
    if shared_memory:  # the views it asked for, within what the daemon lends
        assert session["transport"] == "shared memory"
        assert session["slabs"]["slabs"] == 2 * MAX_PENDING + DEFAULT_MAX_HELD_BATCHES
    else:  # a session over tcp holds no views: the tighter bound holds
        bound = 2 * MAX_PENDING * BATCH * SAMPLE_BYTES
    growth = peak - before
    print(f"daemon tree RSS {before / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB "
          f"(+{growth / 2**20:.1f} MiB) in {PRODUCTION_S} s; session bound "
          f"{bound / 2**20:.1f} MiB + allowance {ALLOWANCE_BYTES / 2**20:.0f} MiB; "
          f"batches sent to the hog {session['delivered']}")
    assert session["delivered"] >= 1  # it was served; what it did not read waits
    assert session["credit"] <= MAX_PENDING
    assert growth <= bound + ALLOWANCE_BYTES
