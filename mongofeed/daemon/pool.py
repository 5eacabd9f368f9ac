"""The producer processes: start, reap, back off, kill when stalled, hand out tasks.

Like a pre-fork server's arbiter, the pool owns one record per worker slot. A worker is
started with ``spawn`` (never forking a process that holds a MongoClient); one that dies is
reaped and restarted, after a growing delay when it keeps dying early; one that holds a task
without a sign of life for ``serve.stall_timeout`` is killed and handled like any other
death. The tasks a dead worker had not delivered go back to the caller to be re-issued; a
task that already outlived a worker is sent to an idle worker and nothing joins it there
until it is done, so a second death names the task that causes it. A death counts against
only the tasks the worker had received: each worker process counts the commands it takes off
its socket in memory it shares with the supervisor (which survives its SIGKILL), and the
pool numbers the commands it sends, so a task sent to a worker that died before reading it
(killed with the others, say) is made again without blame. The tasks of one window
of the windowed order go to the worker that reads the window.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import time
from dataclasses import dataclass, field

import zmq

from ..portable import end_process
from ..security import InternalEndpoints
from ..wire.internal import READY, STOP, WarmMessage, WorkerEvent
from .config import Config
from .sessions import Task
from .worker import WINDOWS_KEPT, run_worker, worker_identity

log = logging.getLogger(__name__)

CRASH_WINDOW_S = 10.0          # a worker that dies sooner than this after its start crashed
RESTART_FIRST_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0
CRASHES_REPORTED = 3           # from this many early deaths in a row, say it keeps dying
STOP_GRACE_S = 3.0
KILL_GRACE_S = 1.0


class WorkerState(enum.Enum):
    STARTING = "starting"      # spawned, has not said ready (or cannot be reached)
    READY = "ready"            # idle
    BUSY = "busy"              # holds tasks
    WAITING = "waiting for database"  # holds tasks, retrying a database outage
    BACKOFF = "backoff"        # dead; restarts at restart_at


@dataclass
class WorkerRecord:
    slot: int
    process: multiprocessing.Process | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float = 0.0
    restart_at: float = 0.0
    inflight: list = field(default_factory=list)  # task ids, in the order they were sent
    sent_as: dict = field(default_factory=dict)   # task id -> its command's number (from 1)
    commands: int = 0          # commands sent to the current process
    received: object = None    # shared counter: commands the current process took (RawValue)
    windows: list = field(default_factory=list)   # windows it was given, most recent last
    alone: bool = False        # holds one task that outlived a worker; gets no other
    stalled: bool = False      # killed for holding a task without a sign of life
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

    @property
    def accepts_tasks(self) -> bool:
        return self.state in (WorkerState.READY, WorkerState.BUSY)

    def status(self) -> dict:
        return {"slot": self.slot, "pid": self.pid, "state": self.state.value,
                "inflight": len(self.inflight), "batches": self.batches, "docs": self.docs,
                "bytes": self.bytes, "skips": self.skips, "errors": self.errors,
                "restarts": self.restarts, "last_error": self.last_error}


class WorkerPool:
    """Worker records and their processes; talks to workers over the task socket."""

    def __init__(self, config: Config, source, task_socket: zmq.Socket,
                 endpoints: InternalEndpoints, log_level: int, on_error,
                 worker_main=run_worker):
        self.config = config
        self.source = source
        self.worker_main = worker_main  # the process entry point (a stand-in in loop tests)
        self.task_socket = task_socket
        self.endpoints = endpoints
        self.log_level = log_level
        self.on_error = on_error  # called with a message for status' error list
        self.records = [WorkerRecord(slot) for slot in range(config.serve.workers)]
        self.mp = multiprocessing.get_context("spawn")

    def start_all(self):
        for record in self.records:
            self.start(record)

    def start(self, record: WorkerRecord):
        record.received = self.mp.RawValue("q", 0)
        record.commands = 0
        record.process = self.mp.Process(
            target=self.worker_main, name=f"mongofeed-worker-{record.slot}", daemon=True,
            args=(record.slot, self.config, self.source, self.endpoints, self.log_level,
                  record.received))
        record.process.start()
        record.state = WorkerState.STARTING
        record.started_at = record.last_heard = time.monotonic()

    def all_ready(self) -> bool:
        return all(r.state == WorkerState.READY for r in self.records)

    def heard(self, slot: int) -> WorkerRecord:
        record = self.records[slot]
        record.last_heard = time.monotonic()
        return record

    def on_event(self, event: WorkerEvent):
        """A worker said ready, or that it waits for the database (or no longer does)."""
        record = self.heard(event.slot)
        if event.kind == READY:
            record.state = WorkerState.READY
        elif event.waiting:
            record.state = WorkerState.WAITING
            record.last_error = event.error or record.last_error
        elif record.state == WorkerState.WAITING:
            record.state = WorkerState.BUSY

    def delivered(self, record: WorkerRecord, task_id: int):
        """A batch of ``record``'s came back: the task is no longer in its hands."""
        if task_id in record.inflight:
            record.inflight.remove(task_id)
            record.sent_as.pop(task_id, None)
        record.alone = record.alone and bool(record.inflight)
        if record.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.BUSY):
            record.state = WorkerState.BUSY if record.inflight else WorkerState.READY

    def check(self) -> list[tuple[list[int], list[int], str]]:
        """Reap dead workers, restart those whose backoff is over, kill stalled ones;
        returns, for each worker that died, the ids of the tasks it had not delivered, those
        of them it had received, and how it died."""
        now = time.monotonic()
        deaths = []
        for record in self.records:
            if record.state == WorkerState.BACKOFF:
                if now >= record.restart_at:
                    record.restarts += 1
                    self.start(record)
                continue
            if record.process is None:
                continue
            if record.process.is_alive():
                self.kill_if_stalled(record, now)
                continue
            record.process.join()
            received = record.received.value
            taken = [task for task in record.inflight if record.sent_as[task] <= received]
            deaths.append((record.inflight, taken, self.back_off(record, now)))
            record.inflight = []
            record.sent_as = {}
            record.alone = False
            record.windows = []
        return deaths

    def back_off(self, record: WorkerRecord, now: float) -> str:
        """Schedule the restart of a dead worker; returns how it died."""
        early = now - record.started_at < CRASH_WINDOW_S
        record.crashes = record.crashes + 1 if early else 0
        delay = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** record.crashes) if early \
            else 0.0
        death = (f"worker {record.slot} (pid {record.process.pid}) exited with code "
                 f"{record.process.exitcode}")
        if record.stalled:
            death += " after it was killed for a stall"
            record.stalled = False
        message = death
        if record.crashes >= CRASHES_REPORTED:
            message += f"; it keeps dying, next start in {delay:.0f} s"
        log.warning(message)
        self.on_error(message)
        record.state = WorkerState.BACKOFF
        record.restart_at = now + delay
        return death

    def kill_if_stalled(self, record: WorkerRecord, now: float):
        """A hung worker would stall its tasks forever: kill it, so it is reaped, its tasks
        re-issued and a replacement started like after any other death."""
        silent = now - record.last_heard
        if record.inflight and silent > self.config.serve.stall_timeout:
            message = (f"worker {record.slot} (pid {record.pid}) held a task for {silent:.0f} s "
                       f"without a sign of life; killing it")
            log.warning(message)
            self.on_error(message)
            record.stalled = True
            record.process.kill()

    def least_loaded(self, alone: bool = False, pack: bool = False) -> WorkerRecord | None:
        """The worker with the fewest tasks in hand that can take one more, if any; with
        ``alone``, an idle one (for a task that must be made by itself); with ``pack``, the
        one with the most (tasks that are not urgent join others, which it reads with the
        same query, and the other workers stay asleep)."""
        limit = 1 if alone else self.config.serve.tasks_per_worker
        free = [r for r in self.records
                if r.accepts_tasks and not r.alone and len(r.inflight) < limit]
        if not free:
            return None
        return (max if pack and not alone else min)(free, key=lambda r: len(r.inflight))

    def worker_for(self, task: Task, pack: bool = False) -> WorkerRecord | None:
        """Who makes ``task``: the least loaded worker with room (with ``pack``, the most
        loaded), or for a task of the windowed order the worker that was given its window,
        which holds the window's documents (a window is read once, whatever the tasks in
        hand: the session's ``max_pending`` bounds them). A task that outlived a worker goes
        to an idle one (which then holds its window)."""
        key = task.window_key
        if key is not None and not task.deaths:
            return self.window_holder(key)[0]
        record = self.least_loaded(alone=task.deaths > 0, pack=pack)
        if record is not None and key is not None:
            record.windows = [*record.windows, key][-WINDOWS_KEPT:]
        return record

    def window_holder(self, key: tuple) -> tuple[WorkerRecord | None, bool]:
        """The worker that holds window ``key``, or the one it is now given (the worker
        given the fewest windows, then the least loaded); and whether it is new there."""
        able = [r for r in self.records if r.accepts_tasks and not r.alone]
        holder = next((r for r in able if key in r.windows), None)
        if holder is not None or not able:
            return holder, False
        holder = min(able, key=lambda r: (len(r.windows), len(r.inflight)))
        holder.windows = [*holder.windows, key][-WINDOWS_KEPT:]  # as the worker keeps them
        return holder, True

    def warm(self, key: tuple, spec) -> bool:
        """Have a worker read window ``key`` (``spec``, a BatchWindow) ahead of its tasks;
        whether one was asked to (not if one holds it already or none can take it: then its
        tasks read it)."""
        holder, new = self.window_holder(key)
        if not new:
            return False
        feed, epoch, _ = key
        try:
            self.task_socket.send_multipart([worker_identity(holder.slot)] + WarmMessage(
                feed, epoch, spec.to_wire()).pack(), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        holder.commands += 1
        return True

    def send(self, record: WorkerRecord, task: Task) -> bool:
        """Hand ``task`` to ``record``'s worker; False if it cannot be reached (yet)."""
        try:
            self.task_socket.send_multipart([worker_identity(record.slot)]
                                            + task.message().pack(), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            record.state = WorkerState.STARTING  # not connected (yet or any more)
            return False
        if not record.inflight:
            record.last_heard = time.monotonic()  # the stall clock starts with the work
        record.commands += 1
        record.sent_as[task.id] = record.commands
        record.inflight.append(task.id)
        record.alone = task.deaths > 0
        record.state = WorkerState.BUSY
        return True

    def stop(self):
        """Ask workers to stop, wait briefly, then terminate and kill what is left."""
        for record in self.records:
            if record.accepts_tasks or record.state == WorkerState.WAITING:
                try:
                    self.task_socket.send_multipart([worker_identity(record.slot), STOP],
                                                    flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for record in self.records:
            if record.process is not None:
                record.process.join(max(0.0, deadline - time.monotonic()))
        for record in self.records:
            if record.process is not None and record.process.is_alive():
                end_process(record.process, KILL_GRACE_S)

    def status(self) -> list[dict]:
        return [r.status() for r in self.records]
