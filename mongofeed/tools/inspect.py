"""``mongofeed inspect``: look at the data through the config before a training run starts.

It reports each feed's document count (and whether its filter can use an index), the fields
of one sample document with their types and sizes (binary values only by length), and makes
the first batch of a feed exactly as a worker would (the same projection, decoding and
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

from ..daemon.config import Config, redact_uri
from ..daemon.planner import BatchCut
from ..daemon.source import MongoSource, describe_failure, plan_feed
from ..daemon.transform import BatchMaker, projection
from ..errors import ConfigError, DecodeError, SourceError

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
        collection = client[config.source.database][config.source.collection]
        try:
            report = {
                "source": {"uri": redact_uri(config.source.uri),
                           "database": config.source.database,
                           "collection": config.source.collection,
                           "documents": collection.estimated_document_count()},
                "feeds": _feeds(config, collection),
                "sample": _sample(collection, config.feeds[feed].filter),
            }
            report["order"] = _order(client, collection, report)
            reader = source.reader(client, 1, projection(config))
            report["dry_run"] = _dry_run(config, reader, feed, plan)
        except PyMongoError as exc:
            raise SourceError(describe_failure(config.source, exc)) from None
    finally:
        client.close()
    return report


def _feeds(config: Config, collection) -> dict:
    """Documents per feed, and the filter fields that no index starts with."""
    leading = {next(iter(index["key"])) for index in collection.list_indexes()}
    feeds = {}
    for name, feed in config.feeds.items():
        count = collection.count_documents(feed.filter)
        cut = BatchCut(count, config.batch.size, config.batch.drop_last)
        unindexed = [key for key in _filter_fields(feed.filter) if key not in leading]
        feeds[name] = {
            "filter": feed.filter, "documents": count, "shuffle": feed.shuffle,
            "batches_per_epoch": cut.batches_per_epoch(config.serve.shard),
            "unindexed": unindexed,
            "suggestions": [f"db[{config.source.collection!r}].create_index({key!r})"
                            for key in unindexed],
        }
    return feeds


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


def _sample(collection, query: dict) -> dict:
    """The fields of one selected document: path -> type and size, never the bytes."""
    doc = collection.find_one(query)
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


def _dry_run(config: Config, reader, feed: str, plan) -> dict:
    """Make the first batch that ``serve`` would send for ``feed``, as a worker does: the
    fields decoded and the [transform] functions run on them."""
    maker = BatchMaker(config, read_gridfs=reader.read_gridfs)
    g = plan.global_index(config.serve.shard, 0, 0)
    if plan.windowed:
        spec = plan.batch_window(0, g)
        window = reader.read_window(spec, config.feeds[feed].filter)
        _, read = window.batch(spec, config.batch.seed, 0, config.source.collection)
    else:
        read = reader.read(plan.batch_ids(0, g))
    docs = [(position, doc) for position, doc in enumerate(read) if isinstance(doc, dict)]
    unreadable = [doc for doc in read if isinstance(doc, DecodeError)]
    arrays, skipped = maker.make(feed, 0, 0, docs)
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


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    source = report["source"]
    lines = [f"{source['database']}.{source['collection']} on {source['uri']}: "
             f"{source['documents']} documents", "",
             f"{'feed':<10} {'documents':>10} {'batches/epoch':>14}  filter"]
    for name, feed in report["feeds"].items():
        lines.append(f"{name:<10} {feed['documents']:>10} {feed['batches_per_epoch']:>14}  "
                     f"{feed['filter']}")
    for name, feed in report["feeds"].items():
        for key, command in zip(feed["unindexed"], feed["suggestions"], strict=True):
            lines.append(f"hint: feed {name!r} filters on {key!r}, which has no index; listing "
                         f"its documents scans the collection. Create one: {command}")
    order = report["order"]
    choice = {True: "true", False: "false", "window": '"window"'}
    lines += ["", f"order: shuffle = {choice[order['recommended']]} suits {order['server']} "
              f"here: {order['why']}"]
    for name, feed in report["feeds"].items():
        if feed["shuffle"] not in (order["recommended"], False):
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
