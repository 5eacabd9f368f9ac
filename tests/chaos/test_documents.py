"""Documents that do not fit, through the real daemon: one bad document per decoder (and an
oversized one, and a GridFS id with no file). With on_error = "fail" the consumer gets a
FeedError naming collection, _id and field; with "skip" the epoch has every other document
once and status counts the skip.

One collection and one daemon per on_error mode serve every case: feed KIND selects the good
documents and the one that is bad for KIND.
"""

from __future__ import annotations

import io
import pickle
import uuid

import gridfs
import numpy as np
import pytest
from bson import ObjectId
from PIL import Image

from mongofeed import Consumer, FeedError
from mongofeed.testing import Daemon
from tests.support import write_toml

COLLECTION = "docs"
GOOD = 15                # documents that fit every field, _id 0..14
BATCH = 2                # 8 batches per epoch: the daemon cannot reach the next epoch's
MAX_PENDING = 2          # bad document (the last one) while the test reads an epoch
OVERSIZED_BYTES = 4 * 2**20
TIMEOUT_S = 30


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

# kind: (field it breaks, its bad value or None for a GridFS id without a file, found text)
BAD = {
    "raw": ("raw", b"\x00" * 3, "found 3 bytes"),
    "oversized": ("raw", b"\x00" * OVERSIZED_BYTES, f"found {OVERSIZED_BYTES} bytes"),
    "npy": ("npy", npy(np.zeros(2, np.int64)), "found int64 (2,)"),
    "scalar": ("scalar", "seven", "found str"),
    "list": ("list", [1, 2], "found shape (2,)"),
    "image": ("image", b"not an image", "found not a PNG/JPEG image"),
    "pickle": ("pickle", b"not a pickle", "found not a pickle"),
    "gridfs": ("blob", None, "missing in bucket 'fs'"),
}
BAD_IDS = {kind: 100 + n for n, kind in enumerate(BAD)}  # after the good ones in plan order


def good_document(i: int, bucket: gridfs.GridFSBucket) -> dict:
    return {"_id": i, "kind": "", "raw": np.full(4, i, np.float32).tobytes(),
            "npy": npy(np.full(2, i, np.float32)), "scalar": float(i), "list": [i, i, i],
            "image": png(np.full((2, 2), i, np.uint8)),
            "pickle": pickle.dumps([float(i), float(i)]),
            "blob": bucket.upload_from_stream(f"blob{i}", bytes([i] * 4))}


@pytest.fixture(scope="module")
def collection(mongo_client):
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    bucket = gridfs.GridFSBucket(db)
    docs = [good_document(i, bucket) for i in range(GOOD)]
    for kind, (field, value, _) in BAD.items():
        doc = {**good_document(BAD_IDS[kind], bucket), "_id": BAD_IDS[kind], "kind": kind}
        doc[field] = ObjectId() if value is None else value
        docs.append(doc)
    db[COLLECTION].insert_many(docs)
    yield db
    mongo_client.drop_database(db.name)


@pytest.fixture(scope="module", params=["fail", "skip"])
def served(request, collection, mongo_uri, tmp_path_factory):
    """A daemon of every feed, and its on_error mode."""
    config = {
        "source": {"uri": mongo_uri, "database": collection.name, "collection": COLLECTION},
        "feeds": {kind: {"filter": {"kind": {"$in": ["", kind]}}, "shuffle": False}
                  for kind in BAD},
        "batch": {"size": BATCH, "on_error": request.param},
        "fields": FIELDS,
        "output": {"inputs": ["raw"], "targets": ["idx"]},
        "serve": {"max_pending": MAX_PENDING},
    }
    path = write_toml(tmp_path_factory.mktemp(request.param) / "docs.toml", config)
    with Daemon(path, workers=1) as daemon:
        yield daemon, request.param


@pytest.mark.parametrize("kind", list(BAD))
def test_a_document_that_does_not_fit(served, kind):
    daemon, on_error = served
    field, _, found = BAD[kind]
    bad_id = BAD_IDS[kind]
    with Consumer(daemon.bind, kind, timeout=TIMEOUT_S, prefetch=2) as consumer:
        if on_error == "fail":
            with pytest.raises(FeedError) as failed:
                for _ in range(consumer.batches_per_epoch):
                    consumer.get()
            message = str(failed.value)
            assert f"collection {COLLECTION!r}, _id {bad_id!r}: field {field!r}" in message
            assert found in message
            assert any(f"_id {bad_id!r}" in e for e in daemon.status()["errors"])
            return
        ids = [int(i) for batch in consumer.epoch() for i in batch.arrays["idx"]]
        [session] = [s for s in daemon.status()["sessions"] if s["session"] == consumer.session]
    assert ids == list(range(GOOD))  # every other document, once, in plan order
    assert session["skips"] == 1


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
