"""Every message on mongofeed's sockets, as pack/unpack pairs, and the checks a receiver
makes before trusting one.

::

  public (tcp or ipc; CurveZMQ off loopback)
    consumer DEALER ──hello / heartbeat / status / bye──▶ control ROUTER
                    ◀──reply──────────────────────────────
    consumer DEALER ──credit (and slab releases)──▶ data ROUTER
                    ◀──[header, array...] or [header naming a slab]──

  internal (serve.internal_transport: ipc:// in the daemon's private folder by default;
            loopback tcp on random ports with "tcp", or where ZeroMQ has no ipc)
    supervisor ROUTER ──task / warm / stop──▶ worker DEALER
                      ◀──ready / event──
    worker PUSH ──[meta, header] (arrays in a slab) or [meta, header, array...]──▶ sink PULL

Public messages (what a consumer, or a stranger, can send or receive):

1. control request/reply: one frame, a JSON object, at most ``MAX_CONTROL_BYTES``:
   ``{"op": "hello", "protocol", "feed", "start_epoch", "shard": [r, R], "start_offset",
   "skip": [g, ...], "shared_memory"}`` opens a session (from global batch ``start_offset``
   of its first epoch, without the global batches in ``skip``: a resume); its reply says
   where the session starts (``"start_epoch"``, ``"start_offset"``, ``"skip"``,
   ``"start_batches"``: the first epoch's batch numbers, skipped ones included), names the
   session (``"session"``, public) and gives its secret ``"token"``, which only the peer
   that said hello knows: it is the identity of that consumer's data socket and what
   ``{"op": "bye", "token"}`` and ``{"op": "heartbeat", "token"}`` (every second) need.
   With ``"shared_memory": true`` the reply names the session's region
   (``SharedMemoryOffer``). ``{"op": "status"}`` never shows a token. Replies carry ``"ok"``
   and, when false, ``"error"``.
2. credit: one frame, ``{"credit": n, "release": [slab...], "attached": bool}`` (``Credit``),
   on the data socket whose identity is the session's token; the consumer grants the daemon
   n more batches, within a window: the daemon keeps at most ``credit_window`` (from the
   hello reply) granted and unsent, and drops the rest. ``release`` gives back shared-memory
   slabs the consumer no longer reads; ``attached`` (first message only) says whether it
   mapped the region.
3. batch: frame 0 is the header (``BatchHeader``): 36 bytes, epoch, index, sample count,
   slab (or none) and the lengths of the variable dimensions; the arrays' names, dtypes and
   shapes are the hello reply's. Then either nothing (the arrays lie in that slab of the
   session's shared memory) or the arrays' raw C-order bytes, one frame per array, cut into
   frames of at most ``FRAME_MAX_BYTES``. An error is one JSON frame ``{"v", "kind":
   "error", "message"}``. A hello reply may announce a dimension as null (padded per batch,
   up to a fourth element, the bound) and ``convert``: the casts the consumer applies on
   receipt.

Internal messages (supervisor, workers and sink; the peers are our own processes, but every
frame is still checked, so a bug shows as a counted rejection, not a crash):

4. task (supervisor → worker): ``[b"task", BSON {task, feed, epoch, index, ids, attempt,
   region, slab}]`` (a feed of several sources: ``parts``, each source's ids and their places
   in the batch, in place of ``ids``); ``[b"warm", ...]`` reads a window ahead; ``[b"stop"]``
   asks the worker to exit.
5. ready / event (worker → supervisor): ``[b"ready", {slot, pid}]`` once the worker's client
   and sockets exist; ``[b"event", {slot, waiting, error}]`` when it starts or stops waiting
   for the database.
6. batch (worker → sink): ``[meta, header]`` when the arrays were written into the task's
   slab, else ``[meta, header, array...]``: ``meta`` (JSON) names the task and its attempt
   and carries the worker's counts or an ``error``; the rest goes on to the consumer.

Nothing received is ever unpickled: headers are a fixed binary layout or JSON, arrays are
raw bytes of plain numeric dtypes, and every length is checked against dtype x shape before
``np.frombuffer``. Every message from outside is parsed here, once, into a checked value
(``HelloRequest``, ``ByeRequest``, ``HeartbeatRequest``, ``StatusRequest``, ``Credit``,
``BatchHeader``) or a ``ProtocolError`` that says why: JSON nested deeper than
``MAX_JSON_DEPTH``, numbers longer than ``MAX_NUMBER_CHARS`` or not finite, and every wrong
type are refused before any handler sees them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import bson
import numpy as np
from bson.codec_options import CodecOptions, DatetimeConversion

from ..errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 4           # 2: the hello reply's secret token is the data identity;
                               # 3: the hello's start offset and skipped batches (a resume);
                               # 4: binary batch headers, shared memory, frames cut at 16 MiB
MAX_CONTROL_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32            # our messages nest at most 6 deep (the status reply)
MAX_NUMBER_CHARS = 40          # a JSON number's text; ours are counts, sizes and seconds
MAX_CREDIT = 1_000_000         # per credit message; the daemon caps a session's total lower
MAX_NAME_CHARS = 256           # a feed name in a hello
MAX_SHARD_WORLD = 2**20
MAX_SKIP = 2048                # batches a resumed session skips: an unordered feed's extras
TOKEN_CHARS = 32               # a session token: 128 random bits as hex
ALLOWED_DTYPES = frozenset((
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
))


@dataclass(frozen=True)
class ArraySpec:
    """Name, dtype and per-sample shape of one array of every batch of a feed.

    In a hello reply a dimension may be None: its length varies from batch to batch (padded
    per batch), up to ``max_shape``, which is then announced too. A batch header always
    names the lengths of that batch.
    """

    name: str
    dtype: str
    shape: tuple
    max_shape: tuple[int, ...] | None = None

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample (at most, for a variable shape)."""
        return math.prod(self.max_shape or self.shape) * np.dtype(self.dtype).itemsize

    def accepts(self, header: ArraySpec) -> bool:
        """Whether a batch header's concrete ``header`` fits this announced spec."""
        if (header.name, header.dtype) != (self.name, self.dtype) or header.max_shape:
            return False
        bounds = self.max_shape or self.shape
        return len(header.shape) == len(self.shape) and all(
            d == want or (want is None and d <= bound)
            for d, want, bound in zip(header.shape, self.shape, bounds, strict=True))

    def to_json(self) -> list:
        value = [self.name, self.dtype, list(self.shape)]
        return value + [list(self.max_shape)] if self.max_shape else value

    @classmethod
    def from_json(cls, value) -> ArraySpec:
        if not (isinstance(value, list) and len(value) in (3, 4)):
            raise ProtocolError(f"array spec must be [name, dtype, shape], got {value!r:.100}")
        name, dtype, shape, *max_shape = value
        if not isinstance(name, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"bad array name or dtype: {value!r:.100}")
        if not max_shape:
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
                raise ProtocolError(f"bad array shape: {shape!r:.100}")
            return cls(name, dtype, tuple(shape))
        bounds = max_shape[0]
        if not (isinstance(shape, list) and isinstance(bounds, list)
                and len(bounds) == len(shape) and None in shape
                and all(_is_count(b) and (d is None or (_is_count(d) and d == b))
                        for d, b in zip(shape, bounds, strict=True))):
            raise ProtocolError(f"bad variable array shape: {shape!r:.100}, {bounds!r:.100}")
        return cls(name, dtype, tuple(shape), tuple(bounds))


