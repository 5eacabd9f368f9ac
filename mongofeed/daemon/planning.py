"""Making each feed's plan at start, with the supervisor's one client: the listing
(streamed into the planner's compact arrays, in a thread so a stop signal is handled at
once) or the plan cache after a cheap check of the collection; for a feed of sources, each
source listed and its documents checked against the declared fields.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from pymongo.errors import PyMongoError

from ..errors import DecodeError, SourceError
from ..security import redact_uri
from .config import Config, FeedConfig, FeedSourceConfig
from .planner import Ids, MixSource, MixturePlan, Plan, WindowPlan
from .planner.cache import PlanCache, cache_key
from .planner.plans import DOCUMENT_OVERHEAD_BYTES, window_shape
from .source import describe_failure

log = logging.getLogger(__name__)

PLAN_WAIT_STEP_S = 0.2
SCHEMA_SAMPLE_DOCUMENTS = 3  # per source of a mixture, checked at start against the fields
CHECKED = {"documents": "documents in the collection", "bytes": "bytes of data",
           "ends": "first and last _id", "selected": "documents the filter selects"}


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
        if hit is not None and not wait_aside(
                lambda: source.still_stored(client, hit["ids"], **where)):
            log.info("%s.%s: a stored _id is gone (reloaded?); listing again",
                     config.source.database, collection)
            hit = None
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
