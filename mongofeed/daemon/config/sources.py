"""[source] and [feeds.*]: the database and collection, each feed's filter and order, and a
feed's sources with their weights, checked before the daemon lists anything.
"""

from __future__ import annotations

import math
import re
import warnings

import bson

from ...errors import ConfigError
from ...security import redact_uri
from ...wire import MAX_NAME_CHARS
from ..planner import Weight
from ..planner.mixture import MAX_EPOCH_SAMPLES, PROPORTION_SUM_TOLERANCE, WEIGHT_KINDS
from .model import FeedConfig, FeedSourceConfig, SourceConfig
from .schema import SCHEMA, checked_table, entries

MAX_SOURCES = 128              # per feed: each is listed at start and named in status


def check_source(source: SourceConfig, where: str):
    """What the driver would only refuse once the daemon plans or a worker starts."""
    uri = source.uri
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"{where}: source.uri must start with mongodb:// or mongodb+srv://, "
                          f"not {redact_uri(uri)!r}")
    if uri.startswith("mongodb+srv://"):  # the rest needs DNS; the driver checks it at start
        host = re.split("[/?]", uri[len("mongodb+srv://"):])[0].rpartition("@")[2]
        if not host or "," in host or ":" in host:
            raise ConfigError(f"{where}: source.uri {redact_uri(uri)!r}: a mongodb+srv:// URI "
                              f"names exactly one host, without a port")
    else:
        from pymongo.uri_parser import parse_uri

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # options the driver ignores, it ignores
                parse_uri(uri, warn=True)
        except Exception as exc:  # noqa: BLE001 - InvalidURI, ValueError, ConfigurationError
            raise ConfigError(f"{where}: source.uri {redact_uri(uri)!r} is not a valid "
                              f"MongoDB URI: {redact_uri(str(exc))}") from None
    database, collection = source.database, source.collection
    if not database or len(database.encode()) > 63 or any(c in database for c in '/\\. "$\0'):
        raise ConfigError(f"{where}: source.database {database!r} is not a MongoDB database "
                          f"name (1 to 63 bytes, none of / \\ . space \" $)")
    check_collection(collection, "source.collection", where)


def check_collection(name: str, key: str, where: str):
    """A name MongoDB takes for a collection (or a GridFS bucket), named by ``key`` if not."""
    if not name or "$" in name or "\0" in name or name.startswith(".") or name.endswith("."):
        raise ConfigError(f"{where}: {key} {name!r} is not a MongoDB collection name (not "
                          f"empty, no $, not starting or ending with a dot)")


def parse_feed(name: str, body: dict, source: SourceConfig, where: str) -> FeedConfig:
    """One [feeds.NAME] table, with its sources."""
    key = f"feeds.{name}"
    if isinstance(body.get("sources"), list):
        raise ConfigError(f"{where}: {key}.sources: give each source a named table, "
                          f"[{key}.sources.NAME], not an array of tables ([[{key}.sources]])")
    values = checked_table(body, key, SCHEMA["feeds.*"], where)
    if isinstance(values["shuffle"], str) and values["shuffle"] != "window":
        raise ConfigError(f"{where}: {key}.shuffle must be true, false or \"window\", not "
                          f"{values['shuffle']!r}")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"{where}: feed name {name[:40]!r}... is longer than "
                          f"{MAX_NAME_CHARS} characters")
    _check_filter(values["filter"], f"{key}.filter", where)
    sources = _feed_sources(key, values, source, where)
    return FeedConfig(name=name, filter=values["filter"], shuffle=values["shuffle"],
                      sources=sources, epoch_size=values["epoch_size"])


def _check_filter(query: dict, key: str, where: str):
    try:
        bson.encode(query)
    except Exception as exc:  # noqa: BLE001 - InvalidDocument, OverflowError, ...
        raise ConfigError(f"{where}: {key} cannot be sent to MongoDB "
                          f"({type(exc).__name__}: {exc}); TOML dates and times without a "
                          f"date or offset have no BSON type") from None


