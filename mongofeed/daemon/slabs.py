"""A session's shared memory: its region (``mongofeed.region``) and what each slab holds.

Workers write every batch of the session into a slab; the supervisor then carries only the
batch's header. Each slab is, in turn::

  free ──plan──▶ a task's ──batch at the sink──▶ waiting ──deliver──┬─▶ lent ──release──▶ free
                  (kept through re-issues)                          │   (the consumer maps
                                                                    │    the region)
                                                                    └─▶ sending ──sent──▶ free
                                                                        (tcp: ZeroMQ reads the
                                                                         slab, no copy)

A slab is written only by the worker that holds its task's current attempt; the supervisor
re-issues a task only after that worker has died (reaped), and a batch of an earlier attempt
is dropped, so a slab that is waiting, lent or being sent is never written. A consumer
releases a slab when the arrays that view it are gone (``release`` in its credit message);
its credit bounds how many it holds. The region holds ``serve.max_pending`` slabs for
production plus the consumer's window (its prefetch and the batches it may keep), so
production never waits for a slab that the consumer is entitled to hold.
"""

from __future__ import annotations

import logging
import os
import secrets

import zmq

from ..portable import shared_memory_name
from ..region import Region, RegionError, SlabLayout
from ..wire.batches import Placement, frame_sizes

log = logging.getLogger(__name__)


class SessionSlabs:
    """The slabs of one session's region: free, lent to the consumer, or being sent."""

    def __init__(self, region: Region, layout: SlabLayout):
        self.region = region
        self.layout = layout
        self.free = list(reversed(range(region.slabs)))  # pop() gives slab 0 first
        self.lent: set[int] = set()
        self.sending: dict[int, list] = {}  # slab -> trackers of the frames that read it
        self.shared = False  # the consumer maps the region (said so in its first credit)

    @classmethod
    def create(cls, folder, slabs: int, layout: SlabLayout) -> SessionSlabs:
        """A new region of ``slabs`` slabs in ``folder``, named ``mongofeed-<pid>-<random>``
        (never after the session's token: file names are visible to every local user);
        RegionError if it cannot be made."""
        path = os.path.join(folder, shared_memory_name(secrets.token_hex(4)))
        try:
            region = Region.create(path, slabs, layout.slab_bytes)
        except OSError as exc:
            raise RegionError(f"cannot create a region in {folder}: {exc.strerror}") from None
        return cls(region, layout)

    @property
    def path(self) -> str:
        return self.region.path

    @property
    def nbytes(self) -> int:
        return self.region.nbytes

    def acquire(self) -> int | None:
        """A free slab for a new task, None if there is none."""
        return self.free.pop() if self.free else None

    def give_back(self, slab: int):
        """A slab that holds nothing any more (its batch came as frames, or was dropped)."""
        self.free.append(slab)

    def lend(self, slab: int):
        """The consumer was told to read ``slab``: it is its until it releases it."""
        self.lent.add(slab)

    def release(self, slabs) -> bool:
        """The consumer no longer reads ``slabs``; False if one of them was not lent to it
        (a confused or hostile peer: ignored and counted)."""
        valid = True
        for slab in slabs:
            if slab in self.lent:
                self.lent.remove(slab)
                self.free.append(slab)
            else:
                valid = False
        return valid

    def frames(self, slab: int, placements: list[Placement]) -> tuple[list, list]:
        """The frames that send ``slab``'s batch over a socket without copying it, and the
        trackers that say when ZeroMQ is done reading them (small frames are copied)."""
        memory = memoryview(self.region.memory)
        start = self.region.slab_offset(slab)
        frames, trackers = [], []
        for place, offset in zip(placements, self.layout.offsets, strict=True):
            position = start + offset
            for size in frame_sizes(place.nbytes):
                part = memory[position:position + size]
                position += size
                if size < zmq.COPY_THRESHOLD:
                    frames.append(bytes(part))
                    continue
                frame = zmq.Frame(part, copy=False, track=True)
                frames.append(frame)
                trackers.append(frame.tracker)
        return frames, trackers

    def sent(self, slab: int, trackers: list):
        """``slab``'s frames were queued: free once ZeroMQ no longer reads them."""
        if trackers:
            self.sending[slab] = trackers
        else:
            self.free.append(slab)

    def poll_sent(self):
        """Free the slabs whose frames ZeroMQ has sent (or dropped)."""
        for slab in [s for s, trackers in self.sending.items()
                     if all(t.done for t in trackers)]:
            del self.sending[slab]
            self.free.append(slab)

    def close(self):
        """Remove the region file; workers and the consumer drop their mappings on their
        own (their memory is freed with the last one)."""
        self.region.remove()

    def status(self) -> dict:
        return {"path": self.path, "slabs": self.region.slabs,
                "slab_bytes": self.region.slab_bytes, "free": len(self.free),
                "lent": len(self.lent), "sending": len(self.sending)}
