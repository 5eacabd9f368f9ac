"""The protocol's version and what every parser in this package builds on: JSON read
safely from a peer (a size limit, a depth limit, numbers of bounded length and finite),
counts that every part of the pipeline can hold, and frames as bytes."""

from __future__ import annotations

import json
import math
import re

import numpy as np

from ..errors import ProtocolError

PROTOCOL_VERSION = 5           # 2: the hello reply's secret token is the data identity;
                               # 3: the hello's start offset and skipped batches (a resume);
                               # 4: binary batch headers, shared memory, frames cut at 16 MiB;
                               # 5: the hello asks for held batches, the offer grants them
MAX_CONTROL_BYTES = 64 * 1024  # one JSON message: a control request or reply, a credit, a meta
MAX_JSON_DEPTH = 32            # our messages nest at most 6 deep (the status reply)
MAX_NUMBER_CHARS = 40          # a JSON number's text; ours are counts, sizes and seconds


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


def _bytes_of(frame) -> bytes:
    """A received frame (a zmq.Frame or any bytes-like) as bytes."""
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
