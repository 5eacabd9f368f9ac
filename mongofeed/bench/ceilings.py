"""What the server, the transport and the memory allow: the ceilings ``mongofeed bench``
compares every loader with.

- ``raw_drain``: one process draining one cursor of raw BSON, no decoding (the server);
- ``zmq_loopback``: batch-sized messages over ZeroMQ on tcp loopback (the transport);
- ``memcpy_batches``: a plain copy of each batch's bytes (the memory).

The pipeline ceiling (the whole daemon serving documents from memory) is a mongofeed row
with ``mongofeed.testing.MemorySource``.
"""

from __future__ import annotations

import time

import numpy as np

from ..testing import ServerCounters

MEMCPY_WORKING_SET_BYTES = 256 * 2**20


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
            "conns_per_epoch": ServerCounters.change(after, before, "conns"),
            "queries_per_epoch": ServerCounters.change(after, before, "queries"),
            "bytes_are": "BSON"}


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
