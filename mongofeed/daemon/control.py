"""The control socket's requests: ``hello`` opens a session, ``heartbeat`` keeps it alive,
``bye`` ends it, ``status`` reports everything ``mongofeed status`` shows.

``hello`` also makes the session's shared memory (``slabs``), where the daemon has a folder
for it: workers write the session's batches there, whatever the consumer. A consumer that
offers to map it (``"shared_memory": true``, with its ``window``: the batches it may hold)
is told where it is; whether it could map it, it says in its first credit message.

Each handler takes a checked request and returns the reply's body; a request it refuses
raises ``ProtocolError`` with the reason, which the supervisor sends back as
``{"ok": false, "error": ...}``. The handlers read and change the supervisor's state, but
never touch its sockets.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import ProtocolError
from ..region import RegionError, SlabLayout
from ..wire import PROTOCOL_VERSION, ArraySpec, Schema, SharedMemoryOffer
from .config import redact_uri
from .planner import Shard
from .slabs import SessionSlabs

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_SESSIONS = 64
DEFAULT_WINDOW = 10  # batches a consumer may hold if its hello does not say (2 x 4 + 2)
MAX_WINDOW = 256


class Control:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.config = supervisor.config

    def handle(self, request: dict) -> dict:
        handler = getattr(self, f"op_{request['op']}", None)
        if handler is None:
            raise ProtocolError(f"unknown op {request['op']!r:.40}")
        return handler(request)

    def op_hello(self, request: dict) -> dict:
        supervisor = self.supervisor
        if request.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"consumer speaks protocol {request.get('protocol')!r}, the "
                                f"daemon speaks {PROTOCOL_VERSION}: upgrade one of them")
        feed = request.get("feed")
        if feed not in supervisor.plans:
            raise ProtocolError(f"unknown feed {feed!r:.40}; this daemon serves "
                                f"{', '.join(supervisor.plans)}")
        start_epoch = request.get("start_epoch", 0)
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or start_epoch < 0:
            raise ProtocolError("start_epoch must be a non-negative integer")
        try:
            # The consumer's share is taken from this daemon's share of the epoch.
            shard = Shard(*request.get("shard", [0, 1])).within(self.config.serve.shard)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad shard: {exc}") from None
        if len(supervisor.sessions) >= MAX_SESSIONS:
            raise ProtocolError(f"too many sessions ({MAX_SESSIONS}); close unused consumers")
        if supervisor.plans[feed].batches_per_epoch(shard) == 0:
            raise ProtocolError(f"shard {shard} of feed {feed!r} has no full batch")
        window = request.get("window", DEFAULT_WINDOW)
        if not (isinstance(window, int) and not isinstance(window, bool)
                and 1 <= window <= MAX_WINDOW):
            raise ProtocolError(f"window must be an integer from 1 to {MAX_WINDOW}")
        specs = self.specs()
        session = supervisor.sessions.open(feed, shard, start_epoch, self.config.serve.ordered,
                                           Schema(feed, supervisor.plans[feed].batch_size, specs))
        supervisor.counters["sessions_opened"] += 1
        reply = {"ok": True, **self.describe_feed(feed, shard), "session": session.name,
                 "start_epoch": start_epoch, "shard": [shard.rank, shard.world],
                 "heartbeat_timeout": self.config.serve.session_timeout}
        refusal = self.make_slabs(session, window)
        if request.get("shared_memory") is True:
            if session.slabs is not None:
                region = session.slabs.region
                reply["shared_memory"] = SharedMemoryOffer(
                    region.path, region.nonce, region.slabs, region.slab_bytes).to_json()
            else:
                reply["shared_memory_refused"] = refusal
        log.info("session %s: feed %s from epoch %d, shard %s%s", session.name, feed,
                 start_epoch, shard, f", region {session.slabs.path}" if session.slabs else "")
        return reply

    def specs(self) -> tuple[ArraySpec, ...]:
        return tuple(a.spec() for a in self.config.arrays.values())

    def make_slabs(self, session, window: int) -> str | None:
        """Give ``session`` a region of ``serve.max_pending + window`` slabs; the reason
        if there is none (no folder for shared memory here, or no room in it)."""
        folder = self.supervisor.shared_memory_dir
        if folder is None:
            return "the daemon's host has no folder for shared memory"
        layout = SlabLayout.of(self.specs(), self.config.batch.size)
        try:
            session.slabs = SessionSlabs.create(folder, session.name,
                                                self.config.serve.max_pending + window, layout)
        except RegionError as exc:
            log.warning("session %s: no shared memory, its batches travel as messages: %s",
                        session.name, exc)
            return str(exc)
        return None

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

    def op_heartbeat(self, request: dict) -> dict:
        """A consumer is alive, whether or not it is taking batches."""
        session = self.supervisor.sessions.get(str(request.get("session")).encode())
        if session is None:
            return {"ok": False, "error": "unknown session"}
        session.last_seen = time.monotonic()
        return {"ok": True}

    def op_bye(self, request: dict) -> dict:
        session = self.supervisor.sessions.get(str(request.get("session")).encode())
        if session is not None:
            self.supervisor.end_session(session)
        return {"ok": True}

    def op_status(self, request: dict) -> dict:
        supervisor, config = self.supervisor, self.config
        batch_bytes = config.batch_nbytes
        return {
            "ok": True, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - supervisor.started_at, 1),
            "source": {"uri": redact_uri(config.source.uri),
                       "database": config.source.database,
                       "collection": config.source.collection},
            "endpoints": {"data": config.serve.bind, "control": config.serve.control},
            "feeds": {name: self.describe_feed(name) for name in supervisor.plans},
            "workers": supervisor.pool.status(),
            "sessions": supervisor.sessions.status(time.monotonic()),
            "pending_tasks": len(supervisor.sessions.pending),
            "memory_bound_bytes": supervisor.sessions.memory_bound(batch_bytes),
            "batch_bytes": batch_bytes,
            "counters": dict(supervisor.counters),
            "errors": list(supervisor.errors),
        }
