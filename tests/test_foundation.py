"""The ground the project stands on: the test server keeps binary data byte-exact, a process
started with ``spawn`` can open its own client, and the server's connection counter is exact
enough to count the clients a test opens."""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import time

import pymongo
import pytest
from bson import Binary

SIZES = {"10KB": 10 * 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


def payload(size: int) -> bytes:
    """Deterministic bytes of every value (so no encoding can hide a change)."""
    return random.Random(size).randbytes(size)


def checksums(collection) -> dict[str, str]:
    return {
        doc["_id"]: hashlib.sha256(bytes(doc["data"])).hexdigest()
        for doc in collection.find({}, batch_size=1)
    }


def read_in_child(uri: str, db_name: str, coll_name: str, queue) -> None:
    """Run in a spawned process: open a client of its own and report the checksums."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        queue.put(checksums(client[db_name][coll_name]))
    finally:
        client.close()


@pytest.fixture
def blobs(db):
    collection = db.blobs
    collection.insert_many(
        [{"_id": name, "data": Binary(payload(size))} for name, size in SIZES.items()]
    )
    return collection


@pytest.mark.parametrize("name", list(SIZES))
def test_binary_round_trips_byte_exact(blobs, name):
    doc = blobs.find_one({"_id": name})
    data = doc["data"]
    assert isinstance(data, bytes)
    assert len(data) == SIZES[name]
    assert data == payload(SIZES[name])


def test_spawned_process_reads_with_its_own_client(mongo_uri, blobs):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=read_in_child, args=(mongo_uri, blobs.database.name, blobs.name, queue)
    )
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    expected = {name: hashlib.sha256(payload(size)).hexdigest() for name, size in SIZES.items()}
    assert got == expected


def settled(read, quiet: float = 0.3, timeout: float = 10.0):
    """Read a value until it stays unchanged for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + timeout
    value = read()
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, stable_since = now, time.monotonic()
    return value


def open_clients(uri: str, k: int) -> list[pymongo.MongoClient]:
    clients = []
    for _ in range(k):
        client = pymongo.MongoClient(uri, maxPoolSize=1, serverSelectionTimeoutMS=10_000)
        client.admin.command("ping")  # forces the monitor's and the pool's connections
        clients.append(client)
    return clients


def test_connection_counter_counts_each_client(mongo_uri, mongo_client, accepted_connections):
    mongo_client.admin.command("ping")  # the session client is connected before we count

    # pymongo opens a monitoring connection besides the pool's; measure the per-client count
    # (2 against FerretDB v1.24.2, which does not stream heartbeats, so no RTT monitor).
    before = settled(accepted_connections)
    clients = open_clients(mongo_uri, 1)
    per_client = settled(accepted_connections) - before
    for client in clients:
        client.close()
    assert per_client in (2, 3)

    k = 3
    before = settled(accepted_connections)
    clients = open_clients(mongo_uri, k)
    try:
        opened = settled(accepted_connections) - before
    finally:
        for client in clients:
            client.close()
    assert opened == k * per_client
