"""Reading a config: the TOML file, the overrides, and the check of the whole, table by table
([batch], [output] and [serve] here; sources and feeds in ``sources``, fields, transform and
arrays in ``arrays``).

Precedence is command-line option > environment > config file > default. The CLI (click)
already resolves option-or-environment; it hands the result here as dotted overrides
(``{"serve.workers": 8}``), which win over the file.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tomllib
from typing import Any

from ... import portable
from ...errors import ConfigError
from ...portable import has_ipc, ipc_path_max
from ...security import check_exposure
from ...wire import check_endpoint, next_port
from ..planner import Shard
from .arrays import parse_arrays, parse_field, parse_transform
from .model import (
    BatchConfig,
    Config,
    FeedConfig,
    OutputConfig,
    ServeConfig,
    SourceConfig,
    batch_nbytes,
)
from .schema import SCHEMA, checked_table, entries
from .sources import check_source, parse_feed

# A worker takes the tasks queued for it together and reads them with one query; this bounds
# how many, by count and by the bytes of their batches.
MAX_TASKS_PER_WORKER = 16
READ_AHEAD_BYTES_PER_WORKER = 64 * 2**20
MAX_WORKERS = 64
MAX_PENDING = 10_000
MAX_SESSIONS = 1_024
MAX_BATCH_BYTES = 2**30        # one batch is one message and several copies in the pipeline
MAX_SEED = 2**63               # numpy's generator takes any; BSON and JSON peers take int64
MIN_SESSION_TIMEOUT_S = 3.0    # three consumer heartbeats (one a second)
MIN_STALL_TIMEOUT_S = 1.0


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (TOML), apply dotted ``overrides`` that are not None, and check it all."""
    raw, where = read_config(path, overrides)
    return parse_config(raw, where)


def load_source(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None):
    """Only the [source] table, for commands that need no fields (``mongofeed load``)."""
    raw, where = read_config(path, overrides)
    source = raw.get("source", {})
    return SourceConfig(**checked_table(source, "source", SCHEMA["source"], where))


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

    source = SourceConfig(**checked_table(table("source"), "source", SCHEMA["source"], where))
    check_source(source, where)
    batch = BatchConfig(**checked_table(table("batch"), "batch", SCHEMA["batch"], where))
    if batch.size < 1:
        raise ConfigError(f"{where}: batch.size must be at least 1, not {batch.size}")
    if not 0 <= batch.seed < MAX_SEED:
        raise ConfigError(f"{where}: batch.seed must be from 0 to 2**63 - 1, not {batch.seed}")
    if batch.window_bytes < 1:
        raise ConfigError(f"{where}: batch.window_bytes must be positive")

    feeds = {name: parse_feed(name, body, source, where)
             for name, body in entries(table("feeds"), "feeds", where)}
    if not feeds:
        feeds = {"train": FeedConfig(name="train", filter={}, shuffle=True)}

    fields = {
        name: parse_field(name, checked_table(body, f"fields.{name}", SCHEMA["fields.*"], where),
                          where)
        for name, body in entries(table("fields"), "fields", where)
    }
    transform = parse_transform(
        checked_table(table("transform"), "transform", SCHEMA["transform"], where), where)
    arrays = parse_arrays(table("arrays"), fields, transform, where)
    if batch_nbytes(batch.size, arrays) > MAX_BATCH_BYTES:
        raise ConfigError(f"{where}: batch.size {batch.size} makes batches of "
                          f"{batch_nbytes(batch.size, arrays)} bytes, more than "
                          f"{MAX_BATCH_BYTES} (1 GiB): lower batch.size")

    out = checked_table(table("output"), "output", SCHEMA["output"], where)
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

    serve = checked_table(table("serve"), "serve", SCHEMA["serve"], where)
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
    if not 0 <= serve["max_held_batches"] <= MAX_PENDING:
        raise ConfigError(f"{where}: serve.max_held_batches must be from 0 to {MAX_PENDING}, "
                          f"not {serve['max_held_batches']}")
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


def _array_list(names: list, key: str, arrays: dict, where: str) -> tuple[str, ...]:
    if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"{where}: {key} must list array names, each once, not {names!r}")
    for name in names:
        if name not in arrays:
            raise ConfigError(f"{where}: {key} names {name!r}, which is not an array of the "
                              f"batch (known: {', '.join(arrays)})")
    return tuple(names)
