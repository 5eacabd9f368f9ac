"""The loaders that ``mongofeed bench`` measures, one per row, each run in its own process.

Benchmark code, not product code. Besides mongofeed itself it holds the loaders users would
write instead, imitated as faithfully as the numbers allow:

- ``ForumPostedSequence`` / ``ForumIntendedSequence``: the two ``keras.utils.Sequence`` patterns
  of the forum thread (shared/background/keras-sequence-mongodb-thread.txt): the answer's code
  as posted (its loop calls ``_connect()`` for every sample: a new MongoClient per sample,
  never closed) and as intended (a client per process, re-made when ``os.getpid()`` changes,
  one ``find`` per sample);
- ``BestPracticeSequence``: a per-process client and one ``$in`` query per batch;
- ``MongoBatchFlow``: tensorpack's ``MultiProcessRunnerZMQ`` around a pymongo reader;
- ``raw_drain``: one process draining one cursor of raw BSON, no decoding;
- ``memory_daemon_main``: the real daemon (supervisor, workers, decode, framing, sink,
  consumer) with its documents served from memory: the pipeline ceiling without a database;
- ``zmq_loopback`` and ``memcpy``: what the transport and the memory allow.

A row process is started by ``mongofeed.bench`` as ``python -c 'row_main()' SPEC_JSON``. It
prints ``@baseline`` when its loader starts, ``@measured`` when the timed part is over (the
parent samples the memory of the process tree in between) and ``@result {json}`` at the end.
Each Keras row reads its ``PyDataset`` through Keras's own ``PyDatasetAdapter`` (the
``OrderedEnqueuer`` with ``workers=N, use_multiprocessing=True``), as ``fit`` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
QUERY_COMMANDS = ("find", "getMore", "aggregate")
MEMCPY_WORKING_SET_BYTES = 256 * 2**20


# -- what the server saw ---------------------------------------------------------------------

class ServerCounters:
    """Connections accepted and queries run by the server so far (None where unknown).

    FerretDB: its Prometheus endpoint (``ferretdb_client_accepts_total`` and
    ``ferretdb_client_requests_total{command=find|getMore|aggregate}``). MongoDB:
    ``serverStatus`` (``connections.totalCreated``, ``opcounters.query + getmore``).
    """

    def __init__(self, uri: str | None, metrics_url: str | None):
        self.metrics_url = metrics_url
        self.client = None
        if uri and not metrics_url:
            import pymongo

            self.client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)

    def read(self) -> dict:
        if self.metrics_url:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
                text = reply.read().decode()
            return {"conns": _prom_sum(text, "ferretdb_client_accepts_total"),
                    "queries": _prom_sum(text, "ferretdb_client_requests_total",
                                         lambda labels: any(f'command="{c}"' in labels
                                                            for c in QUERY_COMMANDS))}
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


def _prom_sum(text: str, metric: str, keep=lambda labels: True) -> int:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric) or line[len(metric):len(metric) + 1] not in ("{", " "):
            continue
        head, _, value = line.rpartition(" ")
        if keep(head[len(metric):]):
            total += float(value)
    return int(total)


def _delta(after: dict, before: dict, key: str):
    if after.get(key) is None or before.get(key) is None:
        return None
    return after[key] - before[key]


# -- the timed loop ----------------------------------------------------------------------------

def measure(spec: dict, start_loader, per_epoch: int) -> dict:
    """Time batches from ``start_loader()`` (an iterator of (x, y)) after the first one.

    Stops after ``spec['max_batches']`` batches or ``spec['seconds']`` of steady state.
    Connections and queries are split into startup (until the first batch) and steady
    state, and extrapolated to one epoch of ``per_epoch`` batches.
    """
    counters = ServerCounters(spec.get("uri"), spec.get("metrics_url"))
    before = counters.read()
    print("@baseline", flush=True)
    started = time.perf_counter()
    batches = start_loader()
    x, y = next(batches)
    first_at = time.perf_counter()
    at_first = counters.read()
    cpu0 = time.process_time()
    n = samples = nbytes = 0
    deadline = first_at + spec["seconds"]
    while n + 1 < spec["max_batches"] and time.perf_counter() < deadline:
        x, y = next(batches)
        n += 1
        samples += len(x)
        nbytes += x.nbytes + y.nbytes
    elapsed = time.perf_counter() - first_at
    cpu = time.process_time() - cpu0
    print("@measured", flush=True)
    after = counters.read()
    result = {"batches": n, "samples": samples, "seconds": elapsed,
              "startup_s": first_at - started,
              "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
              "mb_per_s": nbytes / elapsed / 1e6 if elapsed > 0 else 0.0,
              "train_cpu_ms_per_batch": cpu / n * 1e3 if n else None,
              "batch_bytes": nbytes / n if n else None}
    for key in ("conns", "queries"):
        startup, steady = _delta(at_first, before, key), _delta(after, at_first, key)
        result[f"{key}_startup"], result[f"{key}_steady"] = startup, steady
        result[f"{key}_per_epoch"] = (None if startup is None or steady is None or not n
                                      else round(startup + steady / n * per_epoch))
    return result


def epochs_of(make_epoch):
    """Batches of epoch after epoch, as a training loop sees them."""
    while True:
        yield from make_epoch()


def keras_batches(seq):
    """Read a PyDataset the way ``fit`` does: Keras's adapter and its OrderedEnqueuer."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(seq, shuffle=False)

    def one_epoch():
        adapter.on_epoch_begin()
        yield from adapter.get_numpy_iterator()
        adapter.on_epoch_end()

    return epochs_of(one_epoch)