@dataclass(frozen=True)
class Conversion:
    """A cast (and scale) that the consumer applies to one array on receipt, announced in the
    hello reply, so that the wire carries the smaller stored dtype (uint8 images)."""

    name: str
    dtype: str
    scale: float | None = None

    def to_json(self) -> list:
        return [self.name, self.dtype, self.scale]

    @classmethod
    def from_json(cls, value) -> Conversion:
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
                and value[1] in ALLOWED_DTYPES
                and (value[2] is None or (isinstance(value[2], (int, float))
                                          and not isinstance(value[2], bool)
                                          and math.isfinite(value[2])))):
            raise ProtocolError(f"conversion must be [name, dtype, scale], got {value!r:.100}")
        return cls(*value)


def convert(array: np.ndarray, dtype: str, scale: float | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
    """``array`` cast to ``dtype``, then multiplied by ``scale``: in one pass (uint8 images to
    float32 without a float32 temporary); the daemon and the consumer share this rule, so a
    batch is the same bytes wherever it is converted. With ``out`` (a worker's slab), the
    result is written there, even when nothing is to convert."""
    if scale is not None:
        return np.multiply(array, scale, dtype=dtype, casting="unsafe", out=out)
    if out is not None:
        np.copyto(out, array, casting="unsafe")
        return out
    return array if array.dtype == np.dtype(dtype) else array.astype(dtype)


def _is_count(value) -> bool:
    """A non-negative integer that every part of the pipeline can hold (numpy, BSON, JSON):
    epochs, batch indices, sample counts, credit."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40


def encode_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(frame, limit: int, what: str) -> dict:
    """Parse one frame as a JSON object; anything else, and anything ``json`` would choke on
    (too long, nested too deep, a number of thousands of digits, NaN), is a ProtocolError."""
    data = _bytes_of(frame)
    if len(data) > limit:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds the limit of {limit}")
    depth = _json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError(f"{what} nests {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        value = json.loads(data.decode(), parse_int=_parse_int, parse_float=_parse_float,
                           parse_constant=_refuse_constant)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever json raises, the peer sent garbage
        raise ProtocolError(f"{what} is not JSON: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_BRACKET_STEP = np.zeros(256, np.int32)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def _json_depth(data: bytes) -> int:
    """How deep the brackets of a JSON text nest, outside its strings; linear time, so a
    peer cannot make the check itself slow (escapes go first, then whole strings)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    bare = _STRING.sub(b"", _ESCAPE.sub(b"", data))
    steps = _BRACKET_STEP[np.frombuffer(bare, np.uint8)]
    return int(np.cumsum(steps).max(initial=0))


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ProtocolError(f"a number of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:20]}... is too long or not finite")
    return value


def _refuse_constant(text: str):
    raise ProtocolError(f"{text} is not a number JSON allows")


# -- endpoints -----------------------------------------------------------------------------

def check_endpoint(endpoint: str, key: str, where: str = "<option>") -> str:
    """A ZeroMQ endpoint we can bind and connect: tcp://HOST:PORT or ipc://PATH."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"{where}: {key} must be a string endpoint")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or not 0 < port < 65535:
        raise ConfigError(f"{where}: {key} = {endpoint!r} is not an endpoint like "
                          f"tcp://127.0.0.1:5555 or ipc:///tmp/mongofeed.sock")
    return endpoint


def next_port(endpoint: str) -> str:
    """The default control endpoint: the same host, port + 1 (ipc: a sibling path)."""
    if endpoint.startswith("ipc://"):
        return endpoint + ".control"
    parts = urlsplit(endpoint)
    host = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port + 1}"


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint, None for ipc://."""
    return urlsplit(endpoint).hostname if endpoint.startswith("tcp://") else None



# -- batches -------------------------------------------------------------------------------

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


# -- consumer -> daemon ----------------------------------------------------------------------

@dataclass(frozen=True)
class Credit:
    """A consumer's message on the data socket: ``credit`` more batches it may be sent (0: a
    heartbeat); the shared-memory slabs it no longer reads (``release``); and, in its first
    message of a session offered shared memory, whether it could map it (``attached``)."""

    credit: int
    release: tuple[int, ...] = ()
    attached: bool | None = None

    def pack(self) -> bytes:
        body = {"credit": self.credit}
        if self.release:
            body["release"] = list(self.release)
        if self.attached is not None:
            body["attached"] = self.attached
        return encode_json(body)


MAX_RELEASES = 4096  # slabs one credit message may release


def pack_credit(credit: int) -> bytes:
    return Credit(credit).pack()


def unpack_credit(frames: list) -> Credit:
    if len(frames) != 1:
        raise ProtocolError(f"credit message of {len(frames)} frames, expected 1")
    body = decode_json(frames[0], MAX_CONTROL_BYTES, "credit")
    credit, release, attached = body.get("credit"), body.get("release", []), body.get("attached")
    if not _is_count(credit) or credit > MAX_CREDIT:
        raise ProtocolError(f"credit must be an integer from 0 to {MAX_CREDIT}, got "
                            f"{credit!r:.50}")
    if not (isinstance(release, list) and len(release) <= MAX_RELEASES
            and all(_is_count(slab) for slab in release)):
        raise ProtocolError(f"release must be a list of slab numbers, got {release!r:.50}")
    if attached is not None and not isinstance(attached, bool):
        raise ProtocolError(f"attached must be true or false, got {attached!r:.50}")
    return Credit(credit, tuple(release), attached)


@dataclass(frozen=True)
class HelloRequest:
    """Open a session: its own stream of ``feed`` from epoch ``start_epoch``, part
    ``shard[0]`` of ``shard[1]`` of every epoch. A resume starts after the first
    ``start_offset`` global batches of ``start_epoch`` (which the job consumed) and leaves
    out the global batches in ``skip`` (which this rank took out of order).
    ``shared_memory``: the consumer offers to map the session's shared memory (it may be on
    the daemon's host)."""

    feed: str
    start_epoch: int = 0
    shard: tuple[int, int] = (0, 1)
    start_offset: int = 0
    skip: tuple[int, ...] = ()
    shared_memory: bool = False

    def pack(self) -> bytes:
        return encode_json({"op": "hello", "protocol": PROTOCOL_VERSION, "feed": self.feed,
                            "start_epoch": self.start_epoch, "shard": list(self.shard),
                            "start_offset": self.start_offset, "skip": list(self.skip),
                            "shared_memory": self.shared_memory})

    @classmethod
    def from_json(cls, body: dict) -> HelloRequest:
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            raise ProtocolError(f"consumer speaks protocol {protocol!r:.20}, the daemon speaks "
                                f"{PROTOCOL_VERSION}: upgrade one of them")
        feed = body.get("feed")
        if not (isinstance(feed, str) and 0 < len(feed) <= MAX_NAME_CHARS):
            raise ProtocolError(f"hello needs a feed name (a string of 1 to {MAX_NAME_CHARS} "
                                f"characters), got {feed!r:.60}")
        start_epoch, start_offset = body.get("start_epoch", 0), body.get("start_offset", 0)
        for name, value in (("start_epoch", start_epoch), ("start_offset", start_offset)):
            if not _is_count(value):
                raise ProtocolError(f"{name} must be an integer from 0 to {2**40 - 1}, got "
                                    f"{value!r:.60}")
        shard = body.get("shard", [0, 1])
        if not (isinstance(shard, list) and len(shard) == 2 and all(map(_is_count, shard))
                and shard[0] < shard[1] <= MAX_SHARD_WORLD):
            raise ProtocolError(f"shard must be [r, R] with 0 <= r < R <= {MAX_SHARD_WORLD}, "
                                f"got {shard!r:.60}")
        skip = body.get("skip", [])
        if not (isinstance(skip, list) and len(skip) <= MAX_SKIP and all(map(_is_count, skip))
                and len(set(skip)) == len(skip)):
            raise ProtocolError(f"skip must be a list of at most {MAX_SKIP} distinct global "
                                f"batch numbers, got {skip!r:.60}")
        shared_memory = body.get("shared_memory", False)
        if not isinstance(shared_memory, bool):
            raise ProtocolError(f"shared_memory must be true or false, got "
                                f"{shared_memory!r:.20}")
        return cls(feed, start_epoch, (shard[0], shard[1]), start_offset, tuple(sorted(skip)),
                   shared_memory)


@dataclass(frozen=True)
class ByeRequest:
    """End the session whose secret token this is (only its owner knows it)."""

    token: str

    def pack(self) -> bytes:
        return encode_json({"op": "bye", "token": self.token})

    @classmethod
    def from_json(cls, body: dict) -> ByeRequest:
        return cls(_token(body, "bye"))


@dataclass(frozen=True)
class HeartbeatRequest:
    """The consumer of the session whose token this is is alive (sent every second, also
    while it takes no batch)."""

    token: str

    def pack(self) -> bytes:
        return encode_json({"op": "heartbeat", "token": self.token})

    @classmethod
    def from_json(cls, body: dict) -> HeartbeatRequest:
        return cls(_token(body, "heartbeat"))


def _token(body: dict, op: str) -> str:
    token = body.get("token")
    if not (isinstance(token, str) and len(token) == TOKEN_CHARS):
        raise ProtocolError(f"{op} needs the session's token ({TOKEN_CHARS} characters), "
                            f"as the hello reply gave it")
    return token


@dataclass(frozen=True)
class StatusRequest:
    """What ``mongofeed status`` shows."""

    def pack(self) -> bytes:
        return encode_json({"op": "status"})

    @classmethod
    def from_json(cls, body: dict) -> StatusRequest:
        return cls()


ControlRequest = HelloRequest | ByeRequest | HeartbeatRequest | StatusRequest
_REQUESTS = {"hello": HelloRequest, "bye": ByeRequest, "heartbeat": HeartbeatRequest,
             "status": StatusRequest}


def unpack_request(frames: list) -> ControlRequest:
    """A control request, checked field by field; keys it does not know are ignored."""
    if len(frames) != 1:
        raise ProtocolError(f"control request of {len(frames)} frames, expected 1")
    body = decode_json(frames[0], MAX_CONTROL_BYTES, "control request")
    op = body.get("op")
    kind = _REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"unknown op {op!r:.40}; known: {', '.join(_REQUESTS)}")
    return kind.from_json(body)


