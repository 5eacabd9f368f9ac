"""Running one row of ``mongofeed bench`` in its own process, and the Keras ``fit`` comparison.

A row process is started by ``bench.command`` as ``python -c 'row_main()' SPEC_JSON``. It
prints ``@baseline`` when its loader starts, ``@measured`` when the timed part is over (the
parent samples the memory of the process tree in between) and ``@result {json}`` at the end.
Each Keras row reads its ``PyDataset`` through Keras's own ``PyDatasetAdapter`` (the
``OrderedEnqueuer`` with ``workers=N, use_multiprocessing=True``; ``keras-augment`` with
threads, so that its ``__getitem__`` runs in the training process), as ``fit`` does. The
mongofeed rows run the real daemon (``mongofeed.testing.Daemon``), from the database or, for
the pipeline ceiling, from documents in memory (``ceiling``: the trainer maps the daemon's
shared memory, as a trainer on the daemon's host does; ``ceiling-tcp``: it refuses it and
gets the batches over tcp, as a trainer on another host does; each also times
``Consumer.get`` alone, ``consumer_cost``); ``mongofeed-augment`` runs
the augment rows' transform in its workers (``transform.document``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ..testing import Daemon, ServerCounters, write_documents
from .augment import augment, crop_shape
from .ceilings import (
    memcpy_batches,
    nbytes,
    raw_drain,
    recv_cost,
    wake_cost,
    zmq_loopback,
)
from .peers import decode_batch, epochs_of, make_sequences, tensorpack_batches

AUGMENT_LOADERS = ("mongofeed-augment", "keras-augment")
TRANSFORM_COST_REPEATS = 5

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
        startup = ServerCounters.change(at_first, before, key)
        steady = ServerCounters.change(after, at_first, key)
        result[f"{key}_startup"], result[f"{key}_steady"] = startup, steady
        result[f"{key}_per_epoch"] = (None if startup is None or steady is None or not n
                                      else round(startup + steady / n * per_epoch))
    return result


def keras_batches(seq):
    """Read a PyDataset the way ``fit`` does: Keras's adapter and its OrderedEnqueuer."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(seq, shuffle=False)

    def one_epoch():
        adapter.on_epoch_begin()
        yield from adapter.get_numpy_iterator()
        adapter.on_epoch_end()

    return epochs_of(one_epoch)


# -- mongofeed: the real daemon, from MongoDB or from memory ------------------------------------

def feed_config(spec: dict, path: str) -> str:
    """A one-feed config for the row's data set, written to ``path``; for
    ``mongofeed-augment``, the stored uint8 images through the augment transform."""
    data, q, loader = spec["data"], json.dumps, spec.get("loader")  # none for the fit
    convert, transform = f'cast = "float32"\nscale = {data["scale"]!r}', ""
    if loader == "mongofeed-augment":
        convert = ""
        transform = f"""[transform]
document = "mongofeed.bench.augment:crop_flip_jitter"
[arrays.image]
dtype = "float32"
shape = {crop_shape(data["shape"])}
[arrays.label]
dtype = "int64"
"""
    text = f"""
[source]
uri = {q(spec.get("uri") or "mongodb://127.0.0.1:1")}
database = {q(data["database"] or "memory")}
collection = {q(data["collection"] or "memory")}
[feeds.train]
filter = {toml_table(data["filter"])}
shuffle = {'"window"' if loader == "mongofeed-window" else "true"}
[batch]
size = {spec["batch_size"]}
[fields.image]
path = {q(data["x_path"])}
decode = "raw"
dtype = "uint8"
shape = {list(data["shape"])}
{convert}
[fields.label]
path = {q(data["y_path"])}
decode = "scalar"
dtype = "int64"
{transform}
[output]
inputs = ["image"]
targets = ["label"]
[serve]
plan_cache = "off"  # every row lists its ids: start-up does not depend on earlier runs
"""
    with open(path, "w") as f:
        f.write(text)
    return path


def toml_table(table: dict) -> str:
    """A flat filter as a TOML inline table (string values only, as the bench's are)."""
    return "{" + ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items()) + "}"


def start_daemon(spec: dict, tmp: str, memory_docs: str | None = None) -> Daemon:
    """The real daemon for a row (reading ``memory_docs`` instead of the database if given)."""
    config = feed_config(spec, os.path.join(tmp, "feed.toml"))
    return Daemon(config, workers=spec["workers"], documents=memory_docs).start()


def mongofeed_batches(bind: str, shared_memory: bool = True):
    from ..keras import MongoFeedSequence

    return keras_batches(MongoFeedSequence(bind, feed="train", shared_memory=shared_memory))


def consumer_cost(bind: str, shared_memory: bool, batches: int, seconds: float) -> float:
    """Process CPU per batch of ``Consumer.get`` alone, on a session of its own (the
    mongofeed part of a ceiling row's figure; the rest is ``MongoFeedSequence`` and Keras's
    adapter): as many batches as the row took, within ``seconds``."""
    from ..consumer import Consumer

    with Consumer(bind, feed="train", shared_memory=shared_memory) as consumer:
        consumer.get()
        deadline = time.perf_counter() + seconds
        cpu0, n = time.process_time(), 0
        while n < batches and time.perf_counter() < deadline:
            consumer.get()
            n += 1
        return (time.process_time() - cpu0) / max(n, 1) * 1e6


