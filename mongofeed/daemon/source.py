"""Everything that talks to MongoDB: the one client per process, listing ids, batch reads.

A worker calls ``connect`` once, after it has started, and keeps the client for its whole
life; the supervisor uses a client only while it plans each feed (``plan_feed``: the
listing, streamed into the planner's compact arrays, or the plan cache after a cheap check
of the collection). Workers read a batch's ids with one ``$in`` (``BatchReader.read``) or a
window of the windowed order with one query over its ``_id`` ranges (``read_window``).
``MongoSource`` bundles them for the supervisor and the workers; a stand-in with the same
methods (``testing.MemorySource``: documents in memory) serves without a database.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import bson
import numpy as np
import pymongo
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from pymongo.errors import ConnectionFailure, OperationFailure, ProtocolError, PyMongoError

from ..errors import DecodeError, SourceError
from .config import Config, FeedConfig, FeedSourceConfig, SourceConfig, redact_uri
from .planner import (
    BatchWindow,
    Ids,
    IdsBuilder,
    MixSource,
    MixturePlan,
    Plan,
    SplitsBuilder,
    WindowPlan,
)
from .planner.cache import PlanCache, cache_key
from .planner.ids import MixedIdTypes, UnorderableIds
from .planner.order import window_order
from .planner.plans import DOCUMENT_OVERHEAD_BYTES, window_shape

log = logging.getLogger(__name__)

SERVER_SELECTION_TIMEOUT_MS = 5_000
REPLY_TARGET_BYTES = 8 * 1024 * 1024  # well under the 16 MiB (MongoDB) / 48 MB (FerretDB) caps
ID_QUERY_MAX_BYTES = 8 * 1024 * 1024  # the ids of one $in: half MongoDB's 16 MiB command cap
LISTING_REPLY_DOCS = 100_000  # {_id} documents per reply of a listing (2.2 MB of ObjectIds)
PLAN_WAIT_STEP_S = 0.2
CHECKED = {"documents": "documents in the collection", "bytes": "bytes of data",
           "ends": "first and last _id", "selected": "documents the filter selects"}

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
SCHEMA_SAMPLE_DOCUMENTS = 3  # per source of a mixture, checked at start against the fields


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
    the check is the count and size alone (README, Limits, says what that misses)."""
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


def document_bytes(config: Config) -> int:
    """What the windowed order counts per document against ``batch.window_bytes``: its
    fields' stored values (dtype x shape; a GridFS file id for a GridFS field; the guess the
    workers use for a text field) and a fixed allowance for ``_id`` and the keys."""
    def stored(field) -> int:
        if field.gridfs:
            return 16
        if field.is_text:
            return field.out_nbytes
        return math.prod(field.shape) * np.dtype(field.dtype).itemsize
    return DOCUMENT_OVERHEAD_BYTES + sum(stored(f) for f in config.fields.values())


