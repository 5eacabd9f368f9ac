"""Batches (step 3 of the protocol): the binary header, the arrays' frames, errors, and the
``Schema`` of a hello reply that every received batch is checked against before
``np.frombuffer``."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import ProtocolError
from .arrays import ArraySpec, Conversion, convert
from .checks import PROTOCOL_VERSION, _bytes_of, decode_json, encode_json

MAX_HEADER_BYTES = 64 * 1024
FRAME_MAX_BYTES = 16 * 2**20  # an array larger than this travels in several frames


def frame_sizes(nbytes: int) -> list[int]:
    """The frames an array of ``nbytes`` travels in: none larger than ``FRAME_MAX_BYTES``,
    so that no receive buffer crosses glibc's 32 MiB mmap threshold (a fresh mapping, and a
    page fault per 4 KiB, for every message)."""
    full, rest = divmod(nbytes, FRAME_MAX_BYTES)
    return [FRAME_MAX_BYTES] * full + ([rest] if rest or not full else [])


def array_frames(array: np.ndarray) -> list:
    """``array``'s bytes as frames (views, no copy), as ``frame_sizes`` cuts them."""
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    frames, start = [], 0
    for size in frame_sizes(len(data)):
        frames.append(data[start:start + size])
        start += size
    return frames


BATCH_MAGIC = b"mfb" + bytes([PROTOCOL_VERSION])
BATCH_HEADER = struct.Struct("<4sQQIqI")  # magic, epoch, index, count, slab (-1: none), dims
DIM = struct.Struct("<I")


class BatchHeader(NamedTuple):
    """Frame 0 of a batch: 36 bytes (``BATCH_HEADER``), then 4 per variable length. The
    arrays' names, dtypes and shapes are the announced schema's, so per batch only the
    sample count and the lengths of the variable dimensions (``dims``, in schema order)
    travel, in a fixed binary layout that costs the consumer no parsing. ``slab`` is set
    when the arrays lie in the session's shared memory instead of the frames that follow.
    (A named tuple: the consumer makes one per batch.)"""

    epoch: int
    index: int
    count: int
    dims: tuple[int, ...] = ()
    slab: int | None = None

    def pack(self) -> bytes:
        head = BATCH_HEADER.pack(BATCH_MAGIC, self.epoch, self.index, self.count,
                                 -1 if self.slab is None else self.slab, len(self.dims))
        return head + b"".join(DIM.pack(d) for d in self.dims)

    @classmethod
    def of(cls, epoch: int, index: int, arrays: list[np.ndarray], specs) -> BatchHeader:
        """The header of a batch of ``arrays`` (in the order of ``specs``, the announced
        ``ArraySpec``s)."""
        dims = tuple(array.shape[1 + d] for array, spec in zip(arrays, specs, strict=True)
                     for d, want in enumerate(spec.shape) if want is None)
        return cls(epoch, index, len(arrays[0]) if arrays else 0, dims)

    @classmethod
    def unpack(cls, data: bytes) -> BatchHeader:
        """A header whose magic was checked: every length and number checked here."""
        if len(data) < BATCH_HEADER.size:
            raise ProtocolError(f"batch header of {len(data)} bytes, expected at least "
                                f"{BATCH_HEADER.size}")
        _, epoch, index, count, slab, ndims = BATCH_HEADER.unpack_from(data)
        if len(data) != BATCH_HEADER.size + ndims * DIM.size:
            raise ProtocolError(f"batch header of {len(data)} bytes for {ndims} lengths")
        if not (epoch < 2**40 and index < 2**40 and slab >= -1):
            raise ProtocolError("batch header numbers out of range")
        dims = tuple(d for (d,) in DIM.iter_unpack(data[BATCH_HEADER.size:])) if ndims else ()
        return cls(epoch, index, count, dims, None if slab < 0 else slab)


def pack_batch(epoch: int, index: int, arrays: dict[str, np.ndarray], specs) -> list:
    """Header and array frames for one batch (arrays in the order of ``specs``); the arrays
    travel without a copy, large ones in several frames."""
    values = list(arrays.values())
    frames = [BatchHeader.of(epoch, index, values, specs).pack()]
    for array in values:
        frames += array_frames(array)
    return frames


def pack_error(message: str) -> list:
    return [encode_json({"v": PROTOCOL_VERSION, "kind": "error", "message": message})]


