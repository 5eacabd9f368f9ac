"""Every message on mongofeed's sockets, as pack/unpack pairs, and the checks a receiver
makes before trusting one.

::

  public (tcp or ipc; CurveZMQ off loopback)
    consumer DEALER ──hello / status / bye──▶ control ROUTER
                    ◀──reply──────────────────
    consumer DEALER ──credit───────────────▶ data ROUTER
                    ◀──[header, array...]─────

  internal (ipc:// in the daemon's private folder; loopback tcp where ipc is missing)
    supervisor ROUTER ──task / stop──▶ worker DEALER
                      ◀──ready / event──
    worker PUSH ──[meta, header, array...]──▶ sink PULL (in the supervisor)

Public messages (what a consumer, or a stranger, can send or receive):

1. control request/reply: one frame, a JSON object, at most ``MAX_CONTROL_BYTES``:
   ``{"op": "hello", "protocol", "feed", "start_epoch", "shard": [r, R], "start_offset",
   "skip": [g, ...]}`` opens a session (from global batch ``start_offset`` of its first epoch,
   without the global batches in ``skip``: a resume); its reply says where the session
   starts (``"start_epoch"``, ``"start_offset"``, ``"skip"``, ``"start_batches"``: the first
   epoch's batch numbers, skipped ones included), names the session (``"session"``, public)
   and gives its secret ``"token"``,
   which only the peer that said hello knows: it is the identity of that consumer's data
   socket and what ``{"op": "bye", "token"}`` needs. ``{"op": "status"}`` never shows a
   token. Replies carry ``"ok"`` and, when false, ``"error"``.
2. credit: one frame, ``{"credit": n}``, on the data socket whose identity is the session's
   token; the consumer grants the daemon n more batches, within a window: the daemon keeps
   at most ``credit_window`` (from the hello reply) granted and unsent, and drops the rest,
   so a consumer grants one more per batch it receives. ``n = 0`` is a heartbeat.
3. batch: frame 0 is the header, a JSON object ``{"v", "kind": "batch", "feed", "epoch",
   "index", "count", "arrays": [[name, dtype, shape], ...]}``; then one frame per array with
   its raw C-order bytes. ``kind = "error"`` carries ``"message"`` and no array frames. A
   hello reply may announce a dimension as null (padded per batch, up to a fourth element,
   the bound) and ``convert``: the casts the consumer applies on receipt.

Internal messages (supervisor, workers and sink; the peers are our own processes, but every
frame is still checked, so a bug shows as a counted rejection, not a crash):

4. task (supervisor → worker): ``[b"task", BSON {task, feed, epoch, index, ids}]`` (a feed of
   several sources: ``parts``, each source's ids and their places in the batch, in place of
   ``ids``); ``[b"stop"]`` asks the worker to exit.
5. ready / event (worker → supervisor): ``[b"ready", {slot, pid}]`` once the worker's client
   and sockets exist; ``[b"event", {slot, waiting, error}]`` when it starts or stops waiting
   for the database.
6. batch (worker → sink): ``[meta, header, array...]``: ``meta`` (JSON) names the task and
   carries the worker's counts or an ``error``; the rest goes on to the consumer unchanged.

Nothing received is ever unpickled: headers are JSON, arrays are raw bytes of plain numeric
dtypes, and every length is checked against dtype x shape before ``np.frombuffer``. Every
message from outside is parsed here, once, into a checked value (``HelloRequest``,
``ByeRequest``, ``StatusRequest``, a credit count) or a ``ProtocolError`` that says why:
JSON nested deeper than ``MAX_JSON_DEPTH``, numbers longer than ``MAX_NUMBER_CHARS`` or not
finite, and every wrong type are refused before any handler sees them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import bson
import numpy as np
from bson.codec_options import CodecOptions, DatetimeConversion

from .errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 3           # 2: the hello reply's secret token is the data identity;
                               # 3: the hello's start offset and skipped batches (a resume)
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


def convert(array: np.ndarray, dtype: str, scale: float | None = None) -> np.ndarray:
    """``array`` cast to ``dtype``, then multiplied by ``scale``: in one pass (uint8 images to
    float32 without a float32 temporary); the daemon and the consumer share this rule, so a
    batch is the same bytes wherever it is converted."""
    if scale is not None:
        return np.multiply(array, scale, dtype=dtype, casting="unsafe")
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

@dataclass(frozen=True)
class BatchHeader:
    feed: str
    epoch: int
    index: int
    count: int
    arrays: tuple[ArraySpec, ...]  # shape here is per sample; the frame holds count samples

    def pack(self) -> bytes:
        return encode_json({
            "v": PROTOCOL_VERSION, "kind": "batch", "feed": self.feed, "epoch": self.epoch,
            "index": self.index, "count": self.count,
            "arrays": [spec.to_json() for spec in self.arrays],
        })


def pack_batch(feed: str, epoch: int, index: int, arrays: dict[str, np.ndarray]) -> list:
    """Header and array frames for one batch; large arrays travel without a copy."""
    count = len(next(iter(arrays.values())))
    specs = tuple(ArraySpec(name, a.dtype.name, a.shape[1:]) for name, a in arrays.items())
    header = BatchHeader(feed, epoch, index, count, specs).pack()
    return [header] + [np.ascontiguousarray(a) for a in arrays.values()]


def pack_error(message: str) -> list:
    return [encode_json({"v": PROTOCOL_VERSION, "kind": "error", "message": message})]


@dataclass(frozen=True)
class Schema:
    """What the daemon announced in its hello reply; every batch is checked against it."""

    feed: str
    batch_size: int
    arrays: tuple[ArraySpec, ...]  # as on the wire
    conversions: tuple[Conversion, ...] = ()

    @property
    def delivered(self) -> tuple[ArraySpec, ...]:
        """The arrays as the consumer hands them on, after its conversions."""
        dtypes = {c.name: c.dtype for c in self.conversions}
        return tuple(ArraySpec(s.name, dtypes.get(s.name, s.dtype), s.shape, s.max_shape)
                     for s in self.arrays)

    def convert(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for c in self.conversions:
            arrays[c.name] = convert(arrays[c.name], c.dtype, c.scale)
        return arrays


def unpack_batch(frames: list, schema: Schema) -> tuple[dict, dict[str, np.ndarray]]:
    """Check a batch message against ``schema``; return (header dict, arrays), the arrays
    after the announced conversions.

    Raises ProtocolError for anything malformed, FeedError-worthy messages come back as a
    header with kind "error" and no arrays.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = decode_json(frames[0], MAX_HEADER_BYTES, "batch header")
    if head.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head.get('v')!r}, expected {PROTOCOL_VERSION}")
    if head.get("kind") == "error":
        if len(frames) != 1 or not isinstance(head.get("message"), str):
            raise ProtocolError("malformed error message")
        return head, {}
    if head.get("kind") != "batch":
        raise ProtocolError(f"unknown message kind {head.get('kind')!r:.50}")
    for key in ("epoch", "index", "count"):
        if not _is_count(head.get(key)):
            raise ProtocolError(f"header field {key!r} must be a non-negative integer")
    if head.get("feed") != schema.feed:
        raise ProtocolError(f"batch of feed {head.get('feed')!r:.50}, expected {schema.feed!r}")
    count = head["count"]
    if count > schema.batch_size:  # 0 when on_error = "skip" dropped a whole batch
        raise ProtocolError(f"batch of {count} samples, expected at most {schema.batch_size}")
    raw_specs = head.get("arrays")
    if not isinstance(raw_specs, list):
        raise ProtocolError("header field 'arrays' must be a list")
    specs = tuple(ArraySpec.from_json(s) for s in raw_specs)
    if len(specs) != len(schema.arrays) or not all(
            announced.accepts(spec) for announced, spec in zip(schema.arrays, specs, strict=True)):
        raise ProtocolError(f"arrays {[s.to_json() for s in specs]!r:.200} do not match the "
                            f"announced {[s.to_json() for s in schema.arrays]!r:.200}")
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"{len(frames) - 1} array frames, expected {len(specs)}")
    arrays = {}
    for spec, frame in zip(specs, frames[1:], strict=True):
        buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        expected = count * spec.sample_nbytes
        if buffer.nbytes != expected:
            raise ProtocolError(f"array {spec.name!r}: {buffer.nbytes} bytes, expected "
                                f"{expected} ({count} x {spec.dtype} {spec.shape})")
        arrays[spec.name] = np.frombuffer(buffer, dtype=spec.dtype).reshape((count,) + spec.shape)
    return head, schema.convert(arrays)


