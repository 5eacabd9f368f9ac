"""Sessions and their tasks: what each consumer's stream needs next, and what is in flight.

A session is one consumer's own stream of one feed, from a full epoch boundary or, for a
resume, from a start offset within its first epoch (the global batches the job already
consumed; ``skip`` leaves out batches this rank took out of order), with its own position in
the deterministic plan. For each session the table keeps up to
``serve.max_pending`` batches ahead of delivery (tasks in production plus batches waiting at
the sink), and every task until its batch is delivered, so that a task whose worker died
can be re-issued and a late duplicate recognised.

A session belongs to the peer that said hello: its secret ``token`` (only that peer got it)
is the identity of its data socket and what ``bye`` needs, and the first datagram of its
channel (``mongofeed.channel``, with shared memory); everyone else sees its public
``name``. The table holds at most ``serve.max_sessions``; when it is full, a new hello
takes the place of the session that has been silent longest, if that one has sent nothing
for ``EVICT_SILENCE_S`` (a consumer heartbeats every second, so one that lives is never
evicted, and hellos nobody follows up cannot keep trainers out). A session that ended still
counts while its consumer's data connection stays open (``lingering``): the batches ZeroMQ
queued to that connection stay in the daemon until it closes, so a peer that never reads
cannot open session after session to grow the daemon past its memory bound.

A task whose worker died is re-issued; if that worker had received it, alone to an idle
worker (a worker reads the tasks it holds together, so the first death cannot tell which one
killed it); a task received by ``MAX_TASK_DEATHS`` workers that died is not re-issued again.
A batch that cannot be made (that, or a worker's error) fails its session at that batch: the
consumer gets every batch before it, then the error (``failures_due``).

A session with shared memory (``slabs.SessionSlabs``) gives each task a slab when it is
planned; the task keeps it through re-issues, and each issue is a new ``attempt``, so that a
batch of an earlier attempt (sent by a worker before it died) is known and dropped: only
the worker of the current attempt writes the slab.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import TYPE_CHECKING

from ..wire import TOKEN_CHARS, Schema, SourceIds, TaskMessage
from .planner import BatchWindow, Plan, Shard
from .slabs import SessionSlabs

if TYPE_CHECKING:
    import numpy as np

WINDOWS_REMEMBERED = 256  # windows already read ahead, so sessions at one epoch ask once

EVICT_SILENCE_S = 3.0     # three missed heartbeats: a session this silent may be evicted
MAX_TASK_DEATHS = 2       # a task in the hands of this many dying workers fails its session


@dataclass
class Task:
    id: int
    session: bytes            # the session's token
    feed: str
    epoch: int
    index: int                         # the session's batch number in the epoch
    ids: list | np.ndarray             # the batch's _ids (full order: compact rows), or
    window: BatchWindow | None = None  # its window and slice of it (windowed order), or
    parts: tuple[SourceIds, ...] | None = None  # each source's ids (a feed of sources)
    deaths: int = 0           # workers that died holding it; from 1 on it is made alone
    attempt: int = 1          # 1 + the times it was re-issued
    slab: int | None = None   # the slab its batch is written into (shared memory)
    region: str | None = None

    @property
    def window_key(self) -> tuple | None:
        """The window this task reads, which every session at this epoch shares."""
        return None if self.window is None else (self.feed, self.epoch, self.window.window)

    def describe(self) -> str:
        return f"feed {self.feed!r}, epoch {self.epoch}, batch {self.index}"

    def message(self) -> TaskMessage:
        return TaskMessage(self.id, self.feed, self.epoch, self.index, self.ids,
                           None if self.window is None else self.window.to_wire(), self.parts,
                           self.attempt, self.region, self.slab)

    def drawn(self) -> dict[str, int] | None:
        """Samples of the batch per source, for a feed of sources."""
        return None if self.parts is None else {p.source: len(p.at) for p in self.parts}


@dataclass
class Session:
    token: bytes              # secret: the data socket's identity, needed by bye
    name: str                 # public: status, logs, metrics
    feed: str
    shard: Shard
    batches_per_epoch: int    # of a whole epoch
    start_epoch: int
    ordered: bool
    start_batches: int        # batch numbers of the start epoch (skipped ones included)
    start_offset: int = 0     # global batches of the start epoch the job already consumed
    skip: frozenset = frozenset()  # batch numbers of the start epoch not made (taken before)
    schema: Schema | None = None       # the batches' arrays, to send a slab's frames
    slabs: SessionSlabs | None = None  # its shared memory, if the daemon made it
    last_seen: float = field(default_factory=time.monotonic)
    active: bool = False          # the consumer has connected its data socket
    connection: int | None = None  # the data connection it last sent on (sockets.connection_of)
    channel: bytes | None = None   # its consumer's channel (its name), with shared memory
    credit: int = 0
    plan_epoch: int = 0           # next batch to make into a task
    plan_index: int = 0
    deliver_epoch: int = 0        # epoch being delivered; delivered_in_epoch of it so far
    deliver_index: int = 0        # with ordered: the batch delivered next
    delivered_in_epoch: int = 0
    in_production: int = 0        # tasks issued whose batch has not arrived
    ready: dict = field(default_factory=dict)  # (epoch, index) -> frames or SlabBatch
    delivered: int = 0
    skips: int = 0
    drawn: dict = field(default_factory=dict)    # a feed of sources: samples delivered of each
    drawing: dict = field(default_factory=dict)  # (epoch, index) -> of each, of those in ready
    failing: dict = field(default_factory=dict)  # (epoch, index) -> why it cannot be made

    def __post_init__(self):
        first = self.following(self.start_epoch, -1)
        self.plan_epoch, self.plan_index = first
        self.deliver_epoch, self.deliver_index = first

    def numbered(self, epoch: int) -> int:
        """How many batch numbers ``epoch`` has for this session."""
        return self.start_batches if epoch == self.start_epoch else self.batches_per_epoch

    def offset(self, epoch: int) -> int:
        return self.start_offset if epoch == self.start_epoch else 0

    def to_deliver(self, epoch: int) -> int:
        """How many batches of ``epoch`` this session delivers."""
        return self.numbered(epoch) - (len(self.skip) if epoch == self.start_epoch else 0)

    def following(self, epoch: int, index: int) -> tuple[int, int]:
        """The session's batch after ``(epoch, index)``, skipped ones left out."""
        while True:
            index += 1
            if index >= self.numbered(epoch):
                epoch, index = epoch + 1, 0
            if not (epoch == self.start_epoch and index in self.skip):
                return epoch, index

    @property
    def transport(self) -> str:
        """How its batches travel: "shared memory" (the consumer maps the region), "tcp"
        (sent from the region without a copy) or "frames" (no region: through the sink)."""
        if self.slabs is None:
            return "frames"
        return "shared memory" if self.slabs.shared else "tcp"

    def ahead(self) -> int:
        return self.in_production + len(self.ready)

    def stocked(self) -> bool:
        """Whether the consumer has every batch it granted credit for (on hand or on the
        way): its next task is not urgent, a trainer slower than the daemon (``dispatch``)."""
        return self.active and self.credit == 0

    def next_task(self) -> tuple[int, int]:
        """Advance the plan cursor and return the (epoch, index) it pointed at."""
        position = (self.plan_epoch, self.plan_index)
        self.plan_epoch, self.plan_index = self.following(*position)
        return position

    def next_deliverable(self):
        if self.ordered:
            key = (self.deliver_epoch, self.deliver_index)
            return key if key in self.ready else None
        # Unordered: any batch of the current epoch, never one of the next (epochs stay exact).
        return next((k for k in self.ready if k[0] == self.deliver_epoch), None)

    def sent(self, key: tuple[int, int]):
        """Batch ``key`` went to the consumer: count it, and move on to the next epoch after
        its last."""
        del self.ready[key]
        for source, samples in self.drawing.pop(key, {}).items():
            self.drawn[source] += samples
        self.credit -= 1
        self.delivered += 1
        self.delivered_in_epoch += 1
        if self.ordered:
            self.deliver_index = self.following(*key)[1]
        if self.delivered_in_epoch == self.to_deliver(self.deliver_epoch):
            self.deliver_epoch += 1
            self.delivered_in_epoch = 0

    def fail_at(self, epoch: int, index: int, message: str):
        """Batch ``(epoch, index)`` will not come: the session fails there."""
        self.in_production -= 1
        self.failing.setdefault((epoch, index), message)

    def after_failure(self, epoch: int, index: int) -> bool:
        """Whether batch ``(epoch, index)`` comes after one that fails the session (unordered:
        in a later epoch): it would never be delivered."""
        if not self.failing:
            return False
        first = min(self.failing)
        return (epoch, index) > first if self.ordered else epoch > first[0]

    def failure_due(self) -> str | None:
        """Why the session fails now: every batch before a failed one is delivered (of its
        epoch, unordered)."""
        if self.ordered:
            return self.failing.get((self.deliver_epoch, self.deliver_index))
        here = [why for (epoch, _), why in self.failing.items() if epoch == self.deliver_epoch]
        if here and self.delivered_in_epoch + len(here) >= self.to_deliver(self.deliver_epoch):
            return here[0]
        return None

    def status(self, now: float) -> dict:
        return {
            "session": self.name, "feed": self.feed, "shard": str(self.shard),
            "epoch": self.deliver_epoch, "batch": self.delivered_in_epoch,
            "batches_per_epoch": self.to_deliver(self.deliver_epoch),
            "delivered": self.delivered,
            "waiting": len(self.ready), "in_production": self.in_production,
            "credit": self.credit, "skips": self.skips,
            "idle_s": round(now - self.last_seen, 1),
            **({"drawn": dict(self.drawn)} if self.drawn else {}),
            "transport": self.transport, "slabs": self.slabs.status() if self.slabs else None,
            "failing": self.first_failure(),
        }

    def first_failure(self) -> dict | None:
        """The first batch that will not come, and why: the session fails when its consumer
        reaches it (``failure_due``)."""
        if not self.failing:
            return None
        epoch, index = min(self.failing)
        return {"epoch": epoch, "batch": index, "error": self.failing[(epoch, index)]}


