"""The control socket's requests: ``hello`` opens a session, ``bye`` ends one, ``status``
reports everything ``mongofeed status`` shows.

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
from ..wire import PROTOCOL_VERSION, ArraySpec
from .config import redact_uri
from .planner import Shard

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_SESSIONS = 64


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
        session = supervisor.sessions.open(feed, shard, start_epoch, self.config.serve.ordered)
        supervisor.counters["sessions_opened"] += 1
        log.info("session %s: feed %s from epoch %d, shard %s", session.name, feed,
                 start_epoch, shard)
        return {"ok": True, **self.describe_feed(feed, shard), "session": session.name,
                "start_epoch": start_epoch, "shard": [shard.rank, shard.world],
                "heartbeat_timeout": self.config.serve.session_timeout}

    def describe_feed(self, feed: str, shard: Shard | None = None) -> dict:
        """The feed as a stream of ``shard`` (the daemon's own by default) gets it: its
        schema, and the plan and shard a consumer of several daemons compares."""
        plan = self.supervisor.plans[feed]
        shard = shard or self.config.serve.shard
        fields = self.config.fields.values()
        arrays = [ArraySpec(f.name, f.out_dtype, f.out_shape).to_json() for f in fields]
        return {"protocol": PROTOCOL_VERSION, "feed": feed, "batch_size": plan.batch_size,
                "batches_per_epoch": plan.batches_per_epoch(shard),
                "samples_per_epoch": plan.samples_per_epoch(shard), "arrays": arrays,
                "inputs": list(self.config.output.inputs),
                "targets": list(self.config.output.targets),
                "ordered": self.config.serve.ordered, "plan": plan.identity(),
                "shard": [shard.rank, shard.world]}

    def describe_plan(self, feed: str) -> dict:
        """Where the feed's plan came from (listed, or the plan cache and what was checked),
        how long that took and the bytes it keeps; the window shape of the windowed order."""
        plan = self.supervisor.plans[feed]
        described = dict(getattr(plan, "origin", {}))
        if plan.windowed:
            described.update(range_docs=plan.range_docs, window_ranges=plan.window_ranges,
                             windows_per_epoch=plan.windows)
        return described

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
            "feeds": {name: {**self.describe_feed(name), "planned": self.describe_plan(name)}
                      for name in supervisor.plans},
            "loop": supervisor.loop_clock.status(),
            "workers": supervisor.pool.status(),
            "sessions": supervisor.sessions.status(time.monotonic()),
            "pending_tasks": len(supervisor.sessions.pending),
            "memory_bound_bytes": batch_bytes * config.serve.max_pending
            * max(1, len(supervisor.sessions)),
            "batch_bytes": batch_bytes,
            "counters": dict(supervisor.counters),
            "errors": list(supervisor.errors),
        }
