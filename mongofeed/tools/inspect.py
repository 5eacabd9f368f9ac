"""``mongofeed inspect``: look at the data through the config before a training run starts.

It reports each feed's document count (and whether its filter can use an index; for a feed
of sources, each source's count and what each epoch draws from it), the fields of one sample
document with their types and sizes (binary values only by length), and makes the first
batch of a feed exactly as a worker would (the same projection, decoding and
[transform] functions), with the same errors ``serve`` raises: a ``ConfigError`` for a wrong
key or function reference, a ``DecodeError`` naming the ``_id`` and field (or function) of a
document that does not fit, a ``BatchFunctionError`` for the batch function.
``inspect_source`` returns a plain dict (``--json``); ``format_report`` turns it into text.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

import numpy as np
from pymongo.errors import PyMongoError

from ..daemon.config import Config
from ..daemon.planner import BatchCut
from ..daemon.planner.ids import rows_to_values
from ..daemon.planner.mixture import draw_counts
from ..daemon.planning import plan_feed
from ..daemon.source import BatchPart, MongoSource, describe_failure, read_batches
from ..daemon.transform import BatchMaker, projection
from ..errors import ConfigError, DecodeError, SourceError
from ..security import redact_uri

log = logging.getLogger(__name__)

MAX_SAMPLE_FIELDS = 50  # a report, not a dump: deeply nested documents are cut short


def inspect_source(config: Config, feed: str | None = None) -> dict:
    """Counts, one sample document's fields, index hints and a decoded first batch of ``feed``
    (default: the first feed), as a JSON-ready dict."""
    feed = feed or next(iter(config.feeds))
    if feed not in config.feeds:
        raise ConfigError(f"{config.path}: no feed {feed!r} (feeds: {', '.join(config.feeds)})")
    source = MongoSource(config.source)
    client = source.connect("mongofeed-inspect")
    try:
        # The plan first: it names a missing collection or too few documents clearly.
        plan = plan_feed(source, client, config, config.feeds[feed])
        database = client[config.source.database]
        collection = database[config.source.collection]
        try:
            report = {
                "source": {"uri": redact_uri(config.source.uri),
                           "database": config.source.database,
                           "collection": config.source.collection,
                           "documents": collection.estimated_document_count()},
                "feeds": _feeds(config, database),
                "sample": _sample(database, config.feeds[feed], config.source.collection),
            }
            report["order"] = _order(client, collection, report)
            report["dry_run"] = _dry_run(config, source, client, feed, plan)
        except PyMongoError as exc:
            raise SourceError(describe_failure(config.source, exc)) from None
    finally:
        client.close()
    return report


def _feeds(config: Config, database) -> dict:
    """Documents per feed, and the filter fields that no index starts with; for a feed of
    sources, the same per source and what each epoch draws from it."""
    feeds = {}
    for name, feed in config.feeds.items():
        if feed.sources:
            feeds[name] = _mixture(config, database, feed)
            continue
        count = database[config.source.collection].count_documents(feed.filter)
        cut = BatchCut(count, config.batch.size, config.batch.drop_last)
        feeds[name] = {
            "filter": feed.filter, "documents": count, "shuffle": feed.shuffle,
            "batches_per_epoch": cut.batches_per_epoch(config.serve.shard),
            **_index_hints(database[config.source.collection], feed.filter),
        }
    return feeds


def _index_hints(collection, query: dict) -> dict:
    leading = {next(iter(index["key"])) for index in collection.list_indexes()}
    unindexed = [key for key in _filter_fields(query) if key not in leading]
    return {"unindexed": unindexed,
            "suggestions": [f"db[{collection.name!r}].create_index({key!r})"
                            for key in unindexed]}


def _mixture(config: Config, database, feed) -> dict:
    """A feed of sources: each source's documents, weight and draws per epoch (copies: draws
    per document), as ``planner.mixture.draw_counts`` fixes them; ``problem`` where the
    counts cannot give them (``serve`` refuses such a feed)."""
    sources, counts = [], []
    for spec in feed.sources.values():
        query = feed.source_query(spec)
        counts.append(database[spec.collection].count_documents(query))
        sources.append({"name": spec.name, "collection": spec.collection, "filter": query,
                        spec.weight.kind: spec.weight.value, "documents": counts[-1],
                        **_index_hints(database[spec.collection], query)})
    described = {"filter": feed.filter, "shuffle": True, "epoch_size": feed.epoch_size,
                 "sources": sources, "unindexed": [], "suggestions": []}
    try:
        draws = draw_counts([s.name for s in feed.sources.values()],
                            [s.weight for s in feed.sources.values()], counts, feed.epoch_size)
    except ValueError as exc:
        return {**described, "documents": 0, "batches_per_epoch": 0, "problem": str(exc)}
    for described_source, drawn in zip(sources, draws, strict=True):
        described_source.update(draws=drawn, copies=round(drawn / described_source["documents"],
                                                          4))
    cut = BatchCut(sum(draws), config.batch.size, config.batch.drop_last)
    return {**described, "documents": sum(draws),
            "batches_per_epoch": cut.batches_per_epoch(config.serve.shard),
            "unindexed": list(dict.fromkeys(key for s in sources for key in s["unindexed"])),
            "suggestions": list(dict.fromkeys(hint for s in sources
                                              for hint in s["suggestions"]))}


def _filter_fields(query: Mapping) -> list[str]:
    """Field names a filter compares, also inside $and/$or/$nor."""
    names = []
    for key, value in query.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list):
            for part in value:
                names += [n for n in _filter_fields(part) if n not in names]
        elif not key.startswith("$") and key not in names:
            names.append(key)
    return names


def _sample(database, feed, collection: str) -> dict:
    """The fields of one selected document (of a feed of sources: of its first source):
    path -> type and size, never the bytes."""
    query = feed.filter
    if feed.sources:
        first = next(iter(feed.sources.values()))
        collection, query = first.collection, feed.source_query(first)
    doc = database[collection].find_one(query)
    if doc is None:
        return {"_id": None, "fields": {}}
    fields: dict[str, dict] = {}

    def walk(value: Mapping, prefix: str):
        for key, item in value.items():
            if len(fields) >= MAX_SAMPLE_FIELDS:
                return
            path = f"{prefix}{key}"
            if isinstance(item, Mapping):
                walk(item, f"{path}.")
            else:
                fields[path] = _describe_value(item)

    walk(doc, "")
    return {"_id": str(doc["_id"]), "fields": fields}


def _describe_value(value) -> dict:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "binary", "size": len(value)}
    if isinstance(value, str):
        return {"type": "string", "size": len(value)}
    if isinstance(value, list):
        return {"type": "array", "size": len(value)}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, (int, float)):
        return {"type": type(value).__name__, "value": value}
    if isinstance(value, datetime.datetime):
        return {"type": "date", "value": value.isoformat()}
    return {"type": type(value).__name__}


def _order(client, collection, report: dict) -> dict:
    """Which ``shuffle`` to choose for this server and data size, and why.

    The full order reads each batch with one ``$in`` of random ``_id``s: cheap while the
    data is in the server's memory, one random disk read per document once it is not, and
    one scan of the collection per query on a server that uses no index for ``$in``
    (FerretDB 1.x). The windowed order reads a window's ranges with one query.
    """
    build = client.admin.command("buildInfo")
    documents = report["source"]["documents"]
    data_bytes = cache_bytes = None
    try:
        data_bytes = collection.database.command("collStats", collection.name).get("size")
    except PyMongoError:
        pass
    if "ferretdbVersion" in build:
        server = f"FerretDB {build['ferretdbVersion']}"
        recommended = "window"
        why = ("this server reads the whole collection for every $in (it uses no index for "
               "it): the full order costs one scan per batch, the windowed order one per "
               "window (measured at 200,000 documents: docs/benchmarks.md)")
    else:
        server = f"MongoDB {build.get('version')}"
        try:
            cache = client.admin.command("serverStatus").get("wiredTiger", {}).get("cache", {})
            cache_bytes = cache.get("maximum bytes configured")
        except PyMongoError:
            pass
        if data_bytes and cache_bytes and data_bytes > cache_bytes / 2:
            recommended = "window"
            why = (f"the collection ({data_bytes / 2**30:.1f} GiB) does not fit in the server's "
                   f"cache ({cache_bytes / 2**30:.1f} GiB): the full order makes one random "
                   f"disk read per document, the windowed order reads ranges of _id "
                   f"sequentially")
        else:
            recommended = True
            why = ("the collection fits in the server's cache (or its size is unknown): "
                   "random reads by _id are cheap, and the full order mixes best")
    return {"server": server, "documents": documents, "data_bytes": data_bytes,
            "cache_bytes": cache_bytes, "recommended": recommended, "why": why}


def _dry_run(config: Config, source, client, feed: str, plan) -> dict:
    """Make the first batch that ``serve`` would send for ``feed``, as a worker does: the
    fields decoded and the [transform] functions run on them."""
    readers = {}

    def reader_for(collection: str):
        if collection not in readers:
            readers[collection] = source.reader(client, 1, projection(config),
                                                collection=collection)
        return readers[collection]

    reader = reader_for(config.source.collection)
    maker = BatchMaker(config, read_gridfs=reader.read_gridfs)
    g = plan.global_index(config.serve.shard, 0, 0)
    collections = None
    if plan.windowed:
        spec = plan.batch_window(0, g)
        window = reader.read_window(spec, config.feeds[feed].filter)
        _, read = window.batch(spec, config.batch.seed, 0, config.source.collection)
    elif plan.mixed:
        sources = config.feeds[feed].sources
        [parts] = plan.batch_parts(0, [g])
        [(read, _, collections)] = read_batches(reader_for, [
            [BatchPart(sources[p.source].collection, rows_to_values(p.ids), p.at.tolist())
             for p in parts]])
    else:
        read = reader.read(plan.batch_ids(0, g))
    docs = [(position, doc) for position, doc in enumerate(read) if isinstance(doc, dict)]
    unreadable = [doc for doc in read if isinstance(doc, DecodeError)]
    arrays, skipped = maker.make(feed, 0, 0, docs, collections)
    return {
        "feed": feed, "documents": len(docs), "missing": read.count(None),
        "functions": dict(config.transform.functions),
        "skipped": [str(err) for err in unreadable + skipped],
        "arrays": {name: _describe_array(array) for name, array in arrays.items()},
        "inputs": list(config.output.inputs), "targets": list(config.output.targets),
        "sample_weight": config.output.sample_weight,
        "consumer_casts": {a.name: [a.conversion().dtype, a.conversion().scale]
                           for a in config.arrays.values() if a.conversion()},
    }


def _describe_array(array: np.ndarray) -> dict:
    described = {"dtype": array.dtype.name, "shape": list(array.shape)}
    if array.size:
        described["min"] = array.min().item()
        described["max"] = array.max().item()
    return described


def _source_lines(feed: dict) -> list[str]:
    """A feed of sources' sources, one line each: documents, weight, draws per epoch."""
    if "sources" not in feed:
        return []
    lines = [f"  {'source':<12} {'documents':>10} {'weight':<18} {'draws/epoch':>12} "
             f"{'copies':>7}  collection, filter"]
    for source in feed["sources"]:
        kind = next(k for k in ("proportion", "repeat", "choose") if k in source)
        draws = source.get("draws", "-")
        copies = f"{source['copies']:.3g}" if "copies" in source else "-"
        lines.append(f"  {source['name']:<12} {source['documents']:>10} "
                     f"{kind + ' = ' + format(source[kind], 'g'):<18} {draws:>12} {copies:>7}"
                     f"  {source['collection']}, {source['filter']}")
    if "problem" in feed:
        lines.append(f"  problem: {feed['problem']}")
    return lines


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    source = report["source"]
    lines = [f"{source['database']}.{source['collection']} on {source['uri']}: "
             f"{source['documents']} documents", "",
             f"{'feed':<10} {'documents':>10} {'batches/epoch':>14}  filter"]
    for name, feed in report["feeds"].items():
        lines.append(f"{name:<10} {feed['documents']:>10} {feed['batches_per_epoch']:>14}  "
                     f"{feed['filter']}")
        lines += _source_lines(feed)
    for name, feed in report["feeds"].items():
        for key, command in zip(feed["unindexed"], feed["suggestions"], strict=True):
            lines.append(f"hint: feed {name!r} filters on {key!r}, which has no index; listing "
                         f"its documents scans the collection. Create one: {command}")
    order = report["order"]
    choice = {True: "true", False: "false", "window": '"window"'}
    lines += ["", f"order: shuffle = {choice[order['recommended']]} suits {order['server']} "
              f"here: {order['why']}"]
    for name, feed in report["feeds"].items():
        if feed["shuffle"] not in (order["recommended"], False) and "sources" not in feed:
            lines.append(f"hint: feed {name!r} has shuffle = {choice[feed['shuffle']]}")
    sample = report["sample"]
    lines += ["", f"sample document _id {sample['_id']}:"]
    for path, info in sample["fields"].items():
        units = {"binary": "bytes", "string": "characters", "array": "items"}
        detail = (f"{info['size']} {units[info['type']]}" if "size" in info
                  else info.get("value", ""))
        lines.append(f"  {path:<24} {info['type']:<8} {detail}")
    dry = report["dry_run"]
    lines += ["", f"dry run: first batch of feed {dry['feed']!r}: {dry['documents']} documents"
              f" decoded, {dry['missing']} missing, {len(dry['skipped'])} skipped"]
    lines += [f"  ran {key} = {ref}" for key, ref in dry.get("functions", {}).items()]
    lines.append(f"  {'array':<16} {'role':<7} {'dtype':<8} {'shape':<18} {'min':>10} {'max':>10}")
    for name, info in dry["arrays"].items():
        role = ("input" if name in dry["inputs"] else "target" if name in dry["targets"]
                else "weight" if name == dry.get("sample_weight") else "-")
        low, high = (f"{info[k]:>10.4g}" if k in info else f"{'-':>10}" for k in ("min", "max"))
        lines.append(f"  {name:<16} {role:<7} {info['dtype']:<8} {str(tuple(info['shape'])):<18}"
                     f" {low} {high}")
    for name, (dtype, scale) in dry.get("consumer_casts", {}).items():
        scaled = f", scaled by {scale:g}" if scale is not None else ""
        lines.append(f"  {name}: cast to {dtype}{scaled} by the consumer")
    lines += [f"skipped: {message}" for message in dry["skipped"]]
    return "\n".join(lines)
