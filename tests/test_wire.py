"""The parsers of everything a peer can send: unit checks and hypothesis fuzzing. Whatever
arrives, a parser returns a checked value or raises ProtocolError, never anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongofeed.errors import ProtocolError
from mongofeed.wire import (
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    ArraySpec,
    Schema,
    hello_schema,
    pack_batch,
    pack_credit,
    pack_error,
    unpack_batch,
    unpack_credit,
    unpack_request,
)

SCHEMA = Schema("train", 4, (ArraySpec("x", "float32", (2,)), ArraySpec("y", "int64", ())))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
headers = st.fixed_dictionaries({}, optional={
    "v": st.just(PROTOCOL_VERSION) | json_values, "kind": st.sampled_from(["batch", "error"])
    | json_values, "feed": st.just("train") | json_values, "epoch": json_values,
    "index": json_values, "count": st.integers(-2, 6) | json_values, "message": json_values,
    "arrays": st.just([["x", "float32", [2]], ["y", "int64", []]]) | json_values})


def good_batch(count=4):
    arrays = {"x": np.zeros((count, 2), np.float32), "y": np.arange(count, dtype=np.int64)}
    return pack_batch("train", 3, 1, arrays)


def as_bytes(frames):
    return [f if isinstance(f, bytes) else np.asarray(f).tobytes() for f in frames]


def test_a_good_batch_round_trips():
    head, arrays = unpack_batch(as_bytes(good_batch()), SCHEMA)
    assert (head["epoch"], head["index"], head["count"]) == (3, 1, 4)
    assert arrays["y"].tolist() == [0, 1, 2, 3] and arrays["x"].shape == (4, 2)


@pytest.mark.parametrize("frames, message", [
    ([], "empty"),
    ([b"\x80\x03pickle"], "not JSON"),
    ([b"[1]"], "JSON object"),
    ([b"x" * (MAX_CONTROL_BYTES + 1)], "exceeds the limit"),
    (as_bytes(good_batch())[:2], "1 array frames, expected 2"),  # truncated multipart
    (as_bytes(good_batch()) + [b""], "3 array frames"),
    (as_bytes(good_batch())[:1] + [b"\0" * 31] + as_bytes(good_batch())[2:], "31 bytes"),
    ([json.dumps({"v": 99, "kind": "batch"}).encode()], "protocol version 99"),
    ([json.dumps({"v": PROTOCOL_VERSION, "kind": "pickle"}).encode()], "unknown message kind"),
    (as_bytes(good_batch(5)), "batch of 5 samples"),
])
def test_broken_batches_are_refused(frames, message):
    with pytest.raises(ProtocolError, match=message):
        unpack_batch(frames, SCHEMA)


def test_error_message_round_trips():
    head, arrays = unpack_batch(pack_error("bad document"), SCHEMA)
    assert head["message"] == "bad document" and arrays == {}


@settings(max_examples=300, deadline=None)
@given(headers, st.lists(st.binary(max_size=80), max_size=3))
def test_fuzz_batch_header(header, arrays):
    frames = [json.dumps(header).encode()] + arrays
    try:
        head, decoded = unpack_batch(frames, SCHEMA)
    except ProtocolError:
        return
    if head["kind"] == "batch":  # accepted: then it is exactly what the schema allows
        assert head["count"] <= SCHEMA.batch_size
        assert all(decoded[s.name].shape == (head["count"],) + s.shape for s in SCHEMA.arrays)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=3) | st.lists(
    json_values.map(lambda v: json.dumps(v).encode()), max_size=2))
def test_fuzz_raw_frames(frames):
    for parse in (lambda f: unpack_batch(f, SCHEMA), unpack_credit, unpack_request):
        try:
            parse(frames)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "credit", "feed", "start_epoch"]), json_values))
def test_fuzz_control_and_credit(message):
    frames = [json.dumps(message).encode()]
    try:
        assert isinstance(unpack_request(frames)["op"], str)
    except ProtocolError:
        pass
    try:
        assert 0 <= unpack_credit(frames) <= 1_000_000
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["protocol", "batch_size", "feed", "arrays"]),
                       json_values))
def test_fuzz_hello_reply(reply):
    try:
        schema = hello_schema(reply)
    except ProtocolError:
        return
    assert schema.batch_size >= 1 and schema.arrays


def test_credit_and_request_limits():
    assert unpack_credit([pack_credit(3)]) == 3
    for bad in (-1, 10**7, True, "3", 1.5):
        with pytest.raises(ProtocolError):
            unpack_credit([json.dumps({"credit": bad}).encode()])
    with pytest.raises(ProtocolError, match="2 frames"):
        unpack_request([b'{"op":"hello"}', b""])