# -- the forum thread's patterns and the best practice, as keras.utils.PyDataset -----------------

def _sequence_base():
    import keras

    return keras.utils.PyDataset


def _decode_sample(doc: dict, data: dict):
    """As the thread does it, one sample at a time (its data was pickled; ours is raw)."""
    x = np.frombuffer(doc[data["x_path"]], np.uint8).reshape(data["shape"])
    return x.astype(np.float32) * np.float32(data["scale"]), doc[data["y_path"]]


def make_sequences():
    """The Sequence classes; built on first use so that keras is imported only by their rows."""
    import pymongo

    base = _sequence_base()

    class ForumPostedSequence(base):
        """The answer's ``MongoSequence`` as posted: ``_connect()`` (a new MongoClient) per
        sample, never closed. Obvious typos of the post fixed; its behaviour kept."""

        def __init__(self, uri, data, batch_size, **kwargs):
            super().__init__(**kwargs)
            self._server, self._data, self._batch_size = uri, data, batch_size
            self._collection = self._connect()
            self._object_ids = [smp["_id"] for smp in
                                self._collection.find(data["filter"], {"_id": True})]
            self._pid = os.getpid()
            del self._collection  # "to be sure, that we've disconnected" (it does not)
            self._collection = None

        def _connect(self):
            client = pymongo.MongoClient(self._server)
            return client[self._data["database"]][self._data["collection"]]

        def __len__(self):
            return int(np.ceil(len(self._object_ids) / float(self._batch_size)))

        def _find(self, oid):
            return self._connect().find({"_id": oid}).next()

        def __getitem__(self, item):
            if self._collection is None or self._pid != os.getpid():
                self._collection = self._connect()
                self._pid = os.getpid()
            oids = self._object_ids[item * self._batch_size:(item + 1) * self._batch_size]
            X = np.empty((len(oids), *self._data["shape"]), dtype=np.float32)  # noqa: N806
            y = np.empty(len(oids), dtype=np.int64)
            for i, oid in enumerate(oids):
                X[i], y[i] = _decode_sample(self._find(oid), self._data)
            return X, y

    class ForumIntendedSequence(ForumPostedSequence):
        """The same, as the answer meant it: the per-process client, one find per sample."""

        def _find(self, oid):
            return self._collection.find({"_id": oid}).next()

    class BestPracticeSequence(ForumPostedSequence):
        """A per-process client and ONE ``$in`` query per batch, decoded batch-wise."""

        def __getitem__(self, item):
            if self._collection is None or self._pid != os.getpid():
                self._collection = self._connect()
                self._pid = os.getpid()
            oids = self._object_ids[item * self._batch_size:(item + 1) * self._batch_size]
            return decode_batch(list(self._collection.find({"_id": {"$in": oids}})), oids,
                                self._data)

    return ForumPostedSequence, ForumIntendedSequence, BestPracticeSequence


