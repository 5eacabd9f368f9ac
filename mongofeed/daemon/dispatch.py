"""The work between the session table and the worker pool: tasks out, batches back.

The supervisor's loop calls it for the worker side of each iteration:

- ``on_batch``: a worker's batch from the sink socket is checked (its slot, its slab and
  header), counted to its worker and its session, and handed to the sink for delivery; a
  batch of a session that ended, or of an earlier attempt of a re-issued task, is dropped
  and counted; a batch that failed fails its session;
- ``on_worker_message``: a worker said ready, or that it waits for the database;
- ``reissue``: the tasks of a worker that died are made again, except those that outlived
  ``sessions.MAX_TASK_DEATHS`` workers, which fail their sessions;
- ``dispatch``: pending tasks go to the least loaded worker (a window's tasks to the worker
  that reads the window; those of a consumer that has all it asked for, to the busiest
  worker with room), and windows are read ahead.

A handler that finds a message malformed raises ``ProtocolError``; the loop refuses and
counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ProtocolError
from ..wire import BatchMeta, WorkerEvent, unpack_header
from .pool import WorkerPool
from .sessions import SessionTable
from .sink import Sink, SlabBatch

log = logging.getLogger(__name__)


@dataclass
class Dispatcher:
    sessions: SessionTable
    pool: WorkerPool
    sink: Sink
    counters: dict                        # the supervisor's, which status shows
    record_error: Callable[[str], None]   # keeps a message for status
    end_session: Callable[..., None]      # (session, error=None): ends it, telling why

    def on_worker_message(self, frames):
        event = WorkerEvent.unpack(frames)
        if event.slot >= len(self.pool.records):
            raise ProtocolError(f"worker message from slot {event.slot}, which does not exist")
        self.pool.on_event(event)

    def on_batch(self, frames):
        meta = BatchMeta.unpack(frames[0])
        if meta.slot >= len(self.pool.records):
            raise ProtocolError(f"batch from slot {meta.slot}, which does not exist")
        record = self.pool.heard(meta.slot)
        self.pool.delivered(record, meta.task)
        task, session = self.sessions.finish(meta.task, meta.attempt)
        if session is None:
            # A session that ended, or a late duplicate of a re-issued task: never delivered.
            self.counters["dropped_batches"] += 1
            return
        if session.after_failure(task.epoch, task.index):
            # Made before the session's failure was known (planned ahead, perhaps into the
            # next epoch, where the same bad document is): never delivered, never reported.
            self.counters["dropped_batches"] += 1
            session.in_production -= 1
            if task.slab is not None:
                session.slabs.give_back(task.slab)
            return
        batch = frames[1:]
        # A task with a slab comes back in that slab: its session's batches all take one
        # path (the channel, or the data socket), so they and its last word stay in order.
        if meta.error is None and (meta.slab is not None or task.slab is not None):
            try:
                if meta.slab != task.slab or len(batch) != 1:
                    raise ProtocolError(f"slab {meta.slab} for a task of slab {task.slab}")
                header = unpack_header(batch[0])
                if isinstance(header, str):
                    raise ProtocolError("an error in place of a batch header")
                session.schema.placements(header)  # its counts fit the schema
            except ProtocolError as exc:
                meta = BatchMeta(meta.task, meta.slot, error=f"{task.describe()}: a bad batch "
                                 f"from worker {meta.slot}: {exc}")
            else:
                batch = SlabBatch(meta.slab, header)
        if meta.error is not None:
            if task.slab is not None:
                session.slabs.give_back(task.slab)  # the batch did not come
            record.errors += 1
            record.last_error = meta.error
            self.record_error(meta.error)  # it names the feed, epoch and batch
            session.fail_at(task.epoch, task.index, meta.error)
            return
        record.batches += 1
        record.docs += meta.docs
        record.bytes += meta.bytes
        record.skips += meta.skips
        session.skips += meta.skips
        for message in meta.skipped:
            log.warning("skipped: %s", message)
        if not self.sink.accept(session, task.epoch, task.index, batch, task.drawn()):
            self.end_session(session)

    def dispatch(self):
        """Hand pending tasks to ready workers, the least loaded first (a window's tasks to
        the worker that reads the window), and windows to read ahead; a task that outlived
        a worker waits, first in line, for an idle worker to make it alone.

        A task of a session whose consumer has all the batches it asked for (a trainer
        slower than the daemon) is not urgent: it joins the busiest worker with room, so
        that one worker reads several with one query and the others are not woken for
        one batch each; on two cores that was a third less daemon CPU per batch while
        Keras trained (docs/benchmarks.md)."""
        for key, spec in self.sessions.take_warm():
            self.counters["windows_read_ahead"] += self.pool.warm(key, spec)
        while (task := self.sessions.next_pending()) is not None:
            session = self.sessions.get(task.session)
            record = self.pool.worker_for(task, pack=session is not None and session.stocked())
            if record is None:
                return
            self.sessions.take_pending()
            if not self.pool.send(record, task):
                self.sessions.requeue([task.id])
                return

    def reissue(self, task_ids: list[int], taken: list[int], death: str):
        """A worker died with these tasks sent to it (``taken``: those it had received):
        make them again, except those that have now outlived ``MAX_TASK_DEATHS`` workers,
        at which their sessions fail."""
        for task in self.sessions.orphaned(task_ids, taken):
            self.counters["poison_tasks"] += 1
            message = (f"{task.describe()}: the worker making it died {task.deaths} times "
                       f"(last: {death}); it is not made again")
            self.record_error(message)
            session = self.sessions.get(task.session)
            if session is not None:
                session.fail_at(task.epoch, task.index, message)
