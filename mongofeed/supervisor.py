"""The daemon's master process: plans, workers, sessions, tasks; one loop, one thread.

Like a pre-fork server's arbiter, the supervisor owns every producer process: it starts them
with ``spawn`` (never forking a process that holds a MongoClient), restarts one that dies
(with backoff when it keeps dying), re-issues the tasks a dead worker had not delivered,
and stops them all on SIGINT/SIGTERM. Signal handlers only set a flag; ``loop_once`` does
the work, so a test can step it.

Per loop: read control requests (hello/status/bye), consumer credit and heartbeats, worker
announcements and finished batches; then reap and restart workers, expire silent sessions,
plan new tasks for sessions that have room and hand them to workers with free slots.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field

import bson
import zmq

from . import __version__
from .config import Config, redact_uri
from .errors import ProtocolError, SourceError
from .planner import Plan, Shard
from .security import CurveServer
from .sink import Session, Sink
from .source import connect, plan_feed
from .wire import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    ArraySpec,
    decode_json,
    encode_json,
    pack_error,
    unpack_credit,
    unpack_request,
)
from .worker import run_worker, worker_identity

log = logging.getLogger(__name__)

LOOP_POLL_MS = 100
MAX_SESSIONS = 64
CRASH_WINDOW_S = 10.0          # a worker that dies sooner than this after its start crashed
RESTART_MAX_DELAY_S = 30.0
STOP_GRACE_S = 3.0
ERRORS_KEPT = 20
SOCKET_LINGER_MS = 0
RUNTIME_DIR_PREFIX = "mongofeed-"  # + owner pid + "-": stale once that pid is gone
_RUNTIME_DIR_NAME = re.compile(rf"{RUNTIME_DIR_PREFIX}(\d+)-\w+")


def remove_stale_runtime_dirs(parent: str | None = None):
    """Remove the ipc folders that killed daemons left behind (SIGKILL skips our cleanup):
    only ``mongofeed-<pid>-*`` folders of this user whose pid is no longer alive."""
    if sys.platform == "win32":
        return  # workers use loopback tcp there; os.kill would terminate a live process
    parent = parent or tempfile.gettempdir()
    for entry in os.scandir(parent):
        match = _RUNTIME_DIR_NAME.fullmatch(entry.name)
        if (match and entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                and not _pid_alive(int(match[1]))):
            log.info("removing %s, left behind by a daemon that was killed", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


@dataclass
class Task:
    id: int
    session: bytes
    feed: str
    epoch: int
    index: int
    ids: list

    def pack(self) -> list:
        return [b"task", bson.encode({"task": self.id, "feed": self.feed, "epoch": self.epoch,
                                      "index": self.index, "ids": self.ids})]


@dataclass
class WorkerRecord:
    slot: int
    process: multiprocessing.Process | None = None
    state: str = "starting"
    started_at: float = 0.0
    restart_at: float = 0.0
    inflight: list = field(default_factory=list)
    crashes: int = 0           # consecutive early deaths, for the backoff
    restarts: int = 0
    batches: int = 0
    docs: int = 0
    bytes: int = 0
    skips: int = 0
    errors: int = 0
    last_error: str | None = None
    last_heard: float = 0.0    # the last message from this worker (ready, event or batch)

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def status(self) -> dict:
        return {"slot": self.slot, "pid": self.pid, "state": self.state,
                "inflight": len(self.inflight), "batches": self.batches, "docs": self.docs,
                "bytes": self.bytes, "skips": self.skips, "errors": self.errors,
                "restarts": self.restarts, "last_error": self.last_error}


class Supervisor:
    def __init__(self, config: Config, log_level: int = logging.WARNING):
        self.config = config
        self.log_level = log_level
        self.plans: dict[str, Plan] = {}
        self.workers = [WorkerRecord(slot) for slot in range(config.serve.workers)]
        self.sessions: dict[bytes, Session] = {}
        self.tasks: dict[int, Task] = {}
        self.pending: deque[int] = deque()
        self.errors: deque[str] = deque(maxlen=ERRORS_KEPT)
        self.counters = {"rejected_messages": 0, "dropped_batches": 0, "sessions_opened": 0}
        self.started_at = time.time()
        self.stopping = False
        self.context = None
        self.curve = None  # CurveServer when serve.server_key is set
        self.runtime_dir = None
        self.mp = multiprocessing.get_context("spawn")
        self.metrics_server = None

    # -- start and stop ---------------------------------------------------------------------

    def plan_feeds(self):
        """List each feed's ``_id``s once, with the only client the supervisor ever opens."""
        client = connect(self.config.source, appname="mongofeed-supervisor")
        try:
            for feed in self.config.feeds.values():
                self.plans[feed.name] = plan_feed(client, self.config, feed)
        finally:
            client.close()

    def start(self):
        """Plan, bind every socket and start the workers; raises before leaving anything."""
        self.plan_feeds()
        self.context = zmq.Context()
        try:
            if self.config.serve.server_key:
                self.curve = CurveServer(self.context, self.config.serve.server_key,
                                         self.config.serve.client_keys)
            self.control = self._bind(zmq.ROUTER, self.config.serve.control, MAX_CONTROL_BYTES)
            self.data = self._bind(zmq.ROUTER, self.config.serve.bind, MAX_CONTROL_BYTES)
            self.data.router_mandatory = 1
            self.data.sndhwm = 10_000  # consumer credit is the real bound
            remove_stale_runtime_dirs()
            self.runtime_dir = tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{os.getpid()}-")
            self.task_socket, self.task_endpoint = self._bind_internal(zmq.ROUTER, "tasks")
            self.task_socket.router_mandatory = 1
            self.task_socket.router_handover = 1  # a restarted worker reuses its slot's identity
            self.sink_socket, self.sink_endpoint = self._bind_internal(zmq.PULL, "sink")
            if self.config.serve.metrics_port is not None:
                from .metrics import start_metrics_server

                self.metrics_server = start_metrics_server(self.config.serve.metrics_port,
                                                           lambda: self.op_status({}))
        except BaseException:
            self.close()
            raise
        self.sink = Sink(self.data)
        self.poller = zmq.Poller()
        for socket in (self.control, self.data, self.task_socket, self.sink_socket):
            self.poller.register(socket, zmq.POLLIN)
        for record in self.workers:
            self.start_worker(record)

    def _bind(self, kind: int, endpoint: str, max_message: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.linger = SOCKET_LINGER_MS
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

    def _bind_internal(self, kind: int, name: str) -> tuple[zmq.Socket, str]:
        """Worker sockets: a private ipc folder on POSIX, loopback tcp elsewhere."""
        socket = self.context.socket(kind)
        socket.linger = SOCKET_LINGER_MS
        if sys.platform == "win32":
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            return socket, f"tcp://127.0.0.1:{port}"
        endpoint = f"ipc://{os.path.join(self.runtime_dir, name)}"
        socket.bind(endpoint)
        return socket, endpoint

    def start_worker(self, record: WorkerRecord):
        record.process = self.mp.Process(
            target=run_worker, name=f"mongofeed-worker-{record.slot}", daemon=True,
            args=(record.slot, self.config, self.task_endpoint, self.sink_endpoint,
                  self.log_level))
        record.process.start()
        record.state = "starting"
        record.started_at = record.last_heard = time.monotonic()

    def wait_ready(self, timeout: float = 60.0):
        """Run the loop until every worker has said ready (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while not self.stopping and time.monotonic() < deadline:
            if all(r.state == "ready" for r in self.workers):
                return
            self.loop_once()

    def install_signal_handlers(self):
        def request_stop(signum, frame):
            self.stopping = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self):
        while not self.stopping:
            self.loop_once()

    def stop(self):
        """Ask workers to stop, wait briefly, then terminate and kill what is left."""
        for record in self.workers:
            if record.state not in ("starting", "dead", "backoff"):
                try:
                    self.task_socket.send_multipart([worker_identity(record.slot), b"stop"],
                                                    flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for record in self.workers:
            if record.process is not None:
                record.process.join(max(0.0, deadline - time.monotonic()))
        for record in self.workers:
            if record.process is not None and record.process.is_alive():
                record.process.terminate()
                record.process.join(1.0)
                if record.process.is_alive():
                    record.process.kill()
                    record.process.join()
        for session in list(self.sessions.values()):
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
        self.check_workers()
        self.expire_sessions()
        self.plan_tasks()
        self.dispatch()

    def drain(self, socket: zmq.Socket, handler, limit: int = 100):
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handler(frames)

    # -- workers ----------------------------------------------------------------------------

    def on_worker_message(self, frames):
        try:
            slot = int(frames[0].bytes)
            record = self.workers[slot]
            kind, body = frames[1].bytes, decode_json(frames[2], MAX_CONTROL_BYTES, "event")
        except (ValueError, IndexError, ProtocolError):
            self.counters["rejected_messages"] += 1
            return
        record.last_heard = time.monotonic()
        if kind == b"ready":
            record.state = "ready"
        elif kind == b"event":
            record.state = body.get("state", record.state)
            record.last_error = body.get("error") or record.last_error

    def on_batch(self, frames):
        meta = decode_json(frames[0], MAX_CONTROL_BYTES, "batch meta")
        record = self.workers[meta["slot"]]
        record.last_heard = time.monotonic()
        if meta["task"] in record.inflight:
            record.inflight.remove(meta["task"])
        if record.state != "stopping":
            record.state = "ready"
        task = self.tasks.pop(meta["task"], None)
        session = self.sessions.get(task.session) if task else None
        if session is None:
            # A session that ended, or a late duplicate of a re-issued task: never delivered.
            self.counters["dropped_batches"] += 1
            return
        if "error" in meta:
            record.errors += 1
            record.last_error = meta["error"]
            self.record_error(f"feed {task.feed}: {meta['error']}")
            self.end_session(session, meta["error"])
            return
        record.batches += 1
        record.docs += meta["docs"]
        record.bytes += meta["bytes"]
        record.skips += meta["skips"]
        session.skips += meta["skips"]
        for message in meta["skipped"]:
            log.warning("skipped: %s", message)
        if not self.sink.accept(session, task.epoch, task.index, frames[1:]):
            self.end_session(session)

    def check_workers(self):
        """Reap dead workers, re-issue their tasks, restart them (with backoff)."""
        now = time.monotonic()
        for record in self.workers:
            process = record.process
            if record.state == "backoff":
                if now >= record.restart_at:
                    record.restarts += 1
                    self.start_worker(record)
                continue
            if process is None:
                continue
            if process.is_alive():
                self.kill_if_stalled(record, now)
                continue
            process.join()
            self.reissue(record)
            early = now - record.started_at < CRASH_WINDOW_S
            record.crashes = record.crashes + 1 if early else 0
            delay = min(RESTART_MAX_DELAY_S, 0.5 * 2 ** record.crashes) if early else 0.0
            message = (f"worker {record.slot} (pid {process.pid}) exited with code "
                       f"{process.exitcode}")
            if record.crashes >= 3:
                message += f"; it keeps dying, next start in {delay:.0f} s"
            log.warning(message)
            self.record_error(message)
            record.state = "backoff"
            record.restart_at = now + delay

    def kill_if_stalled(self, record: WorkerRecord, now: float):
        """A hung worker would stall its tasks forever: kill it, so it is reaped, its tasks
        re-issued and a replacement started like after any other death."""
        silent = now - record.last_heard
        if record.inflight and silent > self.config.serve.stall_timeout:
            message = (f"worker {record.slot} (pid {record.pid}) held a task for {silent:.0f} s "
                       f"without a sign of life; killing it")
            log.warning(message)
            self.record_error(message)
            record.process.kill()

    def reissue(self, record: WorkerRecord):
        for task_id in reversed(record.inflight):
            if task_id in self.tasks:
                self.pending.appendleft(task_id)
        record.inflight.clear()

    def dispatch(self):
        """Hand pending tasks to ready workers, the least loaded first."""
        while self.pending:
            free = [r for r in self.workers
                    if r.state in ("ready", "busy")
                    and len(r.inflight) < self.config.serve.tasks_per_worker]
            if not free:
                return
            record = min(free, key=lambda r: len(r.inflight))
            task_id = self.pending.popleft()
            task = self.tasks.get(task_id)
            if task is None:
                continue  # its session ended
            try:
                self.task_socket.send_multipart([worker_identity(record.slot)] + task.pack(),
                                                flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.pending.appendleft(task_id)
                record.state = "starting"  # not connected (yet or any more)
                return
            if not record.inflight:
                record.last_heard = time.monotonic()  # the stall clock starts with the work
            record.inflight.append(task_id)
            record.state = "busy"

    # -- sessions ---------------------------------------------------------------------------

    def plan_tasks(self):
        """Give every active session tasks until it has ``max_pending`` batches ahead."""
        limit = self.config.serve.max_pending
        hungry = [s for s in self.sessions.values() if s.active and s.ahead() < limit]
        while hungry:
            for session in list(hungry):
                epoch, index = session.next_task()
                plan = self.plans[session.feed]
                task = Task(secrets.randbits(62), session.id, session.feed, epoch, index,
                            plan.batch_ids(epoch, index, session.shard))
                self.tasks[task.id] = task
                self.pending.append(task.id)
                session.in_production += 1
                if session.ahead() >= limit:
                    hungry.remove(session)

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
        now = time.monotonic()
        timeout = self.config.serve.session_timeout
        for session in list(self.sessions.values()):
            if now - session.last_seen > timeout:
                log.info("session %s (%s): no heartbeat for %.0f s, ending it",
                         session.name, session.feed, timeout)
                self.end_session(session)

    def end_session(self, session: Session, error: str | None = None):
        """Stop all work for a session; tasks in flight are dropped when they come back."""
        if error is not None:
            self.sink.fail(session, error)
        self.sessions.pop(session.id, None)
        for task_id in [t.id for t in self.tasks.values() if t.session == session.id]:
            del self.tasks[task_id]
        session.ready.clear()

    # -- control ----------------------------------------------------------------------------

    def on_control(self, frames):
        identity = frames[0].bytes
        try:
            request = unpack_request(frames[1:])
            handler = getattr(self, f"op_{request['op']}", None)
            if handler is None:
                raise ProtocolError(f"unknown op {request['op']!r:.40}")
            reply = handler(request)
        except ProtocolError as exc:
            self.counters["rejected_messages"] += 1
            reply = {"ok": False, "error": str(exc)}
        try:
            self.control.send_multipart([identity, encode_json(reply)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def op_hello(self, request: dict) -> dict:
        if request.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(f"consumer speaks protocol {request.get('protocol')!r}, the "
                                f"daemon speaks {PROTOCOL_VERSION}: upgrade one of them")
        feed = request.get("feed")
        if feed not in self.plans:
            raise ProtocolError(f"unknown feed {feed!r:.40}; this daemon serves "
                                f"{', '.join(self.plans)}")
        start_epoch = request.get("start_epoch", 0)
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or start_epoch < 0:
            raise ProtocolError("start_epoch must be a non-negative integer")
        try:
            # The consumer's share is taken from this daemon's share of the epoch.
            shard = Shard(*request.get("shard", [0, 1])).within(self.config.serve.shard)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"bad shard: {exc}") from None
        if len(self.sessions) >= MAX_SESSIONS:
            raise ProtocolError(f"too many sessions ({MAX_SESSIONS}); close unused consumers")
        plan = self.plans[feed]
        if plan.batches_per_epoch(shard) == 0:
            raise ProtocolError(f"shard {shard} of feed {feed!r} has no full batch")
        session = Session(secrets.token_hex(8).encode(), feed, shard,
                          plan.batches_per_epoch(shard), start_epoch, self.config.serve.ordered)
        self.sessions[session.id] = session
        self.counters["sessions_opened"] += 1
        log.info("session %s: feed %s from epoch %d, shard %s", session.name, feed,
                 start_epoch, shard)
        return {"ok": True, **self.describe_feed(feed, shard), "session": session.name,
                "start_epoch": start_epoch, "shard": [shard.rank, shard.world],
                "heartbeat_timeout": self.config.serve.session_timeout}

    def describe_feed(self, feed: str, shard: Shard | None = None) -> dict:
        plan = self.plans[feed]
        shard = shard or self.config.serve.shard
        fields = self.config.fields.values()
        arrays = [ArraySpec(f.name, f.out_dtype, f.out_shape).to_json() for f in fields]
        return {"protocol": PROTOCOL_VERSION, "feed": feed, "batch_size": plan.batch_size,
                "batches_per_epoch": plan.batches_per_epoch(shard),
                "samples_per_epoch": plan.samples_per_epoch(shard), "arrays": arrays,
                "inputs": list(self.config.output.inputs),
                "targets": list(self.config.output.targets),
                "ordered": self.config.serve.ordered}

    def op_bye(self, request: dict) -> dict:
        session = self.sessions.get(str(request.get("session")).encode())
        if session is not None:
            self.end_session(session)
        return {"ok": True}

    def op_status(self, request: dict) -> dict:
        now = time.monotonic()
        batch_bytes = self.config.batch_nbytes
        return {
            "ok": True, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "source": {"uri": redact_uri(self.config.source.uri),
                       "database": self.config.source.database,
                       "collection": self.config.source.collection},
            "endpoints": {"data": self.config.serve.bind, "control": self.config.serve.control},
            "feeds": {name: self.describe_feed(name) for name in self.plans},
            "workers": [r.status() for r in self.workers],
            # A copy: the metrics thread also calls this while the loop changes sessions.
            "sessions": [s.status(now) for s in list(self.sessions.values())],
            "pending_tasks": len(self.pending),
            "memory_bound_bytes": batch_bytes * self.config.serve.max_pending
            * max(1, len(self.sessions)),
            "batch_bytes": batch_bytes,
            "counters": dict(self.counters),
            "errors": list(self.errors),
        }

    def record_error(self, message: str):
        self.errors.append(f"{time.strftime('%H:%M:%S')} {message}")
