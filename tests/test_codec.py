"""Unit tests of the codec: every decoder, error reporting, skipping, transforms, GridFS.

Pure and fast: documents are plain dicts as pymongo returns them, GridFS is a dict lookup.
"""

import io
import logging
import pickle
import sys
from typing import ClassVar

import numpy as np
import pytest
from bson import Int64, ObjectId
from gridfs.errors import NoFile
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pymongo.errors import AutoReconnect, OperationFailure

from mongofeed.daemon.codec import BatchDecoder, DocumentFailure, decode_column, get_path
from mongofeed.daemon.config import FieldConfig
from mongofeed.errors import DecodeError

COLLECTION = "samples"


def make_field(name="x", **kw):
    kw.setdefault("path", name)
    kw.setdefault("decode", "raw")
    kw.setdefault("dtype", "uint8")
    kw.setdefault("shape", (2, 3))
    return FieldConfig(name=name, **kw)


def decode(fields, docs, **kw):
    if isinstance(fields, FieldConfig):
        fields = [fields]
    return BatchDecoder({f.name: f for f in fields}, COLLECTION, **kw).decode(docs)


def decode_one(field, value, _id=1):
    arrays, errors = decode(field, [{"_id": _id, field.path: value}])
    assert errors == []
    return arrays[field.name]


def decode_error(field, doc) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(field, [doc])
    return info.value


def check_error(err, field, _id, found, expected=None):
    message = str(err)
    assert f"collection {COLLECTION!r}" in message
    assert f"_id {_id!r}" in message
    assert f"field {field.name!r}" in message
    assert f"path {field.path!r}" in message
    assert (err.collection, err.doc_id, err.field, err.path) == (
        COLLECTION, _id, field.name, field.path)
    assert found in err.found
    if expected:
        assert expected in err.expected


def npy_bytes(array, **kw):
    buf = io.BytesIO()
    np.save(buf, array, **kw)
    return buf.getvalue()


NOISE = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)


def image_bytes(pixels, fmt="PNG", mode=None):
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


# raw


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_raw_decodes_bytes_like(wrap):
    field = make_field(dtype="float32", shape=(2, 3))
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = decode_one(field, wrap(data.tobytes()))
    assert out.dtype == np.float32 and out.shape == (1, 2, 3)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out[0], data)


@pytest.mark.parametrize("value, found, expected", [
    (b"\x00" * 5, "5 bytes", "6 bytes (uint8 (2, 3))"),
    ("abcdef", "str", "bytes"),
    (None, "null", "bytes"),
])
def test_raw_refuses_wrong_values(value, found, expected):
    field = make_field()
    oid = ObjectId()
    err = decode_error(field, {"_id": oid, "x": value})
    check_error(err, field, oid, found, expected)


def test_missing_value_and_missing_id():
    field = make_field(path="a.b")
    err = decode_error(field, {"a": {}})
    check_error(err, field, None, "missing", "6 bytes")


# npy


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_decodes_array(order):
    field = make_field(decode="npy", dtype="float32", shape=(2, 3))
    data = np.asarray(np.arange(6, dtype=np.float32).reshape(2, 3), order=order)
    out = decode_one(field, npy_bytes(data))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out[0], data)


class Boom:
    """Unpickling this would record that code from the database ran."""

    ran: ClassVar[list] = []

    def __reduce__(self):
        return Boom.ran.append, ("unpickled",)


@pytest.mark.parametrize("value, found", [
    (npy_bytes(np.zeros((2, 3), np.float64)), "float64 (2, 3)"),
    (npy_bytes(np.zeros((3, 2), np.float32)), "float32 (3, 2)"),
    (npy_bytes(np.zeros((2, 3), ">f4")), ">f4 (2, 3)"),
    (npy_bytes(np.array([Boom()], dtype=object), allow_pickle=True), "object (1,)"),
    (pickle.dumps(np.zeros((2, 3), np.float32)), "not a .npy file"),
    (npy_bytes(np.zeros((2, 3), np.float32))[:-4], "20 bytes of array data instead of 24"),
    (b"", "not a .npy file"),
])
def test_npy_refuses_other_arrays_and_pickles(value, found):
    field = make_field(decode="npy", dtype="float32", shape=(2, 3))
    err = decode_error(field, {"_id": 7, "x": value})
    check_error(err, field, 7, found, ".npy bytes of float32 (2, 3)")
    assert Boom.ran == []