def hello_schema(reply: dict) -> Schema:
    """The schema a hello reply announces, checked like any other message from a peer."""
    if reply.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"daemon speaks protocol {reply.get('protocol')!r}, this "
                            f"mongofeed speaks {PROTOCOL_VERSION}: upgrade one of them")
    size = reply.get("batch_size")
    if not _is_count(size) or size < 1 or not isinstance(reply.get("feed"), str):
        raise ProtocolError("hello reply lacks feed or batch_size")
    token = reply.get("token")
    if not (isinstance(token, str) and len(token) == TOKEN_CHARS and token.isascii()):
        raise ProtocolError("hello reply lacks the session's token")
    specs = reply.get("arrays")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("hello reply lacks arrays")
    arrays = tuple(ArraySpec.from_json(s) for s in specs)
    conversions = reply.get("convert", [])
    if not isinstance(conversions, list):
        raise ProtocolError("hello reply's convert must be a list")
    conversions = tuple(Conversion.from_json(c) for c in conversions)
    if not {c.name for c in conversions} <= {a.name for a in arrays}:
        raise ProtocolError("hello reply converts an array it does not announce")
    return Schema(reply["feed"], size, arrays, conversions)


@dataclass(frozen=True)
class SharedMemoryOffer:
    """A hello reply's ``shared_memory``: the session's region file on the daemon's host
    (``region``), which a consumer on that host maps instead of receiving the arrays."""

    path: str
    nonce: bytes
    slabs: int
    slab_bytes: int

    def to_json(self) -> dict:
        return {"path": self.path, "nonce": self.nonce.hex(), "slabs": self.slabs,
                "slab_bytes": self.slab_bytes}

    @classmethod
    def from_reply(cls, reply: dict) -> SharedMemoryOffer | None:
        offer = reply.get("shared_memory")
        if offer is None:
            return None
        try:
            made = cls(offer["path"], bytes.fromhex(offer["nonce"]), offer["slabs"],
                       offer["slab_bytes"])
        except (TypeError, KeyError, ValueError):
            raise ProtocolError(f"malformed shared_memory in the hello reply: "
                                f"{offer!r:.200}") from None
        if not (isinstance(made.path, str) and _is_count(made.slabs) and made.slabs > 0
                and _is_count(made.slab_bytes) and made.slab_bytes > 0):
            raise ProtocolError(f"malformed shared_memory in the hello reply: {offer!r:.200}")
        return made


