"""Documents that do not fit, through the real daemon: one bad document per decoder (and an
oversized one, a GridFS id with no file, and one that pymongo cannot decode at all). With
on_error = "fail" the consumer gets a FeedError naming feed, epoch, batch, collection, _id and
field; with "skip" the epoch has every other document once and status counts the skip. The
worker is never restarted.

One collection and one daemon per on_error mode serve every case: feed KIND selects the good
documents and the one that is bad for KIND.
"""

from __future__ import annotations

import io
import pickle
import struct
import uuid

import bson
import gridfs
import numpy as np
import pytest
from bson import DatetimeMS, ObjectId
from bson.raw_bson import RawBSONDocument
from PIL import Image
from pymongo.errors import PyMongoError

from mongofeed import Consumer, FeedError
from mongofeed.errors import WHOLE_DOCUMENT
from mongofeed.testing import Daemon
from tests.support import write_toml

COLLECTION = "docs"
GOOD = 15                # documents that fit every field, _id 0..14
BATCH = 2                # 8 batches per epoch: the daemon cannot reach the next epoch's
MAX_PENDING = 2          # bad document (the last one) while the test reads an epoch
OVERSIZED_BYTES = 4 * 2**20
TIMEOUT_S = 30
YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z: Python's datetime stops at 9999
FAR_DATE_ID = 99         # a good document with such a date in a field the config does not use


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


FIELDS = {
    "idx": {"path": "_id", "decode": "scalar", "dtype": "int64"},
    "raw": {"decode": "raw", "dtype": "float32", "shape": [4]},
    "npy": {"decode": "npy", "dtype": "float32", "shape": [2]},
    "scalar": {"decode": "scalar", "dtype": "float64"},
    "list": {"decode": "list", "dtype": "int32", "shape": [3]},
    "image": {"decode": "image", "dtype": "uint8", "shape": [2, 2, 1]},
    "pickle": {"decode": "pickle", "dtype": "float32", "shape": [2], "allow_pickle": True},
    "blob": {"decode": "raw", "dtype": "uint8", "shape": [4], "gridfs": True},
}

# The deprecated binary subtype 2 holds its own length again inside; pymongo refuses a value
# where the two disagree (InvalidBSON), which the servers store and return as they are. It
# takes the place of a field the config reads: the workers fetch only those.
UNDECODABLE_ELEMENT = (b"\x05list\x00" + struct.pack("<i", 8) + b"\x02"
                       + struct.pack("<i", 99) + b"abcd")

# kind: (field it breaks, its bad value (None: a GridFS id without a file, bytes: a raw BSON
# element added to the document), found text)
BAD = {
    "raw": ("raw", b"\x00" * 3, "found 3 bytes"),
    "oversized": ("raw", b"\x00" * OVERSIZED_BYTES, f"found {OVERSIZED_BYTES} bytes"),
    "npy": ("npy", npy(np.zeros(2, np.int64)), "found int64 (2,)"),
    "scalar": ("scalar", "seven", "found str"),
    "list": ("list", [1, 2], "found shape (2,)"),
    "image": ("image", b"not an image", "found not a PNG/JPEG image"),
    "pickle": ("pickle", b"not a pickle", "found not a pickle"),
    "gridfs": ("blob", None, "missing in bucket 'fs'"),
    "undecodable": (WHOLE_DOCUMENT, UNDECODABLE_ELEMENT,
                    "found a document that pymongo cannot decode (InvalidBSON"),
}
BAD_IDS = {kind: 100 + n for n, kind in enumerate(BAD)}  # after the good ones in plan order


def good_document(i: int, bucket: gridfs.GridFSBucket) -> dict:
    return {"_id": i, "kind": "", "raw": np.full(4, i, np.float32).tobytes(),
            "npy": npy(np.full(2, i, np.float32)), "scalar": float(i), "list": [i, i, i],
            "image": png(np.full((2, 2), i, np.uint8)),
            "pickle": pickle.dumps([float(i), float(i)]),
            "blob": bucket.upload_from_stream(f"blob{i}", bytes([i] * 4))}


def with_element(doc: dict, element: bytes) -> RawBSONDocument:
    """``doc`` as BSON with one more (raw) element, inserted as it is."""
    body = bson.encode(doc)[4:-1] + element
    return RawBSONDocument(struct.pack("<i", 4 + len(body) + 1) + body + b"\x00")


