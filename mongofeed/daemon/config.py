"""The TOML config: one schema table, loading, overrides and every check, in one place.

Precedence is command-line option > environment > config file > default. The CLI (click)
already resolves option-or-environment; it hands the result here as dotted overrides
(``{"serve.workers": 8}``), which win over the file.

``SCHEMA`` below is the single source of truth for which keys exist, their types, defaults
and meaning; the configuration reference in the docs is generated from it.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import portable
from ..errors import ConfigError
from ..security import check_exposure
from ..wire import check_endpoint, next_port
from .planner import Shard

REQUIRED = object()

NUMERIC_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)
DECODERS = ("raw", "npy", "scalar", "list", "image", "pickle")
ON_ERROR = ("fail", "skip")
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# A worker takes the tasks queued for it together and reads them with one query; this bounds
# how many, by count and by the bytes of their batches.
MAX_TASKS_PER_WORKER = 16
READ_AHEAD_BYTES_PER_WORKER = 64 * 2**20
MAX_WORKERS = 64


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
        "shuffle": Key(bool, True, "Shuffle the order anew each epoch (deterministic from "
                       "batch.seed and the epoch number)."),
    },
    "batch": {
        "size": Key(int, 32, "Samples per batch."),
        "seed": Key(int, 0, "Seed of the per-epoch order: same seed, same batches."),
        "drop_last": Key(bool, False, "Drop the last, short batch of each epoch."),
        "on_error": Key(str, "fail", "What a document that does not fit the schema does: "
                        "'fail' reports it to the consumer, 'skip' leaves it out and counts "
                        "it in status.", ON_ERROR),
    },
    "fields.*": {
        "path": Key(str, None, "Dotted path of the value in the document (default: the "
                    "field's name)."),
        "decode": Key(str, "raw", "How the value becomes an array.", DECODERS),
        "dtype": Key(str, REQUIRED, "Element type of the stored value.", NUMERIC_DTYPES),
        "shape": Key(list, [], "Shape of one sample of this field ([] for a scalar)."),
        "cast": Key(str, None, "Convert to this dtype after decoding.", NUMERIC_DTYPES),
        "scale": Key((int, float), None, "Multiply by this factor after the cast "
                     "(needs a float dtype or cast)."),
        "one_hot": Key(int, None, "Turn an integer class label into a one-hot vector of "
                       "this many classes (float32 unless cast says otherwise)."),
        "gridfs": Key(bool, False, "The document holds a GridFS file id; the bytes live "
                      "in GridFS."),
        "bucket": Key(str, "fs", "GridFS bucket name (with gridfs = true)."),
        "allow_pickle": Key(bool, False, "Allow decode = 'pickle' (legacy data only: "
                            "unpickling runs code from the database)."),
    },
    "output": {
        "inputs": Key(list, None, "Fields the Keras Sequence returns as inputs "
                      "(default: all fields)."),
        "targets": Key(list, [], "Fields the Keras Sequence returns as targets."),
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
        "stall_timeout": Key((int, float), 120.0, "Seconds a worker may hold a task without any "
                             "sign of life before it is killed and its tasks re-issued."),
        "session_timeout": Key((int, float), 15.0, "Seconds without a heartbeat after "
                               "which a consumer's session ends."),
        "insecure": Key(bool, False, "Allow binding a non-loopback address without "
                        "CurveZMQ keys."),
        "server_key": Key(str, None, "CurveZMQ secret key file of the daemon "
                          "(from 'mongofeed keygen')."),
        "client_keys": Key(str, None, "Folder of accepted client public key files "
                           "(*.key)."),
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
class FeedConfig:
    name: str
    filter: dict
    shuffle: bool


@dataclass(frozen=True)
class BatchConfig:
    size: int
    seed: int
    drop_last: bool
    on_error: str


@dataclass(frozen=True)
class FieldConfig:
    name: str
    path: str
    decode: str
    dtype: str
    shape: tuple[int, ...]
    cast: str | None = None
    scale: float | None = None
    one_hot: int | None = None
    gridfs: bool = False
    bucket: str = "fs"
    allow_pickle: bool = False

    @property
    def out_dtype(self) -> str:
        """Element type of this field in a batch, after the transforms."""
        if self.cast:
            return self.cast
        return "float32" if self.one_hot else self.dtype

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one sample of this field in a batch, after the transforms."""
        return self.shape + (self.one_hot,) if self.one_hot else self.shape

    @property
    def out_nbytes(self) -> int:
        """Bytes of one sample of this field in a batch."""
        return math.prod(self.out_shape) * np.dtype(self.out_dtype).itemsize


@dataclass(frozen=True)
class OutputConfig:
    inputs: tuple[str, ...]
    targets: tuple[str, ...]


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
    insecure: bool
    server_key: str | None
    client_keys: str | None
    metrics_port: int | None = None
    internal_transport: str = "tcp"  # resolved: "ipc" or "tcp"


@dataclass(frozen=True)
class Config:
    source: SourceConfig
    feeds: dict[str, FeedConfig]
    batch: BatchConfig
    fields: dict[str, FieldConfig]
    output: OutputConfig
    serve: ServeConfig
    path: str = field(default="<defaults>", compare=False)

    @property
    def batch_nbytes(self) -> int:
        return batch_nbytes(self.batch.size, self.fields)