@dataclass(frozen=True)
class SessionStart:
    """Where a hello reply says the session's stream begins: epoch ``epoch`` after its first
    ``offset`` global batches, with the session's batch numbers ``skip`` of that epoch left
    out; that epoch numbers ``first_batches`` batches (skipped ones included), every later
    one ``batches_per_epoch``. ``shard`` is the session's share (the daemon's times the
    consumer's): its batch j of an epoch is global batch ``offset + rank + world * j``."""

    epoch: int
    offset: int
    first_batches: int
    skip: frozenset[int]
    batches_per_epoch: int
    shard: tuple[int, int]

    @classmethod
    def from_reply(cls, reply: dict) -> SessionStart:
        values = [reply.get(key) for key in ("start_epoch", "start_offset", "start_batches",
                                             "batches_per_epoch")]
        shard, skip = reply.get("shard"), reply.get("skip")
        if not (all(map(_is_count, values)) and isinstance(shard, list) and len(shard) == 2
                and all(map(_is_count, shard)) and shard[0] < shard[1]
                and isinstance(skip, list) and all(map(_is_count, skip))):
            raise ProtocolError("hello reply lacks where the session starts (start_epoch, "
                                "start_offset, start_batches, skip, batches_per_epoch, shard)")
        epoch, offset, first, size = values
        numbers = set()
        for g in skip:
            j, rest = divmod(g - offset - shard[0], shard[1])
            if rest or not 0 <= j < first:
                raise ProtocolError(f"hello reply skips global batch {g}, which is not its "
                                    f"shard's")
            numbers.add(j)
        if len(numbers) >= first or size < 1:
            raise ProtocolError("hello reply announces a session without batches")
        return cls(epoch, offset, first, frozenset(numbers), size, (shard[0], shard[1]))

