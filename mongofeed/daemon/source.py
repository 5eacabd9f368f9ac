"""Everything that talks to MongoDB: the one client per process, listing ids, batch reads.

A worker calls ``connect`` once, after it has started, and keeps the client for its whole
life; the supervisor uses a client only while it lists the ``_id``s of each feed.
``MongoSource`` bundles the three for the supervisor and the workers; a stand-in with the
same methods (the benchmark's documents in memory) serves without a database.
"""

from __future__ import annotations

import logging

import pymongo
from pymongo.errors import ConnectionFailure, OperationFailure, ProtocolError, PyMongoError

from ..errors import SourceError
from .config import Config, FeedConfig, SourceConfig, redact_uri
from .planner import Plan, sort_key

log = logging.getLogger(__name__)

SERVER_SELECTION_TIMEOUT_MS = 5_000
REPLY_TARGET_BYTES = 8 * 1024 * 1024  # well under the 16 MiB (MongoDB) / 48 MB (FerretDB) caps

# Faults that go away when the server comes back: the worker retries them with backoff.
TRANSIENT_ERRORS = (ConnectionFailure,)


def connect(source: SourceConfig, appname: str) -> pymongo.MongoClient:
    """The process's single client: a small pool, bounded server selection, retryable reads."""
    return pymongo.MongoClient(
        source.uri,
        appname=appname,
        maxPoolSize=2,
        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        retryReads=True,
    )


def describe_failure(source: SourceConfig, exc: Exception) -> str:
    """One line for a user, naming the server without its password."""
    where = f"{redact_uri(source.uri)} ({source.database}.{source.collection})"
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):
        return f"authentication or authorization failed for {where}: check the user and password"
    if isinstance(exc, ConnectionFailure):
        return f"cannot reach MongoDB at {where}: {type(exc).__name__}"
    return f"MongoDB error at {where}: {redact_uri(str(exc))[:300]}"


def list_ids(client: pymongo.MongoClient, source: SourceConfig, query: dict) -> list:
    """The sorted ``_id``s of the documents that ``query`` selects (projection ``_id`` only).

    Sorted here rather than by the server so the plan is the same on every server and the
    server needs no index for the sort.
    """
    try:
        db = client[source.database]
        if source.collection not in db.list_collection_names():
            raise SourceError(f"collection {source.database}.{source.collection} does not exist "
                              f"on {redact_uri(source.uri)}: check source.database and "
                              f"source.collection, or load data with 'mongofeed load'")
        ids = [doc["_id"] for doc in db[source.collection].find(query, {"_id": 1})]
    except PyMongoError as exc:
        raise SourceError(describe_failure(source, exc)) from None
    try:
        ids.sort(key=sort_key)
    except TypeError:
        raise SourceError(f"{source.database}.{source.collection}: _id values of types that "
                          f"cannot be ordered (e.g. documents as _id) are not supported") from None
    return ids


def plan_feed(source, client, config: Config, feed: FeedConfig) -> Plan:
    """The feed's plan from its ``_id``s as ``source`` lists them; refused when it cannot
    fill one batch."""
    ids = source.list_ids(client, feed.filter)
    batch, shard = config.batch, config.serve.shard
    plan = Plan(ids, batch.size, batch.seed, feed.shuffle, batch.drop_last)
    if plan.batches_per_epoch(shard) == 0:
        raise SourceError(f"feed {feed.name!r}: filter {feed.filter} selects {len(ids)} "
                          f"documents of {config.source.database}.{config.source.collection}, "
                          f"not enough for one batch of {batch.size} in shard {shard}")
    return plan


def reply_batch_docs(sample_bytes: int) -> int:
    """Documents per server reply so one reply stays near ``REPLY_TARGET_BYTES``."""
    return max(1, min(10_000, REPLY_TARGET_BYTES // max(1, 2 * sample_bytes)))


class BatchReader:
    """Reads the documents of one or more batches with a single ``$in`` query."""

    def __init__(self, client: pymongo.MongoClient, source: SourceConfig, sample_bytes: int):
        self.db = client[source.database]
        self.collection = self.db[source.collection]
        self.docs_per_reply = reply_batch_docs(sample_bytes)
        self._buckets = {}

    def read(self, ids: list) -> dict:
        """The documents of ``ids`` that exist, by ``_id`` (one query for all of them)."""
        try:
            return self._find(ids, self.docs_per_reply)
        except ProtocolError:
            # Documents far larger than the schema says made a reply too large for the driver
            # (which would crash the worker on every retry): one per reply, so the decoder
            # can name the oversized ones.
            return self._find(ids, 1)

    def _find(self, ids: list, docs_per_reply: int) -> dict:
        cursor = self.collection.find({"_id": {"$in": ids}}, batch_size=docs_per_reply)
        return {doc["_id"]: doc for doc in cursor}

    def read_gridfs(self, bucket: str, file_id) -> bytes:
        import gridfs

        if bucket not in self._buckets:
            self._buckets[bucket] = gridfs.GridFSBucket(self.db, bucket_name=bucket)
        with self._buckets[bucket].open_download_stream(file_id) as stream:
            return stream.read()


class MongoSource:
    """Where a daemon's documents come from: the MongoDB of ``[source]``. Picklable, so a
    spawned worker receives it and connects by itself."""

    def __init__(self, config: SourceConfig):
        self.config = config

    def connect(self, appname: str) -> pymongo.MongoClient:
        return connect(self.config, appname)

    def list_ids(self, client: pymongo.MongoClient, query: dict) -> list:
        return list_ids(client, self.config, query)

    def reader(self, client: pymongo.MongoClient, sample_bytes: int) -> BatchReader:
        return BatchReader(client, self.config, sample_bytes)
