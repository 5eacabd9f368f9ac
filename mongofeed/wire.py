"""Messages on mongofeed's sockets, and the checks a receiver makes before trusting them.

::

                        (internal, 127.0.0.1)                       (public)
  supervisor ROUTER ──Task──▶ worker DEALER                 consumer DEALER ──Hello/Status/Bye──▶
             ◀──Ready──────                                 control ROUTER  ◀──Reply──────────
  worker PUSH ──[meta, header, array...]──▶ sink PULL       consumer DEALER ──Credit─────────▶
                                                            data ROUTER     ◀──[header, array...]

Public messages (what a consumer or a stranger can send or receive):

- control request/reply: one frame, a JSON object (``{"op": "hello", ...}``), at most
  ``MAX_CONTROL_BYTES``.
- credit: one frame, ``{"credit": n}``; the consumer grants the daemon n more batches.
  ``n = 0`` is a heartbeat.
- batch: frame 0 is the header, a JSON object ``{"v", "kind": "batch", "feed", "epoch",
  "index", "count", "arrays": [[name, dtype, shape], ...]}``; then one frame per array with
  its raw C-order bytes. ``kind = "error"`` carries ``"message"`` and no array frames.

Nothing received is ever unpickled: headers are JSON, arrays are raw bytes of plain numeric
dtypes, and every length is checked against dtype x shape before ``np.frombuffer``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from .errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
ALLOWED_DTYPES = frozenset((
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
))


@dataclass(frozen=True)
class ArraySpec:
    """Name, dtype and per-sample shape of one array of every batch of a feed."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def sample_nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape)]

    @classmethod
    def from_json(cls, value) -> ArraySpec:
        if not (isinstance(value, list) and len(value) == 3):
            raise ProtocolError(f"array spec must be [name, dtype, shape], got {value!r:.100}")
        name, dtype, shape = value
        if not isinstance(name, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"bad array name or dtype: {value!r:.100}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ProtocolError(f"bad array shape: {shape!r:.100}")
        return cls(name, dtype, tuple(shape))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40


def encode_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(frame, limit: int, what: str) -> dict:
    """Parse one frame as a JSON object, refusing anything too long or not an object."""
    data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    if len(data) > limit:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds the limit of {limit}")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


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
    arrays: tuple[ArraySpec, ...]


def unpack_batch(frames: list, schema: Schema) -> tuple[dict, dict[str, np.ndarray]]:
    """Check a batch message against ``schema``; return (header dict, arrays).

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
    if specs != schema.arrays:
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
    return head, arrays


# -- consumer -> daemon ----------------------------------------------------------------------

def pack_credit(credit: int) -> bytes:
    return encode_json({"credit": credit})


def unpack_credit(frames: list) -> int:
    if len(frames) != 1:
        raise ProtocolError(f"credit message of {len(frames)} frames, expected 1")
    credit = decode_json(frames[0], MAX_CONTROL_BYTES, "credit").get("credit")
    if not _is_count(credit) or credit > 1_000_000:
        raise ProtocolError(f"credit must be a small non-negative integer, got {credit!r:.50}")
    return credit


def unpack_request(frames: list) -> dict:
    """A control request: one JSON object with a string 'op'."""
    if len(frames) != 1:
        raise ProtocolError(f"control request of {len(frames)} frames, expected 1")
    request = decode_json(frames[0], MAX_CONTROL_BYTES, "control request")
    if not isinstance(request.get("op"), str):
        raise ProtocolError("control request needs a string 'op'")
    return request


def hello_schema(reply: dict) -> Schema:
    """The schema a hello reply announces, checked like any other message from a peer."""
    if reply.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"daemon speaks protocol {reply.get('protocol')!r}, this "
                            f"mongofeed speaks {PROTOCOL_VERSION}: upgrade one of them")
    size = reply.get("batch_size")
    if not _is_count(size) or size < 1 or not isinstance(reply.get("feed"), str):
        raise ProtocolError("hello reply lacks feed or batch_size")
    specs = reply.get("arrays")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("hello reply lacks arrays")
    return Schema(reply["feed"], size, tuple(ArraySpec.from_json(s) for s in specs))
