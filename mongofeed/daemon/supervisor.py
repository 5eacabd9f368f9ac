"""The daemon's master process: its sockets and its loop, in one thread.

The supervisor binds the public sockets (control and data) and the internal ones (tasks to
workers, batches from workers), plans each feed, and starts the worker pool. Signal handlers
only set a flag; ``loop_once`` does the work, so a test can step it. Per iteration:

1. read finished batches (sink), worker announcements, consumer credit and heartbeats, and
   control requests (hello/status/bye);
2. reap and restart workers, re-issue the tasks of the dead, end silent sessions;
3. plan new tasks for sessions that have room and hand them to workers with free slots.

The roles live in their own modules: the worker pool [pool], sessions and tasks [sessions],
delivery to consumers [sink], control requests [control].
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Callable

import zmq

from ..errors import ProtocolError, SourceError
from ..portable import bind_internal, make_runtime_dir, on_stop_signals
from ..security import CurveServer
from ..wire import (
    MAX_CONTROL_BYTES,
    BatchMeta,
    WorkerEvent,
    encode_json,
    pack_error,
    unpack_credit,
    unpack_request,
)
from .config import Config
from .control import Control
from .planner import Plan
from .pool import WorkerPool
from .sessions import Session, SessionTable
from .sink import Sink
from .source import MongoSource, plan_feed
from .worker import run_worker

log = logging.getLogger(__name__)

LOOP_POLL_MS = 100
DRAIN_LIMIT = 100              # messages per socket per iteration, so no socket starves
READY_TIMEOUT_S = 60.0
ERRORS_KEPT = 20
SOCKET_LINGER_MS = 0
DATA_SNDHWM = 10_000           # consumer credit is the real bound


class Supervisor:
    def __init__(self, config: Config, log_level: int = logging.WARNING, source=None,
                 worker_main=run_worker):
        """``source`` (default: the config's MongoDB) and ``worker_main`` (the workers'
        process entry point) are what tests and the benchmark replace."""
        self.config = config
        self.log_level = log_level
        self.source = source or MongoSource(config.source)
        self.worker_main = worker_main
        self.plans: dict[str, Plan] = {}
        self.sessions = SessionTable(self.plans, config.serve.max_pending)
        self.control_handlers = Control(self)
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self.counters = {"rejected_messages": 0, "dropped_batches": 0, "sessions_opened": 0}
        self.started_at = time.time()
        self.stopping = False
        self.context = None
        self.curve = None  # CurveServer when serve.server_key is set
        self.runtime_dir = None
        self.pool = None
        self.metrics_server = None

    # -- start and stop ---------------------------------------------------------------------

    def plan_feeds(self):
        """List each feed's ``_id``s once, with the only client the supervisor ever opens."""
        client = self.source.connect("mongofeed-supervisor")
        try:
            for feed in self.config.feeds.values():
                self.plans[feed.name] = plan_feed(self.source, client, self.config, feed)
        finally:
            client.close()

    def start(self):
        """Plan, bind every socket and start the workers; raises before leaving anything."""
        self.plan_feeds()
        self.context = zmq.Context()
        serve = self.config.serve
        try:
            if serve.server_key:
                self.curve = CurveServer(self.context, serve.server_key, serve.client_keys)
            self.control = self._bind(zmq.ROUTER, serve.control, MAX_CONTROL_BYTES)
            self.data = self._bind(zmq.ROUTER, serve.bind, MAX_CONTROL_BYTES)
            self.data.router_mandatory = 1
            self.data.sndhwm = DATA_SNDHWM
            task_endpoint, sink_endpoint = self._bind_internal()
            self.pool = WorkerPool(self.config, self.source, self.task_socket, task_endpoint,
                                   sink_endpoint, self.log_level, self.record_error,
                                   self.worker_main)
            if serve.metrics_port is not None:
                from .metrics import start_metrics_server

                self.metrics_server = start_metrics_server(
                    serve.metrics_port, lambda: self.control_handlers.op_status({}))
        except BaseException:
            self.close()
            raise
        self.sink = Sink(self.data)
        self.poller = zmq.Poller()
        for socket in (self.control, self.data, self.task_socket, self.sink_socket):
            self.poller.register(socket, zmq.POLLIN)
        self.pool.start_all()

    def _bind_internal(self) -> tuple[str, str]:
        """Bind the sockets to the workers (tasks, sink) over serve.internal_transport: ipc in
        a private folder, or loopback tcp [portable]; their endpoints for the workers."""
        if self.config.serve.internal_transport == "ipc":
            self.runtime_dir = make_runtime_dir()
        self.task_socket = self._socket(zmq.ROUTER)
        task_endpoint = bind_internal(self.task_socket, self.runtime_dir, "tasks")
        self.task_socket.router_mandatory = 1
        self.task_socket.router_handover = 1  # a restarted worker reuses its slot's identity
        self.sink_socket = self._socket(zmq.PULL)
        sink_endpoint = bind_internal(self.sink_socket, self.runtime_dir, "sink")
        return task_endpoint, sink_endpoint

    def _socket(self, kind: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.linger = SOCKET_LINGER_MS
        return socket

    def _bind(self, kind: int, endpoint: str, max_message: int) -> zmq.Socket:
        socket = self._socket(kind)
        socket.maxmsgsize = max_message
        if self.curve is not None:
            self.curve.apply(socket)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            socket.close()
            raise SourceError(f"cannot bind {endpoint}: {exc.strerror}; is another "
                              f"'mongofeed serve' running? choose another --bind") from None
        return socket

    def wait_ready(self, timeout: float = READY_TIMEOUT_S):
        """Run the loop until every worker has said ready (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while not self.stopping and time.monotonic() < deadline:
            if self.pool.all_ready():
                return
            self.loop_once()

    def install_signal_handlers(self):
        """SIGINT, SIGTERM and, on Windows, SIGBREAK (Ctrl-Break) ask for a stop [portable]."""
        def request_stop(signum, frame):
            self.stopping = True

        on_stop_signals(request_stop)

    def serve(self, on_ready: Callable[[], None]):
        """Start, call ``on_ready`` once the workers are up, run until a stop is asked for,
        and stop; what ``mongofeed serve`` does."""
        self.install_signal_handlers()
        self.start()
        try:
            self.wait_ready()
            on_ready()
            while not self.stopping:
                self.loop_once()
        finally:
            self.stop()

    def stop(self):
        """Stop the workers, tell every session why it ends, release everything."""
        self.pool.stop()
        for session in list(self.sessions.sessions.values()):
            self.sink.fail(session, "the daemon stopped")
        self.close()

    def close(self):
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.curve is not None:
            self.curve.stop()
            self.curve = None
        if self.context is not None:
            self.context.destroy(linger=SOCKET_LINGER_MS)
            self.context = None
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None

    # -- the loop ---------------------------------------------------------------------------

    def loop_once(self, timeout_ms: int = LOOP_POLL_MS):
        try:
            events = dict(self.poller.poll(timeout_ms))
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EINTR:
                return
            raise
        if self.sink_socket in events:
            self.drain(self.sink_socket, self.on_batch)
        if self.task_socket in events:
            self.drain(self.task_socket, self.on_worker_message)
        if self.data in events:
            self.drain(self.data, self.on_consumer_message)
        if self.control in events:
            self.drain(self.control, self.on_control)
        self.sessions.requeue(self.pool.check())
        self.expire_sessions()
        self.sessions.plan_tasks()
        self.dispatch()

    def drain(self, socket: zmq.Socket, handler, limit: int = DRAIN_LIMIT):
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    def on_worker_message(self, frames):
        try:
            event = WorkerEvent.unpack(frames)
        except ProtocolError:
            self.counters["rejected_messages"] += 1
            return
        if event.slot < len(self.pool.records):
            self.pool.on_event(event)

    def on_batch(self, frames):
        try:
            meta = BatchMeta.unpack(frames[0])
            record = self.pool.heard(meta.slot)
        except (ProtocolError, IndexError):
            self.counters["rejected_messages"] += 1
            return
        self.pool.delivered(record, meta.task)
        task, session = self.sessions.finish(meta.task)
        if session is None:
            # A session that ended, or a late duplicate of a re-issued task: never delivered.
            self.counters["dropped_batches"] += 1
            return
        if meta.error is not None:
            record.errors += 1
            record.last_error = meta.error
            self.record_error(meta.error)  # it names the feed, epoch and batch
            self.end_session(session, meta.error)
            return
        record.batches += 1
        record.docs += meta.docs
        record.bytes += meta.bytes
        record.skips += meta.skips
        session.skips += meta.skips
        for message in meta.skipped:
            log.warning("skipped: %s", message)
        if not self.sink.accept(session, task.epoch, task.index, frames[1:]):
            self.end_session(session)

    def dispatch(self):
        """Hand pending tasks to ready workers, the least loaded first."""
        while self.sessions.pending:
            record = self.pool.least_loaded()
            if record is None:
                return
            task = self.sessions.next_pending()
            if task is None:
                return
            if not self.pool.send(record, task):
                self.sessions.requeue([task.id])
                return

    def on_consumer_message(self, frames):
        identity = frames[0].bytes
        session = self.sessions.get(identity)
        try:
            credit = unpack_credit(frames[1:])
        except ProtocolError as exc:
            self.counters["rejected_messages"] += 1
            log.info("data socket: rejected a message: %s", exc)
            return
        if session is None:
            self.counters["rejected_messages"] += 1
            try:
                self.data.send_multipart([identity] + pack_error(
                    "unknown session: the daemon was restarted or the session expired; "
                    "create a new consumer"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            return
        if not self.sink.grant(session, credit):
            self.end_session(session)

    def expire_sessions(self):
        timeout = self.config.serve.session_timeout
        for session in self.sessions.silent(time.monotonic(), timeout):
            log.info("session %s (%s): no heartbeat for %.0f s, ending it",
                     session.name, session.feed, timeout)
            self.end_session(session)

    def end_session(self, session: Session, error: str | None = None):
        """Stop all work for a session; tasks in flight are dropped when they come back."""
        if error is not None:
            self.sink.fail(session, error)
        self.sessions.end(session)

    def on_control(self, frames):
        identity = frames[0].bytes
        try:
            reply = self.control_handlers.handle(unpack_request(frames[1:]))
        except ProtocolError as exc:
            self.counters["rejected_messages"] += 1
            reply = {"ok": False, "error": str(exc)}
        try:
            self.control.send_multipart([identity, encode_json(reply)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def record_error(self, message: str):
        self.errors.append(f"{time.strftime('%H:%M:%S')} {message}")
