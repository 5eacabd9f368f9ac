"""Helpers for testing and measuring mongofeed with real processes: the daemon as a child
process, free ports, what the server counted, and a document source and a worker without a
database.

Used by the test suite and ``mongofeed bench``; useful in a project's own tests too::

    with Daemon("feed.toml", workers=2) as daemon:
        with Consumer(daemon.bind) as consumer:
            ...

``python -m mongofeed.testing DOCS.bson --config FILE [--workers N] [--bind ENDPOINT]``
serves the documents of a BSON file instead of a database (the benchmark's pipeline ceiling).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .consumer import daemon_status
from .portable import INTERNAL_TRANSPORT_ENV, STOP_REQUESTS, pid_alive, stoppable

READY_TIMEOUT_S = 90.0
STUB_CRASH_EXIT_CODE = 3  # a stub worker that meets its exit_on_id
STOP_TIMEOUT_S = 20.0
PORT_RANGE = (20_000, 32_000)  # below Linux's ephemeral range (32768-), so no client takes it
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
FERRETDB_ACCEPTS = "ferretdb_client_accepts_total"
FERRETDB_REQUESTS = "ferretdb_client_requests_total"
QUERY_COMMANDS = ("find", "getMore", "aggregate")

__all__ = ["Daemon", "MemorySource", "ServerCounters", "free_port_pair", "internal_transport",
           "parse_prometheus", "pid_alive", "stub_worker", "wait_until", "write_documents"]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (data and control endpoints)."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        sockets = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port pair")


def internal_transport() -> str:
    """The ``serve.internal_transport`` that tests ask for: $MONGOFEED_INTERNAL_TRANSPORT, or
    ``auto``. ``Daemon`` passes it on; a test that builds a config sets it there."""
    return os.environ.get(INTERNAL_TRANSPORT_ENV) or "auto"


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Daemon:
    """``mongofeed serve`` as a child process on free loopback ports; a context manager.

    ``documents`` (a BSON file) serves those documents instead of the config's database.
    Its stderr goes to ``stderr_path`` (next to the config unless given). Its internal
    sockets use ``internal_transport()``. ``stop`` asks it to stop as a user would
    (SIGTERM; Ctrl-Break on Windows), ``kill`` ends it at once.
    """

    def __init__(self, config_path, workers: int = 2, args=(), env=None,
                 documents: str | None = None, stderr_path=None):
        self.port = free_port_pair()
        self.bind = f"tcp://127.0.0.1:{self.port}"
        self.control = f"tcp://127.0.0.1:{self.port + 1}"
        program = ["-m", "mongofeed", "serve"] if documents is None else [
            "-m", "mongofeed.testing", str(documents)]
        self.command = [sys.executable, *program, "--config", str(config_path),
                        "--workers", str(workers), "--bind", self.bind,
                        "--internal-transport", internal_transport(), *args]
        self.env = {**os.environ, **(env or {})}
        self.stderr_path = Path(stderr_path or Path(config_path).with_suffix(
            f".{self.port}.stderr"))
        self.process = None
        self.ready_line = None

    def start(self) -> Daemon:
        self.stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, cwd=PACKAGE_ROOT, env=self.env,
                                        **stoppable())
        lines = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        if not lines or not lines[0].startswith("mongofeed ready"):
            self.kill()
            raise RuntimeError(f"daemon did not become ready: {lines!r}\n"
                               f"{self.stderr_path.read_text()}")
        self.ready_line = lines[0]
        return self

    def status(self) -> dict:
        return daemon_status(self.control, timeout=10)

    def stop(self, sig=STOP_REQUESTS[0]) -> int:
        """Ask the daemon to stop with ``sig`` (one of ``portable.STOP_REQUESTS``); returns its
        exit code (waits at most STOP_TIMEOUT_S)."""
        return self._end(lambda: self.process.send_signal(sig), repr(sig))

    def kill(self) -> int:
        """Kill the daemon at once (SIGKILL; TerminateProcess on Windows); its exit code."""
        return self._end(self.process.kill, "a kill")

    def _end(self, send, what: str) -> int:
        if self.process.poll() is None:
            send()
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon ignored {what} for {STOP_TIMEOUT_S} s") from None
        finally:
            self.process.stdout.close()
            self.stderr.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.stop()


# -- what the server counted ----------------------------------------------------------------

def parse_prometheus(text: str, metric: str, keep=lambda labels: True) -> float:
    """The sum of ``metric`` over the label sets that ``keep`` accepts, in Prometheus text
    format (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric) or line[len(metric):len(metric) + 1] not in ("{", " "):
            continue  # another metric, or one whose name starts the same
        head, _, value = line.rpartition(" ")
        if keep(head[len(metric):]):
            total += float(value)
    return total


