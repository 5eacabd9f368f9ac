"""Garbage, truncated, oversized and flooding peers on the public sockets are rejected and
counted, and the daemon keeps serving a well-behaved consumer meanwhile."""

from __future__ import annotations

import json

import zmq

from mongofeed import Consumer
from mongofeed.testing import Daemon
from mongofeed.wire import MAX_CONTROL_BYTES, PROTOCOL_VERSION
from tests.chaos.support import BATCHES, assert_exactly_once, feed_config, read_batches

HELLO_FLOOD = 200


def test_hostile_peers_are_rejected_and_others_keep_being_served(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db, serve={"session_timeout": 5})
    context = zmq.Context()
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 3)
        control = context.socket(zmq.DEALER)
        data = context.socket(zmq.DEALER)
        for s, endpoint in ((control, daemon.control), (data, daemon.bind)):
            s.linger = 0
            s.connect(endpoint)
            s.send(b"\x80\x04\x95garbage")                             # not JSON (a pickle)
            s.send_multipart([b'{"op":"status"}', b"tail"])            # extra frame
            s.send(json.dumps({"op": "hello", "protocol": 99}).encode())  # wrong version
        data.send(json.dumps({"credit": 10**9}).encode())
        for endpoint in (daemon.control, daemon.bind):  # huge: over maxmsgsize, disconnected
            huge = context.socket(zmq.DEALER)
            huge.linger = 0
            huge.connect(endpoint)
            huge.send(b"{" * (MAX_CONTROL_BYTES * 4))
        for _ in range(HELLO_FLOOD):  # floods of hello requests nobody follows up
            control.send(json.dumps({"op": "hello", "protocol": PROTOCOL_VERSION,
                                     "feed": "train"}).encode())
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        replies = []
        while control.poll(1000):
            replies.append(json.loads(control.recv()))
        status = daemon.status()
        assert daemon.process.poll() is None
    context.destroy(linger=0)
    assert_exactly_once(batches, epochs=(0, 1))
    assert status["counters"]["rejected_messages"] >= 6, status["counters"]
    assert any("protocol 99" in r.get("error", "") for r in replies)
    assert len(status["sessions"]) <= 64  # the flood is capped at MAX_SESSIONS
    assert any("too many sessions" in r.get("error", "") for r in replies)
