"""A producer process: one MongoClient for life, one query per batch, one message per batch.

The supervisor starts ``run_worker`` with the ``spawn`` start method, so the client and the
sockets are created here, in the child, never inherited. The loop:

1. say ``ready`` on the task socket (DEALER to the supervisor's ROUTER);
2. take a task (feed, epoch, index, the batch's ``_id``s), read the documents with ONE
   ``$in`` query (of the paths the config uses only; a feed of sources: one per source's
   collection), decode them into preallocated arrays and run the user's functions on them
   (``transform.BatchMaker``);
3. with shared memory (the task names a region and a slab), write the arrays into the slab
   (the last cast or scale of an array writes its result there directly, so a large batch
   costs no fresh allocation) and push ``[meta, header]`` to the sink; otherwise push
   ``[meta, header, array...]`` (the header and arrays go on to the consumer unchanged).
   ``meta`` tells the supervisor which task and attempt it was.

A task of the windowed order names its window instead of ids: the worker reads the whole
window with ONE query over its ``_id`` ranges (or takes it from the two it keeps, read for
an earlier task or ahead on a ``warm`` command) and cuts the batch from the window's order.

A worker never dies from data. Every failure while producing a batch is one of three kinds:

- about one document (``DecodeError``: a misfit, a document deleted since the plan was made,
  one pymongo cannot decode, the document function's exception): ``batch.on_error`` fails
  the batch or skips it, counted;
- transient (``source.is_transient``: the database is away): retried with backoff, shown in
  status as "waiting for database";
- anything else: this batch fails (``meta["error"]``, which ends the session with a
  ``FeedError`` naming feed, epoch, batch and the exception) and the worker goes on.

The worker exits when told to, or by itself when its parent is gone (checked by polling the
parent's sentinel, which works on every platform); it then removes the regions its parent
left. It unmaps a region once the supervisor has removed its file (the session ended).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import OrderedDict

import zmq
from pymongo.errors import PyMongoError

from ..errors import DecodeError, ProtocolError
from ..portable import (
    ignore_console_interrupts,
    remove_stale_shared_memory,
    shared_memory_dir,
)
from ..region import Region, SlabLayout
from ..security import InternalEndpoints
from ..wire import (
    EVENT,
    READY,
    BatchHeader,
    BatchMeta,
    TaskMessage,
    WarmMessage,
    WorkerEvent,
    pack_batch,
    unpack_worker_command,
)
from .config import Config
from .planner import BatchWindow
from .source import BatchPart, describe_failure, is_transient, read_batches
from .transform import BatchFunctionError, BatchMaker, projection

log = logging.getLogger(__name__)

POLL_INTERVAL_MS = 500
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 5.0
SKIP_MESSAGES_SENT = 5  # per batch; the rest are counted only
MESSAGE_MAX_CHARS = 2_000  # per error message: a long _id must not overflow the batch meta
SOCKET_LINGER_MS = 0
WINDOWS_KEPT = 2  # windows of the windowed order a worker holds: the current and the next


class Worker:
    def __init__(self, slot: int, config: Config, source, endpoints: InternalEndpoints,
                 received=None):
        self.slot = slot
        self.received = received  # shared with the supervisor: commands taken (pool.py)
        self.config = config
        self.context = zmq.Context()
        self.tasks = self.context.socket(zmq.DEALER)
        self.tasks.linger = SOCKET_LINGER_MS
        self.tasks.identity = worker_identity(slot)
        endpoints.connect(self.tasks, endpoints.tasks)
        self.sink = self.context.socket(zmq.PUSH)
        self.sink.linger = SOCKET_LINGER_MS
        self.sink.sndhwm = 2
        endpoints.connect(self.sink, endpoints.sink)
        self.source = source
        self.client = source.connect(f"mongofeed-worker-{slot}")
        self.batches = BatchMaker(config, read_gridfs=self._read_gridfs)  # imports the functions
        self.reader = source.reader(self.client, self.batches.sample_nbytes(),
                                    projection(config))
        self.readers = {config.source.collection: self.reader}  # by collection
        self.windows = OrderedDict()  # (feed, epoch, window) -> windows.Window, recent last
        self.parent = multiprocessing.parent_process()
        self.specs = [a.spec() for a in config.arrays.values()]
        self.names = list(config.arrays)
        self.layout = SlabLayout.of(self.specs, config.batch.size)
        self.regions = MappedRegions()

    def _read_gridfs(self, bucket, file_id):
        return self.reader.read_gridfs(bucket, file_id)

    def reader_for(self, collection: str):
        """The reader of ``collection`` (of the source's database), made on first use."""
        if collection not in self.readers:
            self.readers[collection] = self.source.reader(
                self.client, self.batches.sample_nbytes(), projection(self.config),
                collection=collection)
        return self.readers[collection]

    def parts(self, task: TaskMessage) -> list[BatchPart]:
        """What a task reads, per collection: its ids, or each of its sources' ids."""
        if task.parts is None:
            return [BatchPart(self.config.source.collection, task.ids)]
        sources = self.config.feeds[task.feed].sources
        return [BatchPart(sources[part.source].collection, part.ids, part.at)
                for part in task.parts]

    def parent_alive(self) -> bool:
        return self.parent is None or self.parent.is_alive()

    def run(self):
        self.tasks.send_multipart(WorkerEvent(READY, self.slot, pid=os.getpid()).pack())
        while self.parent_alive():
            self.regions.unmap_removed()
            if not self.tasks.poll(POLL_INTERVAL_MS):
                continue
            tasks, stop = self.take_tasks()
            for frames in self.produce(tasks):
                if not self.send(frames):
                    stop = True
                    break
            if stop:
                return
        log.warning("worker %d: supervisor is gone, exiting", self.slot)

    def take_tasks(self) -> tuple[list[TaskMessage], bool]:
        """The next task and every task already queued behind it (read with one query), and
        whether the supervisor asked us to stop."""
        tasks, stop = [], False
        while len(tasks) < self.config.serve.tasks_per_worker:
            frames = self.tasks.recv_multipart()
            if self.received is not None:
                self.received.value += 1  # before anything can kill us: this one counts
            try:
                task = unpack_worker_command(frames)
            except ProtocolError as exc:
                log.error("worker %d: ignoring a malformed command: %s", self.slot, exc)
                task = False
            if task is None:
                stop = True
                break
            if isinstance(task, WarmMessage):
                self.warm(task)
            elif task:
                tasks.append(task)
            if not self.tasks.poll(0):
                break
        return tasks, stop

    def send(self, frames: list) -> bool:
        """Push a batch to the sink; False if the supervisor died while the sink was full
        (a blocking send would wait forever and leave an orphan)."""
        while not self.sink.poll(POLL_INTERVAL_MS, zmq.POLLOUT):
            if not self.parent_alive():
                return False
        self.sink.send_multipart(frames, copy=False)
        return True

    def produce(self, tasks: list[TaskMessage]):
        """The sink message of each task, in order: its batch, or its error. All the tasks'
        documents of one collection are read with ONE query (more only if their ids do not
        fit in one); tasks of the windowed order are made from their window
        (``produce_from_window``)."""
        for task in tasks:
            if task.window is not None:
                yield self.produce_from_window(task)
        tasks = [task for task in tasks if task.window is None]
        if not tasks:
            return
        try:
            read = self.retrying(read_batches, self.reader_for,
                                 [self.parts(task) for task in tasks])
        except Exception as exc:  # not transient: retrying or restarting would not help
            for task in tasks:
                yield self.failed(task, exc)
            return
        for task, (docs, ids, collections) in zip(tasks, read, strict=True):
            yield self.produce_one(task, docs, ids, collections)

    def window(self, feed: str, epoch: int, spec: BatchWindow):
        """The window's documents: kept from an earlier task or warm command, else read with
        one query (the ``WINDOWS_KEPT`` most recent are kept)."""
        key = (feed, epoch, spec.window)
        window = self.windows.get(key)
        if window is None:
            window = self.retrying(self.reader.read_window, spec, self.config.feeds[feed].filter)
            self.windows[key] = window
            while len(self.windows) > WINDOWS_KEPT:
                self.windows.popitem(last=False)
        else:
            self.windows.move_to_end(key)
        return window

    def warm(self, command: WarmMessage):
        """Read a window ahead of its tasks; a failure is left for its tasks to report."""
        try:
            self.window(command.feed, command.epoch, BatchWindow.from_wire(command.window))
        except Exception as exc:  # noqa: BLE001 - the window's tasks read it again and fail
            log.info("worker %d: reading a window ahead failed: %s", self.slot, exc)

    def produce_from_window(self, task: TaskMessage) -> list:
        """A batch of the windowed order: its slice of the window's order, from the window
        read with one query (kept for the window's other batches)."""
        try:
            spec = BatchWindow.from_wire(task.window)
            window = self.window(task.feed, task.epoch, spec)
            ids, docs = window.batch(spec, self.config.batch.seed, task.epoch,
                                     self.config.source.collection)
        except Exception as exc:
            return self.failed(task, exc)
        return self.produce_one(task, docs, ids)

    def produce_one(self, task: TaskMessage, docs: list, ids: list,
                    collections: list | None = None) -> list:
        """The batch of ``task`` from its documents as read (in plan order), their ``_id``s
        and, where they differ, their collections; or its error."""
        started = time.perf_counter()
        try:
            arrays, problems = self.retrying(self.decode, task, docs, ids, collections)
            if task.region is None:
                header_and_arrays = pack_batch(task.epoch, task.index, arrays, self.specs)
            else:
                values = list(arrays.values())
                self.regions.get(task.region).write(task.slab, self.layout, values)
                header_and_arrays = [BatchHeader.of(task.epoch, task.index, values,
                                                    self.specs).pack()]
        except Exception as exc:
            return self.failed(task, exc)
        meta = BatchMeta(
            task.task, self.slot, task.attempt, task.slab,
            docs=len(next(iter(arrays.values()))),
            bytes=sum(a.nbytes for a in arrays.values()),
            skips=len(problems),
            skipped=tuple(clip(str(p)) for p in problems[:SKIP_MESSAGES_SENT]),
            seconds=time.perf_counter() - started,
        )
        return [meta.pack()] + header_and_arrays

    def failed(self, task: TaskMessage, exc: Exception) -> list:
        """The sink message that fails ``task``'s batch, and with it its session."""
        if isinstance(exc, (DecodeError, BatchFunctionError)):  # it names what failed
            cause = str(exc)
        elif isinstance(exc, PyMongoError):
            cause = describe_failure(self.config.source, exc)
        else:
            cause = f"{type(exc).__name__}: {exc}"
        error = clip(f"feed {task.feed!r}, epoch {task.epoch}, batch {task.index}: {cause}")
        if not isinstance(exc, DecodeError):
            log.error("worker %d: %s", self.slot, error, exc_info=exc)
        return [BatchMeta(task.task, self.slot, task.attempt, error=error).pack()]

    def decode(self, task: TaskMessage, docs: list, ids: list,
               collections: list | None = None) -> tuple[dict, list]:
        """One batch's arrays from its documents as read (GridFS fields are read here), and
        the documents left out under on_error = "skip"; ``collections``: each document's,
        where they differ (a feed of sources)."""
        readable, problems = [], []
        for position, (doc_id, doc) in enumerate(zip(ids, docs, strict=True)):
            if doc is None:
                problems.append(self.missing_error(
                    doc_id, collections[position] if collections else None))
            elif isinstance(doc, DecodeError):  # pymongo cannot decode it
                problems.append(doc)
            else:
                readable.append((position, doc))
        if problems and self.config.batch.on_error == "fail":
            raise problems[0]
        out = None
        if task.region is not None:  # final arrays straight into the slab, where they can be
            out = self.regions.get(task.region).placer(task.slab, self.layout, self.names)
        arrays, skipped = self.batches.make(task.feed, task.epoch, task.index, readable,
                                            collections, out)
        return arrays, problems + skipped

    def retrying(self, operation, *args):
        """Run ``operation``, waiting out a database outage with backoff (shown in status)."""
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                result = operation(*args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not self.parent_alive():
                    raise SystemExit(0) from None
                message = describe_failure(self.config.source, exc)
                log.warning("worker %d: %s; retrying in %.1f s", self.slot, message, delay)
                self.tasks.send_multipart(
                    WorkerEvent(EVENT, self.slot, waiting=True, error=message).pack())
                time.sleep(delay)
                delay = min(RETRY_MAX_DELAY_S, delay * 2)
                continue
            if delay > RETRY_FIRST_DELAY_S:
                self.tasks.send_multipart(WorkerEvent(EVENT, self.slot, waiting=False).pack())
            return result

    def missing_error(self, doc_id, collection: str | None = None) -> DecodeError:
        return DecodeError(collection or self.config.source.collection, doc_id, "_id", "_id",
                           "the document listed when the plan was made",
                           "missing (deleted since the daemon started)")

    def close(self):
        self.client.close()
        self.context.destroy(linger=SOCKET_LINGER_MS)
        self.regions.close()
        if not self.parent_alive():  # killed: nobody else removes its regions now
            remove_stale_shared_memory(shared_memory_dir(), owner=self.parent.pid)


class MappedRegions:
    """The session regions a worker writes batches into, by path: mapped on first use, and
    unmapped once the supervisor has removed the file (the session ended), so that their
    memory is freed."""

    def __init__(self):
        self.regions: dict[str, Region] = {}

    def get(self, path: str) -> Region:
        region = self.regions.get(path)
        if region is None:
            region = self.regions[path] = Region.open(path)
        return region

    def unmap_removed(self):
        for path in [p for p in self.regions if not os.path.exists(p)]:
            self.regions.pop(path).close()

    def close(self):
        for region in self.regions.values():
            region.close()
        self.regions = {}


def clip(message: str) -> str:
    """``message`` cut to ``MESSAGE_MAX_CHARS``, saying so."""
    if len(message) <= MESSAGE_MAX_CHARS:
        return message
    return message[:MESSAGE_MAX_CHARS] + f"... ({len(message)} characters)"


def worker_identity(slot: int) -> bytes:
    """The task socket identity by which the supervisor addresses the worker in ``slot``."""
    return str(slot).encode()


def run_worker(slot: int, config: Config, source, endpoints: InternalEndpoints,
               log_level: int = logging.WARNING, received=None):
    """Process entry point (must be importable by ``spawn``); ``received`` is the pool's
    shared count of the commands this process took."""
    ignore_console_interrupts()  # the supervisor decides how to stop us
    logging.basicConfig(level=log_level, format=f"%(asctime)s worker-{slot} %(levelname)s "
                        "%(message)s")
    worker = Worker(slot, config, source, endpoints, received)
    try:
        worker.run()
    finally:
        worker.close()