class ServerCounters:
    """Connections accepted and queries run by the server so far (None where unknown).

    FerretDB: its Prometheus endpoint (``ferretdb_client_accepts_total`` and
    ``ferretdb_client_requests_total{command=find|getMore|aggregate}``). MongoDB:
    ``serverStatus`` (``connections.totalCreated``, ``opcounters.query + getmore``).
    """

    def __init__(self, uri: str | None, metrics_url: str | None = None):
        self.metrics_url = metrics_url
        self.client = None
        if uri and not metrics_url:
            import pymongo

            self.client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)

    def read(self) -> dict:
        if self.metrics_url:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
                text = reply.read().decode()
            queries = parse_prometheus(text, FERRETDB_REQUESTS, lambda labels: any(
                f'command="{c}"' in labels for c in QUERY_COMMANDS))
            return {"conns": int(parse_prometheus(text, FERRETDB_ACCEPTS)),
                    "queries": int(queries)}
        if self.client is not None:
            try:
                status = self.client.admin.command("serverStatus")
            except Exception:  # noqa: BLE001 - a server without serverStatus: unknown
                return {"conns": None, "queries": None}
            conns = status.get("connections", {}).get("totalCreated")
            ops = status.get("opcounters", {})
            queries = ops["query"] + ops["getmore"] if "query" in ops else None
            return {"conns": conns, "queries": queries}
        return {"conns": None, "queries": None}

    @staticmethod
    def change(after: dict, before: dict, key: str):
        """How much ``key`` grew between two readings; None where either is unknown."""
        if after.get(key) is None or before.get(key) is None:
            return None
        return after[key] - before[key]

    def close(self):
        if self.client is not None:
            self.client.close()


# -- a daemon without a database --------------------------------------------------------------

class MemorySource:
    """Documents from a BSON file in place of MongoDB, with the methods of
    ``daemon.source.MongoSource``. Picklable: each worker loads the file for itself.
    Filters may only test top-level fields for equality."""

    def __init__(self, path: str):
        self.path = path

    def connect(self, appname: str) -> _Documents:
        return _Documents(self.path)

    def list_ids(self, documents: _Documents, query: dict):
        from .daemon.planner import Ids

        return Ids.from_values(documents.select(query))

    def list_splits(self, documents: _Documents, query: dict, range_docs: int):
        """As ``daemon.source.list_splits``, for ``_id``s of one type."""
        import bson

        from .daemon.planner import SplitsBuilder

        builder = SplitsBuilder(range_docs)
        builder.add_reply(b"".join(bson.encode({"_id": i}) for i in sorted(
            documents.select(query))))
        return builder.finish()

    def reader(self, documents: _Documents, sample_bytes: int,
               projection: dict | None = None) -> _Documents:
        return documents  # whole documents: the functions see the projected keys only anyway


class _Documents:
    """One process's copy of the file's documents, by ``_id``."""

    def __init__(self, path: str):
        import bson

        with open(path, "rb") as f:
            self.docs = {doc["_id"]: doc for doc in bson.decode_file_iter(f)}

    def select(self, query: dict) -> list:
        if any(key.startswith("$") or isinstance(value, dict) for key, value in query.items()):
            raise ValueError(f"MemorySource filters test fields for equality only: {query}")
        return [i for i, doc in self.docs.items()
                if all(doc.get(k) == v for k, v in query.items())]

    def read_window(self, window, query: dict):
        """As ``BatchReader.read_window``: the window's documents, sorted by ``_id``."""
        import bson

        from .daemon.windows import Window, expect_count

        def inside(doc_id):
            return any(low <= doc_id and (doc_id <= high if inclusive else doc_id < high)
                       for low, high, inclusive in window.ranges)

        found = sorted(i for i in self.select(query) if inside(i))
        return expect_count(window, Window([b"".join(bson.encode(self.docs[i]) for i in found)]))

    def read(self, ids: list) -> list:
        """One entry per id, in order: its document, or None if there is none (as
        ``BatchReader.read``)."""
        return [self.docs.get(i) for i in ids]

    def read_gridfs(self, bucket: str, file_id):
        raise LookupError("MemorySource holds no GridFS files")

    def close(self):
        self.docs = {}