# -- consumer -> daemon ----------------------------------------------------------------------

def pack_credit(credit: int) -> bytes:
    return encode_json({"credit": credit})


def unpack_credit(frames: list) -> int:
    if len(frames) != 1:
        raise ProtocolError(f"credit message of {len(frames)} frames, expected 1")
    credit = decode_json(frames[0], MAX_CONTROL_BYTES, "credit").get("credit")
    if not _is_count(credit) or credit > MAX_CREDIT:
        raise ProtocolError(f"credit must be an integer from 0 to {MAX_CREDIT}, got "
                            f"{credit!r:.50}")
    return credit


@dataclass(frozen=True)
class HelloRequest:
    """Open a session: its own stream of ``feed`` from epoch ``start_epoch``, part
    ``shard[0]`` of ``shard[1]`` of every epoch. A resume starts after the first
    ``start_offset`` global batches of ``start_epoch`` (which the job consumed) and leaves
    out the global batches in ``skip`` (which this rank took out of order)."""

    feed: str
    start_epoch: int = 0
    shard: tuple[int, int] = (0, 1)
    start_offset: int = 0
    skip: tuple[int, ...] = ()

    def pack(self) -> bytes:
        return encode_json({"op": "hello", "protocol": PROTOCOL_VERSION, "feed": self.feed,
                            "start_epoch": self.start_epoch, "shard": list(self.shard),
                            "start_offset": self.start_offset, "skip": list(self.skip)})

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
        return cls(feed, start_epoch, (shard[0], shard[1]), start_offset, tuple(sorted(skip)))