def _feed_sources(key: str, values: dict, source: SourceConfig,
                  where: str) -> dict[str, FeedSourceConfig]:
    """A feed's [feeds.NAME.sources.*] tables: each a collection or filter with exactly one
    weight; proportions on every source or none, summing to 1, with an epoch_size."""
    epoch_size = values["epoch_size"]
    if not values["sources"]:
        if epoch_size is not None:
            raise ConfigError(f"{where}: {key}.epoch_size applies to a feed of sources with "
                              f"proportion weights; this feed has no [{key}.sources.NAME]")
        return {}
    if values["shuffle"] is not True:
        why = ("the windowed order reads one window of one collection per query and makes "
               "a window's batches from it alone, while every batch of a mixture draws from "
               "all its sources" if values["shuffle"] == "window" else
               "a mixture draws subsets and copies of its sources, shuffled together")
        raise ConfigError(f"{where}: {key}.shuffle = {values['shuffle']!r} cannot order a "
                          f"feed of sources ({why}): remove {key}.shuffle (a mixture is "
                          f"always shuffled by batch.seed and the epoch)")
    if len(values["sources"]) > MAX_SOURCES:
        raise ConfigError(f"{where}: {key} has {len(values['sources'])} sources, at most "
                          f"{MAX_SOURCES}")
    sources, seen = {}, {}
    for name, body in entries(values["sources"], f"{key}.sources", where):
        source_key = f"{key}.sources.{name}"
        if len(name) > MAX_NAME_CHARS:
            raise ConfigError(f"{where}: source name {name[:40]!r}... is longer than "
                              f"{MAX_NAME_CHARS} characters")
        given = checked_table(body, source_key, SCHEMA["feeds.*.sources.*"], where)
        collection = given["collection"] or source.collection
        check_collection(collection, f"{source_key}.collection", where)
        _check_filter(given["filter"], f"{source_key}.filter", where)
        weights = [kind for kind in WEIGHT_KINDS if given[kind] is not None]
        if len(weights) != 1:
            raise ConfigError(f"{where}: {source_key}: give exactly one of proportion, repeat "
                              f"or choose, not {' and '.join(weights) or 'none'}")
        kind = weights[0]
        value = given[kind]
        if kind == "choose" and value < 1:
            raise ConfigError(f"{where}: {source_key}.choose must be at least 1, not {value}")
        if kind != "choose" and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}: {source_key}.{kind} must be a positive number, not "
                              f"{value}")
        if kind == "proportion" and value > 1:
            raise ConfigError(f"{where}: {source_key}.proportion is a share of "
                              f"{key}.epoch_size, from 0 to 1, not {value}")
        selects = (collection, bson.encode(given["filter"]))
        if selects in seen:
            raise ConfigError(f"{where}: {source_key} selects the same documents as "
                              f"{key}.sources.{seen[selects]} (collection {collection!r}, "
                              f"filter {given['filter']}): give one source a repeat instead")
        seen[selects] = name
        sources[name] = FeedSourceConfig(name, collection, given["filter"], Weight(kind, value))
    kinds = {s.weight.kind == "proportion" for s in sources.values()}
    if kinds == {True, False}:
        mixed = ", ".join(f"{n} has {s.weight.kind}" for n, s in sources.items())
        raise ConfigError(f"{where}: {key}.sources: {mixed}; proportions are shares of "
                          f"epoch_size and repeat and choose are counts, so a feed's sources "
                          f"take either proportions, all of them, or repeat/choose")
    if kinds == {True}:
        total = sum(s.weight.value for s in sources.values())
        if abs(total - 1) > PROPORTION_SUM_TOLERANCE:
            raise ConfigError(f"{where}: {key}.sources: the proportions sum to {total:g}, "
                              f"not 1")
        if epoch_size is None:
            raise ConfigError(f"{where}: {key}.epoch_size is required with proportion "
                              f"weights (the samples per epoch the proportions share)")
        if not 1 <= epoch_size <= MAX_EPOCH_SAMPLES:
            raise ConfigError(f"{where}: {key}.epoch_size must be from 1 to 2**48, not "
                              f"{epoch_size}")
    elif epoch_size is not None:
        raise ConfigError(f"{where}: {key}.epoch_size applies to proportion weights; with "
                          f"repeat and choose the epoch is what the sources draw: remove it")
    return sources
