"""Thousands of generated messages on both public sockets of a live daemon while a real
Consumer reads: the daemon stays up, counts every message it refuses, and the consumer's
epochs stay exactly once (issue 9, the socket fuzz).

The generator is seeded, so a failure replays: random bytes, random JSON, deep nesting, huge
numbers, every field of hello/bye/status/credit with every wrong type, multi-frame messages
and empty frames. Control requests go one at a time (each gets exactly one reply, which is
how the test knows what was refused); nothing sent on the data socket carries a session's
token, so every one of those is refused.
"""

from __future__ import annotations

import json
import random
import threading

import zmq

from mongofeed import Consumer
from mongofeed.testing import Daemon
from mongofeed.wire import MAX_CONTROL_BYTES, PROTOCOL_VERSION, decode_json
from tests.chaos.support import BATCHES, RawPeer, assert_exactly_once, feed_config

SEED = 20_261_126
RANDOM_MESSAGES = 10_000
MIN_EPOCHS = 2

GOOD = {
    "control": [{"op": "hello", "protocol": PROTOCOL_VERSION, "feed": "train",
                 "start_epoch": 0, "shard": [0, 1]},
                {"op": "bye", "token": "0" * 32}, {"op": "status"}],
    "data": [{"credit": 1}],
}
WRONG_VALUES = [None, True, False, 0, -1, 2**31, 2**63, 2**64, 1.5, -0.0, 1e308, "", "x" * 300,
                [], [1], [[0, 1]], [0, 1, 2], {}, {"a": 1}, "hello", "train"]
RAW_WRONG = [b"[" * 50 + b"]" * 50, b"1" + b"0" * 5_000, b"1e999", b"NaN", b"-Infinity",
             b'"\\ud800"', b"[" * 20_000 + b"]" * 20_000]


def json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 6 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([rng.randint(-10, 10), rng.randint(-2**70, 2**70)])
    if kind == 3:
        return rng.choice([rng.uniform(-1e6, 1e6), 1e300, -0.0])
    if kind in (4, 5):
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 6:
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["op", "protocol", "feed", "start_epoch", "shard", "token", "credit", "session"]
    return {rng.choice(keys): json_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def field_mutations() -> list[tuple[str, list[bytes]]]:
    """Every field of every message, with every wrong value (as JSON and as raw text)."""
    messages = []
    for socket, bodies in GOOD.items():
        for body in bodies:
            for field in body:
                for value in WRONG_VALUES:
                    messages.append((socket, [json.dumps({**body, field: value}).encode()]))
                for raw in RAW_WRONG:
                    text = json.dumps({**body, field: "@"}).encode().replace(b'"@"', raw)
                    messages.append((socket, [text]))
                messages.append((socket, [json.dumps({k: v for k, v in body.items()
                                                      if k != field}).encode()]))
    return messages


def random_message(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(7)
    if kind == 0:
        return [rng.randbytes(rng.randrange(200))]
    if kind == 1:
        return [json.dumps(json_value(rng)).encode()]
    if kind == 2:
        depth = rng.randrange(20, 30_000)
        return [b"[" * depth + b"]" * depth]
    if kind == 3:
        return [b'{"credit": ' + b"9" * rng.randrange(20, 6_000) + b"}"]
    if kind == 4:
        return [rng.choice([b"", b"{}", b"[]", b"null"]) for _ in range(rng.randrange(1, 4))]
    if kind == 5:
        body = rng.choice(GOOD["control"] + GOOD["data"])
        return [json.dumps(body).encode()] + [rng.randbytes(rng.randrange(20))
                                              for _ in range(rng.randrange(1, 3))]
    body = dict(rng.choice(GOOD["control"] + GOOD["data"]))
    body[rng.choice(list(body))] = json_value(rng)
    return [json.dumps(body).encode()]


class Fuzzer(threading.Thread):
    """Sends the generated messages and keeps count of what the daemon must have refused."""

    def __init__(self, control_endpoint: str, data_endpoint: str):
        super().__init__(daemon=True)
        self.endpoints = {"control": control_endpoint, "data": data_endpoint}
        self.refused_control = self.sent_data = self.sent = 0
        self.failure: BaseException | None = None

    def run(self):
        context = zmq.Context()
        try:
            peers = {name: RawPeer(context, endpoint) for name, endpoint in
                     self.endpoints.items()}
            rng = random.Random(SEED)
            messages = field_mutations()
            messages += [(rng.choice(["control", "data"]), random_message(rng))
                         for _ in range(RANDOM_MESSAGES)]
            for socket, frames in messages:
                assert all(len(f) <= MAX_CONTROL_BYTES for f in frames)  # none is dropped
                if socket == "control":
                    reply = peers["control"].request(*frames)
                    self.refused_control += not reply["ok"]
                else:
                    peers["data"].send(*frames)
                    self.sent_data += 1
                    peers["data"].received(quiet_s=0)  # "unknown session" errors
                self.sent += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc
        finally:
            context.destroy(linger=0)


def test_fuzzed_public_sockets_leave_the_daemon_up_and_the_consumer_exact(
        tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=60) as consumer:
        before = daemon.status()["counters"]["rejected_messages"]
        fuzzer = Fuzzer(daemon.control, daemon.bind)
        fuzzer.start()
        batches = []
        while fuzzer.is_alive() or len(batches) < MIN_EPOCHS * BATCHES:
            batch = consumer.get()
            batches.append((batch.epoch, batch.index, [int(i) for i in batch.arrays["idx"]]))
        while len(batches) % BATCHES:  # finish the epoch it is in
            batch = consumer.get()
            batches.append((batch.epoch, batch.index, [int(i) for i in batch.arrays["idx"]]))
        fuzzer.join()
        status = daemon.status()
        assert daemon.process.poll() is None
    assert fuzzer.failure is None, fuzzer.failure
    epochs = sorted({b[0] for b in batches})
    print(f"{fuzzer.sent} fuzzed messages ({fuzzer.refused_control} control requests refused, "
          f"{fuzzer.sent_data} on the data socket) while the consumer read {len(epochs)} "
          f"epochs; counters {status['counters']}")
    assert_exactly_once(batches, epochs=epochs)
    rejected = status["counters"]["rejected_messages"] - before
    assert rejected == fuzzer.refused_control + fuzzer.sent_data
    assert consumer.session in [s["session"] for s in status["sessions"]]
    assert all(decode_json(json.dumps(s).encode(), 2**20, "s") for s in status["sessions"])
