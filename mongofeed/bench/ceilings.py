"""What the server, the transport and the memory allow: the ceilings ``mongofeed bench``
compares every loader with.

- ``raw_drain``: one process draining one cursor of raw BSON, no decoding (the server);
- ``zmq_loopback``: batch-sized messages over ZeroMQ on tcp loopback (the transport);
- ``memcpy_batches``: a plain copy of each batch's bytes (the memory);
- ``wake_cost``: what this machine charges the same fixed Python work back to back and after
  an idle wait (the CPU of a trainer that waits for every batch is mostly the latter);
- ``recv_cost``: the process CPU of a bare pyzmq receive of one small message per batch at the
  same pace (ZeroMQ's I/O thread included): the floor of any consumer that is handed each
  batch, or its descriptor, as one ZeroMQ message; and of a bare datagram receive, the floor
  of a consumer on the daemon's host (``mongofeed.channel``), also while every CPU is busy
  copying memory, as the ceiling rows' workers keep a small machine.

The pipeline ceiling (the whole daemon serving documents from memory) is a mongofeed row
with ``mongofeed.testing.MemorySource``.
"""

from __future__ import annotations

import time

import numpy as np

from ..testing import ServerCounters

MEMCPY_WORKING_SET_BYTES = 256 * 2**20
WAKE_COST_ROUNDS = 200
WAKE_COST_SLEEP_S = 1.0  # at most this long asleep in all


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


RECV_COST_MESSAGES = 2000
RECV_COST_SECONDS = 1.0  # at most this long per measurement
DESCRIPTOR_BYTES = 64  # about a batch header with its slab number


def paced_sender(endpoint: str, gap_s: float):
    """Sends a descriptor-sized message every ``gap_s`` forever (spawn target of
    ``recv_cost``): over ZeroMQ to a tcp endpoint, as a datagram to an abstract Unix name
    (``@name``) otherwise."""
    message = bytes(DESCRIPTOR_BYTES)
    if endpoint.startswith("@"):
        import socket

        datagrams = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = b"\0" + endpoint[1:].encode()

        def send():
            datagrams.sendto(message, address)
    else:
        import zmq

        pusher = zmq.Context().socket(zmq.PUSH)
        pusher.connect(endpoint)

        def send():
            pusher.send(message)
    while True:
        send()
        if gap_s:
            time.sleep(gap_s)


HOG_BYTES = 32 * 2**20


def memory_hog():
    """Copies 32 MiB over and over (spawn target of ``recv_cost``), as a worker writing
    batches into slabs keeps a CPU and the memory bus busy."""
    source = np.ones(HOG_BYTES, np.uint8)
    target = np.empty_like(source)
    while True:
        np.copyto(target, source)


def recv_cost(gap_s: float) -> dict:
    """Process CPU per message of a blocking receive of messages sent every ``gap_s`` by
    another process, before any code of ours: a bare pyzmq ``recv`` (a PULL socket on tcp
    loopback; ``recv_us``), what ZeroMQ alone costs a consumer handed one message per batch
    at the row's pace, and a datagram on an abstract Unix socket received as the channel
    does (``mongofeed.channel``: a poll, then a recv; ``channel_us``), and the same while a
    ``memory_hog`` runs on every CPU (``channel_busy_us``)."""
    import multiprocessing
    import os
    import select
    import socket

    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    datagrams = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mongofeed-bench-{os.getpid()}"
    datagrams.bind(b"\0" + name.encode())
    readable = select.poll()
    readable.register(datagrams, select.POLLIN)

    def datagram():
        readable.poll()
        datagrams.recv(DESCRIPTOR_BYTES, socket.MSG_DONTWAIT)

    result = {}
    spawn = multiprocessing.get_context("spawn")
    try:
        for key, endpoint, receive, hogs in (
                ("recv", f"tcp://127.0.0.1:{port}", pull.recv, 0),
                ("channel", f"@{name}", datagram, 0),
                ("channel_busy", f"@{name}", datagram, os.cpu_count() or 1)):
            helpers = [spawn.Process(target=memory_hog, daemon=True) for _ in range(hogs)]
            helpers.append(spawn.Process(target=paced_sender, args=(endpoint, gap_s),
                                         daemon=True))
            for helper in helpers:
                helper.start()
            try:
                for _ in range(20):
                    receive()
                count = max(20, min(RECV_COST_MESSAGES,
                                    int(RECV_COST_SECONDS / max(gap_s, 1e-6))))
                cpu0, started = time.process_time(), time.perf_counter()
                for _ in range(count):
                    receive()
                cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - started
            finally:
                for helper in helpers:
                    helper.kill()
                    helper.join()
            result[f"{key}_gap_ms"], result[f"{key}_us"] = elapsed / count * 1e3, cpu / count * 1e6
    finally:
        datagrams.close()
        pull.close(linger=0)
        context.term()
    return result


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


def _fixed_work(buffer: bytearray) -> int:
    """About what a consumer does per batch in Python: small dicts and tuples, array views."""
    total = 0
    for i in range(8):
        header = {"epoch": 0, "index": i, "dims": (i, i + 1)}
        base = np.frombuffer(buffer, np.uint8, 4096, i * 4096)
        total += len(header) + np.ndarray((8, 8), np.float32, base, 0).shape[0]
    return total


def wake_cost(gap_s: float) -> dict:
    """This thread's CPU for the same fixed work, back to back and each time after sleeping
    ``gap_s`` (a trainer's wait for its next batch). On an idle virtual CPU the second is
    several times the first (caches and predictors cold after the wait): the part of a
    waiting trainer's CPU per batch that no code of the data path can remove."""
    buffer = bytearray(8 * 4096)
    for _ in range(WAKE_COST_ROUNDS // 10):
        _fixed_work(buffer)
    started = time.thread_time()
    for _ in range(WAKE_COST_ROUNDS):
        _fixed_work(buffer)
    warm = (time.thread_time() - started) / WAKE_COST_ROUNDS
    rounds = max(10, min(WAKE_COST_ROUNDS, int(WAKE_COST_SLEEP_S / max(gap_s, 1e-6))))
    after_gap = 0.0
    for _ in range(rounds):
        time.sleep(gap_s)
        started = time.thread_time()
        _fixed_work(buffer)
        after_gap += time.thread_time() - started
    return {"wake_gap_ms": gap_s * 1e3, "work_us": warm * 1e6,
            "work_after_gap_us": after_gap / rounds * 1e6}