# scalar


@pytest.mark.parametrize("dtype, value", [
    ("int64", Int64(2**62)), ("int64", -5), ("uint8", 255), ("uint8", 3.0),
    ("float32", 1), ("float64", 0.1), ("float32", float("nan")), ("bool", True),
    ("bool", 0), ("int8", False),
])
def test_scalar_decodes_numbers(dtype, value):
    out = decode_one(make_field(decode="scalar", dtype=dtype, shape=()), value)
    assert out.dtype == np.dtype(dtype) and out.shape == (1,)
    np.testing.assert_array_equal(out, np.array([value], dtype))


@pytest.mark.parametrize("dtype, value, found", [
    ("uint8", 300, "300"), ("int8", -129, "-129"), ("int64", 2.5, "2.5"),
    ("int64", 2**63, str(2**63)), ("uint64", 2**70, str(2**70)), ("int32", float("nan"), "nan"),
    ("int64", float("inf"), "inf"), ("bool", 2, "2"), ("bool", 1.0, "1.0"),
    ("float16", 1e6, "1000000.0"), ("float32", "1.0", "str"), ("int64", None, "null"),
    ("int64", b"1", "bytes"), ("int64", {"v": 1}, "dict"), ("int64", [1], "list"),
])
def test_scalar_refuses_wrong_values(dtype, value, found):
    field = make_field(decode="scalar", dtype=dtype, shape=())
    err = decode_error(field, {"_id": "s1", "x": value})
    check_error(err, field, "s1", found)
    assert err.found == found


# list


def test_list_decodes_nested_lists():
    field = make_field(decode="list", dtype="uint8", shape=(2, 2))
    np.testing.assert_array_equal(decode_one(field, [[1, 2], [3, 255.0]]), [[[1, 2], [3, 255]]])
    field = make_field(decode="list", dtype="float32", shape=(3,))
    out = decode_one(field, [1, 2.5, True])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 2.5, 1]])


@pytest.mark.parametrize("value, found", [
    ([[1, 2], [3]], "a ragged or non-numeric list"),
    ([[1, 2], ["a", 4]], "non-numeric values"),
    ([[1, None], [3, 4]], "non-numeric values"),
    ([1, 2, 3, 4], "shape (4,)"),
    ([[1, 2], [300, 4]], "300 at [1][0]"),
    ([[1, 2], [3, 4.5]], "4.5 at [1][1]"),
    ("[[1, 2], [3, 4]]", "str"),
])
def test_list_refuses_wrong_values(value, found):
    field = make_field(decode="list", dtype="uint8", shape=(2, 2))
    err = decode_error(field, {"_id": 3, "x": value})
    check_error(err, field, 3, found)


# image


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (4, "RGBA"), (1, "L")])
def test_image_decodes_png(channels, mode):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 5, channels), dtype=np.uint8)
    field = make_field(decode="image", shape=(4, 5, channels))
    out = decode_one(field, image_bytes(pixels[..., 0] if channels == 1 else pixels))
    assert out.dtype == np.uint8 and out.shape == (1, 4, 5, channels)
    np.testing.assert_array_equal(out[0], pixels)


def test_image_converts_jpeg_to_the_channels_asked_for():
    pixels = np.full((8, 6, 3), 200, np.uint8)
    out = decode_one(make_field(decode="image", shape=(8, 6, 1)), image_bytes(pixels, "JPEG"))
    assert out.shape == (1, 8, 6, 1)
    assert np.all(np.abs(out.astype(int) - 200) <= 2)


@pytest.mark.parametrize("value, found", [
    (b"garbage", "not a PNG/JPEG image (unrecognised data)"),
    (image_bytes(np.zeros((4, 5, 3), np.uint8), "GIF"), "not a PNG/JPEG image"),
    (image_bytes(NOISE)[:-40], "not a PNG/JPEG image"),
    (image_bytes(np.zeros((5, 4, 3), np.uint8)), "a 5x4 image"),
    ("png", "str"),
])
def test_image_refuses_wrong_values(value, found):
    field = make_field(decode="image", shape=(4, 5, 3))
    err = decode_error(field, {"_id": 9, "x": value})
    check_error(err, field, 9, found)


