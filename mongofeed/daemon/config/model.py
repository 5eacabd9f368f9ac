"""What a checked config is: frozen dataclasses, one per table (``Config`` holds them all),
with what the daemon and the hello reply derive from them (bytes of a batch, arrays' specs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...wire import ArraySpec, Conversion
from ..planner import Shard, Weight
from .schema import TEXT_DECODERS

VARIABLE = -1  # in [arrays.NAME].shape: a dimension padded per batch
TEXT_SAMPLE_NBYTES = 1024  # a guess at a text field's size, to size the server's replies


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
    max_held_batches: int
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
        produced ahead (in production or waiting at the sink), ``max_pending`` sent but not
        yet read (credit and the data socket's queue are capped at that) and, for a consumer
        that maps its shared memory, ``max_held_batches`` it keeps as views."""
        return (2 * self.serve.max_pending + self.serve.max_held_batches) * self.batch_nbytes

    @property
    def memory_bound(self) -> int:
        """Bytes of batches the daemon holds for all its sessions together at most."""
        return self.serve.max_sessions * self.session_memory_bound


def batch_nbytes(size: int, arrays: dict[str, ArrayConfig]) -> int:
    """Bytes of one full batch over all its arrays (variable dimensions at their longest)."""
    return size * sum(a.out_nbytes for a in arrays.values())
