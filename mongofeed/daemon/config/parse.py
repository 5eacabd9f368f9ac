"""The TOML config: one schema table, loading, overrides and every check, in one place.

Precedence is command-line option > environment > config file > default. The CLI (click)
already resolves option-or-environment; it hands the result here as dotted overrides
(``{"serve.workers": 8}``), which win over the file.

``SCHEMA`` below is the single source of truth for which keys exist, their types, defaults
and meaning; the configuration reference in the docs is generated from it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from typing import Any

import bson
import numpy as np

from ... import portable
from ...errors import ConfigError
from ...portable import has_ipc, ipc_path_max
from ...security import check_exposure, redact_uri
from ...wire import MAX_NAME_CHARS, ArraySpec, Conversion, check_endpoint, next_port
from ..planner import Shard, Weight
from ..planner.mixture import MAX_EPOCH_SAMPLES, PROPORTION_SUM_TOLERANCE, WEIGHT_KINDS

REQUIRED = object()

NUMERIC_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)
DECODERS = ("raw", "npy", "scalar", "list", "image", "pickle", "string", "bytes")
TEXT_DECODERS = ("string", "bytes")  # values for the user functions, never arrays themselves
ON_ERROR = ("fail", "skip")
CAST_ON = ("daemon", "consumer")
VARIABLE = -1  # in [arrays.NAME].shape: a dimension padded per batch
PAD_TO = ("longest", "max_length")
LENGTHS_DTYPE = "int32"
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# A worker takes the tasks queued for it together and reads them with one query; this bounds
# how many, by count and by the bytes of their batches.
MAX_TASKS_PER_WORKER = 16
READ_AHEAD_BYTES_PER_WORKER = 64 * 2**20
MAX_WORKERS = 64
TEXT_SAMPLE_NBYTES = 1024  # a guess at a text field's size, to size the server's replies
MAX_PENDING = 10_000
MAX_SESSIONS = 1_024
MAX_BATCH_BYTES = 2**30        # one batch is one message and several copies in the pipeline
MAX_SEED = 2**63               # numpy's generator takes any; BSON and JSON peers take int64
MAX_SAMPLE_DIMS = 31           # numpy arrays have at most 32 dimensions, one is the batch
MIN_SESSION_TIMEOUT_S = 3.0    # three consumer heartbeats (one a second)
MIN_STALL_TIMEOUT_S = 1.0
MAX_SOURCES = 128              # per feed: each is listed at start and named in status
DEFAULT_STALL_TIMEOUT_S = 20.0  # well under a consumer's default timeout (60 s)


@dataclass(frozen=True)
class Key:
    type: type | tuple
    default: Any
    doc: str
    choices: tuple = ()


# Sections whose name ends in ".*" are tables of named entries ([feeds.train], [fields.image]).
SCHEMA: dict[str, dict[str, Key]] = {
    "source": {
        "uri": Key(str, "mongodb://127.0.0.1:27017", "MongoDB connection string "
                   "(env MONGOFEED_URI). Passwords in it are never logged."),
        "database": Key(str, REQUIRED, "Database that holds the samples."),
        "collection": Key(str, REQUIRED, "Collection that holds the samples."),
    },
    "feeds.*": {
        "filter": Key(dict, {}, "MongoDB query that selects this feed's documents."),
        "shuffle": Key((bool, str), True, "The order of each epoch (deterministic from "
                       "batch.seed and the epoch number): true shuffles all documents (one "
                       "$in query per batch, random reads), \"window\" shuffles ranges of "
                       "_id and documents within windows of ranges (one query per window, "
                       "sequential reads; see batch.window_bytes), false is _id order. A "
                       "feed of sources is always shuffled (true)."),
        "sources": Key(dict, {}, "The feed's sources, one [feeds.NAME.sources.SOURCE] table "
                       "each: the feed is then their mixture, each epoch drawn from every "
                       "source by its weight and shuffled together (see below); filter "
                       "applies to every source as well."),
        "epoch_size": Key(int, None, "Samples per epoch of a feed whose sources have "
                          "proportion weights (required with them, refused without)."),
    },
    "feeds.*.sources.*": {
        "collection": Key(str, None, "Collection of this source, in source.database "
                          "(default: source.collection)."),
        "filter": Key(dict, {}, "MongoDB query that selects this source's documents (and "
                      "the feed's filter)."),
        "proportion": Key((int, float), None, "This source's share of the feed's epoch_size "
                          "(every source of the feed then has one; they sum to 1). A share "
                          "larger than the source repeats it."),
        "repeat": Key((int, float), None, "Copies of this source per epoch (2.5: every "
                      "document twice, and a seeded half of them a third time; 0.5: a seeded "
                      "half)."),
        "choose": Key(int, None, "Documents drawn from this source per epoch: a seeded "
                      "subset, another one every epoch (at most the source's documents)."),
    },
    "batch": {
        "size": Key(int, 32, "Samples per batch."),
        "seed": Key(int, 0, "Seed of the per-epoch order: same seed, same batches "
                    "(0 to 2**63 - 1)."),
        "drop_last": Key(bool, False, "Drop the last, short batch of each epoch."),
        "window_bytes": Key(int, 64 * 2**20, "With shuffle = \"window\": the bytes of "
                            "documents in one window (counted from the fields' dtype x shape "
                            "plus 64 bytes each), which a worker reads with one query and "
                            "holds while it makes the window's batches (at most two windows "
                            "per worker)."),
        "on_error": Key(str, "fail", "What a document that does not fit the schema does: "
                        "'fail' reports it to the consumer, 'skip' leaves it out and counts "
                        "it in status.", ON_ERROR),
    },
    "fields.*": {
        "path": Key(str, None, "Dotted path of the value in the document (default: the "
                    "field's name)."),
        "decode": Key(str, "raw", "How the value becomes an array; 'string' and 'bytes' "
                      "hand the value to the [transform] functions as it is (they return "
                      "numbers).", DECODERS),
        "dtype": Key(str, None, "Element type of the stored value (required, except with "
                     "decode = 'string' or 'bytes').", NUMERIC_DTYPES),
        "shape": Key(list, [], "Shape of one sample of this field ([] for a scalar)."),
        "cast": Key(str, None, "Convert to this dtype after decoding.", NUMERIC_DTYPES),
        "scale": Key((int, float), None, "Multiply by this factor after the cast "
                     "(needs a float dtype or cast)."),
        "cast_on": Key(str, "daemon", "Where cast and scale run: 'consumer' sends the stored "
                       "dtype (uint8 images: a quarter of the float32 bytes) and converts in "
                       "the training process's receiving thread.", CAST_ON),
        "one_hot": Key(int, None, "Turn an integer class label into a one-hot vector of "
                       "this many classes (float32 unless cast says otherwise)."),
        "gridfs": Key(bool, False, "The document holds a GridFS file id; the bytes live "
                      "in GridFS."),
        "bucket": Key(str, "fs", "GridFS bucket name (with gridfs = true)."),
        "allow_pickle": Key(bool, False, "Allow decode = 'pickle' (legacy data only: "
                            "unpickling runs code from the database)."),
    },
    "transform": {
        "document": Key(str, None, "Your function run on every document, as \"module:name\": "
                        "f(fields, doc, rng) -> dict of arrays; fields are the decoded [fields], "
                        "doc the document as read (the fields' paths and transform.reads), rng "
                        "a numpy Generator seeded from (batch.seed, epoch, batch index, "
                        "position); a parameter named feed gets the feed's name. Runs in the "
                        "daemon's workers: the config is code."),
        "batch": Key(str, None, "Your function run on every batch, after the document "
                     "function, as \"module:name\": f(arrays, rng) -> dict of arrays (one "
                     "row per document; a list of rows for a variable-length array); a "
                     "parameter named feed gets the feed's name."),
        "reads": Key(list, [], "Further document paths the functions read: the workers fetch "
                     "only these and the fields' paths (a projection)."),
        "paths": Key(list, [], "Folders (relative to the config file) put first on sys.path "
                     "in the daemon and its workers, to import the functions' modules from."),
    },
    "arrays.*": {
        "dtype": Key(str, REQUIRED, "Element type of the array the functions return.",
                     NUMERIC_DTYPES),
        "shape": Key(list, [], "Shape of one sample ([] for a scalar); -1 marks a dimension "
                     "of variable length, padded per batch."),
        "max_length": Key(int, None, "Longest allowed length of a variable dimension "
                          "(required with a -1 in shape); a longer value is an error."),
        "pad_to": Key((int, str), "longest", "Pad variable dimensions to the batch's longest "
                      "value ('longest'), to that rounded up to a multiple of this integer, or "
                      "always to max_length ('max_length': a fixed shape)."),
        "pad_value": Key((int, float), 0, "Value of the padding."),
        "lengths": Key(str, None, "Name of an extra int32 array with each sample's length "
                       "along the variable dimension (shape [] for one such dimension, [n] "
                       "for n)."),
        "cast": Key(str, None, "Convert to this dtype after the functions.", NUMERIC_DTYPES),
        "scale": Key((int, float), None, "Multiply by this factor after the cast "
                     "(needs a float dtype or cast)."),
        "cast_on": Key(str, "daemon", "Where cast and scale run (as for fields).", CAST_ON),
    },
    "output": {
        "inputs": Key(list, None, "Arrays the Keras Sequence returns as inputs "
                      "(default: all arrays)."),
        "targets": Key(list, [], "Arrays the Keras Sequence returns as targets."),
        "sample_weight": Key(str, None, "An array (one number per sample) the Keras Sequence "
                             "returns third, as fit's sample_weight: (x, y, w)."),
    },
    "serve": {
        "workers": Key(int, None, "Producer processes, each with one MongoClient "
                       "(env MONGOFEED_WORKERS; default: the number of CPUs, at most 8)."),
        "bind": Key(str, DEFAULT_BIND, "Daemon address consumers connect to "
                    "(env MONGOFEED_BIND)."),
        "control": Key(str, None, "Control endpoint (default: bind port + 1)."),
        "ordered": Key(bool, True, "Deliver batches in plan order (reproducible); false "
                       "trades that for throughput."),
        "max_pending": Key(int, None, "Batches produced ahead per session (memory bound; "
                           "default: workers x the batches each reads ahead, up to 16 and "
                           "64 MiB per worker)."),
        "shard": Key(str, "0/1", "Serve only part r of R of every epoch (\"r/R\"): one daemon "
                     "per trainer host, disjoint and equal, no coordinator (env MONGOFEED_SHARD)."),
        "stall_timeout": Key((int, float), DEFAULT_STALL_TIMEOUT_S, "Seconds a worker may hold "
                             "a task without any sign of life before it is killed and its "
                             "tasks re-issued; keep it well under the consumers' timeout "
                             "(60 s by default) so they wait out the recovery."),
        "session_timeout": Key((int, float), 15.0, "Seconds without a heartbeat after "
                               "which a consumer's session ends (at least 3)."),
        "max_sessions": Key(int, 16, "Consumer sessions served at once (memory bound: see "
                            "memory_bound_bytes in status). When all are taken, a new hello "
                            "replaces the session silent longest if it has sent nothing for "
                            "3 s; a consumer that heartbeats is never replaced."),
        "insecure": Key(bool, False, "Allow binding a non-loopback address without "
                        "CurveZMQ keys."),
        "server_key": Key(str, None, "CurveZMQ secret key file of the daemon "
                          "(from 'mongofeed keygen')."),
        "client_keys": Key(str, None, "Folder of accepted client public key files "
                           "(*.key)."),
        "plan_cache": Key(str, None, "Folder of the plan cache, which spares a restarted "
                          "daemon the listing of the _ids when the feed's count and first and "
                          "last _id are unchanged (default: $XDG_CACHE_HOME/mongofeed/plans or "
                          "~/.cache/mongofeed/plans; \"off\" lists at every start)."),
        "metrics_port": Key(int, None, "Serve Prometheus metrics on 127.0.0.1:PORT "
                            "(env MONGOFEED_METRICS_PORT; needs the 'metrics' extra)."),
        "internal_transport": Key(str, "auto", "How the daemon's own processes talk: "
                                  "'ipc' (a private folder; not on Windows), 'tcp' (loopback, "
                                  "random ports) or 'auto' (ipc where ZeroMQ has it) "
                                  "(env MONGOFEED_INTERNAL_TRANSPORT).",
                                  portable.INTERNAL_TRANSPORTS),
    },
}


@dataclass(frozen=True)
class SourceConfig:
    uri: str
    database: str
    collection: str


@dataclass(frozen=True)
class FeedSourceConfig:
    """One source of a feed of several: a collection or a filter of one, and its weight."""

    name: str
    collection: str
    filter: dict
    weight: Weight


@dataclass(frozen=True)
class FeedConfig:
    name: str
    filter: dict
    shuffle: bool | str  # True, False or "window"
    sources: dict[str, FeedSourceConfig] = field(default_factory=dict)  # by name, in order
    epoch_size: int | None = None

    def source_query(self, source: FeedSourceConfig) -> dict:
        """The query of one of the feed's sources: its filter and the feed's."""
        if not (self.filter and source.filter):
            return self.filter or source.filter
        return {"$and": [self.filter, source.filter]}


@dataclass(frozen=True)
class BatchConfig:
    size: int
    seed: int
    drop_last: bool
    on_error: str
    window_bytes: int = 64 * 2**20


@dataclass(frozen=True)
class FieldConfig:
    name: str
    path: str
    decode: str
    dtype: str | None  # None with a text decoder
    shape: tuple[int, ...]
    cast: str | None = None
    scale: float | None = None
    cast_on: str = "daemon"
    one_hot: int | None = None
    gridfs: bool = False
    bucket: str = "fs"
    allow_pickle: bool = False

    @property
    def is_text(self) -> bool:
        """A string or bytes value for the functions, never an array of a batch."""
        return self.decode in TEXT_DECODERS

    @property
    def out_dtype(self) -> str | None:
        """Element type of this field as the daemon makes it (after the daemon's transforms)."""
        if self.cast and self.cast_on == "daemon":
            return self.cast
        return "float32" if self.one_hot else self.dtype

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one sample of this field in a batch, after the transforms."""
        return self.shape + (self.one_hot,) if self.one_hot else self.shape

    @property
    def out_nbytes(self) -> int:
        """Bytes of one sample of this field in a batch (a guess for a text field, to size the
        server's replies)."""
        if self.is_text:
            return TEXT_SAMPLE_NBYTES
        return math.prod(self.out_shape) * np.dtype(self.out_dtype).itemsize

    def as_array(self) -> ArrayConfig:
        """The batch array of this field when [arrays] declares none: the field as decoded,
        with the cast and scale left to the consumer if cast_on says so."""
        on_consumer = self.cast_on == "consumer"
        return ArrayConfig(self.name, self.out_dtype, self.out_shape,
                           cast=self.cast if on_consumer else None,
                           scale=self.scale if on_consumer else None, cast_on=self.cast_on)


@dataclass(frozen=True)
class ArrayConfig:
    """One array of every batch: what the [transform] functions return (or a field as
    decoded), what crosses the wire, and what the consumer makes of it."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # per sample; VARIABLE for a dimension padded per batch
    max_length: int | None = None
    pad_to: int | str = "longest"
    pad_value: float = 0
    lengths: str | None = None
    cast: str | None = None
    scale: float | None = None
    cast_on: str = "daemon"
    lengths_of: str | None = None  # set on the lengths array of a variable-length array

    @property
    def variable_dims(self) -> tuple[int, ...]:
        """Indices of the per-sample dimensions padded per batch."""
        return tuple(i for i, d in enumerate(self.shape) if d == VARIABLE)

    @property
    def max_shape(self) -> tuple[int, ...]:
        return tuple(self.max_length if d == VARIABLE else d for d in self.shape)

    @property
    def wire_dtype(self) -> str:
        """Element type on the wire: after the daemon's cast, before the consumer's."""
        return self.cast if self.cast and self.cast_on == "daemon" else self.dtype

    @property
    def out_nbytes(self) -> int:
        """Bytes of one sample on the wire at most."""
        return math.prod(self.max_shape) * np.dtype(self.wire_dtype).itemsize

    def spec(self) -> ArraySpec:
        """The array as the hello reply announces it (None for a dimension that varies)."""
        if not self.variable_dims:
            return ArraySpec(self.name, self.wire_dtype, self.shape)
        if self.pad_to == "max_length":
            return ArraySpec(self.name, self.wire_dtype, self.max_shape)
        shape = tuple(None if d == VARIABLE else d for d in self.shape)
        return ArraySpec(self.name, self.wire_dtype, shape, self.max_shape)

    def conversion(self) -> Conversion | None:
        """The cast and scale the consumer applies, if cast_on = "consumer"."""
        if self.cast_on != "consumer" or not (self.cast or self.scale is not None):
            return None
        return Conversion(self.name, self.cast or self.dtype, self.scale)


@dataclass(frozen=True)
class TransformConfig:
    """The user's functions, as import references, and what they read."""

    document: str | None = None
    batch: str | None = None
    reads: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # absolute

    @property
    def functions(self) -> dict[str, str]:
        """The configured functions by key (transform.document, transform.batch)."""
        return {key: ref for key, ref in (("transform.document", self.document),
                                          ("transform.batch", self.batch)) if ref}


@dataclass(frozen=True)
class OutputConfig:
    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    sample_weight: str | None = None


@dataclass(frozen=True)
class ServeConfig:
    workers: int
    bind: str
    control: str
    ordered: bool
    max_pending: int
    tasks_per_worker: int  # derived from the batch size in bytes, not a config key
    shard: Shard
    session_timeout: float
    stall_timeout: float
    max_sessions: int
    insecure: bool
    server_key: str | None
    client_keys: str | None
    metrics_port: int | None = None
    plan_cache: str | None = None
    internal_transport: str = "tcp"  # resolved: "ipc" or "tcp"


@dataclass(frozen=True)
class Config:
    source: SourceConfig
    feeds: dict[str, FeedConfig]
    batch: BatchConfig
    fields: dict[str, FieldConfig]
    output: OutputConfig
    serve: ServeConfig
    transform: TransformConfig = TransformConfig()
    arrays: dict[str, ArrayConfig] = field(default_factory=dict)  # what every batch holds
    path: str = field(default="<defaults>", compare=False)

    @property
    def batch_nbytes(self) -> int:
        return batch_nbytes(self.batch.size, self.arrays)

    @property
    def session_memory_bound(self) -> int:
        """Bytes of batches the daemon holds for one session at most: ``max_pending``
        produced ahead (in production or waiting at the sink) and ``max_pending`` sent but
        not yet read (credit and the data socket's queue are capped at that)."""
        return 2 * self.serve.max_pending * self.batch_nbytes

    @property
    def memory_bound(self) -> int:
        """Bytes of batches the daemon holds for all its sessions together at most."""
        return self.serve.max_sessions * self.session_memory_bound


def batch_nbytes(size: int, arrays: dict[str, ArrayConfig]) -> int:
    """Bytes of one full batch over all its arrays (variable dimensions at their longest)."""
    return size * sum(a.out_nbytes for a in arrays.values())


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (TOML), apply dotted ``overrides`` that are not None, and check it all."""
    raw, where = read_config(path, overrides)
    return parse_config(raw, where)


def load_source(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None):
    """Only the [source] table, for commands that need no fields (``mongofeed load``)."""
    raw, where = read_config(path, overrides)
    source = raw.get("source", {})
    return SourceConfig(**_section(source, "source", SCHEMA["source"], where))


def read_config(path, overrides) -> tuple[dict[str, Any], str]:
    """The TOML file as nested dicts with the overrides applied, and its name for messages."""
    where = str(path) if path else "<no config file>"
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {where} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        table = raw
        for part in section.split("."):
            table = table.setdefault(part, {})
        table[key] = value
    return raw, where


def parse_config(raw: dict[str, Any], where: str = "<config>") -> Config:
    """Check a config given as nested dicts; every fault names the key and ``where``."""
    for section in raw:
        if section not in SCHEMA and f"{section}.*" not in SCHEMA:
            known = ", ".join(sorted({s.split(".")[0] for s in SCHEMA}))
            raise ConfigError(f"{where}: unknown section [{section}] (known: {known})")

    def table(name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        return value

    source = SourceConfig(**_section(table("source"), "source", SCHEMA["source"], where))
    _check_source(source, where)
    batch = BatchConfig(**_section(table("batch"), "batch", SCHEMA["batch"], where))
    if batch.size < 1:
        raise ConfigError(f"{where}: batch.size must be at least 1, not {batch.size}")
    if not 0 <= batch.seed < MAX_SEED:
        raise ConfigError(f"{where}: batch.seed must be from 0 to 2**63 - 1, not {batch.seed}")
    if batch.window_bytes < 1:
        raise ConfigError(f"{where}: batch.window_bytes must be positive")

    feeds = {name: _feed(name, body, source, where)
             for name, body in _entries(table("feeds"), "feeds", where)}
    if not feeds:
        feeds = {"train": FeedConfig(name="train", filter={}, shuffle=True)}

    fields = {
        name: _field(name, _section(body, f"fields.{name}", SCHEMA["fields.*"], where), where)
        for name, body in _entries(table("fields"), "fields", where)
    }
    transform = _transform(_section(table("transform"), "transform", SCHEMA["transform"],
                                    where), where)
    arrays = _arrays(table("arrays"), fields, transform, where)
    if batch_nbytes(batch.size, arrays) > MAX_BATCH_BYTES:
        raise ConfigError(f"{where}: batch.size {batch.size} makes batches of "
                          f"{batch_nbytes(batch.size, arrays)} bytes, more than "
                          f"{MAX_BATCH_BYTES} (1 GiB): lower batch.size")

    out = _section(table("output"), "output", SCHEMA["output"], where)
    if out["inputs"] == []:
        raise ConfigError(f"{where}: output.inputs is empty: a model needs at least one input")
    output = OutputConfig(
        inputs=_array_list(out["inputs"] if out["inputs"] is not None else list(arrays),
                           "output.inputs", arrays, where),
        targets=_array_list(out["targets"], "output.targets", arrays, where),
        sample_weight=out["sample_weight"],
    )
    if output.sample_weight is not None:
        _array_list([output.sample_weight], "output.sample_weight", arrays, where)
        if not output.targets:
            raise ConfigError(f"{where}: output.sample_weight needs output.targets (weights "
                              f"weigh each sample's loss against its targets)")
        if arrays[output.sample_weight].shape != ():
            raise ConfigError(f"{where}: output.sample_weight names {output.sample_weight!r}, "
                              f"which must hold one number per sample (shape [])")

    serve = _section(table("serve"), "serve", SCHEMA["serve"], where)
    workers = serve["workers"] if serve["workers"] is not None else min(8, os.cpu_count() or 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{where}: serve.workers must be between 1 and {MAX_WORKERS}, "
                          f"not {workers}")
    bind = _bindable(check_endpoint(serve["bind"], "serve.bind", where), "serve.bind", where)
    control = _bindable(check_endpoint(serve["control"] or next_port(bind), "serve.control",
                                       where), "serve.control", where)
    if control == bind:
        raise ConfigError(f"{where}: serve.control must differ from serve.bind ({bind})")
    read_ahead = READ_AHEAD_BYTES_PER_WORKER // batch_nbytes(batch.size, arrays)
    tasks_per_worker = max(2, min(MAX_TASKS_PER_WORKER, read_ahead))
    max_pending = serve["max_pending"]
    if max_pending is None:
        max_pending = workers * tasks_per_worker
    if not 1 <= max_pending <= MAX_PENDING:
        raise ConfigError(f"{where}: serve.max_pending must be from 1 to {MAX_PENDING}, "
                          f"not {max_pending}")
    if not 1 <= serve["max_sessions"] <= MAX_SESSIONS:
        raise ConfigError(f"{where}: serve.max_sessions must be from 1 to {MAX_SESSIONS}, "
                          f"not {serve['max_sessions']}")
    try:
        shard = Shard.parse(serve["shard"])
    except ValueError as exc:
        raise ConfigError(f"{where}: serve.shard: {exc}") from None
    for key, least in (("session_timeout", MIN_SESSION_TIMEOUT_S),
                       ("stall_timeout", MIN_STALL_TIMEOUT_S)):
        if not (math.isfinite(serve[key]) and serve[key] >= least):
            raise ConfigError(f"{where}: serve.{key} must be a number of seconds, at least "
                              f"{least:g}, not {serve[key]}")
    if serve["server_key"] is not None and not os.path.isfile(serve["server_key"]):
        raise ConfigError(f"{where}: serve.server_key {serve['server_key']} is not a file "
                          f"(create a key pair with 'mongofeed keygen')")
    if serve["client_keys"] is not None and not os.path.isdir(serve["client_keys"]):
        raise ConfigError(f"{where}: serve.client_keys {serve['client_keys']} is not a folder "
                          f"(of client public keys, *.key)")
    if serve["metrics_port"] is not None and not 0 < serve["metrics_port"] < 65536:
        raise ConfigError(f"{where}: serve.metrics_port must be a port (1 to 65535), "
                          f"not {serve['metrics_port']}")
    if serve["metrics_port"] is not None and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"{where}: serve.metrics_port needs prometheus-client: "
                          f"pip install 'mongofeed[metrics]'")
    serve["internal_transport"] = _internal_transport(serve["internal_transport"], where)
    _refuse_missing_ipc({"serve.bind": bind, "serve.control": control}, where)
    serve_config = ServeConfig(**{**serve, "workers": workers, "bind": bind,
                                  "control": control, "max_pending": max_pending,
                                  "tasks_per_worker": tasks_per_worker,
                                  "shard": shard,
                                  "session_timeout": float(serve["session_timeout"]),
                                  "stall_timeout": float(serve["stall_timeout"])})
    check_exposure(serve_config, where)
    return Config(source=source, feeds=feeds, batch=batch, fields=fields, output=output,
                  serve=serve_config, transform=transform, arrays=arrays, path=where)


def _check_source(source: SourceConfig, where: str):
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
    _check_collection(collection, "source.collection", where)


def _check_collection(name: str, key: str, where: str):
    if not name or "$" in name or "\0" in name or name.startswith(".") or name.endswith("."):
        raise ConfigError(f"{where}: {key} {name!r} is not a MongoDB collection name (not "
                          f"empty, no $, not starting or ending with a dot)")


def _feed(name: str, body: dict, source: SourceConfig, where: str) -> FeedConfig:
    key = f"feeds.{name}"
    if isinstance(body.get("sources"), list):
        raise ConfigError(f"{where}: {key}.sources: give each source a named table, "
                          f"[{key}.sources.NAME], not an array of tables ([[{key}.sources]])")
    values = _section(body, key, SCHEMA["feeds.*"], where)
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
    for name, body in _entries(values["sources"], f"{key}.sources", where):
        source_key = f"{key}.sources.{name}"
        if len(name) > MAX_NAME_CHARS:
            raise ConfigError(f"{where}: source name {name[:40]!r}... is longer than "
                              f"{MAX_NAME_CHARS} characters")
        given = _section(body, source_key, SCHEMA["feeds.*.sources.*"], where)
        collection = given["collection"] or source.collection
        _check_collection(collection, f"{source_key}.collection", where)
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


def _bindable(endpoint: str, key: str, where: str) -> str:
    """An endpoint the daemon can bind: an ipc:// path must fit a socket address and its
    folder must exist."""
    if not endpoint.startswith("ipc://"):
        return endpoint
    path = endpoint[len("ipc://"):]
    if not has_ipc():
        raise ConfigError(f"{where}: {key} = {endpoint!r}: this ZeroMQ has no ipc://; use "
                          f"tcp://127.0.0.1:PORT")
    if len(path.encode()) > ipc_path_max():
        raise ConfigError(f"{where}: {key} = {endpoint!r}: the path is longer than the "
                          f"{ipc_path_max()} bytes a socket address holds; use a shorter one")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{where}: {key} = {endpoint!r}: its folder does not exist")
    return endpoint


def _internal_transport(setting: str, where: str) -> str:
    try:
        return portable.resolve_internal_transport(setting)
    except ValueError as exc:
        raise ConfigError(f"{where}: serve.internal_transport = {exc}") from None


def _refuse_missing_ipc(endpoints: dict[str, str], where: str):
    for key, endpoint in endpoints.items():
        if endpoint.startswith("ipc://") and not portable.has_ipc():
            raise ConfigError(f"{where}: {key} = {endpoint!r}, but the ZeroMQ here has no "
                              f"ipc:// transport (as on Windows); use tcp://127.0.0.1:PORT")


def _entries(value: dict[str, Any], name: str, where: str):
    for entry, body in value.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: [{name}.{entry}] must be a table, not "
                              f"{type(body).__name__}")
        yield entry, body


def _section(values: dict[str, Any], name: str, schema: dict[str, Key], where: str) -> dict:
    """Fill defaults, refuse unknown keys and wrong types, for one table."""
    for key in values:
        if key not in schema:
            raise ConfigError(f"{where}: unknown key {name}.{key} (known: {', '.join(schema)})")
    result = {}
    for key, spec in schema.items():
        value = values.get(key, spec.default)
        if value is REQUIRED:
            raise ConfigError(f"{where}: {name}.{key} is required ({spec.doc})")
        if value is not None:
            # bool is an int in Python; a config that says `size = true` is still wrong.
            wrong_bool = isinstance(value, bool) and bool not in _as_tuple(spec.type)
            if wrong_bool or not isinstance(value, spec.type):
                raise ConfigError(f"{where}: {name}.{key} must be {_type_name(spec.type)}, "
                                  f"not {type(value).__name__} {value!r}")
            if spec.choices and value not in spec.choices:
                raise ConfigError(f"{where}: {name}.{key} must be one of "
                                  f"{', '.join(spec.choices)}, not {value!r}")
        result[key] = value
    return result


def _field(name: str, values: dict[str, Any], where: str) -> FieldConfig:
    key = f"fields.{name}"
    shape = values["shape"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ConfigError(f"{where}: {key}.shape must be a list of positive integers, "
                          f"not {shape!r}")
    if len(shape) > MAX_SAMPLE_DIMS:
        raise ConfigError(f"{where}: {key}.shape has {len(shape)} dimensions, at most "
                          f"{MAX_SAMPLE_DIMS}")
    path = values["path"] if values["path"] is not None else name
    if not all(part and not part.startswith("$") for part in path.split(".")):
        raise ConfigError(f"{where}: {key}.path {path!r} is not a dotted path of field names "
                          f"(no empty part, none starting with $)")
    if values["gridfs"]:
        _check_collection(values["bucket"], f"{key}.bucket", where)
    values = {**values, "shape": tuple(shape), "path": path}
    decode, dtype = values["decode"], values["dtype"]
    if decode in TEXT_DECODERS:
        given = [k for k in ("dtype", "cast", "scale", "one_hot") if values[k] is not None]
        if given or shape:
            raise ConfigError(f"{where}: {key}: decode = {decode!r} hands the value to the "
                              f"[transform] functions as it is: remove "
                              f"{', '.join(given + (['shape'] if shape else []))}")
    elif dtype is None:
        raise ConfigError(f"{where}: {key}.dtype is required ({SCHEMA['fields.*']['dtype'].doc})")
    if decode == "scalar" and shape:
        raise ConfigError(f"{where}: {key}.shape must be [] with decode = 'scalar'")
    if decode in ("raw", "npy", "list", "image", "pickle") and not shape:
        raise ConfigError(f"{where}: {key}.shape is required with decode = {decode!r}")
    if decode == "image" and (dtype != "uint8" or len(shape) != 3 or shape[2] not in (1, 3, 4)):
        raise ConfigError(f"{where}: {key}: decode = 'image' needs dtype = 'uint8' and "
                          f"shape = [height, width, channels] with 1, 3 or 4 channels")
    if decode == "image" and not _pillow_imports():
        raise ConfigError(f"{where}: {key}.decode = 'image' needs Pillow, which does not "
                          f"import here: pip install 'mongofeed[image]'")
    if decode == "pickle" and not values["allow_pickle"]:
        raise ConfigError(f"{where}: {key}: decode = 'pickle' runs code stored in the database;"
                          f" set {key}.allow_pickle = true if you trust that data")
    if values["gridfs"] and decode not in ("raw", "npy", "image", "pickle", "bytes"):
        raise ConfigError(f"{where}: {key}: gridfs = true needs a bytes decoder "
                          f"(raw, npy, image, pickle or bytes), not {decode!r}")
    one_hot = values["one_hot"]
    if one_hot is not None and (one_hot < 2 or shape or not dtype.startswith(("int", "uint"))):
        raise ConfigError(f"{where}: {key}.one_hot needs an integer scalar field "
                          f"(decode = 'scalar', an int dtype) and at least 2 classes")
    if one_hot is not None and values["cast_on"] == "consumer":
        raise ConfigError(f"{where}: {key}: one_hot runs in the daemon; remove cast_on = "
                          f"'consumer' (one-hot labels are small on the wire)")
    target = values["cast"] or ("float32" if values["one_hot"] else dtype)
    _check_scale(key, values["scale"], target, where)
    return FieldConfig(name=name, **values)


def _check_scale(key: str, scale, target: str | None, where: str):
    if scale is None:
        return
    if not target.startswith("float"):
        raise ConfigError(f"{where}: {key}.scale needs a float result: add cast = 'float32'")
    if not math.isfinite(scale):
        raise ConfigError(f"{where}: {key}.scale must be a finite number")


_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _transform(values: dict[str, Any], where: str) -> TransformConfig:
    """[transform]: function references checked for form (``serve`` imports them), the
    folders to import from made absolute (relative to the config file) and checked."""
    for key in ("document", "batch"):
        ref = values[key]
        if ref is not None and not _FUNCTION_REF.match(ref):
            raise ConfigError(f"{where}: transform.{key} = {ref!r} is not \"module:function\" "
                              f"(e.g. \"myproject.prep:transform\")")
    for key in ("reads", "paths"):
        if not all(isinstance(item, str) and item for item in values[key]):
            raise ConfigError(f"{where}: transform.{key} must be a list of non-empty strings, "
                              f"not {values[key]!r}")
    base = os.getcwd() if where.startswith("<") else os.path.dirname(os.path.abspath(where))
    paths = tuple(os.path.normpath(os.path.join(base, folder)) for folder in values["paths"])
    for folder, path in zip(values["paths"], paths, strict=True):
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: transform.paths: folder {folder!r} ({path}) does not "
                              f"exist (relative paths start at the config file's folder)")
    if values["reads"] and not (values["document"] or values["batch"]):
        raise ConfigError(f"{where}: transform.reads names paths for the functions, but "
                          f"neither transform.document nor transform.batch is set")
    return TransformConfig(values["document"], values["batch"], tuple(values["reads"]), paths)


def _arrays(tables: dict[str, Any], fields: dict[str, FieldConfig],
            transform: TransformConfig, where: str) -> dict[str, ArrayConfig]:
    """The arrays of every batch: the [arrays.*] tables (what the functions return, and the
    lengths of variable ones), or without them one per field as decoded."""
    if not tables:
        if not fields:
            raise ConfigError(f"{where}: no [fields.NAME] table: declare at least one field")
        for f in fields.values():
            if f.is_text:
                raise ConfigError(f"{where}: field {f.name!r} (decode = {f.decode!r}) is an "
                                  f"input of the [transform] functions, never an array itself:"
                                  f" declare the arrays they return in [arrays.NAME] tables")
        return {name: f.as_array() for name, f in fields.items()}
    if not transform.functions:
        raise ConfigError(f"{where}: [arrays.*] declares what the [transform] functions "
                          f"return: set transform.document or transform.batch (without them "
                          f"the [fields.*] are the arrays)")
    arrays = {}
    for name, body in _entries(tables, "arrays", where):
        values = _section(body, f"arrays.{name}", SCHEMA["arrays.*"], where)
        arrays[name] = _array(name, values, set(body), where)
    for array in list(arrays.values()):
        if array.lengths is None:
            continue
        if array.lengths in arrays:
            raise ConfigError(f"{where}: arrays.{array.name}.lengths = {array.lengths!r} names "
                              f"an array that exists already: choose another name")
        count = len(array.variable_dims)
        arrays[array.lengths] = ArrayConfig(array.lengths, LENGTHS_DTYPE,
                                            () if count == 1 else (count,),
                                            lengths_of=array.name)
    return arrays


def _array(name: str, values: dict[str, Any], given: set, where: str) -> ArrayConfig:
    key = f"arrays.{name}"
    shape, dtype = values["shape"], values["dtype"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == VARIABLE)
               for d in shape):
        raise ConfigError(f"{where}: {key}.shape must be a list of positive integers or -1 "
                          f"(a variable length), not {shape!r}")
    if VARIABLE in shape:
        max_length, pad_to = values["max_length"], values["pad_to"]
        if max_length is None or max_length < 1:
            raise ConfigError(f"{where}: {key}.max_length (a positive integer) is required "
                              f"with a -1 in shape: it bounds the memory of a batch")
        if not (pad_to in PAD_TO or (isinstance(pad_to, int) and pad_to >= 1)):
            raise ConfigError(f"{where}: {key}.pad_to must be 'longest', 'max_length' or a "
                              f"positive integer, not {pad_to!r}")
        pad = np.array(values["pad_value"])
        if not (math.isfinite(values["pad_value"]) and pad.astype(dtype) == pad):
            raise ConfigError(f"{where}: {key}.pad_value {values['pad_value']!r} is not a "
                              f"value of dtype {dtype}")
    else:
        variable_only = sorted({"max_length", "pad_to", "pad_value", "lengths"} & given)
        if variable_only:
            raise ConfigError(f"{where}: {key}: {', '.join(variable_only)} apply to a "
                              f"variable dimension only (-1 in shape)")
    _check_scale(key, values["scale"], values["cast"] or dtype, where)
    return ArrayConfig(name=name, **{**values, "shape": tuple(shape)})


def _pillow_imports() -> bool:
    """Whether Pillow imports: checked with the config so that a missing Pillow stops
    ``serve`` at once instead of failing the first batch of every session."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _array_list(names: list, key: str, arrays: dict, where: str) -> tuple[str, ...]:
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"{where}: {key} must list array names, each once, not {names!r}")
    for name in names:
        if name not in arrays:
            raise ConfigError(f"{where}: {key} names {name!r}, which is not an array of the "
                              f"batch (known: {', '.join(arrays)})")
    return tuple(names)


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(x, x.__name__) for x in _as_tuple(t))