def decode_batch(docs: list, oids: list, data: dict):
    """Documents put back in ``oids`` order, decoded into one float32 batch and its labels."""
    by_id = {doc["_id"]: doc for doc in docs}
    ordered = [by_id[i] for i in oids]
    raw = b"".join(doc[data["x_path"]] for doc in ordered)
    x = np.frombuffer(raw, np.uint8).reshape((len(ordered), *data["shape"]))
    y = np.fromiter((doc[data["y_path"]] for doc in ordered), np.int64, len(ordered))
    return x.astype(np.float32) * np.float32(data["scale"]), y


# -- tensorpack ----------------------------------------------------------------------------------

def tensorpack_batches(spec: dict):
    """tensorpack's MultiProcessRunnerZMQ around a pymongo DataFlow (client made in
    ``reset_state``, after the fork; random i.i.d. batches, as the runner assumes)."""
    import pymongo
    from tensorpack.dataflow import DataFlow, MultiProcessRunnerZMQ

    data, batch = spec["data"], spec["batch_size"]
    client = pymongo.MongoClient(spec["uri"])
    ids = [d["_id"] for d in client[data["database"]][data["collection"]].find(
        data["filter"], {"_id": 1})]
    client.close()

    class MongoBatchFlow(DataFlow):
        def reset_state(self):
            self.collection = pymongo.MongoClient(spec["uri"])[data["database"]][
                data["collection"]]
            self.rng = np.random.default_rng(os.getpid())

        def __len__(self):
            return -(-len(ids) // batch)

        def __iter__(self):
            for _ in range(len(self)):
                oids = [ids[i] for i in self.rng.choice(len(ids), batch, replace=False)]
                yield list(decode_batch(list(self.collection.find({"_id": {"$in": oids}})),
                                        oids, data))

    runner = MultiProcessRunnerZMQ(MongoBatchFlow(), num_proc=spec["workers"])
    runner.reset_state()
    return epochs_of(lambda: iter(runner))


# -- mongofeed: the real daemon, from MongoDB or from memory ------------------------------------

def free_endpoint() -> str:
    """tcp://127.0.0.1:PORT with PORT and PORT + 1 (the control endpoint) both free."""
    import socket

    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return f"tcp://127.0.0.1:{port}"


class Daemon:
    """``mongofeed serve`` (or the in-memory variant) as a real subprocess."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("mongofeed ready"):
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("daemon did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def feed_config(spec: dict, path: str, bind: str) -> str:
    """A one-feed config for the row's data set, written to ``path``."""
    data, q = spec["data"], json.dumps
    text = f"""
[source]
uri = {q(spec.get("uri") or "mongodb://127.0.0.1:1")}
database = {q(data["database"] or "memory")}
collection = {q(data["collection"] or "memory")}
[feeds.train]
filter = {{ split = "train" }}
shuffle = true
[batch]
size = {spec["batch_size"]}
[fields.image]
path = {q(data["x_path"])}
decode = "raw"
dtype = "uint8"
shape = {list(data["shape"])}
cast = "float32"
scale = {data["scale"]!r}
[fields.label]
path = {q(data["y_path"])}
decode = "scalar"
dtype = "int64"
[output]
inputs = ["image"]
targets = ["label"]
[serve]
workers = {spec["workers"]}
bind = {q(bind)}
"""
    with open(path, "w") as f:
        f.write(text)
    return path


def start_daemon(spec: dict, tmp: str, memory_docs: str | None = None) -> tuple[Daemon, str]:
    bind = free_endpoint()
    config = feed_config(spec, os.path.join(tmp, "feed.toml"), bind)
    if memory_docs:
        argv = [sys.executable, "-c", "from mongofeed.bench_peers import memory_daemon_main; "
                "memory_daemon_main()", config, memory_docs]
    else:
        argv = [sys.executable, "-m", "mongofeed", "serve", "--config", config]
    return Daemon(argv), bind


def mongofeed_batches(bind: str):
    from .keras import MongoFeedSequence

    return keras_batches(MongoFeedSequence(bind, feed="train"))


def synthetic_docs(data: dict, count: int, seed: int = 0) -> list[dict]:
    """Documents laid out like the data set's (random pixels), for the database-free rows."""
    from bson import ObjectId

    rng = np.random.default_rng(seed)
    size = int(np.prod(data["shape"]))
    return [{"_id": ObjectId(), "split": "train",
             data["x_path"]: rng.integers(0, 256, size, np.uint8).tobytes(),
             data["y_path"]: int(rng.integers(0, 10))} for _ in range(count)]


def memory_daemon_main():
    """``mongofeed serve`` whose planner and workers read documents from a BSON file.

    Everything else is the product: Supervisor, Worker loop, BatchDecoder, framing, sink.
    """
    import bson

    from . import source as source_module
    from . import supervisor as supervisor_module
    from .config import load_config

    config_path, docs_path = sys.argv[1], sys.argv[2]
    os.environ["MONGOFEED_BENCH_DOCS"] = docs_path  # the spawned workers read it
    with open(docs_path, "rb") as f:
        ids = sorted(doc["_id"] for doc in bson.decode_file_iter(f))
    supervisor_module.connect = lambda *args, **kwargs: _NoClient()
    source_module.list_ids = lambda client, source, query: list(ids)
    supervisor_module.run_worker = memory_worker
    config = load_config(config_path)
    supervisor = supervisor_module.Supervisor(config)
    supervisor.install_signal_handlers()
    supervisor.start()
    try:
        supervisor.wait_ready()
        print(f"mongofeed ready: data {config.serve.bind} (documents from memory)", flush=True)
        supervisor.run()
    finally:
        supervisor.stop()


class _NoClient:
    def close(self):
        pass


class MemoryReader:
    """Stands in for ``source.BatchReader``: the documents of the batches from a dict."""

    def __init__(self, client, source, sample_bytes):
        import bson

        with open(os.environ["MONGOFEED_BENCH_DOCS"], "rb") as f:
            self.docs = {doc["_id"]: doc for doc in bson.decode_file_iter(f)}

    def read(self, ids):
        return [self.docs[i] for i in ids]


def memory_worker(*args, **kwargs):
    """A real mongofeed worker whose reader is ``MemoryReader`` (spawn target)."""
    from . import worker

    worker.connect = lambda *a, **k: _NoClient()
    worker.BatchReader = MemoryReader
    worker.run_worker(*args, **kwargs)


# -- server, transport and memory ceilings -------------------------------------------------------

def raw_drain(spec: dict) -> dict:
    """One process, one cursor, raw BSON batches, no decoding: the server's read rate."""
    import pymongo

    data = spec["data"]
    counters = ServerCounters(spec["uri"], spec.get("metrics_url"))
    client = pymongo.MongoClient(spec["uri"])
    collection = client[data["database"]][data["collection"]]
    collection.database.command("ping")
    before = counters.read()
    print("@baseline", flush=True)
    cpu0, started = time.process_time(), time.perf_counter()
    docs = nbytes = 0
    for raw in collection.find_raw_batches(data["filter"], batch_size=spec["reply_docs"]):
        nbytes += len(raw)
        offset = 0
        while offset < len(raw):
            offset += int.from_bytes(raw[offset:offset + 4], "little")
            docs += 1
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    print("@measured", flush=True)
    after = counters.read()
    batches = docs / spec["batch_size"]
    return {"batches": batches, "samples": docs, "seconds": elapsed, "startup_s": 0.0,
            "samples_per_s": docs / elapsed, "mb_per_s": nbytes / elapsed / 1e6,
            "train_cpu_ms_per_batch": cpu / batches * 1e3, "batch_bytes": nbytes / batches,
            "conns_per_epoch": _delta(after, before, "conns"),
            "queries_per_epoch": _delta(after, before, "queries"), "bytes_are": "BSON"}


def loopback_sender(endpoint: str, frame_sizes: list[int]):
    """Pushes batch-sized frames forever (spawn target of the loopback row)."""
    import zmq

    socket = zmq.Context().socket(zmq.PUSH)
    socket.sndhwm = 4
    socket.connect(endpoint)
    frames = [b"{}"] + [np.ones(size, np.uint8) for size in frame_sizes]
    while True:
        socket.send_multipart(frames, copy=False)


def zmq_loopback(spec: dict, frame_sizes: list[int], dtypes, shapes):
    """Batch-sized messages from another process over tcp loopback (the consumer's socket
    options), wrapped with np.frombuffer like the consumer does."""
    import multiprocessing

    import zmq

    socket = zmq.Context().socket(zmq.PULL)
    socket.rcvhwm = 4
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    sender = multiprocessing.get_context("spawn").Process(
        target=loopback_sender, args=(f"tcp://127.0.0.1:{port}", frame_sizes), daemon=True)
    sender.start()

    def batches():
        while True:
            frames = socket.recv_multipart(copy=False)
            yield tuple(np.frombuffer(f.buffer, dt).reshape(shape)
                        for f, dt, shape in zip(frames[1:], dtypes, shapes, strict=True))

    return batches()


def nbytes(dtype, shape) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def memcpy_batches(dtypes, shapes):
    """A plain copy of the batch's bytes into preallocated arrays, batch after batch, cycling
    through 256 MiB of them so that the bytes come from memory, as a received batch does."""
    batch_bytes = sum(nbytes(d, s) for d, s in zip(dtypes, shapes, strict=True))
    copies = max(2, -(-MEMCPY_WORKING_SET_BYTES // batch_bytes))  # not from the CPU's caches
    sources = [[np.ones(shape, dt) for dt, shape in zip(dtypes, shapes, strict=True)]
               for _ in range(copies)]
    targets = [[np.empty_like(a) for a in arrays] for arrays in sources]

    def batches():
        while True:
            for source, target in zip(sources, targets, strict=True):
                for s, t in zip(source, target, strict=True):
                    np.copyto(t, s)
                yield tuple(target)

    return batches()


# -- one row -------------------------------------------------------------------------------------

def row_main():
    """Entry point of a row process: ``python -c '...row_main()' SPEC_JSON``."""
    import tempfile

    spec = json.loads(sys.argv[1])
    loader, data, batch = spec["loader"], spec["data"], spec["batch_size"]
    per_epoch = -(-data["count"] // batch)
    shapes = [(batch, *data["shape"]), (batch,)]
    dtypes = [np.float32, np.int64]
    daemon = None
    with tempfile.TemporaryDirectory(prefix="mongofeed-bench-") as tmp:
        try:
            if loader == "raw-drain":
                result = raw_drain(spec)
            elif loader == "memcpy":
                result = measure(spec, lambda: memcpy_batches(dtypes, shapes), per_epoch)
            elif loader == "zmq-loopback":
                sizes = [nbytes(d, s) for d, s in zip(dtypes, shapes, strict=True)]
                result = measure(spec, lambda: zmq_loopback(spec, sizes, dtypes, shapes),
                                 per_epoch)
            elif loader == "tensorpack":
                try:
                    import tensorpack  # noqa: F401
                except Exception as exc:  # noqa: BLE001 - any import failure skips the row
                    result = {"skipped": f"tensorpack cannot be imported: {exc!r:.200}"}
                else:
                    result = measure(spec, lambda: tensorpack_batches(spec), per_epoch)
            elif loader.startswith(("mongofeed", "ceiling")):
                docs = None
                if loader.startswith("ceiling"):
                    import bson

                    docs = os.path.join(tmp, "docs.bson")
                    with open(docs, "wb") as f:
                        for doc in synthetic_docs(data, data["count"]):
                            f.write(bson.encode(doc))

                def start():
                    nonlocal daemon
                    daemon, bind = start_daemon(spec, tmp, docs)
                    return mongofeed_batches(bind)

                from . import keras as _  # noqa: F401 - imported before the baseline

                result = measure(spec, start, per_epoch)
            else:
                posted, intended, best = make_sequences()
                kind = {"keras-forum-posted": posted, "keras-forum-intended": intended,
                        "keras-best-practice": best}[loader]
                result = measure(spec, lambda: keras_batches(kind(
                    spec["uri"], data, batch, workers=spec["workers"],
                    use_multiprocessing=True)), per_epoch)
        finally:
            if daemon is not None:
                daemon.stop()
    print("@result " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # leave Keras pools and tensorpack runners to the parent's kill of the group


# -- Keras fit: mongofeed against in-memory numpy ------------------------------------------------

def demo_model(shape, classes: int = 10):
    """The small CNN of the demo (or mongofeed.demo's, once there is one)."""
    try:
        from .demo import build_model  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return build_model(tuple(shape), classes)
    import keras

    model = keras.Sequential([
        keras.Input(tuple(shape)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _epoch_times(model, epochs: int, *args, **kwargs) -> list[float]:
    import keras

    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(*args, epochs=epochs, callbacks=[Clock()], verbose=0, **kwargs)
    return times


def fit_main():
    """``fit`` of the demo model, epoch times, from: in-memory numpy arrays; a plain
    ``PyDataset`` slicing those arrays (the floor of any Sequence loader); mongofeed serving
    the same documents from memory (no database); mongofeed reading the database."""
    import tempfile

    import bson
    import keras
    import pymongo

    spec = json.loads(sys.argv[1])
    data, batch, epochs = spec["data"], spec["batch_size"], spec["epochs"]
    client = pymongo.MongoClient(spec["uri"])
    docs = list(client[data["database"]][data["collection"]].find(data["filter"]))
    client.close()
    x, y = decode_batch(docs, [d["_id"] for d in docs], data)

    class ArraySequence(keras.utils.PyDataset):
        def __len__(self):
            return -(-len(x) // batch)

        def __getitem__(self, i):
            return x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]

    def from_daemon(row_spec, tmp, memory_docs=None):
        from .keras import MongoFeedSequence

        daemon, bind = start_daemon(row_spec, tmp, memory_docs)
        try:
            seq = MongoFeedSequence(bind, feed="train")
            times = _epoch_times(demo_model(data["shape"]), epochs, seq)
            seq.close()
        finally:
            daemon.stop()
        return times

    times = {"numpy": _epoch_times(demo_model(data["shape"]), epochs, x, y, batch_size=batch,
                                   shuffle=True),
             "pydataset": _epoch_times(demo_model(data["shape"]), epochs, ArraySequence())}
    with tempfile.TemporaryDirectory(prefix="mongofeed-bench-") as tmp:
        path = os.path.join(tmp, "docs.bson")
        with open(path, "wb") as f:
            for doc in docs:
                f.write(bson.encode(doc))
        times["memory"] = from_daemon({**spec, "data": {**data, "database": None}}, tmp, path)
        times["mongofeed"] = from_daemon(spec, tmp)
    # The first epoch of each compiles the model's step function: leave it out.
    median = {k: float(np.median(v[1:])) for k, v in times.items()}
    result = {f"{k}_epoch_s": v for k, v in median.items()}
    result.update(
        slowdown=median["mongofeed"] / median["numpy"] - 1,
        stall_fraction=max(0.0, 1 - median["numpy"] / median["mongofeed"]),
        pydataset_slowdown=median["pydataset"] / median["numpy"] - 1,
        memory_slowdown=median["memory"] / median["numpy"] - 1,
        epochs_s=times, samples_per_epoch=len(x), workers=spec["workers"])
    print("@result " + json.dumps(result), flush=True)
    os._exit(0)
