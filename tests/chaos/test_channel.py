"""The channel between the daemon and a trainer on its host (``mongofeed.channel``), from
outside: no other socket can send on a trainer's channel; garbage, strangers, stolen tokens
and unnamed sockets on the daemon's channel are refused, counted and told so while the
trainer is served; a consumer finding the daemon's queue full waits for room, for a while.
(A daemon killed under a trainer: test_daemon_stop.)"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading

import pytest

import mongofeed.channel
from mongofeed import Consumer
from mongofeed.channel import (
    CHANNEL_PREFIX,
    Channel,
    ChannelError,
    abstract,
    channels_supported,
)
from mongofeed.testing import Daemon, wait_until
from mongofeed.wire import MAX_CONTROL_BYTES, BatchHeader, Credit, decode_json
from tests.chaos.support import BATCHES, assert_exactly_once, feed_config, read_batches

pytestmark = pytest.mark.skipif(not channels_supported(),
                                reason="channels are Linux's (abstract Unix sockets)")


def datagram_socket() -> socket.socket:
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stranger.bind("")  # a name of its own, as a consumer's
    stranger.settimeout(10)
    return stranger


def test_no_other_socket_can_send_on_a_trainers_channel(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 2)
        assert consumer.shared_memory
        trainer = consumer._stream.channel.receiver.getsockname()
        forged = BatchHeader(0, 2, 4, slab=0).pack()  # the next batch, in a slab it may hold
        with datagram_socket() as stranger, pytest.raises(PermissionError):
            stranger.sendto(forged, trainer)
        batches += read_batches(consumer, BATCHES - len(batches))
        session = daemon.status()["sessions"][0]
    assert_exactly_once(batches, epochs=(0,))
    assert session["transport"] == "shared memory"


def test_hostile_datagrams_on_the_daemons_channel_are_refused_and_counted(
        tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=30) as consumer:
        batches = read_batches(consumer, 3)
        channel = abstract(consumer.info["shared_memory"]["channel"])
        token = consumer._stream.token.encode()
        told = [b"\x80\x04\x95garbage",                    # not a token
                token]                                    # stolen: its channel is open
        untold = [Credit(10**6).pack(),                   # a credit naming no session
                  Credit(1, token=b"0" * len(token)).pack(),  # naming a session not open
                  b"{" * (2 * MAX_CONTROL_BYTES)]         # oversized
        with datagram_socket() as stranger:
            for datagram in told + untold:
                stranger.sendto(datagram, channel)
            replies = [decode_json(stranger.recv(MAX_CONTROL_BYTES), MAX_CONTROL_BYTES, "reply")
                       for _ in told]
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unnamed:  # never bound
                unnamed.sendto(token, channel)
        hostile = len(told) + len(untold) + 1
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        assert wait_until(lambda: daemon.status()["counters"]["rejected_messages"] >= hostile,
                          timeout=10)
        counters = daemon.status()["counters"]
        assert daemon.process.poll() is None
    assert_exactly_once(batches, epochs=(0, 1))
    assert counters["rejected_messages"] == hostile, counters
    assert all("unknown channel" in reply["message"] for reply in replies), replies


@pytest.fixture
def full_daemon_queue():
    """A socket named as a daemon's channel whose queue a stranger has filled (the daemon's
    loop busy elsewhere); yields (its name, the socket) so that a test can drain it."""
    name = f"{CHANNEL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon, datagram_socket() as filler:
        daemon.bind(abstract(name))
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(10_000):
                filler.sendto(b"x", abstract(name))
        yield name, daemon


def test_a_consumer_waits_for_room_to_open_its_channel(full_daemon_queue, monkeypatch):
    name, daemon = full_daemon_queue
    monkeypatch.setattr(mongofeed.channel, "OPEN_TIMEOUT_S", 5.0)
    timer = threading.Timer(0.5, daemon.recv, [64])  # the loop takes one datagram
    timer.start()
    channel = Channel(name, "t" * 32)
    timer.join()
    try:
        while (received := daemon.recvfrom(64))[0] == b"x":
            pass
        assert received == (b"t" * 32, channel.receiver.getsockname())
    finally:
        channel.close()


def test_a_consumer_whose_daemon_queue_stays_full_is_told_why(full_daemon_queue, monkeypatch):
    name, _ = full_daemon_queue
    monkeypatch.setattr(mongofeed.channel, "OPEN_TIMEOUT_S", 0.5)
    with pytest.raises(ChannelError, match=f"cannot reach the daemon's channel {name}: its "
                                           f"queue stayed full"):
        Channel(name, "t" * 32)