@dataclass(frozen=True)
class Placement:
    """One array of one batch: its name, dtype, shape (samples first) and bytes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Schema:
    """What the daemon announced in its hello reply; every batch is checked against it."""

    feed: str
    batch_size: int
    arrays: tuple[ArraySpec, ...]  # as on the wire
    conversions: tuple[Conversion, ...] = ()
    _placements: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def delivered(self) -> tuple[ArraySpec, ...]:
        """The arrays as the consumer hands them on, after its conversions."""
        dtypes = {c.name: c.dtype for c in self.conversions}
        return tuple(ArraySpec(s.name, dtypes.get(s.name, s.dtype), s.shape, s.max_shape)
                     for s in self.arrays)

    def placements(self, header: BatchHeader) -> list[Placement]:
        """The arrays of a batch with ``header``, after checking its count and variable
        lengths against the schema; computed once per distinct (count, lengths)."""
        key = (header.count, header.dims)
        placements = self._placements.get(key)
        if placements is None:
            placements = self._place(*key)
            if len(self._placements) < PLACEMENTS_KEPT:
                self._placements[key] = placements
        return placements

    def _place(self, count: int, dims: tuple[int, ...]) -> list[Placement]:
        if count > self.batch_size:  # 0 when on_error = "skip" dropped a whole batch
            raise ProtocolError(f"batch of {count} samples, expected at most {self.batch_size}")
        variable = sum(spec.shape.count(None) for spec in self.arrays)
        if len(dims) != variable:
            raise ProtocolError(f"batch header gives {len(dims)} variable lengths, "
                                f"{'fewer' if len(dims) < variable else 'more'} than the "
                                f"{variable} of the schema")
        lengths = list(reversed(dims))
        placements = []
        for spec in self.arrays:
            bounds = spec.max_shape or spec.shape
            shape = tuple(lengths.pop() if want is None else want for want in spec.shape)
            if any(d > bound for d, bound in zip(shape, bounds, strict=True)):
                raise ProtocolError(f"array {spec.name!r}: shape {shape} exceeds the "
                                    f"announced {bounds}")
            dtype = np.dtype(spec.dtype)
            placements.append(Placement(spec.name, dtype, (count, *shape),
                                        count * math.prod(shape) * dtype.itemsize))
        return placements

    def convert(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for c in self.conversions:
            arrays[c.name] = convert(arrays[c.name], c.dtype, c.scale)
        return arrays


PLACEMENTS_KEPT = 1024  # distinct (count, lengths) per session whose placements are kept


def unpack_header(frame) -> BatchHeader | str:
    """Frame 0 of a batch message: its checked header, or the message of an error (JSON)."""
    data = _bytes_of(frame)
    if data[:4] == BATCH_MAGIC:
        return BatchHeader.unpack(data)
    if data[:3] == BATCH_MAGIC[:3] and len(data) > 3:
        raise ProtocolError(f"protocol version {data[3]}, expected {PROTOCOL_VERSION}")
    head = decode_json(data, MAX_HEADER_BYTES, "batch header")
    if head.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head.get('v')!r}, expected {PROTOCOL_VERSION}")
    if head.get("kind") != "error":
        raise ProtocolError(f"unknown message kind {head.get('kind')!r:.50}")
    if not isinstance(head.get("message"), str):
        raise ProtocolError("malformed error message")
    return head["message"]


def unpack_frames(header: BatchHeader, frames: list, schema: Schema,
                  buffer_for=None) -> dict[str, np.ndarray]:
    """The arrays of a batch whose bytes came as ``frames`` (all but the header), each length
    checked before ``np.frombuffer``: views of the frames, or, for an array cut into several
    frames, joined into ``buffer_for(nbytes)`` (a writable buffer; a new one by default)."""
    if header.slab is not None:
        raise ProtocolError("a batch in shared memory on a session without it")
    placements = schema.placements(header)
    counts = [len(frame_sizes(p.nbytes)) for p in placements]
    if len(frames) != sum(counts):
        raise ProtocolError(f"{len(frames)} array frames, expected {sum(counts)}")
    arrays, start = {}, 0
    for place, count in zip(placements, counts, strict=True):
        parts = [f.buffer if hasattr(f, "buffer") else memoryview(f)
                 for f in frames[start:start + count]]
        start += count
        for part, size in zip(parts, frame_sizes(place.nbytes), strict=True):
            if part.nbytes != size:
                raise ProtocolError(f"array {place.name!r}: a frame of {part.nbytes} bytes, "
                                    f"expected {size} ({place.dtype} {place.shape})")
        if count == 1:
            data = parts[0]
        else:
            data = (buffer_for or bytearray)(place.nbytes)
            target, offset = memoryview(data).cast("B"), 0
            for part in parts:
                target[offset:offset + part.nbytes] = part.cast("B")
                offset += part.nbytes
        arrays[place.name] = np.frombuffer(data, place.dtype, math.prod(place.shape)
                                           ).reshape(place.shape)
    return schema.convert(arrays)


def unpack_batch(frames: list, schema: Schema) -> tuple[BatchHeader | str, dict]:
    """A whole batch message checked against ``schema``: (header, arrays), the arrays after
    the announced conversions; for an error message (its text, {})."""
    if not frames:
        raise ProtocolError("empty message")
    header = unpack_header(frames[0])
    if isinstance(header, str):
        if len(frames) != 1:
            raise ProtocolError("malformed error message")
        return header, {}
    return header, unpack_frames(header, frames[1:], schema)