@dataclass(frozen=True)
class ByeRequest:
    """End the session whose secret token this is (only its owner knows it)."""

    token: str

    def pack(self) -> bytes:
        return encode_json({"op": "bye", "token": self.token})

    @classmethod
    def from_json(cls, body: dict) -> ByeRequest:
        token = body.get("token")
        if not (isinstance(token, str) and len(token) == TOKEN_CHARS):
            raise ProtocolError(f"bye needs the session's token ({TOKEN_CHARS} characters), "
                                f"as the hello reply gave it")
        return cls(token)


@dataclass(frozen=True)
class StatusRequest:
    """What ``mongofeed status`` shows."""

    def pack(self) -> bytes:
        return encode_json({"op": "status"})

    @classmethod
    def from_json(cls, body: dict) -> StatusRequest:
        return cls()


ControlRequest = HelloRequest | ByeRequest | StatusRequest
_REQUESTS = {"hello": HelloRequest, "bye": ByeRequest, "status": StatusRequest}


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
    of it, ``planner.BatchWindow.to_wire``) and no ids."""

    task: int
    feed: str
    epoch: int
    index: int
    ids: list
    window: dict | None = None
    parts: tuple[SourceIds, ...] | None = None

    def pack(self) -> list:
        body = {"task": self.task, "feed": self.feed, "epoch": self.epoch, "index": self.index,
                **_ids_to_wire(self.ids)}
        if self.window is not None:
            body["window"] = self.window
        if self.parts is not None:
            body["parts"] = [part.to_wire() for part in self.parts]
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
                       _parts_from_wire(body.get("parts")))
    if not (isinstance(task.task, int) and not isinstance(task.task, bool)
            and isinstance(task.feed, str) and _is_count(task.epoch)
            and _is_count(task.index) and isinstance(task.window, (dict, type(None)))):
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
    """Frame 0 of a worker's batch message: which task, and what it cost, or why it failed."""

    task: int
    slot: int
    docs: int = 0
    bytes: int = 0
    skips: int = 0
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None

    def pack(self) -> bytes:
        body = {"task": self.task, "slot": self.slot}
        if self.error is not None:
            body["error"] = self.error
        else:
            body.update(docs=self.docs, bytes=self.bytes, skips=self.skips,
                        skipped=list(self.skipped), seconds=self.seconds)
        return encode_json(body)

    @classmethod
    def unpack(cls, frame) -> BatchMeta:
        body = decode_json(frame, MAX_CONTROL_BYTES, "batch meta")
        task, slot = body.get("task"), body.get("slot")
        if not (isinstance(task, int) and _is_count(slot)):
            raise ProtocolError("batch meta lacks task or slot")
        if "error" in body:
            if not isinstance(body["error"], str):
                raise ProtocolError("batch meta error must be a string")
            return cls(task, slot, error=body["error"])
        counts = [body.get(key) for key in ("docs", "bytes", "skips")]
        skipped, seconds = body.get("skipped"), body.get("seconds")
        if not (all(_is_count(c) for c in counts) and isinstance(skipped, list)
                and all(isinstance(s, str) for s in skipped)
                and isinstance(seconds, (int, float))):
            raise ProtocolError("malformed batch meta")
        return cls(task, slot, *counts, tuple(skipped), float(seconds))


def _bytes_of(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
