"""The one place where batches leave the daemon: per-session ordering, credit and delivery.

Each consumer's session is its own stream of its feed. Worker batches for a session wait
here until they are next in plan order (or, with ``ordered = false``, until their epoch is
the one being delivered) and the consumer has granted credit; then they go out on the data
ROUTER socket, addressed to the session's identity. A batch is *delivered* once it is handed
to that socket: only then does the supervisor forget its task.

Memory per session is bounded by ``max_pending`` batches produced ahead (tasks in flight
plus batches waiting here) and by the consumer's credit for those in transit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from .planner import Shard
from .wire import pack_error

log = logging.getLogger(__name__)


@dataclass
class Session:
    id: bytes
    feed: str
    shard: Shard
    batches_per_epoch: int
    start_epoch: int
    ordered: bool
    last_seen: float = field(default_factory=time.monotonic)
    active: bool = False          # the consumer has connected its data socket
    credit: int = 0
    plan_epoch: int = 0           # next batch to make into a task
    plan_index: int = 0
    deliver_epoch: int = 0        # epoch being delivered; delivered_in_epoch of it so far
    delivered_in_epoch: int = 0
    in_production: int = 0        # tasks issued whose batch has not arrived
    ready: dict = field(default_factory=dict)  # (epoch, index) -> frames
    delivered: int = 0
    skips: int = 0

    def __post_init__(self):
        self.plan_epoch = self.deliver_epoch = self.start_epoch

    @property
    def name(self) -> str:
        return self.id.decode()

    def ahead(self) -> int:
        return self.in_production + len(self.ready)

    def next_task(self) -> tuple[int, int]:
        """Advance the plan cursor and return the (epoch, index) it pointed at."""
        position = (self.plan_epoch, self.plan_index)
        self.plan_index += 1
        if self.plan_index == self.batches_per_epoch:
            self.plan_epoch, self.plan_index = self.plan_epoch + 1, 0
        return position

    def next_deliverable(self):
        if self.ordered:
            key = (self.deliver_epoch, self.delivered_in_epoch)
            return key if key in self.ready else None
        # Unordered: any batch of the current epoch, never one of the next (epochs stay exact).
        return next((k for k in self.ready if k[0] == self.deliver_epoch), None)

    def status(self, now: float) -> dict:
        return {
            "session": self.name, "feed": self.feed, "shard": str(self.shard),
            "epoch": self.deliver_epoch, "batch": self.delivered_in_epoch,
            "batches_per_epoch": self.batches_per_epoch, "delivered": self.delivered,
            "waiting": len(self.ready), "in_production": self.in_production,
            "credit": self.credit, "skips": self.skips,
            "idle_s": round(now - self.last_seen, 1),
        }


class Sink:
    """Holds the data socket and the sessions' delivery state."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        self.sessions: dict[bytes, Session] = {}

    def accept(self, session: Session, epoch: int, index: int, frames: list) -> bool:
        """A worker's batch for ``session``; sends what has become deliverable."""
        session.in_production -= 1
        session.ready[(epoch, index)] = frames
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
            try:
                self.socket.send_multipart([session.id] + session.ready[key],
                                           copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return True  # the transport is full; the next credit retries
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                log.info("session %s: consumer disconnected", session.name)
                return False
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