class SessionTable:
    """The live sessions, their tasks, and the queue of tasks waiting for a worker."""

    def __init__(self, plans: dict[str, Plan], max_pending: int, max_sessions: int):
        self.plans = plans
        self.max_pending = max_pending
        self.max_sessions = max_sessions
        self.sessions: dict[bytes, Session] = {}  # by token
        self.tasks: dict[int, Task] = {}
        self.pending: deque[int] = deque()
        self.warmed: OrderedDict[tuple, BatchWindow] = OrderedDict()  # windows read ahead
        self.warm: list[tuple] = []  # of those, the ones not yet handed to a worker
        self.opened = 0
        self.connections: dict[int, bytes] = {}  # open data connection -> its session's token
        self.lingering: dict[int, str] = {}  # connection of an ended session -> why it ended

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, token: bytes) -> Session | None:
        return self.sessions.get(token)

    def full(self) -> bool:
        """Whether the live sessions and the connections of ended ones fill the cap."""
        return len(self.sessions) + len(self.lingering) >= self.max_sessions

    def connected(self, session: Session, connection: int | None):
        """``session``'s consumer sent on data connection ``connection``. A connection
        number in use again means the one it named before has closed, even if the monitor's
        event about that is late or lost."""
        if connection is not None and session.connection != connection:
            self.lingering.pop(connection, None)
            if session.connection is not None:
                self.connections.pop(session.connection, None)
            session.connection = connection
            self.connections[connection] = session.token

    def ended_because(self, connection: int | None) -> str | None:
        """Why the session last served on ``connection`` ended, while it stays open."""
        return self.lingering.get(connection) if connection is not None else None

    def disconnected(self, connection: int):
        """A consumer's data connection closed: what was queued to it is gone."""
        self.lingering.pop(connection, None)
        session = self.sessions.get(self.connections.pop(connection, b""))
        if session is not None and session.connection == connection:
            session.connection = None

    def evictable(self, now: float) -> Session | None:
        """The session silent longest, if it has been silent for ``EVICT_SILENCE_S``."""
        quietest = min(self.sessions.values(), key=lambda s: s.last_seen, default=None)
        if quietest is not None and now - quietest.last_seen > EVICT_SILENCE_S:
            return quietest
        return None

    def open(self, feed: str, shard: Shard, start_epoch: int, ordered: bool,
             start_offset: int = 0, skip: frozenset = frozenset(),
             schema: Schema | None = None) -> Session:
        """A new session of ``feed``; ``start_offset`` and ``skip`` (batch numbers of the start
        epoch) as ``Control.hello`` checked them."""
        self.opened += 1
        plan = self.plans[feed]
        session = Session(secrets.token_hex(TOKEN_CHARS // 2).encode(), f"s{self.opened}",
                          feed, shard, plan.batches_per_epoch(shard), start_epoch, ordered,
                          plan.shard_batches(shard, start_offset), start_offset, skip,
                          schema=schema,
                          drawn=dict.fromkeys(plan.source_names, 0) if plan.mixed else {})
        self.sessions[session.token] = session
        return session

    def end(self, session: Session, reason: str | None = None):
        """Forget a session and its tasks; those in flight are dropped when they come back.
        Its region file is removed (the mappings of workers and consumer outlive it). While
        its consumer's connection stays open, it counts, and ``ended_because`` says why."""
        self.sessions.pop(session.token, None)
        if session.connection is not None:  # counts until the connection closes
            self.connections.pop(session.connection, None)
            self.lingering[session.connection] = (
                f"session {session.name} of feed {session.feed!r} ended: "
                + (reason or "its consumer said bye or the daemon ended it"))
        for task_id in [t.id for t in self.tasks.values() if t.session == session.token]:
            del self.tasks[task_id]
        session.ready.clear()
        session.drawing.clear()
        if session.slabs is not None:
            session.slabs.close()

    def failures_due(self) -> list[tuple[Session, str]]:
        """The sessions to fail now, and why (``Session.failure_due``)."""
        due = [(s, s.failure_due()) for s in self.sessions.values() if s.failing]
        return [(session, why) for session, why in due if why is not None]

    def poll_sent(self):
        """Free the slabs that ZeroMQ has finished sending."""
        for session in self.sessions.values():
            if session.slabs is not None and session.slabs.sending:
                session.slabs.poll_sent()

    def silent(self, now: float, timeout: float) -> list[Session]:
        """Sessions whose consumer sent nothing for ``timeout`` seconds."""
        return [s for s in self.sessions.values() if now - s.last_seen > timeout]

    def plan_tasks(self):
        """Give every active session tasks until it has ``max_pending`` batches ahead (and,
        with shared memory, while it has free slabs), until one of its batches fails. Each
        session's new batches are planned together (one vectorised call per epoch), then
        queued taking turns between sessions."""
        planned = []
        for session in self.sessions.values():
            # A session that fails at a batch needs none after it (those before are planned).
            need = self.max_pending - session.ahead() if (
                session.active and not session.failing) else 0
            if session.slabs is not None:
                need = min(need, len(session.slabs.free))
            if need > 0:
                planned.append(self.plan_session(session, need))
        for turn in zip_longest(*planned):
            for task in turn:
                if task is not None:
                    self.tasks[task.id] = task
                    self.pending.append(task.id)

    def plan_session(self, session: Session, count: int) -> list[Task]:
        """The session's next ``count`` tasks."""
        plan = self.plans[session.feed]
        positions = [session.next_task() for _ in range(count)]
        session.in_production += count
        tasks = []
        for epoch in dict.fromkeys(epoch for epoch, _ in positions):
            indices = [index for e, index in positions if e == epoch]
            batches = [plan.global_index(session.shard, session.offset(epoch), index)
                       for index in indices]
            if plan.windowed:
                reads = [{"ids": [], "window": plan.batch_window(epoch, g)} for g in batches]
                if plan.window_batches // session.shard.world > self.max_pending:
                    self.read_ahead(session.feed, plan, epoch, reads[-1]["window"].window)
            elif plan.mixed:
                reads = [{"ids": [], "parts": parts}
                         for parts in plan.batch_parts(epoch, batches)]
            else:
                reads = [{"ids": rows} for rows in plan.batch_rows(epoch, batches)]
            tasks += [Task(secrets.randbits(62), session.token, session.feed, epoch, index,
                           **read)
                      for index, read in zip(indices, reads, strict=True)]
        if session.slabs is not None:
            for task in tasks:
                task.slab, task.region = session.slabs.acquire(), session.slabs.path
        return tasks

    def read_ahead(self, feed: str, plan, epoch: int, window: int):
        """Once a session has tasks in a window, the next window is read ahead (by a worker
        without the current one), so its read overlaps the current window's batches. Once
        per window, whatever the sessions; only for windows of more batches than a session
        plans ahead (in smaller ones its tasks already reach into the next window, and a
        worker keeps two windows)."""
        key = (feed, *plan.next_window(epoch, window))
        if key not in self.warmed:
            self.warmed[key] = plan.window_read(*key[1:])
            self.warm.append(key)
            while len(self.warmed) > WINDOWS_REMEMBERED:
                self.warmed.popitem(last=False)

    def take_warm(self) -> list[tuple[tuple, BatchWindow]]:
        """The windows to read ahead, (key, spec) each, since the last call."""
        taken = [(key, self.warmed[key]) for key in self.warm if key in self.warmed]
        self.warm.clear()
        return taken

    def finish(self, task_id: int, attempt: int) -> tuple[Task | None, Session | None]:
        """A batch came back: its task (None for a late duplicate, a batch of an earlier
        attempt, or an ended session's) and the session that still waits for it."""
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt:
            return None, None
        del self.tasks[task_id]
        return task, self.sessions.get(task.session)

    def requeue(self, task_ids: list[int]):
        """Tasks a worker could not be sent, or whose worker died: first in line again, in
        their order, each as a new attempt (a batch of the old one is dropped if it comes)."""
        for task_id in reversed(task_ids):
            task = self.tasks.get(task_id)
            if task is not None:
                task.attempt += 1
                self.pending.appendleft(task_id)

    def orphaned(self, task_ids: list[int], taken: list[int]) -> list[Task]:
        """Tasks of a worker that died: each that it had received (``taken``) counts the
        death, and all go first in line again (those with a death to be made alone);
        returns those that reached ``MAX_TASK_DEATHS`` instead, forgotten (poison: their
        sessions must fail rather than kill workers forever)."""
        poison = []
        for task_id in taken:
            task = self.tasks.get(task_id)
            if task is not None:
                task.deaths += 1
                if task.deaths >= MAX_TASK_DEATHS:
                    poison.append(self.tasks.pop(task_id))
        self.requeue(task_ids)
        for task in poison:
            session = self.sessions.get(task.session)
            if session is not None and task.slab is not None:
                session.slabs.give_back(task.slab)
        return poison

    def next_pending(self) -> Task | None:
        """The next task waiting for a worker (skipping those of ended sessions); it stays
        first in line until ``take_pending``."""
        while self.pending:
            task = self.tasks.get(self.pending[0])
            if task is not None:
                return task
            self.pending.popleft()
        return None

    def take_pending(self) -> Task:
        return self.tasks[self.pending.popleft()]

    def status(self, now: float) -> list[dict]:
        # A copy: the metrics thread also calls this while the loop changes sessions.
        return [s.status(now) for s in list(self.sessions.values())]
