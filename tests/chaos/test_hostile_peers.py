"""Garbage, truncated, oversized and flooding peers on the public sockets are rejected and
counted, and the daemon keeps serving a well-behaved consumer meanwhile; no stranger can end,
read or crowd out another trainer's session (issue 9, items 4 and 9)."""

from __future__ import annotations

import json
import time

from mongofeed import Consumer
from mongofeed.daemon.sessions import EVICT_SILENCE_S
from mongofeed.testing import Daemon, wait_until
from mongofeed.wire import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    Credit,
    HelloRequest,
    decode_json,
    pack_credit,
)
from tests.chaos.support import (
    BATCHES,
    RawPeer,
    assert_exactly_once,
    feed_config,
    read_batches,
)

HELLO_FLOOD = 200
SQUATTERS = 64


def test_hostile_peers_are_rejected_and_others_keep_being_served(tmp_path, mongo_uri, db,
                                                                 context):
    config = feed_config(tmp_path, mongo_uri, db, serve={"session_timeout": 5})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 3)
        control = RawPeer(context, daemon.control)
        data = RawPeer(context, daemon.bind)
        for peer in (control, data):
            peer.send(b"\x80\x04\x95garbage")                           # not JSON (a pickle)
            peer.send(b'{"op":"status"}', b"tail")                      # extra frame
            peer.send({"op": "hello", "protocol": 99})                  # wrong version
        data.send({"credit": 10**9})
        for endpoint in (daemon.control, daemon.bind):  # huge: over maxmsgsize, disconnected
            RawPeer(context, endpoint).send(b"{" * (MAX_CONTROL_BYTES * 4))
        for _ in range(HELLO_FLOOD):  # floods of hello requests nobody follows up
            control.send(HelloRequest("train").pack())
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        replies = [decode_json(m[0], 2**24, "reply") for m in control.received()]
        status = daemon.status()
        assert daemon.process.poll() is None
    assert_exactly_once(batches, epochs=(0, 1))
    assert status["counters"]["rejected_messages"] >= 6, status["counters"]
    assert any("protocol 99" in r.get("error", "") for r in replies)
    assert len(status["sessions"]) <= status["max_sessions"]
    assert any("too many sessions" in r.get("error", "") for r in replies)


def test_messages_that_crashed_the_daemon_are_refused_with_their_reason(
        tmp_path, mongo_uri, db, context):
    """Each of these ended the daemon, or survived by luck, before (issue 9, item 4)."""
    config = feed_config(tmp_path, mongo_uri, db)
    hello = {"op": "hello", "protocol": PROTOCOL_VERSION, "feed": "train"}
    deep = b"[" * 30_000 + b"]" * 30_000  # under maxmsgsize; json.loads: RecursionError
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 3)
        control, data = RawPeer(context, daemon.control), RawPeer(context, daemon.bind)
        data.send(deep)
        refusals = {
            "nests 30000 levels": control.request(deep),
            "a number of 5000 digits": control.request(
                b'{"op":"hello","protocol":2,"feed":"train","start_epoch":1' + b"0" * 4999
                + b"}"),
            "feed name": control.request({**hello, "feed": []}),
            "start_epoch must be": control.request({**hello, "start_epoch": 2**63}),
        }
        # Before, this hello was accepted and its first credit crashed the daemon in BSON.
        if refusals["start_epoch must be"].get("ok"):
            reply = refusals["start_epoch must be"]
            identity = reply.get("token", reply.get("session"))
            RawPeer(context, daemon.bind, identity=identity.encode()).send(pack_credit(1))
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        status = daemon.status()
        assert daemon.process.poll() is None
    for reason, reply in refusals.items():
        assert reply["ok"] is False and reason in reply["error"], reply
    assert status["counters"]["rejected_messages"] == 1 + len(refusals), status["counters"]
    assert_exactly_once(batches, epochs=(0, 1))


