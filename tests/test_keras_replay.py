"""Replay, the pure logic under the Keras and tf.data adapters: a pass that is not committed
is handed again, in order, before new batches; one too long to keep raises; a pass that
reads on after a newer one began takes nothing."""

from __future__ import annotations

import pytest

from mongofeed.consumer import Batch
from mongofeed.errors import FeedError
from mongofeed.replay import Replay

PER_EPOCH = 4


class Stream:
    """Stands in for a Consumer: batches (epoch, index) in order."""

    feed = "train"

    def __init__(self):
        self.taken = 0

    def get(self) -> Batch:
        self.taken += 1
        return Batch((self.taken - 1) // PER_EPOCH, (self.taken - 1) % PER_EPOCH, {})

    @property
    def current_epoch(self) -> int:
        return self.taken // PER_EPOCH

    @property
    def taken_in_epoch(self) -> int:
        return self.taken % PER_EPOCH


def positions(replay: Replay, count: int, pass_number=None) -> list[tuple[int, int]]:
    return [replay.take(pass_number)[:2] for _ in range(count)]


def test_an_uncommitted_pass_is_handed_again_in_order():
    stream = Stream()
    replay = Replay(stream, limit=8)
    assert positions(replay, 3) == [(0, 0), (0, 1), (0, 2)]
    replay.restart()
    assert positions(replay, 1) == [(0, 0)]  # abandoned again, after one batch
    replay.restart()
    assert positions(replay, 5) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert replay.commit() == (5, [0, 1])
    replay.restart()
    assert positions(replay, 1) == [(1, 1)]
    assert stream.taken == 6  # nothing was read twice from the stream


def test_a_committed_pass_is_not_handed_again():
    replay = Replay(Stream(), limit=8)
    positions(replay, PER_EPOCH)
    assert replay.commit() == (PER_EPOCH, [0])
    replay.restart()
    assert positions(replay, 1) == [(1, 0)]


def test_a_pass_longer_than_the_limit_raises_instead_of_losing_batches():
    replay = Replay(Stream(), limit=2)
    positions(replay, 3)
    with pytest.raises(FeedError, match=r"after 3 batches .*align_epoch\(1\) .* to read "
                                        r"the next feed epoch, or align_epoch\(0\) .*"
                                        r"replay_batches=3 or more"):
        replay.restart()
    with pytest.raises(ValueError, match="at least 1"):
        Replay(Stream(), limit=0)


def test_a_superseded_pass_takes_nothing():
    replay = Replay(Stream(), limit=8)
    old = replay.restart()
    positions(replay, 2, old)
    new = replay.restart()
    with pytest.raises(FeedError, match="iterate one at a time"):
        replay.take(old)
    assert positions(replay, 3, new) == [(0, 0), (0, 1), (0, 2)]