def test_image_without_pillow_fails_the_batch_naming_the_document(monkeypatch):
    """Not a misfit of the document: on_error = "skip" would drop every image silently."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    field = make_field(decode="image", shape=(4, 5, 3))
    with pytest.raises(DocumentFailure, match=r"_id 1: field 'x': ImportError: .*"
                       r"pip install 'mongofeed\[image\]'"):
        decode(field, [{"_id": 1, "x": b"png"}], on_error="skip")


# pickle


def test_pickle_decodes_and_warns_once(caplog):
    fields = [make_field("a", decode="pickle", dtype="float32", shape=(2,), allow_pickle=True),
              make_field("b", decode="pickle", dtype="int16", shape=(2,), allow_pickle=True)]
    decoder = BatchDecoder({f.name: f for f in fields}, COLLECTION)
    doc = {"_id": 1, "a": pickle.dumps(np.array([1.5, 2.0])), "b": pickle.dumps([3, 4])}
    with caplog.at_level(logging.WARNING, logger="mongofeed.daemon.codec"):
        arrays, _ = decoder.decode([doc, doc])
        decoder.decode([doc])
    np.testing.assert_array_equal(arrays["a"], [[1.5, 2.0]] * 2)
    assert arrays["b"].dtype == np.int16
    warnings = [r for r in caplog.records if "pickle" in r.getMessage()]
    assert len(warnings) == 1
    assert "executes code stored in the database" in warnings[0].getMessage()


@pytest.mark.parametrize("allow, value, found", [
    (False, pickle.dumps([1, 2]), "without allow_pickle"),
    (True, b"not a pickle", "not a pickle"),
    (True, pickle.dumps([1, 2, 3]), "shape (3,)"),
    (True, pickle.dumps({"a": 1}), "non-numeric values"),
])
def test_pickle_refuses_wrong_values(allow, value, found):
    field = make_field(decode="pickle", dtype="int16", shape=(2,), allow_pickle=allow)
    err = decode_error(field, {"_id": 2, "x": value})
    check_error(err, field, 2, found)


# gridfs


class FakeGridFS:
    def __init__(self, files):
        self.files = files

    def __call__(self, bucket, file_id):
        if bucket == "down":
            raise AutoReconnect("connection lost")
        if bucket == "electing":
            raise OperationFailure("primary stepped down", code=189)
        if bucket == "locked":
            raise OperationFailure("not authorized on fs", code=13)
        if (bucket, file_id) not in self.files:
            raise NoFile(f"no file {file_id!r}")
        return self.files[bucket, file_id]


def test_gridfs_reads_bytes_then_decodes():
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    oid = ObjectId()
    read = FakeGridFS({("imgs", oid): npy_bytes(data), ("fs", "r1"): data.tobytes()})
    fields = [make_field("a", decode="npy", dtype="float32", gridfs=True, bucket="imgs"),
              make_field("b", decode="raw", dtype="float32", gridfs=True)]
    arrays, errors = decode(fields, [{"_id": 1, "a": oid, "b": "r1"}], read_gridfs=read)
    assert errors == []
    np.testing.assert_array_equal(arrays["a"][0], data)
    np.testing.assert_array_equal(arrays["b"][0], data)


def test_gridfs_missing_file_is_a_decode_error():
    field = make_field(gridfs=True, bucket="imgs")
    with pytest.raises(DecodeError) as info:
        decode(field, [{"_id": 4, "x": "nope"}], read_gridfs=FakeGridFS({}))
    err = info.value
    check_error(err, field, 4, "GridFS file 'nope' missing in bucket 'imgs'")


@pytest.mark.parametrize("bucket, error", [("down", AutoReconnect),
                                           ("electing", OperationFailure)])
def test_gridfs_transient_errors_propagate_for_the_worker_to_retry(bucket, error):
    field = make_field(gridfs=True, bucket=bucket)
    with pytest.raises(error):
        decode(field, [{"_id": 4, "x": "f"}], read_gridfs=FakeGridFS({}), on_error="skip")


def test_gridfs_other_database_errors_fail_the_batch_not_the_document():
    field = make_field(gridfs=True, bucket="locked")
    with pytest.raises(DocumentFailure, match="_id 4: field 'x': OperationFailure: not auth"):
        decode(field, [{"_id": 4, "x": "f"}], read_gridfs=FakeGridFS({}), on_error="skip")


def test_gridfs_needs_a_reader():
    with pytest.raises(ValueError, match="read_gridfs"):
        BatchDecoder({"x": make_field(gridfs=True)}, COLLECTION)


# skip / fail


def skip_docs():
    good = bytes(range(6))
    return [
        {"_id": 0, "x": good, "y": 0},
        {"_id": 1, "x": b"short", "y": 1},
        {"_id": 2, "x": good, "y": 2},
        {"_id": 3, "x": good, "y": "bad"},
        {"_id": 4, "x": good, "y": 4},
    ]


SKIP_FIELDS = [make_field("x"), make_field("y", decode="scalar", dtype="int64", shape=())]


def test_skip_leaves_bad_docs_out_of_every_array():
    arrays, errors = decode(SKIP_FIELDS, skip_docs(), on_error="skip")
    np.testing.assert_array_equal(arrays["y"], [0, 2, 4])
    assert arrays["x"].shape == (3, 2, 3) and arrays["x"].flags.c_contiguous
    np.testing.assert_array_equal(arrays["x"][2].ravel(), range(6))
    assert [(e.doc_id, e.field) for e in errors] == [(1, "x"), (3, "y")]


def test_fail_raises_the_first_bad_doc():
    with pytest.raises(DecodeError) as info:
        decode(SKIP_FIELDS, skip_docs())
    assert info.value.doc_id == 1


def test_empty_batch_and_bad_on_error():
    arrays, errors = decode(SKIP_FIELDS, [])
    assert arrays["x"].shape == (0, 2, 3) and arrays["y"].shape == (0,) and errors == []
    with pytest.raises(ValueError, match="on_error"):
        BatchDecoder({}, COLLECTION, on_error="ignore")


# transforms


def test_cast_and_scale():
    field = make_field(cast="float32", scale=1 / 255)
    out = decode_one(field, bytes([0, 51, 102, 153, 204, 255]))
    assert out.dtype == np.float32 and out.shape == (1, 2, 3) and out.flags.c_contiguous
    np.testing.assert_allclose(out.ravel(), [0, 0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)


def test_scale_without_cast_on_a_float_field():
    field = make_field(decode="scalar", dtype="float64", shape=(), scale=2)
    np.testing.assert_array_equal(decode_one(field, 1.5), [3.0])


@pytest.mark.parametrize("cast, dtype", [(None, np.float32), ("uint8", np.uint8)])
def test_one_hot(cast, dtype):
    field = make_field("label", decode="scalar", dtype="int64", shape=(), one_hot=4, cast=cast)
    docs = [{"_id": i, "label": v} for i, v in enumerate([2, 0, 3])]
    arrays, _ = decode(field, docs)
    out = arrays["label"]
    assert out.dtype == dtype and out.shape == (3, 4) == (3, *field.out_shape)
    np.testing.assert_array_equal(out, [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])


def test_one_hot_label_out_of_range():
    field = make_field("label", decode="scalar", dtype="int64", shape=(), one_hot=3)
    docs = [{"_id": i, "label": v} for i, v in enumerate([1, 3, -1, 0])]
    arrays, errors = decode(field, docs, on_error="skip")
    np.testing.assert_array_equal(arrays["label"], [[0, 1, 0], [1, 0, 0]])
    assert [e.doc_id for e in errors] == [1, 2]
    check_error(errors[0], field, 1, "label 3", "a class label in [0, 3)")
    arrays, errors = decode(field, docs[1:3], on_error="skip")
    assert arrays["label"].shape == (0, 3) and len(errors) == 2


def test_sample_nbytes():
    fields = [make_field("img", shape=(8, 8, 1)),
              make_field("label", decode="scalar", dtype="int64", shape=(), one_hot=10),
              make_field("w", decode="scalar", dtype="float64", shape=())]
    decoder = BatchDecoder({f.name: f for f in fields}, COLLECTION)
    assert decoder.sample_nbytes() == 64 + 10 * 4 + 8


# paths


def test_get_path():
    doc = {"a": {"b": [{"c": 1}, {"c": 2}]}, "d": 0, "e.f": 3}
    assert get_path(doc, "a.b.1.c") == 2
    assert get_path(doc, "d") == 0
    for path in ["a.b.2.c", "a.b.x", "d.0", "a.c", "e.f", "a.b.-1"]:
        with pytest.raises(KeyError):
            get_path(doc, path)


def test_dotted_path_in_a_document():
    field = make_field(path="meta.frames.1", decode="list", dtype="int16", shape=(2,))
    docs = [{"_id": 1, "meta": {"frames": [[1, 2], [3, 4]]}}]
    arrays, _ = decode(field, docs)
    np.testing.assert_array_equal(arrays["x"], [[3, 4]])
    err = decode_error(field, {"_id": 2, "meta": {"frames": [[1, 2]]}})
    check_error(err, field, 2, "missing")


# property: raw bytes round-trip


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]


@st.composite
def raw_batches(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))
    n = draw(st.integers(1, 3))
    return dtype, shape, [draw(hnp.arrays(dtype, shape)) for _ in range(n)]


@settings(max_examples=60, deadline=None)
@given(raw_batches())
def test_raw_round_trips_exactly(batch):
    dtype, shape, samples = batch
    field = make_field(dtype=dtype, shape=shape)
    arrays, _ = decode(field, [{"_id": i, "x": s.tobytes()} for i, s in enumerate(samples)])
    out = arrays["x"]
    assert out.dtype == np.dtype(dtype) and out.shape == (len(samples), *shape)
    assert out.tobytes() == b"".join(s.tobytes() for s in samples)


# -- the column path: the same arrays as document by document, or none -------------------------

SCALAR_VALUES = st.one_of(
    st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**53 + 1, -2**63, 2**63 - 1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**60, 2**60).map(float),
    st.booleans(), st.builds(Int64,
    st.integers(-2**63, 2**63 - 1)), st.none(), st.text(max_size=2))


@settings(max_examples=400, deadline=None)
@given(values=st.lists(SCALAR_VALUES, min_size=1, max_size=6),
       dtype=st.sampled_from(["int8", "uint8", "int32", "int64", "float32", "float64", "bool"]),
       one_hot=st.sampled_from([None, 3]))
@example(values=[2**53 + 1, 1.0], dtype="int64", one_hot=None)  # float64 would round the int
def test_a_scalar_column_is_what_the_documents_give_one_by_one(values, dtype, one_hot):
    if one_hot and dtype in ("float32", "float64", "bool"):
        one_hot = None  # one_hot takes integer labels
    field = make_field("y", decode="scalar", dtype=dtype, shape=(), one_hot=one_hot)
    docs = [{"_id": i, "y": v} for i, v in enumerate(values)]
    column = decode_column(field, docs)
    decoder = BatchDecoder({"y": field}, COLLECTION)
    try:
        rows, _, _ = decoder._decode_rows(docs, None)
    except DecodeError:
        assert column is None  # what the documents refuse, the column does not take
        return
    if column is not None:
        assert column.dtype == rows["y"].dtype
        assert np.array_equal(column, rows["y"], equal_nan=column.dtype.kind == "f")


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.one_of(st.binary(min_size=5, max_size=7), st.integers(0, 3)),
                       min_size=1, max_size=5))
def test_a_raw_column_is_what_the_documents_give_one_by_one(values):
    field = make_field("x", dtype="uint8", shape=(2, 3))
    docs = [{"_id": i, "x": v} for i, v in enumerate(values)]
    column = decode_column(field, docs)
    if all(isinstance(v, bytes) and len(v) == 6 for v in values):
        rows, _, _ = BatchDecoder({"x": field}, COLLECTION)._decode_rows(docs, None)
        assert column.flags.writeable and np.array_equal(column, rows["x"])
    else:
        assert column is None


def test_a_batch_of_plain_values_is_decoded_by_column_and_a_bad_one_named_by_rows():
    fields = [make_field("x", dtype="uint8", shape=(2,)), make_field("y", decode="scalar",
                                                                      dtype="int64", shape=())]
    docs = [{"_id": i, "x": bytes([i, i]), "y": i} for i in range(4)]
    arrays, errors = decode(fields, docs)
    assert errors == [] and arrays["y"].tolist() == [0, 1, 2, 3]
    assert arrays["x"].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    docs[2]["y"] = "two"
    with pytest.raises(DecodeError, match="_id 2"):
        decode(fields, docs)
    arrays, errors = decode(fields, docs, on_error="skip")
    assert arrays["y"].tolist() == [0, 1, 3] and [e.doc_id for e in errors] == [2]
