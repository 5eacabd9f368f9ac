"""Memory the consumer's arrays view, and when it may be used again: the training side.

The arrays a ``Consumer`` hands out are views, never copies, of one of:

- a slab of the daemon's shared memory (a consumer on the daemon's host). The slab is the
  daemon's to reuse once the arrays are gone: ``Slabs`` leases it to them and, when the last
  array that views it is dropped (in whatever thread), queues its release, which goes to
  the daemon with the consumer's next credit;
- a buffer that an array cut into several frames was joined into (over tcp).
  ``JoinBuffers`` reuses those buffers once their arrays are gone, so that a large batch
  costs no fresh mapping (and no page fault per 4 KiB) per message.

A lease ends when the uint8 array over the memory (the *base* of every array of the batch)
is collected: numpy keeps it alive as long as any view, or anything holding a view (a
TensorFlow tensor that shares the memory), is.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections import deque

import numpy as np

JOIN_BUFFERS_KEPT = 8  # free join buffers kept per size


class Lease:
    """One slab, lent to the arrays that view ``base``; called when ``base`` dies (the
    callback of its weak reference)."""

    __slots__ = ("slab", "slabs", "handed", "released", "ref")

    def __init__(self, slab: int, slabs: Slabs):
        self.slab = slab
        self.slabs = slabs
        self.handed = False    # its arrays were handed to the caller (they count as held)
        self.released = False  # its arrays are gone

    def __call__(self, _ref):
        self.slabs.release(self)


class Slabs:
    """The slabs the daemon lent to this consumer: which are still viewed, how many the
    caller holds, and the releases yet to be sent (with the next credit). Thread-safe:
    arrays die in whatever thread drops them."""

    def __init__(self):
        self._lock = threading.RLock()  # a release may run inside a locked section (gc)
        self._live: dict[int, Lease] = {}  # what keeps each lease's weakref alive
        self.held = 0  # handed to the caller and still viewed
        self._released: deque[int] = deque()

    def lease(self, base: np.ndarray, slab: int) -> Lease:
        """Lend ``slab`` to the arrays built on ``base`` (released when ``base`` dies)."""
        lease = Lease(slab, self)
        lease.ref = weakref.ref(base, lease)
        self._live[id(lease)] = lease
        return lease

    def hand(self, lease: Lease, limit: int) -> bool:
        """Whether the caller may get the arrays of ``lease`` as they are: yes if it holds
        fewer than ``limit`` batches that view slabs (this one then counts), or if nothing
        views the slab any more (every array was converted on receipt)."""
        with self._lock:
            if lease.released:
                return True
            if self.held >= limit:
                return False
            lease.handed = True
            self.held += 1
            return True

    def release(self, lease: Lease):
        with self._lock:
            lease.released = True
            if lease.handed:
                self.held -= 1
            self._live.pop(id(lease), None)
        self._released.append(lease.slab)

    @property
    def pending(self) -> int:
        """Releases waiting to be sent."""
        return len(self._released)

    def take_released(self) -> tuple[int, ...]:
        """The slabs released since the last call (to send with the next credit)."""
        released = []
        while self._released:
            released.append(self._released.popleft())
        return tuple(released)


class JoinBuffers:
    """Buffers that an array cut into several frames is joined into, reused once the arrays
    that view them are gone."""

    def __init__(self, kept: int = JOIN_BUFFERS_KEPT):
        self.kept = kept
        self._free: dict[int, list[mmap.mmap]] = {}

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` to join frames into and build arrays on."""
        free = self._free.get(nbytes)
        try:
            memory = free.pop()
        except (AttributeError, IndexError):
            memory = mmap.mmap(-1, max(1, nbytes))
        base = np.frombuffer(memory, np.uint8, nbytes)
        weakref.finalize(base, self._give_back, nbytes, memory)
        return base

    def _give_back(self, nbytes: int, memory: mmap.mmap):
        free = self._free.setdefault(nbytes, [])
        if len(free) < self.kept:
            free.append(memory)