# -- internal: supervisor <-> workers -> sink ------------------------------------------------

TASK, STOP, READY, EVENT, WARM = b"task", b"stop", b"ready", b"event", b"warm"
# How mongofeed decodes BSON everywhere (documents, ids in tasks, the plan cache): a date
# beyond Python's datetime range stays a DatetimeMS instead of failing the whole document.
BSON_OPTIONS = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)


@dataclass(frozen=True)
class SourceIds:
    """One source's documents in a batch of a feed of several sources: the source's name,
    its ``_id``s (a list, or the planner's compact rows) and their places in the batch (in
    the order of ``ids``)."""

    source: str
    ids: list
    at: list

    def to_wire(self) -> dict:
        return {"source": self.source, **_ids_to_wire(self.ids),
                "at": np.asarray(self.at, "<i4").tobytes()}

    @classmethod
    def from_wire(cls, body) -> SourceIds:
        if not (isinstance(body, dict) and isinstance(body.get("source"), str)
                and isinstance(body.get("at"), bytes) and not len(body["at"]) % 4):
            raise ProtocolError("malformed task parts")
        return cls(body["source"], _ids_from_wire(body), np.frombuffer(body["at"], "<i4").tolist())


@dataclass(frozen=True)
class TaskMessage:
    """One batch to make: the ``_id``s of batch ``index`` of ``epoch`` of ``feed`` (a list,
    or the planner's compact rows, a numpy array sent as bytes and received as a list); for
    a feed of several sources, ``parts`` (``SourceIds``) and no ids; or, in the windowed
    order, its ``window`` (the read spec: the window's ``_id`` ranges and the batch's slice
    of it, ``planner.BatchWindow.to_wire``) and no ids; its ``attempt`` (1 + the times it
    was re-issued) and, when the session has shared memory, the region file and the slab to
    write it into."""

    task: int
    feed: str
    epoch: int
    index: int
    ids: list
    window: dict | None = None
    parts: tuple[SourceIds, ...] | None = None
    attempt: int = 1
    region: str | None = None
    slab: int | None = None

    def pack(self) -> list:
        body = {"task": self.task, "feed": self.feed, "epoch": self.epoch, "index": self.index,
                "attempt": self.attempt, **_ids_to_wire(self.ids)}
        if self.window is not None:
            body["window"] = self.window
        if self.parts is not None:
            body["parts"] = [part.to_wire() for part in self.parts]
        if self.region is not None:
            body.update(region=self.region, slab=self.slab)
        return [TASK, bson.encode(body)]