def transform_ms_per_batch(data: dict, batch: int) -> float:
    """CPU milliseconds of the augment transform on one batch, in this process."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *data["shape"]), np.uint8)
    started = time.process_time()
    for _ in range(TRANSFORM_COST_REPEATS):
        np.stack([augment(image, rng) for image in images])
    return (time.process_time() - started) / TRANSFORM_COST_REPEATS * 1e3


def synthetic_docs(data: dict, count: int, seed: int = 0) -> list[dict]:
    """Documents laid out like the data set's (random pixels), for the database-free rows."""
    from bson import ObjectId

    rng = np.random.default_rng(seed)
    size = int(np.prod(data["shape"]))
    return [{"_id": ObjectId(), "split": "train",
             data["x_path"]: rng.integers(0, 256, size, np.uint8).tobytes(),
             data["y_path"]: int(rng.integers(0, 10))} for _ in range(count)]


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
                    docs = write_documents(synthetic_docs(data, data["count"]),
                                           os.path.join(tmp, "docs.bson"))

                def start():
                    nonlocal daemon
                    daemon = start_daemon(spec, tmp, docs)
                    return mongofeed_batches(daemon.bind, loader != "ceiling-tcp")

                from .. import keras as _  # noqa: F401 - imported before the baseline

                result = measure(spec, start, per_epoch)
                if loader.startswith("ceiling") and result.get("batches"):
                    # The trainer waited this long per batch: what that costs on this machine;
                    # and what the consumer alone costs it, without Keras's adapter.
                    gap = result["seconds"] / result["batches"]
                    result.update(wake_cost(gap), **recv_cost(gap))
                    result["consumer_us"] = consumer_cost(daemon.bind, loader != "ceiling-tcp",
                                                          result["batches"], spec["seconds"])
            else:
                kind = make_sequences()[loader]
                threads = loader == "keras-augment"  # __getitem__ in the training process
                result = measure(spec, lambda: keras_batches(kind(
                    spec["uri"], data, batch, workers=spec["workers"],
                    use_multiprocessing=not threads)), per_epoch)
            if loader in AUGMENT_LOADERS and "samples_per_s" in result:
                result["transform_ms_per_batch"] = transform_ms_per_batch(data, batch)
        finally:
            if daemon is not None:
                daemon.stop()
    print("@result " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # leave Keras pools and tensorpack runners to the parent's kill of the group


# -- Keras fit: mongofeed against in-memory numpy ------------------------------------------------

def demo_model(shape, classes: int = 10):
    """A small CNN like the demo's (examples/train_digits.py)."""
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
    the same documents from memory (no database), over shared memory and over tcp; mongofeed
    reading the database."""
    import tempfile

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

    def from_daemon(row_spec, tmp, memory_docs=None, shared_memory=True):
        from ..keras import MongoFeedSequence

        daemon = start_daemon(row_spec, tmp, memory_docs)
        try:
            seq = MongoFeedSequence(daemon.bind, feed="train", shared_memory=shared_memory)
            times = _epoch_times(demo_model(data["shape"]), epochs, seq)
            seq.close()
        finally:
            daemon.stop()
        return times

    def from_numpy():
        return _epoch_times(demo_model(data["shape"]), epochs, x, y, batch_size=batch,
                            shuffle=True)

    times = {"numpy_before": from_numpy(),
             "pydataset": _epoch_times(demo_model(data["shape"]), epochs, ArraySequence())}
    with tempfile.TemporaryDirectory(prefix="mongofeed-bench-") as tmp:
        path = write_documents(docs, os.path.join(tmp, "docs.bson"))
        memory = {**spec, "data": {**data, "database": None}}
        times["memory"] = from_daemon(memory, tmp, path)
        times["memory_tcp"] = from_daemon(memory, tmp, path, shared_memory=False)
        times["mongofeed"] = from_daemon(spec, tmp)
    times["numpy_after"] = from_numpy()
    # The first epoch of each compiles the model's step function: leave it out. numpy runs
    # first and last, and its epochs of both count, so that a machine getting slower or
    # faster during the comparison does not show as mongofeed's.
    times["numpy"] = times["numpy_before"] + times["numpy_after"][1:]
    median = {k: float(np.median(v[1:])) for k, v in times.items()}
    result = {f"{k}_epoch_s": v for k, v in median.items()}
    result.update(
        slowdown=median["mongofeed"] / median["numpy"] - 1,
        stall_fraction=max(0.0, 1 - median["numpy"] / median["mongofeed"]),
        pydataset_slowdown=median["pydataset"] / median["numpy"] - 1,
        memory_slowdown=median["memory"] / median["numpy"] - 1,
        memory_tcp_slowdown=median["memory_tcp"] / median["numpy"] - 1,
        epochs_s=times, samples_per_epoch=len(x), workers=spec["workers"])
    print("@result " + json.dumps(result), flush=True)
    os._exit(0)
