"""Everything that talks to MongoDB: the one client per process, listing ids, batch reads.

A worker calls ``connect`` once, after it has started, and keeps the client for its whole
life; the supervisor uses a client only while it plans each feed (daemon/planning.py: the
listing, streamed into the planner's compact arrays, or the plan cache after a cheap check
of the collection). Workers read a batch's ids with one ``$in`` (``BatchReader.read``) or a
window of the windowed order with one query over its ``_id`` ranges (``read_window``).
``MongoSource`` bundles them for the supervisor and the workers; a stand-in with the same
methods (``testing.MemorySource``: documents in memory) serves without a database.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

import bson
import pymongo
from bson.raw_bson import RawBSONDocument
from pymongo.errors import ConnectionFailure, OperationFailure, ProtocolError, PyMongoError

from ..errors import WHOLE_DOCUMENT, DecodeError, SourceError
from ..security import redact_uri
from ..wire import BSON_OPTIONS
from .config import SourceConfig
from .planner import (
    BatchWindow,
    Ids,
    IdsBuilder,
    SplitsBuilder,
)
from .planner.ids import MixedIdTypes, UnorderableIds
from .windows import Window, expect_count

log = logging.getLogger(__name__)

SERVER_SELECTION_TIMEOUT_MS = 5_000
REPLY_TARGET_BYTES = 8 * 1024 * 1024  # well under the 16 MiB (MongoDB) / 48 MB (FerretDB) caps
ID_QUERY_MAX_BYTES = 8 * 1024 * 1024  # the ids of one $in: half MongoDB's 16 MiB command cap
LISTING_REPLY_DOCS = 100_000  # {_id} documents per reply of a listing (2.2 MB of ObjectIds)

# Dates outside Python's years 1-9999 decode as bson.DatetimeMS instead of failing the whole
# reply (pymongo's own answer to them); used for documents, _id lists and tasks alike.
RAW_CODEC_OPTIONS = BSON_OPTIONS.with_options(document_class=RawBSONDocument)

# OperationFailure codes that pymongo itself retries: its helpers_shared._RETRYABLE_ERROR_CODES
# (4.20), i.e. "not primary" / "node is recovering" (an election, a shutdown) and the network
# faults a mongos reports for a shard. tests/test_source.py checks that they still agree.
RETRYABLE_CODES = frozenset({
    10058, 10107, 13435, 11602, 13436, 189,  # not primary, primary stepped down
    11600, 91,                               # shutting down
    7, 6, 89, 9001,                          # host not found / unreachable, network timeout
    262, 134,                                # exceeded time limit, read concern not yet available
})


def connect(source: SourceConfig, appname: str) -> pymongo.MongoClient:
    """The process's single client: a small pool, bounded server selection, retryable reads."""
    return pymongo.MongoClient(
        source.uri,
        appname=appname,
        maxPoolSize=2,
        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        retryReads=True,
        datetime_conversion=BSON_OPTIONS.datetime_conversion,
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


def _ids_cursor(client: pymongo.MongoClient, source: SourceConfig, query: dict,
                sort: bool = False):
    """Raw replies of ``{_id: value}`` documents of ``query``. An empty filter is hinted to
    the ``_id`` index: an index-only plan (the projection is covered) instead of a read of
    every document; ``sort`` asks the server for ``_id`` order (the index's, then)."""
    db = client[source.database]
    if source.collection not in db.list_collection_names():
        raise SourceError(f"collection {source.database}.{source.collection} does not exist "
                          f"on {redact_uri(source.uri)}: check source.database and "
                          f"source.collection, or load data with 'mongofeed load'")
    options = {"batch_size": LISTING_REPLY_DOCS}
    if not query:
        options["hint"] = [("_id", 1)]
    if sort:
        options["sort"] = [("_id", 1)]
    return db[source.collection].find_raw_batches(query, {"_id": 1}, **options)


def list_ids(client: pymongo.MongoClient, source: SourceConfig, query: dict) -> Ids:
    """The sorted ``_id``s of the documents that ``query`` selects, streamed from the raw
    replies into compact arrays (``planner.ids``) and sorted here, so the plan is the same on
    every server and the server needs no index for the sort."""
    builder = IdsBuilder()
    try:
        for raw in _ids_cursor(client, source, query):
            builder.add_reply(raw)
    except PyMongoError as exc:
        raise SourceError(describe_failure(source, exc)) from None
    try:
        return builder.finish()
    except UnorderableIds as exc:
        raise SourceError(f"{source.database}.{source.collection}: {exc}") from None


def list_splits(client: pymongo.MongoClient, source: SourceConfig, query: dict,
                range_docs: int) -> tuple[Ids, object, int, str]:
    """What the windowed order keeps of the listing, in the server's ``_id`` order (the order
    its range queries use): every ``range_docs``-th ``_id``, the last, the count and the
    digest (``planner.ids.SplitsBuilder``). Refuses ``_id``s of more than one type."""
    builder = SplitsBuilder(range_docs)
    try:
        for raw in _ids_cursor(client, source, query, sort=True):
            builder.add_reply(raw)
    except PyMongoError as exc:
        raise SourceError(describe_failure(source, exc)) from None
    except MixedIdTypes as exc:
        raise SourceError(f"{source.database}.{source.collection}: shuffle = 'window' reads "
                          f"ranges of _id, which hold one type of value, but the feed's "
                          f"_ids are {exc}: give the feed shuffle = true") from None
    return builder.finish()


def fingerprint(client: pymongo.MongoClient, source: SourceConfig, query: dict) -> dict:
    """What the plan cache is checked against at start, as cheap as the server allows: the
    collection's document count and data size (``collStats``: metadata, on every server),
    and where the server answers them from its indexes (MongoDB), the first and last
    ``_id`` (the ``_id`` index) and the number of documents a filter selects. FerretDB 1.x
    reads the whole collection for a sort or a filtered count, as for a listing, so there
    the check is the count and size, and after loading, ``still_stored`` (README, Limits,
    says what that misses)."""
    db = client[source.database]
    collection = db[source.collection]
    try:
        indexed = "ferretdbVersion" not in client.admin.command("buildInfo")
        try:
            stats = db.command("collStats", source.collection)
            check = {"documents": stats["count"], "bytes": stats["size"]}
        except OperationFailure:  # a server without collStats: the count alone
            check = {"documents": collection.estimated_document_count()}
        if indexed:
            ends = [collection.find_one({}, {"_id": 1}, sort=[("_id", direction)],
                                        hint=[("_id", 1)]) for direction in (1, -1)]
            check["ends"] = [end and end["_id"] for end in ends]
            if query:
                check["selected"] = collection.count_documents(query)
    except PyMongoError as exc:
        raise SourceError(describe_failure(source, exc)) from None
    return check


def still_stored(client: pymongo.MongoClient, source: SourceConfig, ids) -> bool:
    """Whether the first, middle and last ``_id`` of a stored listing are still in the
    collection: a reload (the same documents under new ``_id``s, or another data set of the
    same count and size) fails it on every server. Lookups by ``_id`` alone, the one query
    FerretDB 1.x answers without a scan (30 to 170 ms each there)."""
    collection = client[source.database][source.collection]
    positions = sorted({0, len(ids) // 2, len(ids) - 1}) if len(ids) else []
    try:
        return all(collection.find_one({"_id": ids[i]}, {"_id": 1}) is not None
                   for i in positions)
    except PyMongoError as exc:
        raise SourceError(describe_failure(source, exc)) from None


def reply_batch_docs(sample_bytes: int) -> int:
    """Documents per server reply so one reply stays near ``REPLY_TARGET_BYTES``."""
    return max(1, min(10_000, REPLY_TARGET_BYTES // max(1, 2 * sample_bytes)))


def id_key(doc_id) -> bytes:
    """An ``_id`` as the server tells them apart: its BSON type and value. Python's ``==``
    and ``hash`` merge true, 1 and 1.0, which are three ``_id``s to MongoDB (and to the
    planner, which orders them by type first)."""
    return bson.encode({"": doc_id}, codec_options=BSON_OPTIONS)


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


class BatchPart(NamedTuple):
    """Documents of one batch that one query reads: their collection, ``_id``s, and places
    in the batch (None: all of it, in order)."""

    collection: str
    ids: list
    at: list | None = None


def read_batches(reader_for, batches: list[list[BatchPart]]) -> list[tuple[list, list, list]]:
    """For each batch (its parts): its documents (as ``BatchReader.read`` gives them), their
    ``_id``s and their collections, in the batch's order. All the batches' documents of one
    collection are read together (``reader_for(collection).read``): one query per
    collection (more only when the ids do not fit in one)."""
    wanted: dict[str, list[tuple[int, int]]] = {}
    for b, parts in enumerate(batches):
        for p, part in enumerate(parts):
            wanted.setdefault(part.collection, []).append((b, p))
    found = {}
    for collection, keys in wanted.items():
        docs = reader_for(collection).read([i for b, p in keys for i in batches[b][p].ids])
        start = 0
        for b, p in keys:
            found[b, p] = docs[start:start + len(batches[b][p].ids)]
            start += len(batches[b][p].ids)
    made = []
    for b, parts in enumerate(batches):
        count = sum(len(part.ids) for part in parts)
        docs, ids, collections = [None] * count, [None] * count, [None] * count
        for p, part in enumerate(parts):
            places = range(len(part.ids)) if part.at is None else part.at
            for place, doc_id, doc in zip(places, part.ids, found[b, p], strict=True):
                docs[place], ids[place], collections[place] = doc, doc_id, part.collection
        made.append((docs, ids, collections))
    return made


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
                doc = bson.decode(raw.raw, BSON_OPTIONS)
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

    def read_window(self, window: BatchWindow, query: dict) -> Window:
        """The documents of ``window`` (the feed's ``query`` within the window's ``_id``
        ranges) with one query, kept as the raw replies, sorted by ``_id``. Refused when the
        ranges no longer hold the documents the plan counted in them."""
        selector = window.query() if not query else {"$and": [query, window.query()]}
        try:
            replies = self._find_raw(selector, self.docs_per_reply)
        except ProtocolError:
            replies = self._find_raw(selector, 1)  # as in _read: far larger documents
        return expect_count(window, Window(replies))

    def _find_raw(self, selector: dict, docs_per_reply: int) -> list[bytes]:
        return list(self.collection.find_raw_batches(selector, self.projection,
                                                     batch_size=docs_per_reply))

    def read_gridfs(self, bucket: str, file_id) -> bytes:
        import gridfs

        if bucket not in self._buckets:
            self._buckets[bucket] = gridfs.GridFSBucket(self.db, bucket_name=bucket)
        with self._buckets[bucket].open_download_stream(file_id) as stream:
            return stream.read()


class MongoSource:
    """Where a daemon's documents come from: the MongoDB of ``[source]`` (``collection``
    names another of its database, for a feed's sources). Picklable, so a spawned worker
    receives it and connects by itself."""

    def __init__(self, config: SourceConfig):
        self.config = config

    def _at(self, collection: str | None) -> SourceConfig:
        return self.config if collection is None else replace(self.config,
                                                              collection=collection)

    def connect(self, appname: str) -> pymongo.MongoClient:
        return connect(self.config, appname)

    def list_ids(self, client: pymongo.MongoClient, query: dict,
                 collection: str | None = None) -> Ids:
        return list_ids(client, self._at(collection), query)

    def list_splits(self, client: pymongo.MongoClient, query: dict, range_docs: int,
                    collection: str | None = None):
        return list_splits(client, self._at(collection), query, range_docs)

    def fingerprint(self, client: pymongo.MongoClient, query: dict,
                    collection: str | None = None) -> dict:
        return fingerprint(client, self._at(collection), query)

    def still_stored(self, client: pymongo.MongoClient, ids,
                     collection: str | None = None) -> bool:
        return still_stored(client, self._at(collection), ids)

    def reader(self, client: pymongo.MongoClient, sample_bytes: int,
               projection: dict | None = None, collection: str | None = None) -> BatchReader:
        return BatchReader(client, self._at(collection), sample_bytes, projection)