@pytest.fixture(scope="module")
def collection(mongo_client):
    """The database, and the kinds whose bad document the server refused to store."""
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    bucket = gridfs.GridFSBucket(db)
    docs = [good_document(i, bucket) for i in range(GOOD)]
    docs.append({**good_document(FAR_DATE_ID, bucket), "kind": "far_date",
                 "when": DatetimeMS(YEAR_10000_MS)})
    refused = set()
    for kind, (field, value, _) in BAD.items():
        doc = {**good_document(BAD_IDS[kind], bucket), "_id": BAD_IDS[kind], "kind": kind}
        if kind == "undecodable":
            del doc["list"]  # the element takes its place
            try:
                db[COLLECTION].insert_one(with_element(doc, value))
            except PyMongoError:  # a server that validates the inner length
                refused.add(kind)
            continue
        doc[field] = ObjectId() if value is None else value
        docs.append(doc)
    db[COLLECTION].insert_many(docs)
    yield db, refused
    mongo_client.drop_database(db.name)


@pytest.fixture(scope="module", params=["fail", "skip"])
def served(request, collection, mongo_uri, tmp_path_factory):
    """A daemon of every feed, and its on_error mode."""
    db, _ = collection
    config = {
        "source": {"uri": mongo_uri, "database": db.name, "collection": COLLECTION},
        "feeds": {kind: {"filter": {"kind": {"$in": ["", kind]}}, "shuffle": False}
                  for kind in [*BAD, "far_date"]},
        "batch": {"size": BATCH, "on_error": request.param},
        "fields": FIELDS,
        "output": {"inputs": ["raw"], "targets": ["idx"]},
        "serve": {"max_pending": MAX_PENDING},
    }
    path = write_toml(tmp_path_factory.mktemp(request.param) / "docs.toml", config)
    with Daemon(path, workers=1) as daemon:
        yield daemon, request.param


def never_restarted(daemon) -> bool:
    return all(worker["restarts"] == 0 for worker in daemon.status()["workers"])


@pytest.mark.parametrize("kind", list(BAD))
def test_a_document_that_does_not_fit(served, collection, kind):
    daemon, on_error = served
    if kind in collection[1]:
        pytest.skip(f"this server refuses to store the {kind} document")
    field, _, found = BAD[kind]
    bad_id = BAD_IDS[kind]
    with Consumer(daemon.bind, kind, timeout=TIMEOUT_S, prefetch=2) as consumer:
        if on_error == "fail":
            received = []
            with pytest.raises(FeedError) as failed:
                for _ in range(consumer.batches_per_epoch):
                    received.append(consumer.get().index)
            message = str(failed.value)
            last = consumer.batches_per_epoch - 1  # the bad document sorts last
            assert received == list(range(last))  # every batch before it, then the error
            assert f"feed {kind!r}, epoch 0, batch {last}: " in message
            assert f"collection {COLLECTION!r}, _id {bad_id!r}: field {field!r}" in message
            assert found in message
            assert any(f"_id {bad_id!r}" in e for e in daemon.status()["errors"])
            assert never_restarted(daemon)
            return
        ids = [int(i) for batch in consumer.epoch() for i in batch.arrays["idx"]]
        [session] = [s for s in daemon.status()["sessions"] if s["session"] == consumer.session]
    assert ids == list(range(GOOD))  # every other document, once, in plan order
    assert session["skips"] == 1
    assert never_restarted(daemon)


def test_a_date_beyond_year_9999_in_a_field_not_used_is_no_error(served):
    """pymongo cannot make a datetime of it; the worker reads it as a DatetimeMS instead of
    dying on the whole batch, and the document is served like any other."""
    daemon, _ = served
    with Consumer(daemon.bind, "far_date", timeout=TIMEOUT_S, prefetch=2) as consumer:
        ids = [int(i) for batch in consumer.epoch() for i in batch.arrays["idx"]]
        [session] = [s for s in daemon.status()["sessions"] if s["session"] == consumer.session]
    assert ids == [*range(GOOD), FAR_DATE_ID]
    assert session["skips"] == 0
    assert never_restarted(daemon)


def test_oversized_documents_beyond_a_reply_are_named_not_a_crash_loop(tmp_path, mongo_uri, db):
    """Four 13 MiB documents make one 54 MB reply, over the driver's 48 MB limit."""
    huge = b"\x00" * (13 * 2**20)
    db[COLLECTION].insert_many([{"_id": i, "raw": huge} for i in range(4)])
    config = write_toml(tmp_path / "huge.toml", {
        "source": {"uri": mongo_uri, "database": db.name, "collection": COLLECTION},
        "batch": {"size": 4}, "fields": {"raw": FIELDS["raw"]}})
    with Daemon(config, workers=1) as daemon, \
            Consumer(daemon.bind, "train", timeout=TIMEOUT_S) as consumer:
        with pytest.raises(FeedError, match=rf"_id \d: field 'raw'.*found {len(huge)} bytes"):
            consumer.get()
        assert daemon.status()["workers"][0]["restarts"] == 0