ROW_KINDS = {"S": "objectid", "i": "int64"}  # numpy dtype kinds of compact id rows


def _ids_to_wire(ids) -> dict:
    """``{"ids": list}``, or the planner's compact rows as bytes (``{"ids": [], "rows"}``)."""
    if isinstance(ids, np.ndarray):
        return {"ids": [], "rows": {"kind": ROW_KINDS[ids.dtype.kind], "bytes": ids.tobytes()}}
    return {"ids": ids}


def _ids_from_wire(body: dict) -> list:
    ids = body.get("ids") if "rows" not in body else _rows_to_ids(body["rows"])
    if not isinstance(ids, list):
        raise ProtocolError("malformed task ids")
    return ids


def _parts_from_wire(parts) -> tuple[SourceIds, ...] | None:
    """A task's parts, checked: as many places as ids in each, and together every place of
    the batch once."""
    if parts is None:
        return None
    if not isinstance(parts, list) or not parts:
        raise ProtocolError("malformed task parts")
    parts = tuple(SourceIds.from_wire(part) for part in parts)
    places = sorted(i for part in parts for i in part.at)
    if any(len(part.ids) != len(part.at) for part in parts) or places != list(
            range(len(places))):
        raise ProtocolError("malformed task parts")
    return parts


def _rows_to_ids(rows) -> list:
    """A task's compact rows as ``_id`` values: ObjectIds of 12 bytes each, or int64s."""
    if not (isinstance(rows, dict) and rows.get("kind") in ("objectid", "int64")
            and isinstance(rows.get("bytes"), bytes)):
        raise ProtocolError("malformed task ids")
    data = rows["bytes"]
    if rows["kind"] == "objectid":
        if len(data) % 12:
            raise ProtocolError("malformed task ids")
        return [bson.ObjectId(data[i:i + 12]) for i in range(0, len(data), 12)]
    if len(data) % 8:
        raise ProtocolError("malformed task ids")
    return np.frombuffer(data, "<i8").tolist()


