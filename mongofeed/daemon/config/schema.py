"""The config's keys: ``SCHEMA``, the single source of truth for which keys exist, their
types, defaults and meaning (the configuration reference in the docs is generated from it),
and the check of one table against it (``checked_table``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ... import portable
from ...errors import ConfigError

REQUIRED = object()

NUMERIC_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)
DECODERS = ("raw", "npy", "scalar", "list", "image", "pickle", "string", "bytes")
TEXT_DECODERS = ("string", "bytes")  # values for the user functions, never arrays themselves
ON_ERROR = ("fail", "skip")
CAST_ON = ("daemon", "consumer")
DEFAULT_BIND = "tcp://127.0.0.1:5555"
DEFAULT_STALL_TIMEOUT_S = 20.0  # well under a consumer's default timeout (60 s)
DEFAULT_MAX_HELD_BATCHES = 18  # what the Keras and tf.data adapters ask for by default


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
        "max_held_batches": Key(int, DEFAULT_MAX_HELD_BATCHES, "Batches a consumer on this "
                                "host may keep as views of shared memory beyond its credit "
                                "(it asks in its hello: the Keras and tf.data adapters ask for "
                                "the batches they keep to hand again, plus 2; a Consumer for "
                                "its held_batches). Each is a slab of the session's region, in "
                                "the memory bound; a batch kept beyond them is a copy."),
        "shard": Key(str, "0/1", "Serve only part r of R of every epoch (\"r/R\"): one daemon "
                     "per trainer host, disjoint and equal, no coordinator (env MONGOFEED_SHARD)."),
        "stall_timeout": Key((int, float), DEFAULT_STALL_TIMEOUT_S, "Seconds a worker may hold "
                             "a task without any sign of life before it is killed and its "
                             "tasks re-issued; keep it well under the consumers' timeout "
                             "(60 s by default) so they wait out the recovery."),
        "session_timeout": Key((int, float), 15.0, "Seconds without a heartbeat after "
                               "which a consumer's session ends (at least 3); raise it for "
                               "trainers paused longer (a debugger), which are told so."),
        "max_sessions": Key(int, 16, "Consumer sessions served at once (memory bound: see "
                            "memory_bound_bytes in status). When all are taken, a new hello "
                            "replaces the session silent longest if it has sent nothing for "
                            "3 s; a consumer that heartbeats is never replaced. A session "
                            "that ended while its consumer keeps its data connection open "
                            "(its unread batches stay queued in the daemon) counts until "
                            "that connection closes (lingering_connections in status)."),
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


def entries(value: dict[str, Any], name: str, where: str):
    """The named entries of a table of tables ([feeds.NAME], [fields.NAME]), each a table."""
    for entry, body in value.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: [{name}.{entry}] must be a table, not "
                              f"{type(body).__name__}")
        yield entry, body


def checked_table(values: dict[str, Any], name: str, schema: dict[str, Key],
                  where: str) -> dict:
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
                raise ConfigError(f"{where}: {name}.{key} must be {type_name(spec.type)}, "
                                  f"not {type(value).__name__} {value!r}")
            if spec.choices and value not in spec.choices:
                raise ConfigError(f"{where}: {name}.{key} must be one of "
                                  f"{', '.join(spec.choices)}, not {value!r}")
        result[key] = value
    return result


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def type_name(t) -> str:
    """A key's type in words, for messages and the configuration reference."""
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(x, x.__name__) for x in _as_tuple(t))