def write_documents(docs, path: str) -> str:
    """Write documents to a BSON file for ``MemorySource`` / ``Daemon(documents=...)``."""
    import bson

    with open(path, "wb") as f:
        for doc in docs:
            f.write(bson.encode(doc))
    return path


def stub_worker(slot, config, source, endpoints, log_level, received=None, exit_on_id=None):
    """A worker process that speaks the internal protocol without a database, for stepping
    the supervisor's loop (``Supervisor(config, source=..., worker_main=stub_worker)``):
    each task's batch is one array, ``idx``, of the task's ``_id``s (0 for one that is not an
    integer), written into the task's slab where it names one, as a worker does. A task
    that holds ``exit_on_id`` (``functools.partial(stub_worker, exit_on_id=...)``) ends the
    process with ``STUB_CRASH_EXIT_CODE``, as a document that crashes a decoder would. It
    exits when told to stop, or when its parent is gone."""
    import multiprocessing

    import numpy as np
    import zmq

    from .daemon.worker import POLL_INTERVAL_MS, MappedRegions, worker_identity
    from .region import SlabLayout
    from .wire import (
        READY,
        BatchHeader,
        BatchMeta,
        WorkerEvent,
        pack_batch,
        unpack_worker_command,
    )

    context = zmq.Context()
    tasks = context.socket(zmq.DEALER)
    tasks.identity = worker_identity(slot)
    endpoints.connect(tasks, endpoints.tasks)
    sink = context.socket(zmq.PUSH)
    endpoints.connect(sink, endpoints.sink)
    tasks.send_multipart(WorkerEvent(READY, slot, pid=os.getpid()).pack())
    specs = [a.spec() for a in config.arrays.values()]
    layout, regions = SlabLayout.of(specs, config.batch.size), MappedRegions()
    parent = multiprocessing.parent_process()
    while parent.is_alive():
        if not tasks.poll(POLL_INTERVAL_MS):
            continue
        frames = tasks.recv_multipart()
        if received is not None:
            received.value += 1  # as a worker counts what it took (daemon/pool.py)
        task = unpack_worker_command(frames)
        if task is None:
            break
        if exit_on_id is not None and exit_on_id in task.ids:
            os._exit(STUB_CRASH_EXIT_CODE)
        idx = np.array([i if isinstance(i, int) else 0 for i in task.ids], np.int64)
        if task.region is None:
            parts = pack_batch(task.epoch, task.index, {"idx": idx}, specs)
        else:
            regions.get(task.region).write(task.slab, layout, [idx])
            parts = [BatchHeader.of(task.epoch, task.index, [idx], specs).pack()]
        meta = BatchMeta(task.task, slot, task.attempt, task.slab, docs=len(idx),
                         bytes=idx.nbytes)
        sink.send_multipart([meta.pack(), *parts])
    regions.close()
    context.destroy(linger=0)


def serve_documents(argv: list[str] | None = None):
    """``python -m mongofeed.testing DOCS.bson --config FILE ...``: ``mongofeed serve`` with
    the documents of a BSON file in place of the database."""
    from .daemon.config import load_config
    from .daemon.supervisor import Supervisor
    from .tools.cli import announce_ready

    parser = argparse.ArgumentParser(prog="python -m mongofeed.testing")
    parser.add_argument("documents")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--bind")
    parser.add_argument("--internal-transport")
    args = parser.parse_args(argv)
    config = load_config(args.config, {"serve.workers": args.workers, "serve.bind": args.bind,
                                       "serve.internal_transport": args.internal_transport})
    supervisor = Supervisor(config, source=MemorySource(args.documents))
    supervisor.serve(on_ready=lambda: announce_ready(supervisor))


if __name__ == "__main__":
    serve_documents()
