"""Epoch passes over one consumer's stream, for frameworks that abandon a pass and start again.

Keras and tf.data sometimes begin reading an epoch, throw away what they read and begin the
epoch again: the TF backend's signature peek, the symbolic build under a ``tf.distribute``
strategy or on the JAX backend's first ``fit``, with whatever a prefetching iterator read
ahead. The daemon's stream cannot rewind, so ``Replay`` keeps the first ``limit`` batches
handed in the current pass::

    stream ─▶ [queue: batches to hand again] ─▶ take() ─▶ the framework
                        ▲                          │ kept while the pass is young
                        └──── restart() ◀── [this pass's batches] ── commit(): forgotten

The adapter says how a pass ended: ``commit()`` when training used it, ``restart()`` when a
new pass begins (a pass that was not committed is handed again, in order, before any new
batch). A pass that took more than ``limit`` batches cannot be handed again: ``restart()``
raises instead of losing them.
"""

from __future__ import annotations

import threading
from collections import deque

from .consumer import Batch
from .errors import FeedError

DEFAULT_REPLAY_BATCHES = 16  # Keras 3.15 discards at most about 8 (peek 2, prefetch ~6)


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
        self._lock = threading.Lock()

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
                raise FeedError(
                    f"feed {self.consumer.feed!r}: a pass over the epoch stopped after "
                    f"{self.handed} batches and a new one began, but only its first "
                    f"{self.limit} are kept to hand again (replay_batches={self.limit}); the "
                    f"others would be lost. Read whole epochs (no steps_per_epoch below the "
                    f"epoch, no early stop), pass replay_batches={self.handed} or more, or "
                    f"open a new session (start_epoch=...)")
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

    def _forget(self):
        self._kept, self.handed, self.epochs = [], 0, set()