def batch_nbytes(size: int, fields: dict[str, FieldConfig]) -> int:
    """Bytes of one full batch over all its arrays."""
    return size * sum(f.out_nbytes for f in fields.values())


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
            known = ", ".join(sorted(s.removesuffix(".*") for s in SCHEMA))
            raise ConfigError(f"{where}: unknown section [{section}] (known: {known})")

    def table(name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        return value

    source = SourceConfig(**_section(table("source"), "source", SCHEMA["source"], where))
    batch = BatchConfig(**_section(table("batch"), "batch", SCHEMA["batch"], where))
    if batch.size < 1:
        raise ConfigError(f"{where}: batch.size must be at least 1, not {batch.size}")

    feeds = {
        name: FeedConfig(name=name, **_section(body, f"feeds.{name}", SCHEMA["feeds.*"], where))
        for name, body in _entries(table("feeds"), "feeds", where)
    }
    if not feeds:
        feeds = {"train": FeedConfig(name="train", filter={}, shuffle=True)}

    fields = {
        name: _field(name, _section(body, f"fields.{name}", SCHEMA["fields.*"], where), where)
        for name, body in _entries(table("fields"), "fields", where)
    }
    if not fields:
        raise ConfigError(f"{where}: no [fields.NAME] table: declare at least one field")

    out = _section(table("output"), "output", SCHEMA["output"], where)
    output = OutputConfig(
        inputs=_field_list(out["inputs"] if out["inputs"] is not None else list(fields),
                           "output.inputs", fields, where),
        targets=_field_list(out["targets"], "output.targets", fields, where),
    )

    serve = _section(table("serve"), "serve", SCHEMA["serve"], where)
    workers = serve["workers"] if serve["workers"] is not None else min(8, os.cpu_count() or 1)
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{where}: serve.workers must be between 1 and {MAX_WORKERS}, "
                          f"not {workers}")
    bind = check_endpoint(serve["bind"], "serve.bind", where)
    control = check_endpoint(serve["control"] or next_port(bind), "serve.control", where)
    if control == bind:
        raise ConfigError(f"{where}: serve.control must differ from serve.bind ({bind})")
    read_ahead = READ_AHEAD_BYTES_PER_WORKER // batch_nbytes(batch.size, fields)
    tasks_per_worker = max(2, min(MAX_TASKS_PER_WORKER, read_ahead))
    max_pending = serve["max_pending"]
    if max_pending is None:
        max_pending = workers * tasks_per_worker
    if max_pending < 1:
        raise ConfigError(f"{where}: serve.max_pending must be at least 1, not {max_pending}")
    try:
        shard = Shard.parse(serve["shard"])
    except ValueError as exc:
        raise ConfigError(f"{where}: serve.shard: {exc}") from None
    for key in ("session_timeout", "stall_timeout"):
        if serve[key] <= 0:
            raise ConfigError(f"{where}: serve.{key} must be positive")
    if serve["metrics_port"] is not None and not 0 < serve["metrics_port"] < 65536:
        raise ConfigError(f"{where}: serve.metrics_port must be a port (1 to 65535), "
                          f"not {serve['metrics_port']}")
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
                  serve=serve_config, path=where)


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
    values = {**values, "shape": tuple(shape), "path": values["path"] or name}
    decode, dtype = values["decode"], values["dtype"]
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
    if values["gridfs"] and decode not in ("raw", "npy", "image", "pickle"):
        raise ConfigError(f"{where}: {key}: gridfs = true needs a bytes decoder "
                          f"(raw, npy, image or pickle), not {decode!r}")
    one_hot = values["one_hot"]
    if one_hot is not None and (one_hot < 2 or shape or not dtype.startswith(("int", "uint"))):
        raise ConfigError(f"{where}: {key}.one_hot needs an integer scalar field "
                          f"(decode = 'scalar', an int dtype) and at least 2 classes")
    if values["scale"] is not None:
        target = values["cast"] or ("float32" if values["one_hot"] else dtype)
        if not target.startswith("float"):
            raise ConfigError(f"{where}: {key}.scale needs a float result: add "
                              f"cast = 'float32'")
        if not math.isfinite(values["scale"]):
            raise ConfigError(f"{where}: {key}.scale must be a finite number")
    return FieldConfig(name=name, **values)


def _pillow_imports() -> bool:
    """Whether Pillow imports: checked with the config so that a missing Pillow stops
    ``serve`` at once instead of failing the first batch of every session."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _field_list(names: list, key: str, fields: dict, where: str) -> tuple[str, ...]:
    for name in names:
        if name not in fields:
            raise ConfigError(f"{where}: {key} names {name!r}, which is not a [fields.*] "
                              f"table (known: {', '.join(fields)})")
    return tuple(names)


def redact_uri(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ***, for logs, status and
    error messages (a driver's message may embed the whole connection string)."""
    return _URI_PASSWORD.sub(r"\1:***@", text)


_URI_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^@/\s]*@")


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(x, x.__name__) for x in _as_tuple(t))
