"""Epoch passes over one consumer's stream, for frameworks that abandon a pass and start again.

Keras and tf.data sometimes begin reading an epoch, throw away what they read and begin the
epoch again: the symbolic build under a ``tf.distribute`` strategy or on the JAX backend's
first ``fit``, with whatever a prefetching iterator read ahead (the TF backend's signature
peek gets batches made from the schema instead: ``keras.signature_batch``). The daemon's
stream cannot rewind, so ``Replay`` keeps the first ``limit`` batches handed in the current
pass::

    stream ─▶ [queue: batches to hand again] ─▶ take() ─▶ the framework
                        ▲                          │ kept while the pass is young
                        └──── restart() ◀── [this pass's batches] ── commit(): forgotten

The adapter says how a pass ended: ``commit()`` when training used it, ``restart()`` when a
new pass begins (a pass that was not committed is handed again, in order, before any new
batch). A pass that took more than ``limit`` batches cannot be handed again: ``restart()``
raises instead of losing them.

A resume goes through here too: ``state_dict`` is the consumer's (batches waiting to be
handed again are not yet used), ``load_state_dict`` and ``align_epoch`` (the next pass is
feed epoch e, as a resumed ``fit`` wants) drop what waits and reopen the consumer's stream.
"""

from __future__ import annotations

import threading
from collections import deque

from .consumer import Batch
from .errors import FeedError

DEFAULT_REPLAY_BATCHES = 16  # Keras 3.15 discards at most about 8 (a build, prefetch ~6)


class Replay:
    """Hands ``consumer``'s batches pass by pass; thread-safe."""

    def __init__(self, consumer, limit: int = DEFAULT_REPLAY_BATCHES):
        if limit < 1:
            raise ValueError("replay_batches must be at least 1")
        self.consumer = consumer
        self.limit = limit
        self.pass_number = 0
        self.handed = 0  # batches handed in this pass (replayed ones included)
        self.epochs: set[int] = set()  # feed epochs they came from
        self._kept: list[Batch] = []  # the pass's first `limit` batches
        self._queue: deque[Batch] = deque()  # batches to hand before taking new ones
        self._lock = threading.RLock()  # as Consumer._taking

    def take(self, pass_number: int | None = None) -> Batch:
        """The next batch for the current pass (``pass_number``, when given, must be it)."""
        with self._lock:
            if pass_number is not None and pass_number != self.pass_number:
                raise FeedError(f"feed {self.consumer.feed!r}: an earlier pass over the epoch "
                                f"read on after a new one began; they share one stream, so "
                                f"iterate one at a time")
            batch = self._queue.popleft() if self._queue else self.consumer.get()
            self.handed += 1
            self.epochs.add(batch.epoch)
            if self.handed <= self.limit:
                self._kept.append(batch)
            else:
                self._kept.clear()  # too many to hand again: restart() will say so
            return batch

    def restart(self) -> int:
        """Begin a new pass; the batches of an uncommitted one come first. Returns its number."""
        with self._lock:
            if self.handed > self.limit:
                consumer = self.consumer
                stopped = min(self.epochs)
                following = consumer.current_epoch + (1 if consumer.taken_in_epoch else 0)
                raise FeedError(
                    f"feed {consumer.feed!r}: a pass over the epoch stopped after "
                    f"{self.handed} batches (an interrupted fit, steps_per_epoch below the "
                    f"epoch, an early stop) and a new one began, but only its first "
                    f"{self.limit} are kept to hand again (replay_batches={self.limit}); the "
                    f"others would be lost. To go on, call align_epoch({following}) on the "
                    f"sequence (or the dataset's feed_state) to read the next feed epoch, or "
                    f"align_epoch({stopped}) to read epoch {stopped} again from its start; "
                    f"to avoid it, read whole epochs or pass replay_batches={self.handed} or "
                    f"more")
            self._queue.extendleft(reversed(self._kept))
            self._forget()
            self.pass_number += 1
            return self.pass_number

    def commit(self) -> tuple[int, list[int]]:
        """The current pass was used: its batches are not handed again. Returns how many
        it handed and the feed epochs they came from."""
        with self._lock:
            handed, epochs = self.handed, sorted(self.epochs)
            self._forget()
            return handed, epochs

    def pass_length(self) -> int:
        """Batches the current pass hands: those handed again, then the rest of their epoch
        (the whole next epoch at an epoch's start, what is left after a resume)."""
        with self._lock:
            return len(self._queue) + self.consumer.left_in_epoch

    def state_dict(self) -> dict:
        """The consumer's state; refused while batches of a dropped pass wait to be handed
        again (their place in the stream is behind the consumer's)."""
        with self._lock:
            if self._queue:
                raise FeedError(
                    f"feed {self.consumer.feed!r}: {len(self._queue)} batches that the "
                    f"framework read and dropped wait to be handed again; take the state "
                    f"after the pass has handed them (from its {len(self._queue) + 1}th batch "
                    f"on) or between passes")
            return self.consumer.state_dict()

    def load_state_dict(self, state: dict):
        """Continue at ``state``; batches kept to hand again are dropped."""
        with self._lock:
            self.consumer.load_state_dict(state)
            self._drop_passes()

    def align_epoch(self, epoch: int):
        """Make the next pass feed epoch ``epoch``, whole: nothing changes when it would
        be; otherwise the consumer reopens at that epoch's start and what was kept to hand
        again is dropped."""
        with self._lock:
            if not self._next_pass_is(epoch):
                self.consumer.seek_epoch(epoch)
                self._drop_passes()

    def _next_pass_is(self, epoch: int) -> bool:
        """Whether the next pass begins at the start of feed epoch ``epoch``: what waits to
        be handed again is that epoch's first batches and the consumer took no others."""
        if self.handed > self.limit:
            return False
        pending = self._kept + list(self._queue)  # restart() hands them in this order
        consumer = self.consumer
        if any(batch.epoch != epoch for batch in pending):
            return False
        if consumer.current_epoch == epoch:
            return consumer.taken_in_epoch == len(pending)
        return (consumer.current_epoch == epoch + 1 and consumer.taken_in_epoch == 0
                and len(pending) == consumer.batches_per_epoch)

    def _drop_passes(self):
        """The stream was reopened: nothing is handed again, and a pass that was under way
        must not read on (its count of batches is of the old stream)."""
        self._queue.clear()
        self._forget()
        self.pass_number += 1

    def _forget(self):
        self._kept, self.handed, self.epochs = [], 0, set()
