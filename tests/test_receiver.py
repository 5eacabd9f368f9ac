"""The consumer's receiving never fails silently: whatever breaks it reaches the training
thread on its ``get`` as a ``FeedError`` naming the cause, not as a ``FeedTimeout`` after a
long wait, and again on every later ``get``."""

from __future__ import annotations

import pytest

import mongofeed.stream
from mongofeed import Consumer, FeedError
from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml


def test_an_unexpected_failure_in_the_receiver_reaches_the_caller(tmp_path, mongo_uri, db,
                                                                   monkeypatch):
    """A real batch arrives over the real socket, and handling it raises MemoryError (as
    decoding a batch can when the host runs out of memory): the waiting ``get`` raises at
    once, with the MemoryError as cause, and so does every later one."""
    insert_samples(db.samples, 16)
    path = write_toml(tmp_path / "c.toml", sample_config(mongo_uri, db.name,
                                                         feeds={"train": {}}))

    def out_of_memory(frame):
        raise MemoryError("injected while unpacking a batch")

    monkeypatch.setattr(mongofeed.stream, "unpack_header", out_of_memory)
    with Daemon(path, workers=1) as daemon, Consumer(daemon.bind, timeout=30) as consumer:
        expected = f"receiving failed on session .* from {daemon.bind}: MemoryError: injected"
        with pytest.raises(FeedError, match=expected) as failure:
            consumer.get()  # well within 30 s, or this is a FeedTimeout
        assert isinstance(failure.value.__cause__, MemoryError)
        with pytest.raises(FeedError, match=expected):
            consumer.get(timeout=0.1)