@dataclass(frozen=True)
class WarmMessage:
    """Read ``window`` (``planner.BatchWindow.to_wire``) of ``epoch`` of ``feed`` ahead of its
    tasks, into the worker's memory: the next window of the windowed order is read while the
    current one's batches are made. No batch comes back."""

    feed: str
    epoch: int
    window: dict

    def pack(self) -> list:
        return [WARM, bson.encode({"feed": self.feed, "epoch": self.epoch,
                                   "window": self.window})]


def unpack_worker_command(frames: list) -> TaskMessage | WarmMessage | None:
    """What the supervisor asks of a worker: a task, a window to read ahead, or None for
    stop."""
    frames = [_bytes_of(f) for f in frames]
    if frames == [STOP]:
        return None
    if len(frames) != 2 or frames[0] not in (TASK, WARM):
        raise ProtocolError(f"unknown worker command {frames[:1]!r:.50}")
    try:
        body = bson.decode(frames[1], BSON_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - InvalidBSON, but also what a C decoder raises
        raise ProtocolError(f"task is not BSON: {type(exc).__name__}: {exc}"[:300]) from None
    if frames[0] == WARM:
        warm = WarmMessage(body.get("feed"), body.get("epoch"), body.get("window"))
        if not (isinstance(warm.feed, str) and _is_count(warm.epoch)
                and isinstance(warm.window, dict)):
            raise ProtocolError("malformed warm command")
        return warm
    task = TaskMessage(body.get("task"), body.get("feed"), body.get("epoch"), body.get("index"),
                       _ids_from_wire(body), body.get("window"),
                       _parts_from_wire(body.get("parts")), body.get("attempt"),
                       body.get("region"), body.get("slab"))
    if not (isinstance(task.task, int) and not isinstance(task.task, bool)
            and isinstance(task.feed, str) and _is_count(task.epoch)
            and _is_count(task.index) and isinstance(task.window, (dict, type(None)))
            and _is_count(task.attempt)
            and ((task.region, task.slab) == (None, None)
                 or (isinstance(task.region, str) and _is_count(task.slab)))):
        raise ProtocolError("malformed task")
    return task


@dataclass(frozen=True)
class WorkerEvent:
    """A worker's announcement: ready (``kind = READY``), or waiting for the database or
    done waiting (``kind = EVENT``)."""

    kind: bytes
    slot: int
    pid: int | None = None
    waiting: bool = False
    error: str | None = None

    def pack(self) -> list:
        if self.kind == READY:
            return [READY, encode_json({"slot": self.slot, "pid": self.pid})]
        return [EVENT, encode_json({"slot": self.slot, "waiting": self.waiting,
                                    "error": self.error})]

    @classmethod
    def unpack(cls, frames: list) -> WorkerEvent:
        """``frames`` as the supervisor's ROUTER receives them: [identity, kind, body]."""
        if len(frames) != 3:
            raise ProtocolError(f"worker message of {len(frames)} frames, expected 3")
        kind = _bytes_of(frames[1])
        body = decode_json(frames[2], MAX_CONTROL_BYTES, "worker event")
        slot = body.get("slot")
        if kind not in (READY, EVENT) or not _is_count(slot):
            raise ProtocolError(f"malformed worker message {kind!r:.20}")
        if kind == READY:
            return cls(READY, slot, pid=body.get("pid"))
        error = body.get("error")
        return cls(EVENT, slot, waiting=body.get("waiting") is True,
                   error=error if isinstance(error, str) else None)


@dataclass(frozen=True)
class BatchMeta:
    """Frame 0 of a worker's batch message: which task (and attempt), and what it cost, or
    why it failed; ``slab`` when its arrays are in that shared-memory slab, not frames."""

    task: int
    slot: int
    attempt: int = 1
    slab: int | None = None
    docs: int = 0
    bytes: int = 0
    skips: int = 0
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None

    def pack(self) -> bytes:
        body = {"task": self.task, "slot": self.slot, "attempt": self.attempt}
        if self.slab is not None:
            body["slab"] = self.slab
        if self.error is not None:
            body["error"] = self.error
        else:
            body.update(docs=self.docs, bytes=self.bytes, skips=self.skips,
                        skipped=list(self.skipped), seconds=self.seconds)
        return encode_json(body)

    @classmethod
    def unpack(cls, frame) -> BatchMeta:
        body = decode_json(frame, MAX_CONTROL_BYTES, "batch meta")
        task, slot, attempt = body.get("task"), body.get("slot"), body.get("attempt")
        slab = body.get("slab")
        if not (isinstance(task, int) and _is_count(slot) and _is_count(attempt)
                and (slab is None or _is_count(slab))):
            raise ProtocolError("batch meta lacks task, slot or attempt")
        if "error" in body:
            if not isinstance(body["error"], str):
                raise ProtocolError("batch meta error must be a string")
            return cls(task, slot, attempt, error=body["error"])
        counts = [body.get(key) for key in ("docs", "bytes", "skips")]
        skipped, seconds = body.get("skipped"), body.get("seconds")
        if not (all(_is_count(c) for c in counts) and isinstance(skipped, list)
                and all(isinstance(s, str) for s in skipped)
                and isinstance(seconds, (int, float))):
            raise ProtocolError("malformed batch meta")
        return cls(task, slot, attempt, slab, *counts, tuple(skipped), float(seconds))


def _bytes_of(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
