"""The one place where batches leave the daemon: per-session ordering, credit and delivery.

Each consumer's session is its own stream of its feed. Worker batches for a session wait
here until they are next in plan order (or, with ``ordered = false``, until their epoch is
the one being delivered) and the consumer has granted credit; then they go out on the data
ROUTER socket, addressed to the session's identity. The supervisor forgets a task once its
batch has reached the sink; from then on the batch is the session's to deliver.

A batch waits here as what the worker sent: a ``SlabBatch`` (its arrays are in a slab of the
session's shared memory) or the frames themselves (a session without a region). How a slab
batch goes out depends on the consumer:

- it maps the region: only the header, naming the slab, on the session's channel (once its
  consumer has opened it: ``mongofeed.channel``); the slab stays lent until released;
- it does not (another host, or it refused): the header and frames that read the slab in
  place (no copy in this process), the slab freed once ZeroMQ has sent them.

Memory per session is bounded by ``max_pending`` batches produced ahead (tasks in flight
plus batches waiting here) and ``max_pending`` more sent but not yet read: a session's credit
is capped at that, and so is the data socket's send queue per connection (its high-water
mark), so a consumer that grants credit without ever reading cannot make batches pile up in
ZeroMQ's queue. A session's region has a slab for each: ``max_pending`` for production,
``max_pending`` lent or being sent, and one for each view its consumer asked to keep (at
most ``serve.max_held_batches``); a consumer that keeps more slabs than that only stalls its
own session. ``Config.session_memory_bound`` is the sum in bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq

from ..channel import DaemonChannel
from ..wire.batches import BatchHeader, pack_error
from .sessions import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlabBatch:
    """A batch written into ``slab`` of its session's region, with its header."""

    slab: int
    header: BatchHeader


class Sink:
    """Sends each session's batches on the data socket or its channel, in order and within
    its credit."""

    def __init__(self, socket: zmq.Socket, credit_limit: int,
                 channel: DaemonChannel | None = None):
        self.socket = socket
        self.credit_limit = credit_limit  # also the socket's sndhwm (set by the supervisor)
        self.channel = channel
        self.blocked: set[bytes] = set()  # sessions whose channel was full: retried each loop

    def accept(self, session: Session, epoch: int, index: int, batch,
               drawn: dict[str, int] | None = None) -> bool:
        """A worker's batch for ``session`` (a ``SlabBatch`` or frames; for a feed of sources,
        with its samples of each); sends what has become deliverable."""
        session.in_production -= 1
        session.ready[(epoch, index)] = batch
        if drawn:
            session.drawing[(epoch, index)] = drawn
        return self.flush(session)

    def grant(self, session: Session, credit: int) -> bool:
        session.credit = min(session.credit + credit, self.credit_limit)
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
                if session.channel is None:
                    return True  # its consumer's channel is on its way (its first datagram)
                try:
                    if not self.channel.send(session.channel,
                                             batch.header._replace(slab=batch.slab).pack()):
                        self.blocked.add(session.token)  # a full queue: ``retry`` sends it
                        return True
                except OSError as exc:
                    log.info("session %s: consumer's channel gone (%s)", session.name, exc)
                    return False
                session.slabs.lend(batch.slab)
                session.sent(key)
                continue
            else:
                frames, trackers = session.slabs.frames(
                    batch.slab, session.schema.placements(batch.header))
                parts = [batch.header.pack(), *frames]
            try:
                self.socket.send_multipart([session.token] + parts, copy=False,
                                           flags=zmq.NOBLOCK)
            except zmq.Again:
                return True  # its queue is full; the next credit or heartbeat retries
            except zmq.ZMQError as exc:
                log.info("session %s: consumer disconnected (%s)", session.name, exc)
                return False
            if trackers is not None:
                session.slabs.sent(batch.slab, trackers)
            session.sent(key)
        return True

    def retry(self, sessions) -> list[Session]:
        """Flush the sessions whose channel was full (its consumer's queue, or ours); the
        sessions whose consumer is gone."""
        blocked, self.blocked = self.blocked, set()
        gone = []
        for token in blocked:
            session = sessions.get(token)
            if session is not None and not self.flush(session):
                gone.append(session)
        return gone

    def fail(self, session: Session, message: str):
        """Tell the consumer why its session ends; it raises this as a FeedError."""
        if session.channel is not None:
            try:
                if self.channel.send(session.channel, pack_error(message)[0]):
                    return
            except OSError:
                return  # already gone: nobody to tell
        try:  # no channel, or (a full one) where the consumer looks once it is empty
            self.socket.send_multipart([session.token] + pack_error(message),
                                       flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # already gone: nobody to tell