def test_a_session_belongs_to_the_peer_that_opened_it(tmp_path, mongo_uri, db, context):
    """A stranger sees only the public name: its bye ends nothing, and a data socket with
    that name as identity receives none of the session's batches (issue 9, item 9)."""
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 3)
        status = daemon.status()
        [public] = [s["session"] for s in status["sessions"]]
        assert public == consumer.session
        stranger = RawPeer(context, daemon.control)
        byes = [stranger.request({"op": "bye", "session": public}),
                stranger.request({"op": "bye", "token": public}),
                stranger.request({"op": "bye", "token": public.ljust(32, "0")})]
        thief = RawPeer(context, daemon.bind, identity=public.encode())
        thief.send(pack_credit(100))
        stolen = thief.received(quiet_s=2)
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        assert daemon.status()["sessions"][0]["session"] == public
        token = consumer._stream.token
    assert token not in json.dumps(status) and token != public
    assert all(not reply["ok"] for reply in byes), byes
    assert [json.loads(m[0])["kind"] for m in stolen] == ["error"]  # "unknown session"
    assert_exactly_once(batches, epochs=(0, 1))


def test_idle_hellos_cannot_keep_a_trainer_out(tmp_path, mongo_uri, db, context):
    """64 hellos that nobody follows up took every session before; now a new hello takes the
    place of one silent for EVICT_SILENCE_S, and a consumer that heartbeats is never evicted
    (issue 9, item 9)."""
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon:
        squatter = RawPeer(context, daemon.control)
        for _ in range(SQUATTERS):
            squatter.send(HelloRequest("train").pack())
        first_wave = [decode_json(m[0], 2**24, "reply") for m in squatter.received()]
        time.sleep(EVICT_SILENCE_S + 1)
        with Consumer(daemon.bind, "train", timeout=30) as consumer:
            batches = read_batches(consumer, 3)
            for _ in range(SQUATTERS):  # while it trains: its session is never the one to go
                squatter.send(HelloRequest("train").pack())
            batches += read_batches(consumer, 2 * BATCHES - len(batches))
            status = daemon.status()
            assert consumer.session in [s["session"] for s in status["sessions"]]
    assert sum(r["ok"] for r in first_wave) == status["max_sessions"]
    assert status["counters"]["evicted_sessions"] >= 1
    assert_exactly_once(batches, epochs=(0, 1))


def test_ended_sessions_count_while_their_connections_stay_open(tmp_path, mongo_uri, db,
                                                               context):
    """A peer that grants credit, never reads, stops heartbeating and keeps its data
    connection open leaves what ZeroMQ queued to it in the daemon, which cannot drop it.
    Such a session, once ended, still counts against serve.max_sessions until its connection
    closes: peers like it cannot open session after session and grow the daemon past its
    memory bound; a trainer gets a clear refusal meanwhile, and a session once they close."""
    config = feed_config(tmp_path, mongo_uri, db,
                         serve={"max_sessions": 2, "session_timeout": 3})
    with Daemon(config, workers=2) as daemon:
        hogs = []
        for _ in range(2):
            reply = RawPeer(context, daemon.control).request(
                HelloRequest("train", shared_memory=False).pack())
            hog = RawPeer(context, daemon.bind, identity=reply["token"].encode(), rcvhwm=1,
                          rcvbuf=4096)
            hog.send(Credit(1_000_000).pack())  # and no heartbeat: the session expires
            hogs.append(hog)
        assert wait_until(lambda: not daemon.status()["sessions"], 15)
        status = daemon.status()
        assert status["lingering_connections"] == 2, status
        refused = RawPeer(context, daemon.control).request(HelloRequest("train").pack())
        assert not refused["ok"]
        assert "2 ended whose consumers keep their data connection open" in refused["error"]
        for hog in hogs:
            hog.socket.close()
        assert wait_until(lambda: daemon.status()["lingering_connections"] == 0, 10)
        with Consumer(daemon.bind, "train", timeout=30) as consumer:
            batches = read_batches(consumer, 2 * BATCHES)
    assert_exactly_once(batches, epochs=(0, 1))
