"""The daemon's master process: its sockets and its loop, in one thread.

The supervisor binds the public sockets (control and data) and the internal ones (tasks to
workers, batches from workers), plans each feed, and starts the worker pool. Signal handlers
only set a flag (while it plans, the one long step that does not loop here, they also
interrupt it); ``loop_once`` does the work, so a test can step it. Per iteration:

1. read finished batches (sink), worker announcements, consumer credit (data socket and
   channel) and heartbeats, and control requests (hello/status/bye);
2. reap and restart workers, re-issue the tasks of the dead (a task that dies with its
   worker twice fails its session instead), end silent sessions;
3. plan new tasks for sessions that have room and hand them to workers with free slots.

No message can stop the loop: whatever a handler raises, the message is refused and
counted (``rejected_messages``), logged with its reason (a traceback for the unexpected, at
most one warning per ``REJECT_LOG_INTERVAL_S``), and the loop goes on.

The roles live in their own modules: the sockets and how they are bound [sockets], the
worker pool [pool], sessions and tasks [sessions], tasks to workers and their batches back
[dispatch], delivery to consumers [sink], control requests [control].
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

import zmq

from ..errors import ProtocolError
from ..portable import on_stop_signals, remove_stale_shared_memory, shared_memory_dir
from ..wire import encode_json, pack_error, unpack_credit, unpack_request
from .config import Config
from .control import Control
from .dispatch import Dispatcher
from .planner import Plan
from .planning import plan_feed
from .pool import WorkerPool
from .sessions import Session, SessionTable
from .sink import Sink
from .sockets import Sockets, closed_connection, connection_of
from .source import MongoSource
from .transform import load_functions
from .worker import run_worker

log = logging.getLogger(__name__)

LOOP_POLL_MS = 100
LOOP_WINDOW_S = 60.0           # status reports the longest iteration of this last window
DRAIN_LIMIT = 100              # messages per socket per iteration, so no socket starves
READY_TIMEOUT_S = 60.0
ERRORS_KEPT = 20
REJECT_LOG_INTERVAL_S = 10.0   # one warning per interval; the others at debug level


class StopRequested(BaseException):
    """SIGTERM or SIGINT arrived while the daemon was planning (which does not loop here to
    look at the stop flag): raised by the signal handler to abandon the plan."""


class LoopClock:
    """How long the loop's iterations take, poll wait excluded: the longest since start and
    in the last ``LOOP_WINDOW_S`` (a slow iteration delays every consumer's traffic), and the
    longest in CPU time of the loop's thread (its own work, without the time the machine gave
    to other processes meanwhile)."""

    def __init__(self):
        self.iterations = 0
        self.longest_s = self.longest_cpu_s = 0.0
        self.recent = deque()  # (when, seconds) of the longest iterations of the window

    def record(self, seconds: float, cpu_seconds: float):
        now = time.monotonic()
        self.iterations += 1
        self.longest_s = max(self.longest_s, seconds)
        self.longest_cpu_s = max(self.longest_cpu_s, cpu_seconds)
        while self.recent and now - self.recent[0][0] > LOOP_WINDOW_S:
            self.recent.popleft()
        while self.recent and self.recent[-1][1] <= seconds:  # never the longest again
            self.recent.pop()
        self.recent.append((now, seconds))

    def status(self) -> dict:
        now = time.monotonic()
        recent = [s for when, s in self.recent if now - when <= LOOP_WINDOW_S]
        return {"iterations": self.iterations, "longest_ms": round(self.longest_s * 1e3, 2),
                "longest_cpu_ms": round(self.longest_cpu_s * 1e3, 2),
                "longest_recent_ms": round(max(recent, default=0.0) * 1e3, 2),
                "recent_window_s": LOOP_WINDOW_S}


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
        self.sessions = SessionTable(self.plans, config.serve.max_pending,
                                     config.serve.max_sessions)
        self.control_handlers = Control(self)
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self.counters = {"rejected_messages": 0, "dropped_batches": 0, "sessions_opened": 0,
                         "evicted_sessions": 0, "poison_tasks": 0, "windows_read_ahead": 0}
        self.loop_clock = LoopClock()
        self.started_at = time.time()
        self.stopping = False
        self.planning = False  # while true, a stop signal raises StopRequested
        self.last_reject_log = -REJECT_LOG_INTERVAL_S
        self.sockets = None  # bound by start
        self.shared_memory_dir = None  # where session regions are made; None: no regions
        self.pool = None
        self.metrics_server = None

    # -- start and stop ---------------------------------------------------------------------

    def plan_feeds(self):
        """List each feed's ``_id``s once, with the only client the supervisor ever opens.
        A stop signal meanwhile raises ``StopRequested`` (see ``install_signal_handlers``)."""
        self.planning = True
        try:
            if self.stopping:
                raise StopRequested
            client = self.source.connect("mongofeed-supervisor")
            try:
                for feed in self.config.feeds.values():
                    log.info("planning feed %s", feed.name)
                    self.plans[feed.name] = plan_feed(self.source, client, self.config, feed)
            finally:
                client.close()
        finally:
            self.planning = False

    def start(self):
        """Bind every socket, plan, start the workers; raises before leaving anything. The
        user's functions, sockets and keys come first, so a bad function reference, a port in
        use or a bad key is refused at once, not after a long listing."""
        load_functions(self.config.transform, self.config.path)  # a ConfigError stops us here
        serve = self.config.serve
        try:
            self.sockets = sockets = Sockets(serve)
            self.shared_memory_dir = shared_memory_dir()
            remove_stale_shared_memory(self.shared_memory_dir)
            self.plan_feeds()
            self.pool = WorkerPool(self.config, self.source, sockets.tasks,
                                   sockets.internal_endpoints, self.log_level,
                                   self.record_error, self.worker_main)
            if serve.metrics_port is not None:
                from .metrics import start_metrics_server

                self.metrics_server = start_metrics_server(serve.metrics_port,
                                                           self.control_handlers.status)
        except BaseException:
            self.close()
            raise
        self.sink = Sink(sockets.data, serve.max_pending, sockets.channel)
        self.dispatcher = Dispatcher(self.sessions, self.pool, self.sink, self.counters,
                                     self.record_error, self.end_session)
        self.poller = sockets.poller()
        self.pool.start_all()

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
            if self.planning:  # a listing can take minutes and does not look at the flag
                self.planning = False
                raise StopRequested

        on_stop_signals(request_stop)

    def serve(self, on_ready: Callable[[], None]):
        """Start, call ``on_ready`` once the workers are up, run until a stop is asked for,
        and stop; what ``mongofeed serve`` does. A stop asked for before the daemon is ready
        ends it without ``on_ready``."""
        self.install_signal_handlers()
        try:
            self.start()
        except StopRequested:
            log.info("stopped while planning")
            return
        try:
            self.wait_ready()
            if not self.stopping:
                on_ready()
            while not self.stopping:
                self.loop_once()
        finally:
            self.stop()

    def stop(self):
        """Stop the workers, tell every session why it ends, release everything."""
        self.pool.stop()
        for session in list(self.sessions.sessions.values()):
            self.end_session(session, "the daemon stopped")
        self.close()

    def close(self):
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        for session in list(self.sessions.sessions.values()):
            self.sessions.end(session)  # removes its region
        if self.sockets is not None:
            self.sockets.close()

    # -- the loop ---------------------------------------------------------------------------

    def loop_once(self, timeout_ms: int = LOOP_POLL_MS):
        try:
            events = dict(self.poller.poll(timeout_ms))
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EINTR:
                return
            raise
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            self.step(events)
        finally:
            self.loop_clock.record(time.perf_counter() - started,
                                   time.thread_time() - started_cpu)

    def step(self, events: dict):
        """One iteration's work, after the poll: what every consumer's traffic waits for."""
        sockets = self.sockets
        if sockets.sink in events:
            self.drain(sockets.sink, self.dispatcher.on_batch)
        if sockets.tasks in events:
            self.drain(sockets.tasks, self.dispatcher.on_worker_message)
        if sockets.data in events:
            self.drain(sockets.data, self.on_consumer_message)
        if sockets.channel is not None and sockets.channel.fileno() in events:
            self.drain_channel()
        if sockets.data_closed in events:
            self.drain(sockets.data_closed, self.on_data_closed)
        if sockets.control in events:
            self.drain(sockets.control, self.on_control)
        if self.sink.blocked:
            for session in self.sink.retry(self.sessions):
                self.end_session(session)
        for task_ids, taken, death in self.pool.check():
            self.dispatcher.reissue(task_ids, taken, death)
        for session, error in self.sessions.failures_due():
            self.end_session(session, error)
        self.sessions.poll_sent()
        self.expire_sessions()
        self.sessions.plan_tasks()
        self.dispatcher.dispatch()

    def drain(self, socket: zmq.Socket, handler, limit: int = DRAIN_LIMIT):
        """Handle up to ``limit`` messages of ``socket``; one that makes its handler raise is
        refused and counted, and the next one is handled."""
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception as exc:  # noqa: BLE001 - no message may stop the daemon
                self.reject(handler.__name__, exc)

    def drain_channel(self, limit: int = DRAIN_LIMIT):
        """Handle up to ``limit`` datagrams of the channel, as ``drain`` does messages."""
        for _ in range(limit):
            received = self.sockets.channel.receive()
            if received is None:
                return
            try:
                self.on_channel_message(*received)
            except Exception as exc:  # noqa: BLE001 - no datagram may stop the daemon
                self.reject("on_channel_message", exc)

    def reject(self, where: str, exc: Exception):
        """Count a refused message and log why: a ProtocolError is a peer's fault (its
        reason), anything else our bug (a traceback); one warning per interval, so a flood
        of bad messages cannot flood the log."""
        self.counters["rejected_messages"] += 1
        now = time.monotonic()
        level = logging.DEBUG
        if now - self.last_reject_log >= REJECT_LOG_INTERVAL_S:
            self.last_reject_log, level = now, logging.WARNING
        unexpected = not isinstance(exc, ProtocolError)
        log.log(level, "%s: refused a message (%d so far): %s%s", where,
                self.counters["rejected_messages"], type(exc).__name__ + ": " if unexpected
                else "", exc, exc_info=exc if unexpected else None)

    def on_data_closed(self, frames):
        connection = closed_connection(frames)
        if connection is not None:
            self.sessions.disconnected(connection)

    def on_consumer_message(self, frames):
        message = unpack_credit(frames[1:])
        session = self.sessions.get(frames[0].bytes)
        if session is None:
            self.tell_unknown(frames[0].bytes, connection_of(frames[0]))
        self.sessions.connected(session, connection_of(frames[0]))
        self.on_credit(session, message)

    def on_channel_message(self, message: bytes, sender):
        """A datagram on the channel: a credit message, which names its session, or the
        token of a session whose consumer's channel it opens (``mongofeed.channel``)."""
        if message[:1] == b"{":
            credit = unpack_credit([message])
            session = self.sessions.get(credit.token or b"")
            if session is None:
                self.tell_unknown(credit.token, None)
            self.on_credit(session, credit)
            return
        if not (isinstance(sender, bytes) and sender.startswith(b"\0")):
            raise ProtocolError("a channel's token from an unnamed socket")
        session = self.sessions.get(message)
        if session is None or session.slabs is None or session.channel is not None:
            with contextlib.suppress(OSError):  # the sender's name is its own: tell it
                self.sockets.channel.send(sender, pack_error(
                    "unknown channel: the daemon was restarted or the session ended; "
                    "create a new consumer")[0])
            raise ProtocolError("a channel's token that opens no session")
        session.channel = sender
        log.info("session %s: channel open", session.name)
        if not self.sink.flush(session):
            self.end_session(session)

    def tell_unknown(self, token: bytes | None, connection: int | None):
        """Tell the consumer of a session the daemon does not know (any more) why, on the
        data socket, where it looks when nothing else comes; and refuse its message."""
        why = (self.sessions.ended_because(connection)
               or "unknown session: the daemon was restarted or the session ended")
        if token:
            with contextlib.suppress(zmq.ZMQError):
                self.sockets.data.send_multipart(
                    [token] + pack_error(f"{why}; create a new consumer"), flags=zmq.NOBLOCK)
        raise ProtocolError("credit for an unknown session")

    def on_credit(self, session: Session, message):
        """A consumer's credit message, from its data socket or its channel."""
        if session.slabs is not None:
            if message.attached is not None and not session.active:
                session.slabs.shared = message.attached  # its first message says
                log.info("session %s: %s", session.name, session.transport)
            if message.release and not session.slabs.release(message.release):
                self.reject("on_consumer_message",
                            ProtocolError(f"session {session.name} released a slab it did "
                                          f"not hold"))
        if not self.sink.grant(session, message.credit):
            self.end_session(session)

    def expire_sessions(self):
        timeout = self.config.serve.session_timeout
        for session in self.sessions.silent(time.monotonic(), timeout):
            log.info("session %s (%s): no heartbeat for %.0f s, ending it",
                     session.name, session.feed, timeout)
            self.end_session(session, f"no heartbeat for {timeout:g} s "
                             f"(serve.session_timeout): a trainer paused that long (a "
                             f"debugger, SIGSTOP) needs a larger serve.session_timeout")

    def end_session(self, session: Session, error: str | None = None):
        """Stop all work for a session; tasks in flight are dropped when they come back."""
        if error is not None:
            self.sink.fail(session, error)
        self.sessions.end(session, error)

    def on_control(self, frames):
        identity = frames[0].bytes
        try:
            reply = self.control_handlers.handle(unpack_request(frames[1:]))
        except Exception as exc:  # noqa: BLE001 - refused with the reason, counted, logged
            self.reject("control request", exc)
            reply = {"ok": False, "error": str(exc) if isinstance(exc, ProtocolError) else
                     f"the daemon could not handle this request ({type(exc).__name__}); "
                     f"its log has the details"}
        try:
            self.sockets.control.send_multipart([identity, encode_json(reply)],
                                                flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def record_error(self, message: str):
        self.errors.append(f"{time.strftime('%H:%M:%S')} {message}")
