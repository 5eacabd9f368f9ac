"""Everything that talks to MongoDB: the one client per process, listing ids, batch reads.

A worker calls ``connect`` once, after it has started, and keeps the client for its whole
life; the supervisor uses a client only while it lists the ``_id``s of each feed.
``MongoSource`` bundles the three for the supervisor and the workers; a stand-in with the
same methods (the benchmark's documents in memory) serves without a database.
"""

from __future__ import annotations

import logging

import bson
import pymongo
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from pymongo.errors import ConnectionFailure, OperationFailure, ProtocolError, PyMongoError

from ..errors import DecodeError, SourceError
from .config import Config, FeedConfig, SourceConfig, redact_uri
from .planner import Plan, sort_key

log = logging.getLogger(__name__)

SERVER_SELECTION_TIMEOUT_MS = 5_000
REPLY_TARGET_BYTES = 8 * 1024 * 1024  # well under the 16 MiB (MongoDB) / 48 MB (FerretDB) caps
ID_QUERY_MAX_BYTES = 8 * 1024 * 1024  # the ids of one $in: half MongoDB's 16 MiB command cap

# Dates outside Python's years 1-9999 decode as bson.DatetimeMS instead of failing the whole
# reply (pymongo's own answer to them); used for documents, _id lists and tasks alike.
CODEC_OPTIONS = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
RAW_CODEC_OPTIONS = CODEC_OPTIONS.with_options(document_class=RawBSONDocument)

# OperationFailure codes that pymongo itself retries: its helpers_shared._RETRYABLE_ERROR_CODES
# (4.20), i.e. "not primary" / "node is recovering" (an election, a shutdown) and the network
# faults a mongos reports for a shard. tests/test_source.py checks that they still agree.
RETRYABLE_CODES = frozenset({
    10058, 10107, 13435, 11602, 13436, 189,  # not primary, primary stepped down
    11600, 91,                               # shutting down
    7, 6, 89, 9001,                          # host not found / unreachable, network timeout
    262, 134,                                # exceeded time limit, read concern not yet available
})
WHOLE_DOCUMENT = "(whole document)"  # the field of an error about no field in particular


def connect(source: SourceConfig, appname: str) -> pymongo.MongoClient:
    """The process's single client: a small pool, bounded server selection, retryable reads."""
    return pymongo.MongoClient(
        source.uri,
        appname=appname,
        maxPoolSize=2,
        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        retryReads=True,
        datetime_conversion=CODEC_OPTIONS.datetime_conversion,
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` goes away by itself (an outage, a failover, a network blip): the worker
    retries these with backoff. The rule of pymongo's retryable reads: connection failures,
    and server errors with a retryable code or label."""
    if isinstance(exc, ConnectionFailure):  # includes NotPrimaryError and timeouts
        return True
    return isinstance(exc, OperationFailure) and (
        exc.code in RETRYABLE_CODES or exc.has_error_label("RetryableError"))


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


def id_key(doc_id) -> bytes:
    """An ``_id`` as the server tells them apart: its BSON type and value. Python's ``==``
    and ``hash`` merge true, 1 and 1.0, which are three ``_id``s to MongoDB (and to the
    planner, which orders them by type first)."""
    return bson.encode({"": doc_id}, codec_options=CODEC_OPTIONS)


def id_chunks(ids: list, max_bytes: int = ID_QUERY_MAX_BYTES) -> list[list]:
    """``ids`` cut into runs whose encoded size fits one ``$in`` query (long string ids can
    make one batch's query exceed the server's 16 MiB)."""
    chunks, size = [], 0
    for doc_id in ids:
        nbytes = len(id_key(doc_id))
        if not chunks or size + nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(doc_id)
        size += nbytes
    return chunks


class BatchReader:
    """Reads the documents of one or more batches with a single ``$in`` query (more only when
    the ids do not fit in one), decoding each document on its own so that one pymongo cannot
    decode spoils nothing but itself. ``projection`` (``transform.projection``: the paths the
    config uses) keeps the rest of each document on the server."""

    def __init__(self, client: pymongo.MongoClient, source: SourceConfig, sample_bytes: int,
                 projection: dict | None = None):
        self.projection = projection
        self.db = client[source.database]
        self.collection = self.db[source.collection]
        self.raw_collection = self.collection.with_options(codec_options=RAW_CODEC_OPTIONS)
        self.docs_per_reply = reply_batch_docs(sample_bytes)
        self._buckets = {}

    def read(self, ids: list) -> list:
        """For each of ``ids``, in order: its document, the DecodeError of a document that
        pymongo cannot decode, or None where no document has that ``_id``."""
        unique = {id_key(doc_id): doc_id for doc_id in ids}  # tasks of two epochs share ids
        found = {}
        for chunk in id_chunks(list(unique.values())):
            found.update(self._read(chunk))
        return [found.get(key) for key in map(id_key, ids)]

    def _read(self, ids: list) -> dict:
        """The documents of ``ids`` (or their DecodeErrors) by ``id_key``: one query."""
        try:
            raw_docs = self._find(ids, self.docs_per_reply)
        except ProtocolError:
            # Documents far larger than the schema says made a reply too large for the driver
            # (which would crash the worker on every retry): one per reply, so the decoder
            # can name the oversized ones.
            raw_docs = self._find(ids, 1)
        found, failures = {}, []
        for raw in raw_docs:
            try:
                doc = bson.decode(raw.raw, CODEC_OPTIONS)
            except Exception as exc:  # bson raises several kinds of errors for bad bytes
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            found[id_key(doc["_id"])] = doc
        if failures:
            found.update(self._undecodable(ids, found, failures))
        return found

    def _find(self, ids: list, docs_per_reply: int) -> list[RawBSONDocument]:
        return list(self.raw_collection.find({"_id": {"$in": ids}}, self.projection,
                                             batch_size=docs_per_reply))

    def _undecodable(self, ids: list, found: dict, failures: list[str]) -> dict:
        """The DecodeErrors of the documents that could not be decoded, which are the ids
        asked for, not decoded and present (read again by ``_id`` alone, which decodes)."""
        unread = [i for i in ids if id_key(i) not in found]
        present = self.collection.find({"_id": {"$in": unread}}, {"_id": 1})
        why = f"a document that pymongo cannot decode ({'; '.join(sorted(set(failures)))})"
        return {id_key(doc["_id"]): DecodeError(self.collection.name, doc["_id"], WHOLE_DOCUMENT,
                                                WHOLE_DOCUMENT, "BSON that pymongo decodes", why)
                for doc in present}

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

    def reader(self, client: pymongo.MongoClient, sample_bytes: int,
               projection: dict | None = None) -> BatchReader:
        return BatchReader(client, self.config, sample_bytes, projection)
