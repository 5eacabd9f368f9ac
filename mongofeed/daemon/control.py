"""The control socket's requests: ``hello`` opens a session, ``heartbeat`` keeps it alive,
``bye`` ends it, ``status`` reports everything ``mongofeed status`` shows.

Requests arrive parsed and checked (``wire.unpack_request``): each handler takes its typed
request and returns the reply's body; a request it refuses raises ``ProtocolError`` with
the reason, which the supervisor sends back as ``{"ok": false, "error": ...}``. The handlers
read and change the supervisor's state, but never touch its sockets.

A session's secret token goes only to the peer that said hello; status shows its public
name, and bye and heartbeat need the token.

``hello`` also makes the session's shared memory (``slabs``), where the daemon has a folder
for it: workers write the session's batches there, whatever the consumer. Its
``2 x serve.max_pending`` slabs (``max_pending`` produced ahead, ``max_pending`` sent or
lent) and the batches a consumer that offers to map it keeps as views (its hello's
``held_batches``, at most ``serve.max_held_batches``) are within the session's memory bound.
That consumer (``"shared_memory": true``) is told where the region is and the name of the
daemon's channel; whether it could map it, it says in its first credit message, and its
channel's first datagram follows.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from bson import json_util

from .. import __version__
from ..errors import ProtocolError
from ..region import RegionError, SlabLayout
from ..security import redact_uri
from ..wire import (
    PROTOCOL_VERSION,
    ByeRequest,
    ControlRequest,
    HeartbeatRequest,
    HelloRequest,
    Schema,
    SharedMemoryOffer,
)
from .planner import Shard
from .slabs import SessionSlabs

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)


class Control:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.config = supervisor.config

    def handle(self, request: ControlRequest) -> dict:
        if isinstance(request, HelloRequest):
            return self.hello(request)
        if isinstance(request, ByeRequest):
            return self.bye(request)
        if isinstance(request, HeartbeatRequest):
            return self.heartbeat(request)
        return self.status()

    def hello(self, request: HelloRequest) -> dict:
        supervisor, feed = self.supervisor, request.feed
        if feed not in supervisor.plans:
            raise ProtocolError(f"unknown feed {feed!r:.40}; this daemon serves "
                                f"{', '.join(supervisor.plans)}")
        # The consumer's share is taken from this daemon's share of the epoch.
        shard = Shard(*request.shard).within(self.config.serve.shard)
        plan = supervisor.plans[feed]
        if plan.batches_per_epoch(shard) == 0:
            raise ProtocolError(f"shard {shard} of feed {feed!r} has no full batch")
        epoch, offset, skip = self.start(plan, feed, shard, request)
        self.make_room()
        session = supervisor.sessions.open(
            feed, shard, epoch, self.config.serve.ordered, offset, frozenset(skip),
            Schema(feed, supervisor.plans[feed].batch_size, self.specs()))
        supervisor.counters["sessions_opened"] += 1
        held = min(request.held_batches, self.config.serve.max_held_batches) \
            if request.shared_memory else 0
        refusal = self.make_slabs(session, held)
        log.info("session %s: feed %s from epoch %d (after %d global batches, %d skipped), "
                 "shard %s%s", session.name, feed, epoch, offset, len(skip), shard,
                 f", region {session.slabs.path}" if session.slabs else "")
        reply = {"ok": True, **self.describe_feed(feed, shard), "session": session.name,
                 "token": session.token.decode(), "start_epoch": epoch,
                 "start_offset": offset, "start_batches": session.start_batches,
                 "skip": [offset + shard.rank + shard.world * j for j in sorted(skip)],
                 "shard": [shard.rank, shard.world],
                 "credit_window": self.config.serve.max_pending,
                 "heartbeat_timeout": self.config.serve.session_timeout}
        if request.shared_memory:
            if session.slabs is not None:
                region = session.slabs.region
                reply["shared_memory"] = SharedMemoryOffer(
                    region.path, region.nonce, region.slabs, region.slab_bytes, held,
                    self.supervisor.sockets.channel.name).to_json()
            else:
                reply["shared_memory_refused"] = refusal
        return reply

    def specs(self):
        return tuple(a.spec() for a in self.config.arrays.values())

    def make_slabs(self, session, held: int) -> str | None:
        """Give ``session`` a region of ``2 x serve.max_pending`` slabs and ``held`` more for
        the batches its consumer keeps as views; the reason if there is none (no folder for
        shared memory here, or no room in it)."""
        folder = self.supervisor.shared_memory_dir
        if folder is None:
            return "the daemon's host has no folder for shared memory"
        if self.supervisor.sockets.channel is None:
            return "the daemon's host has no channels for descriptors (abstract Unix sockets)"
        layout = SlabLayout.of(self.specs(), self.config.batch.size)
        try:
            session.slabs = SessionSlabs.create(
                folder, 2 * self.config.serve.max_pending + held, layout)
        except RegionError as exc:
            log.warning("session %s: no shared memory, its batches travel as messages: %s",
                        session.name, exc)
            return str(exc)
        return None

    @staticmethod
    def start(plan, feed: str, shard: Shard, request: HelloRequest) -> tuple[int, int, list]:
        """Where a session starts: the request's epoch and offset, and the batch numbers of
        its skipped global batches, each checked; an epoch with nothing left for the
        session (its rest went to other ranks or was taken) is passed for the next one."""
        epoch, offset = request.start_epoch, request.start_offset
        if offset > plan.global_batches():
            raise ProtocolError(f"start_offset {offset} is beyond the {plan.global_batches()} "
                                f"global batches of an epoch of feed {feed!r}")
        numbered = plan.shard_batches(shard, offset)
        skip = []
        for g in request.skip:
            j, rest = divmod(g - offset - shard.rank, shard.world)
            if rest or not 0 <= j < numbered:
                raise ProtocolError(f"skip names global batch {g}, which shard {shard} of feed "
                                    f"{feed!r} does not take after offset {offset} (a state "
                                    f"saved by another rank?)")
            skip.append(j)
        if numbered == len(skip):
            return epoch + 1, 0, []
        return epoch, offset, skip

    def make_room(self):
        """At the session cap, end the sessions silent longest while they are silent enough
        to be abandoned (or never claimed); otherwise refuse the hello. An ended session
        whose consumer keeps its data connection open still counts (``SessionTable``)."""
        sessions = self.supervisor.sessions
        while sessions.full():
            victim = sessions.evictable(time.monotonic())
            if victim is None:
                lingering = len(sessions.lingering)
                raise ProtocolError(
                    f"too many sessions ({sessions.max_sessions}, serve.max_sessions): "
                    f"{len(sessions)} alive" + (
                        f", and {lingering} ended whose consumers keep their data "
                        f"connection open (its unread batches stay in the daemon until it "
                        f"closes)" if lingering else ", all of them heartbeating")
                    + "; close unused consumers")
            log.info("session %s (%s): evicted for a new hello, silent for %.1f s",
                     victim.name, victim.feed, time.monotonic() - victim.last_seen)
            self.supervisor.counters["evicted_sessions"] += 1
            self.supervisor.end_session(victim, "this session was silent (no heartbeat) "
                                        "while the daemon had no room for a new one")

    def describe_feed(self, feed: str, shard: Shard | None = None) -> dict:
        """The feed as a stream of ``shard`` (the daemon's own by default) gets it: its
        schema, and the plan and shard a consumer of several daemons compares."""
        plan = self.supervisor.plans[feed]
        shard = shard or self.config.serve.shard
        arrays = self.config.arrays.values()
        conversions = [a.conversion() for a in arrays]
        return {"protocol": PROTOCOL_VERSION, "feed": feed, "batch_size": plan.batch_size,
                "batches_per_epoch": plan.batches_per_epoch(shard),
                "samples_per_epoch": plan.samples_per_epoch(shard),
                "arrays": [a.spec().to_json() for a in arrays],
                "convert": [c.to_json() for c in conversions if c is not None],
                "inputs": list(self.config.output.inputs),
                "targets": list(self.config.output.targets),
                "sample_weight": self.config.output.sample_weight,
                "ordered": self.config.serve.ordered, "plan": plan.identity(),
                "shard": [shard.rank, shard.world]}

    def describe_plan(self, feed: str) -> dict:
        """Where the feed's plan came from (listed, or the plan cache and what was checked;
        per source for a feed of sources), how long that took and the bytes it keeps; the
        window shape of the windowed order."""
        plan = self.supervisor.plans[feed]
        described = dict(getattr(plan, "origin", {}))
        if plan.windowed:
            described.update(range_docs=plan.range_docs, window_ranges=plan.window_ranges,
                             windows_per_epoch=plan.windows)
        return described

    def heartbeat(self, request: HeartbeatRequest) -> dict:
        """A consumer is alive, whether or not it is taking batches."""
        session = self.supervisor.sessions.get(request.token.encode())
        if session is None:  # it ended; the consumer hears why on its data socket
            return {"ok": False, "error": "no session with this token"}
        session.last_seen = time.monotonic()
        return {"ok": True}

    def describe_sources(self, feed: str) -> dict:
        """A feed of sources' sources: each one's query (as MongoDB extended JSON text, so
        that any filter fits the reply), documents, weight and draws per epoch (``{}`` for a
        plain feed)."""
        plan, config = self.supervisor.plans[feed], self.config.feeds[feed]
        if not plan.mixed:
            return {}
        return {"sources": [{**described, "filter": json_util.dumps(config.source_query(
                    config.sources[described["name"]]))}
                for described in plan.describe_sources()]}

    def bye(self, request: ByeRequest) -> dict:
        session = self.supervisor.sessions.get(request.token.encode())
        if session is None:
            raise ProtocolError("no session with this token (it ended, or it is not yours)")
        self.supervisor.end_session(session)
        return {"ok": True}

    def status(self) -> dict:
        supervisor, config = self.supervisor, self.config
        return {
            "ok": True, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - supervisor.started_at, 1),
            "source": {"uri": redact_uri(config.source.uri),
                       "database": config.source.database,
                       "collection": config.source.collection},
            "endpoints": {"data": config.serve.bind, "control": config.serve.control},
            "feeds": {name: {**self.describe_feed(name), **self.describe_sources(name),
                             "planned": self.describe_plan(name)}
                      for name in supervisor.plans},
            "loop": supervisor.loop_clock.status(),
            "workers": supervisor.pool.status(),
            "sessions": supervisor.sessions.status(time.monotonic()),
            "pending_tasks": len(supervisor.sessions.pending),
            "batch_bytes": config.batch_nbytes,
            "max_sessions": config.serve.max_sessions,
            "lingering_connections": len(supervisor.sessions.lingering),
            "session_memory_bound_bytes": config.session_memory_bound,
            "memory_bound_bytes": config.memory_bound,
            "counters": dict(supervisor.counters),
            "errors": list(supervisor.errors),
        }
