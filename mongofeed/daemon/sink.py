"""The one place where batches leave the daemon: per-session ordering, credit and delivery.

Each consumer's session is its own stream of its feed. Worker batches for a session wait
here until they are next in plan order (or, with ``ordered = false``, until their epoch is
the one being delivered) and the consumer has granted credit; then they go out on the data
ROUTER socket, addressed to the session's identity. The supervisor forgets a task once its
batch has reached the sink; from then on the batch is the session's to deliver.

A batch waits here as what the worker sent: a ``SlabBatch`` (its arrays are in a slab of the
session's shared memory) or the frames themselves (a session without a region). How a slab
batch goes out depends on the consumer:

- it maps the region: only the header, naming the slab, which stays lent until released;
- it does not (another host, or it refused): the header and frames that read the slab in
  place (no copy in this process), the slab freed once ZeroMQ has sent them.

Memory per session is bounded by ``max_pending`` batches produced ahead (tasks in flight
plus batches waiting here) and by the consumer's credit for those in transit or held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import zmq

from ..wire import BatchHeader, pack_error
from .sessions import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlabBatch:
    """A batch written into ``slab`` of its session's region, with its header."""

    slab: int
    header: BatchHeader


class Sink:
    """Sends each session's batches on the data socket, in order and within its credit."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket

    def accept(self, session: Session, epoch: int, index: int, batch) -> bool:
        """A worker's batch for ``session`` (a ``SlabBatch`` or frames); sends what has
        become deliverable."""
        session.in_production -= 1
        session.ready[(epoch, index)] = batch
        return self.flush(session)

    def grant(self, session: Session, credit: int) -> bool:
        session.credit += credit
        session.active = True
        session.last_seen = time.monotonic()
        return self.flush(session)

    def flush(self, session: Session) -> bool:
        """Send deliverable batches while the consumer has credit; False if it is gone."""
        while session.credit > 0:
            key = session.next_deliverable()
            if key is None:
                return True
            batch = session.ready[key]
            trackers = None
            if not isinstance(batch, SlabBatch):
                parts = batch
            elif session.slabs.shared:
                parts = [replace(batch.header, slab=batch.slab).pack()]
            else:
                frames, trackers = session.slabs.frames(
                    batch.slab, session.schema.placements(batch.header))
                parts = [batch.header.pack(), *frames]
            try:
                self.socket.send_multipart([session.id] + parts, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return True  # the transport is full; the next credit retries
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                log.info("session %s: consumer disconnected", session.name)
                return False
            if trackers is not None:
                session.slabs.sent(batch.slab, trackers)
            elif isinstance(batch, SlabBatch):
                session.slabs.lend(batch.slab)
            del session.ready[key]
            session.credit -= 1
            session.delivered += 1
            session.delivered_in_epoch += 1
            if session.delivered_in_epoch == session.batches_per_epoch:
                session.deliver_epoch += 1
                session.delivered_in_epoch = 0
        return True

    def fail(self, session: Session, message: str):
        """Tell the consumer why its session ends; it raises this as a FeedError."""
        try:
            self.socket.send_multipart([session.id] + pack_error(message), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # already gone: nobody to tell
