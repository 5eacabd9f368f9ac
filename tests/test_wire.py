"""The parsers of everything a peer can send: unit checks and hypothesis fuzzing. Whatever
arrives, a parser returns a checked value or raises ProtocolError, never anything else."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mongofeed.wire.batches
from mongofeed.errors import ProtocolError
from mongofeed.wire import (
    BATCH_HEADER,
    BATCH_MAGIC,
    MAX_CONTROL_BYTES,
    MAX_CREDIT,
    MAX_JSON_DEPTH,
    PROTOCOL_VERSION,
    TOKEN_CHARS,
    ArraySpec,
    BatchHeader,
    BatchMeta,
    ByeRequest,
    Credit,
    HeartbeatRequest,
    HelloRequest,
    Schema,
    SharedMemoryOffer,
    StatusRequest,
    TaskMessage,
    decode_json,
    hello_schema,
    pack_batch,
    pack_credit,
    pack_error,
    unpack_batch,
    unpack_credit,
    unpack_header,
    unpack_request,
    unpack_worker_command,
)

SCHEMA = Schema("train", 4, (ArraySpec("x", "float32", (2,)), ArraySpec("y", "int64", ())))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
headers = st.fixed_dictionaries({}, optional={
    "v": st.just(PROTOCOL_VERSION) | json_values, "kind": st.sampled_from(["batch", "error"])
    | json_values, "epoch": json_values, "index": json_values,
    "count": st.integers(-2, 6) | json_values, "message": json_values,
    "dims": st.just([]) | json_values, "slab": st.integers(-1, 3) | json_values})


def good_batch(count=4, schema=SCHEMA):
    arrays = {"x": np.zeros((count, 2), np.float32), "y": np.arange(count, dtype=np.int64)}
    return pack_batch(3, 1, arrays, schema.arrays)


def as_bytes(frames):
    return [f if isinstance(f, bytes) else bytes(f) for f in frames]


def test_a_good_batch_round_trips():
    head, arrays = unpack_batch(as_bytes(good_batch()), SCHEMA)
    assert head == BatchHeader(3, 1, 4)
    assert arrays["y"].tolist() == [0, 1, 2, 3] and arrays["x"].shape == (4, 2)


def test_large_arrays_travel_in_frames_of_a_bounded_size_and_are_joined(monkeypatch):
    monkeypatch.setattr(mongofeed.wire.batches, "FRAME_MAX_BYTES", 12)
    frames = as_bytes(good_batch())  # x: 32 bytes in 12 + 12 + 8, y: 32 in 12 + 12 + 8
    assert [len(f) for f in frames[1:]] == [12, 12, 8, 12, 12, 8]
    head, arrays = unpack_batch(frames, SCHEMA)
    assert arrays["y"].tolist() == [0, 1, 2, 3] and arrays["x"].shape == (4, 2)
    with pytest.raises(ProtocolError, match="a frame of 8 bytes, expected 12"):
        unpack_batch(frames[:2] + frames[3:4] + frames[2:3] + frames[4:], SCHEMA)


def test_variable_lengths_travel_in_the_header_and_are_checked():
    schema = Schema("f", 4, (ArraySpec("t", "int32", (None, 2), (6, 2)),
                             ArraySpec("n", "int32", ())))
    frames = as_bytes(pack_batch(0, 0, {"t": np.ones((3, 5, 2), np.int32),
                                        "n": np.arange(3, dtype=np.int32)}, schema.arrays))
    head, arrays = unpack_batch(frames, schema)
    assert head.dims == (5,) and arrays["t"].shape == (3, 5, 2)
    for dims, message in (([7], "exceeds the announced"), ([], "fewer"), ([5, 1], "more")):
        with pytest.raises(ProtocolError, match=message):
            schema.placements(BatchHeader(0, 0, 3, tuple(dims)))


def test_a_batch_in_shared_memory_is_a_header_naming_its_slab():
    header = BatchHeader(3, 1, 4, (), 7).pack()
    assert len(header) == 36 and unpack_header(header) == BatchHeader(3, 1, 4, (), 7)
    with pytest.raises(ProtocolError, match="shared memory on a session without it"):
        unpack_batch([header], SCHEMA)


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
                 st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
                 st.integers(0, 2**32 - 1)), st.binary(max_size=12),
       st.lists(st.binary(max_size=80), max_size=3))
def test_fuzz_binary_batch_header(numbers, tail, arrays):
    frames = [BATCH_HEADER.pack(BATCH_MAGIC, *numbers) + tail] + arrays
    try:
        head, decoded = unpack_batch(frames, SCHEMA)
    except ProtocolError:
        return
    assert head.count <= SCHEMA.batch_size and head.slab is None and head.dims == ()
    assert all(decoded[s.name].shape == (head.count,) + s.shape for s in SCHEMA.arrays)


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
    ([json.dumps({"v": PROTOCOL_VERSION, "kind": "batch"}).encode()], "unknown message kind"),
    ([b"mfb\x01" + bytes(32)], "protocol version 1"),
    ([as_bytes(good_batch())[0][:20]], "batch header of 20 bytes"),
    ([as_bytes(good_batch())[0] + b"\0"], "batch header of 37 bytes for 0 lengths"),
    (as_bytes(good_batch(5)), "batch of 5 samples"),
])
def test_broken_batches_are_refused(frames, message):
    with pytest.raises(ProtocolError, match=message):
        unpack_batch(frames, SCHEMA)


def test_error_message_round_trips():
    head, arrays = unpack_batch(pack_error("bad document"), SCHEMA)
    assert head == "bad document" and arrays == {}


@settings(max_examples=300, deadline=None)
@given(headers, st.lists(st.binary(max_size=80), max_size=3))
def test_fuzz_batch_header(header, arrays):
    frames = [json.dumps(header).encode()] + arrays
    try:
        head, decoded = unpack_batch(frames, SCHEMA)
    except ProtocolError:
        return
    assert isinstance(head, str) and decoded == {}  # JSON: only an error message


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=3) | st.lists(
    json_values.map(lambda v: json.dumps(v).encode()), max_size=2))
def test_fuzz_raw_frames(frames):
    for parse in (lambda f: unpack_batch(f, SCHEMA), unpack_credit, unpack_request):
        try:
            parse(frames)
        except ProtocolError:
            pass


@settings(max_examples=500, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["hello", "bye", "heartbeat", "status"]) | json_values,
    "protocol": st.just(PROTOCOL_VERSION) | json_values,
    "feed": st.just("train") | json_values, "start_epoch": st.integers() | json_values,
    "shard": st.lists(st.integers(-2, 2**21), max_size=3) | json_values,
    "token": st.text(min_size=TOKEN_CHARS, max_size=TOKEN_CHARS) | json_values,
    "credit": st.integers() | json_values, "release": st.lists(st.integers()) | json_values,
    "attached": st.booleans() | json_values, "shared_memory": st.booleans() | json_values}))
def test_fuzz_control_and_credit(message):
    """Whatever the fields hold, a request parses into a checked value or is refused."""
    frames = [json.dumps(message).encode()]
    try:
        request = unpack_request(frames)
    except ProtocolError:
        request = None
    if isinstance(request, HelloRequest):
        assert isinstance(request.feed, str) and 0 <= request.start_epoch < 2**40
        assert 0 <= request.shard[0] < request.shard[1]
        assert isinstance(request.shared_memory, bool)
    elif isinstance(request, (ByeRequest, HeartbeatRequest)):
        assert isinstance(request.token, str) and len(request.token) == TOKEN_CHARS
    else:
        assert request is None or isinstance(request, StatusRequest)
    try:
        credit = unpack_credit(frames)
    except ProtocolError:
        return
    assert 0 <= credit.credit <= MAX_CREDIT and credit.attached in (None, True, False)
    assert all(isinstance(slab, int) and slab >= 0 for slab in credit.release)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["protocol", "batch_size", "feed", "arrays"]),
                       json_values))
def test_fuzz_hello_reply(reply):
    try:
        schema = hello_schema(reply)
    except ProtocolError:
        return
    assert schema.batch_size >= 1 and schema.arrays


@given(st.integers(0, MAX_CREDIT), st.lists(st.integers(0, 2**31), max_size=64),
       st.sampled_from([None, True, False]))
def test_credit_written_by_hand_is_the_json_the_daemon_reads(credit, release, attached):
    message = Credit(credit, tuple(release), attached)
    packed = message.pack()
    assert unpack_credit([packed]) == message
    body = {"credit": credit, **({"release": release} if release else {}),
            **({} if attached is None else {"attached": attached})}
    assert json.loads(packed) == body


def test_credit_and_request_limits():
    assert unpack_credit([pack_credit(3)]) == Credit(3)
    assert unpack_credit([Credit(0, (4, 1), True).pack()]) == Credit(0, (4, 1), True)
    for bad in (-1, 10**7, True, "3", 1.5):
        with pytest.raises(ProtocolError):
            unpack_credit([json.dumps({"credit": bad}).encode()])
    for bad in ({"release": [-1]}, {"release": 3}, {"release": [0] * 5000}, {"attached": 1}):
        with pytest.raises(ProtocolError):
            unpack_credit([json.dumps({"credit": 0, **bad}).encode()])
    with pytest.raises(ProtocolError, match="2 frames"):
        unpack_request([b'{"op":"hello"}', b""])


def test_tasks_and_batch_metas_carry_attempt_and_slab():
    task = TaskMessage(5, "train", 1, 2, [3, 4], attempt=2, region="/dev/shm/r", slab=6)
    assert unpack_worker_command(task.pack()) == task
    plain = TaskMessage(5, "train", 1, 2, [3, 4])
    assert unpack_worker_command(plain.pack()) == plain
    meta = BatchMeta(5, 0, attempt=2, slab=6, docs=2, bytes=8)
    assert BatchMeta.unpack(meta.pack()) == meta
    failed = BatchMeta(5, 0, attempt=3, error="no")
    assert BatchMeta.unpack(failed.pack()) == failed


def test_shared_memory_offer_in_the_hello_reply():
    offer = SharedMemoryOffer("/dev/shm/mongofeed-1-a", b"\x01" * 16, 4, 8192, 2,
                              "mongofeed-channel-1-ab")
    assert SharedMemoryOffer.from_reply({"shared_memory": offer.to_json()}) == offer
    assert SharedMemoryOffer.from_reply({}) is None
    for bad in ({"path": 1}, {**offer.to_json(), "nonce": "zz"}, {**offer.to_json(), "slabs": 0},
                {**offer.to_json(), "held_batches": 4}, {**offer.to_json(), "held_batches": -1},
                {**offer.to_json(), "channel": None}, [1]):
        with pytest.raises(ProtocolError, match="malformed shared_memory"):
            SharedMemoryOffer.from_reply({"shared_memory": bad})


# -- what crashed the daemon (issue 9, item 4): refused with a reason, not by luck ---------------

@pytest.mark.parametrize("text, reason", [
    (b"[" * 30_000 + b"]" * 30_000, "nests 30000 levels deep"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, f"more than {MAX_JSON_DEPTH}"),
    (b'{"credit": ' + b"9" * 5_000 + b"}", "a number of 5000 digits"),
    (b'{"credit": 1' + b"0" * 400 + b'.5}', "too long or not finite"),
    (b'{"credit": 1e999}', "not finite"),
    (b'{"credit": NaN}', "NaN is not a number JSON allows"),
    (b'{"credit": -Infinity}', "-Infinity is not a number JSON allows"),
    (b'{"op": "st\xffatus"}', "not JSON"),
    (b'{"op": "status"', "not JSON"),
    (b'"just a string"', "must be a JSON object"),
])
def test_json_that_json_would_choke_on_is_refused(text, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_json(text, MAX_CONTROL_BYTES, "request")


def test_brackets_inside_strings_do_not_count_as_nesting():
    deep_looking = json.dumps({"op": "status", "note": "[" * 1000 + '\\"{' * 500}).encode()
    assert decode_json(deep_looking, MAX_CONTROL_BYTES, "request")["op"] == "status"
    # Escaped quotes cannot hide brackets from the check, nor make it slow.
    sneaky = b'{"a": "\\\\", "b": ' + b"[" * 100 + b"]" * 100 + b"}"
    with pytest.raises(ProtocolError, match="nests 101 levels"):
        decode_json(sneaky, MAX_CONTROL_BYTES, "request")
    decode_json(b'{"a": "' + b'\\"' * 20_000 + b'"}', MAX_CONTROL_BYTES, "request")


def hello(**fields) -> list:
    body = {"op": "hello", "protocol": PROTOCOL_VERSION, "feed": "train", **fields}
    return [json.dumps({k: v for k, v in body.items() if v is not ...}).encode()]


def test_a_good_hello_bye_and_status_parse_into_typed_requests():
    assert unpack_request(hello()) == HelloRequest("train", 0, (0, 1))
    assert unpack_request(hello(start_epoch=7, shard=[1, 4])) == HelloRequest("train", 7, (1, 4))
    assert unpack_request([HelloRequest("val", 2, (0, 2)).pack()]) == HelloRequest("val", 2,
                                                                                   (0, 2))
    token = "a" * TOKEN_CHARS
    assert unpack_request([ByeRequest(token).pack()]) == ByeRequest(token)
    assert unpack_request([HeartbeatRequest(token).pack()]) == HeartbeatRequest(token)
    assert unpack_request(hello(shared_memory=True)).shared_memory
    with pytest.raises(ProtocolError, match="shared_memory must be true or false"):
        unpack_request(hello(shared_memory=1))
    assert unpack_request([StatusRequest().pack()]) == StatusRequest()


WRONG = [None, True, -1, 2**63, 1.5, "x", [], {}, [0], [[0, 1]], {"a": 1}]


@pytest.mark.parametrize("field", ["protocol", "feed", "start_epoch", "shard"])
@pytest.mark.parametrize("value", WRONG + [..., "", "f" * 1000, [1, 1], [0, 2**21], [-1, 2]])
def test_every_wrong_hello_field_is_refused_with_its_name(field, value):
    frames = hello(**{field: value})
    good = {"start_epoch": (..., 0), "shard": (..., [0, 1], [0, 1])}
    if value in good.get(field, ()) or (field == "feed" and value == "x"):
        assert isinstance(unpack_request(frames), HelloRequest)
        return
    with pytest.raises(ProtocolError, match=field.replace("protocol", "speaks protocol")
                       .replace("feed", "feed name")):
        unpack_request(frames)


@pytest.mark.parametrize("body", [
    {"op": "bye"}, {"op": "bye", "token": None}, {"op": "bye", "token": 5},
    {"op": "bye", "token": "short"}, {"op": "bye", "token": ["a" * TOKEN_CHARS]},
    {"op": "bye", "session": "s1"},
    {"op": None}, {"op": ["status"]}, {"op": "shutdown"}, {},
])
def test_wrong_bye_and_unknown_ops_are_refused(body):
    with pytest.raises(ProtocolError, match="token|op"):
        unpack_request([json.dumps(body).encode()])


@pytest.mark.parametrize("frames", [
    [b"task", b"\x05\x00\x00\x00"], [b"task", b"\xff" * 40], [b"task"], [],
    [b"task", b"\x0c\x00\x00\x00\x10task\x00\x01\x00\x00\x00"],  # lacks the rest
    [b"stop", b""], [b"task", bytes(TaskMessage(1, "f", 0, 0, []).pack()[1])[:-1]],
])
def test_worker_commands_are_parsed_or_refused(frames):
    with pytest.raises(ProtocolError):
        unpack_worker_command(frames)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_worker_command(body):
    try:
        task = unpack_worker_command([b"task", body])
    except ProtocolError:
        return
    assert isinstance(task.ids, list) and task.epoch >= 0