def plan_feed(source, client, config: Config, feed: FeedConfig):
    """The feed's plan (``Plan``, ``WindowPlan`` for ``shuffle = "window"``, or
    ``MixturePlan`` for a feed of sources) from its ``_id``s as ``source`` lists them, or
    from the plan cache when the server's count and ends of the feed are those stored;
    refused when it cannot fill one batch. The listing runs in a thread while this one
    waits in short steps, so a stop signal is handled at once (a sort of 100 million ids
    holds no lock that a signal handler needs, but it does keep the thread that runs it
    busy for seconds)."""
    if feed.sources:
        return plan_mixture(source, client, config, feed)
    batch, shard = config.batch, config.serve.shard
    started = time.monotonic()
    if feed.shuffle == "window":
        range_docs, window_ranges = window_shape(
            batch.size, batch.window_bytes // document_bytes(config))
        listing = list_planned(source, client, config, config.source.collection, feed.filter,
                               range_docs)
        plan = WindowPlan(listing.ids, listing.last, listing.count, batch.size, batch.seed,
                          batch.drop_last, range_docs, window_ranges, listing.digest)
    else:
        listing = list_planned(source, client, config, config.source.collection, feed.filter)
        plan = Plan(listing.ids, batch.size, batch.seed, feed.shuffle, batch.drop_last,
                    listing.digest)
    if plan.batches_per_epoch(shard) == 0:
        raise SourceError(f"feed {feed.name!r}: filter {feed.filter} selects {listing.count} "
                          f"documents of {config.source.database}.{config.source.collection}, "
                          f"not enough for one batch of {batch.size} in shard {shard}")
    plan.origin = {**listing.origin, "seconds": round(time.monotonic() - started, 3),
                   "resident_bytes": plan.resident_bytes}
    log.info("feed %s: %d documents, %s", feed.name, listing.count, plan.origin)
    return plan


@dataclass
class Listing:
    """The ``_id``s of one query as a plan keeps them, and where they came from."""

    ids: Ids          # all of them, or for the windowed order the split points
    count: int
    digest: str
    last: object      # the windowed order's last _id
    origin: dict      # listed, or from_cache (and what was checked); stored


def list_planned(source, client, config: Config, collection: str, query: dict,
                 range_docs: int | None = None) -> Listing:
    """The ``_id``s that ``query`` selects in ``collection``: all of them (sorted), or with
    ``range_docs`` what the windowed order keeps; from the plan cache when the collection
    passes its check, else listed (and cached)."""
    # A stand-in source (testing.MemorySource) serves one collection: it is not named.
    where = {} if collection == config.source.collection else {"collection": collection}
    order = {"order": "full"} if range_docs is None else {"order": "window",
                                                          "range_docs": range_docs}
    cache = plan_cache(source, config)
    check = hit = None
    if cache is not None:
        check = wait_aside(lambda: source.fingerprint(client, query, **where))
        key = cache_key(redact_uri(config.source.uri), config.source.database, collection,
                        query, order)
        hit = cache.load(key, check)
    if hit is not None:
        ids, digest, count, last = hit["ids"], hit["digest"], hit["count"], hit.get("last")
        origin = {"from_cache": hit["path"]}
    elif range_docs is not None:
        ids, last, count, digest = wait_aside(
            lambda: source.list_splits(client, query, range_docs, **where))
        origin = {"listed": True}
    else:
        ids = wait_aside(lambda: source.list_ids(client, query, **where))
        count, last, digest = len(ids), None, wait_aside(ids.digest)
        origin = {"listed": True}
    if hit is None and cache is not None:
        if wait_aside(lambda: source.fingerprint(client, query, **where)) == check:
            stored = cache.store(key, {"check": check, "digest": digest, "count": count,
                                       "last": last}, ids)
            if stored:
                origin["stored"] = stored
        else:
            log.warning("%s.%s, filter %s: the collection changed while it was listed; the "
                        "plan is not cached", config.source.database, collection, query)
    if check is not None:
        origin["checked"] = ", ".join(f"{CHECKED[k]} {v}" for k, v in check.items())
    return Listing(ids, count, digest, last, origin)


def plan_mixture(source, client, config: Config, feed: FeedConfig) -> MixturePlan:
    """The plan of a feed of sources: each source listed (or taken from the plan cache) as
    a plain feed's ids, its documents checked against the declared fields
    (``check_source_schema``), and their draws per epoch fixed by the weights."""
    batch, shard = config.batch, config.serve.shard
    started = time.monotonic()
    sources, origins = [], {}
    for spec in feed.sources.values():
        query = feed.source_query(spec)
        try:
            listing = list_planned(source, client, config, spec.collection, query)
        except SourceError as exc:
            raise SourceError(f"feed {feed.name!r}, source {spec.name!r}: {exc}") from None
        check_source_schema(source, client, config, feed, spec, listing.ids)
        sources.append(MixSource(spec.name, spec.collection, listing.ids, listing.digest,
                                 spec.weight))
        origins[spec.name] = listing.origin
    try:
        plan = MixturePlan(sources, batch.size, batch.seed, batch.drop_last, feed.epoch_size)
    except ValueError as exc:
        raise SourceError(f"feed {feed.name!r}: {exc} ([feeds.{feed.name}.sources.*] in "
                          f"database {config.source.database})") from None
    if plan.batches_per_epoch(shard) == 0:
        raise SourceError(f"feed {feed.name!r}: its sources draw {plan.count} samples per "
                          f"epoch, not enough for one batch of {batch.size} in shard {shard}")
    plan.origin = {"sources": origins, "seconds": round(time.monotonic() - started, 3),
                   "resident_bytes": plan.resident_bytes}
    log.info("feed %s: %s per epoch from %s", feed.name, plan.count,
             ", ".join(f"{d['name']} {d['draws']} of {d['documents']}"
                       for d in plan.describe_sources()))
    return plan


def check_source_schema(source, client, config: Config, feed: FeedConfig,
                        spec: FeedSourceConfig, ids: Ids):
    """Refuse a source whose documents do not fit the declared fields, before anything
    starts, naming the source, the field and the ``_id``: ``SCHEMA_SAMPLE_DOCUMENTS`` of its
    documents (its first, middle and last ``_id``) read and decoded as a worker would, with
    the same decoder. With ``on_error = "fail"`` any of them that misfits refuses the
    source; with "skip" only all of them (a source of other documents, not a few odd ones)."""
    from .codec import BatchDecoder  # both import this module
    from .transform import projection

    if not len(ids):
        return  # refused by its draws, which name it
    picked = sorted({0, len(ids) // 2, len(ids) - 1})[:SCHEMA_SAMPLE_DOCUMENTS]
    where = {} if spec.collection == config.source.collection else {"collection":
                                                                    spec.collection}
    try:
        reader = source.reader(client, 1, projection(config), **where)
        docs = [doc for doc in reader.read(ids.take(picked)) if doc is not None]
        decoder = BatchDecoder(config.fields, spec.collection, "skip",
                               read_gridfs=reader.read_gridfs)
        _, problems = decoder.decode([doc for doc in docs if isinstance(doc, dict)])
    except PyMongoError as exc:
        raise SourceError(describe_failure(config.source, exc)) from None
    problems += [doc for doc in docs if isinstance(doc, DecodeError)]
    if problems and (config.batch.on_error == "fail" or len(problems) == len(docs)):
        raise SourceError(f"feed {feed.name!r}, source {spec.name!r} (collection "
                          f"{spec.collection!r}) does not fit the declared fields: "
                          f"{problems[0]} ({len(problems)} of the {len(docs)} documents "
                          f"checked at start misfit; [fields.{problems[0].field}] is declared "
                          f"once for every source of the feed)")


def plan_cache(source, config: Config) -> PlanCache | None:
    """The plan cache, unless ``serve.plan_cache = "off"`` or ``source`` has no cheap check
    (an in-memory source lists faster than it would read a file)."""
    if config.serve.plan_cache == "off" or not hasattr(source, "fingerprint"):
        return None
    return PlanCache(config.serve.plan_cache)


def wait_aside(function, *args):
    """``function(*args)`` run in a daemon thread while this thread waits in steps of
    ``PLAN_WAIT_STEP_S``: a signal handler (which runs only in the main thread, between its
    bytecodes) is not held up by a long C call such as a sort, and may raise to abandon it."""
    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # handed to the waiting thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="mongofeed-planner", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(PLAN_WAIT_STEP_S)
    if "error" in result:
        raise result["error"]
    return result["value"]


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


class WindowChanged(Exception):
    """A window's ``_id`` ranges hold other documents than when the plan was made."""


def expect_count(window: BatchWindow, found: Window) -> Window:
    """``found`` if it holds the documents the plan counted in ``window``'s ranges: any
    other number would move documents between batches, so none of them is made."""
    if len(found) != window.count:
        raise WindowChanged(
            f"the documents of window {window.window} changed since the daemon planned: "
            f"its _id ranges held {window.count} when they were listed and hold "
            f"{len(found)} now (documents were inserted or deleted). Restart the daemon "
            f"to plan again; if the collection kept its count and its first and last "
            f"_id, delete its plan cache (serve.plan_cache) first")
    return found


class Window:
    """One window's documents: the raw replies as read, and each document's place in them,
    sorted by ``_id``. Documents are decoded one at a time, when a batch takes them, so the
    window costs its BSON bytes and three integers per document."""

    def __init__(self, replies: list[bytes]):
        self.replies = replies
        reply_of, offsets, sizes, keys = [], [], [], []
        for number, raw in enumerate(replies):
            offset = 0
            while offset < len(raw):
                size = int.from_bytes(raw[offset:offset + 4], "little")
                reply_of.append(number)
                offsets.append(offset)
                sizes.append(size)
                keys.append(raw_id_key(raw, offset, size))
                offset += size
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.reply_of = np.array(reply_of, np.int32)[order]
        self.offsets = np.array(offsets, np.int64)[order]
        self.sizes = np.array(sizes, np.int64)[order]
        self.nbytes = sum(len(raw) for raw in replies)

    def __len__(self) -> int:
        return len(self.offsets)

    def batch(self, spec: BatchWindow, seed: int, epoch: int, collection: str):
        """The ``_id``s and documents of the batch ``spec`` slices from this window: its
        positions of the window's order, which is keyed by seed, epoch and window."""
        order = window_order(seed, epoch, spec.window, spec.count)
        return self.documents(order.at(np.arange(spec.start, spec.stop)), collection)

    def documents(self, positions, collection: str) -> tuple[list, list]:
        """The ``_id``s and documents at ``positions`` of the sorted window: each document
        decoded, or the DecodeError of one that pymongo cannot decode."""
        ids, docs = [], []
        for p in np.asarray(positions).tolist():
            offset, size = int(self.offsets[p]), int(self.sizes[p])
            raw = memoryview(self.replies[self.reply_of[p]])[offset:offset + size]
            try:
                doc = bson.decode(raw, CODEC_OPTIONS)
            except Exception as exc:  # bson raises several kinds of errors for bad bytes
                doc_id = raw_id_value(raw)
                doc = DecodeError(collection, doc_id, WHOLE_DOCUMENT, WHOLE_DOCUMENT,
                                  "BSON that pymongo decodes",
                                  f"a document that pymongo cannot decode "
                                  f"({type(exc).__name__}: {exc})")
                ids.append(doc_id)
            else:
                ids.append(doc["_id"])
            docs.append(doc)
        return ids, docs


# _id as a document's first element, by BSON type: its value's width and how to read it
_ID_READERS = {
    0x07: (12, bytes),                                                      # ObjectId
    0x10: (4, lambda b: int.from_bytes(b, "little", signed=True)),          # int32
    0x12: (8, lambda b: int.from_bytes(b, "little", signed=True)),          # int64
}


def raw_id_key(raw: bytes, offset: int, size: int):
    """A sort key of a raw document's ``_id`` that orders one type as MongoDB does (bytes
    of an ObjectId, an integer's value), read without decoding the document where ``_id``
    is its first element of a common type (as MongoDB stores it); decoded otherwise."""
    element = raw[offset + 4]
    reader = _ID_READERS.get(element)
    if reader is not None and raw[offset + 5:offset + 9] == b"_id\x00":
        width, read = reader
        return read(raw[offset + 9:offset + 9 + width])
    value = raw_id_value(memoryview(raw)[offset:offset + size])
    return value.binary if isinstance(value, bson.ObjectId) else value


def raw_id_value(raw) -> object:
    """The ``_id`` of a raw document, also of one that does not decode as a whole."""
    try:
        return bson.decode(raw, CODEC_OPTIONS)["_id"]
    except Exception:  # noqa: BLE001 - pymongo cannot decode it: say so
        return "(an _id pymongo cannot decode)"


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

    def reader(self, client: pymongo.MongoClient, sample_bytes: int,
               projection: dict | None = None, collection: str | None = None) -> BatchReader:
        return BatchReader(client, self._at(collection), sample_bytes, projection)
