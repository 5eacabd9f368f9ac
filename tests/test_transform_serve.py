"""User functions in the daemon's workers, against the real server and real processes: the
forum's preprocessing byte for byte, reproducible augmentation whatever the worker count,
text padded with its lengths into a Keras model, failures named and survived, and the
projection of what is used."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pymongo
import pytest

from mongofeed import Consumer, FeedError
from mongofeed.consumer import model_io
from mongofeed.daemon.config import parse_config
from mongofeed.daemon.source import BatchReader
from mongofeed.daemon.transform import projection
from mongofeed.testing import Daemon
from mongofeed.tools.inspect import format_report, inspect_source
from tests.support import REPO, write_toml

TESTS = str(REPO / "tests")
FRAME_SHAPE = (4, 5, 3)


def feed_config(uri, db, collection, transform, arrays=None, fields=None, output=None,
                batch=None, feeds=None) -> dict:
    config = {
        "source": {"uri": uri, "database": db.name, "collection": collection},
        "feeds": feeds or {"train": {"shuffle": True}},
        "batch": {"size": 5, "seed": 11, **(batch or {})},
        "fields": fields or {},
        "transform": {"paths": [TESTS], **transform},
        "arrays": arrays or {},
        "output": output or {},
    }
    return {key: value for key, value in config.items() if value != {}}


def epochs(consumer, count) -> list[list]:
    return [[(b.epoch, b.index, {k: v.copy() for k, v in b.arrays.items()})
             for b in consumer.epoch()] for _ in range(count)]


# -- the forum's Sequence, byte for byte ---------------------------------------------------------

def forum_batches(uri, database, collection, ids, batch_size):
    """The forum's ``MongoSequence.__getitem__`` logic as intended (one client, one find per
    sample), over ``ids`` in the daemon's plan order."""
    keras = pytest.importorskip("keras")
    collection = pymongo.MongoClient(uri)[database][collection]
    for item in range(-(-len(ids) // batch_size)):
        oids = ids[item * batch_size:(item + 1) * batch_size]
        X = np.empty((len(oids), *FRAME_SHAPE), dtype=np.float32)  # noqa: N806
        y = np.empty((len(oids), 2), dtype=np.float32)
        for i, oid in enumerate(oids):
            smp = collection.find({"_id": oid}).next()
            X[i, :, :, :] = pickle.loads(smp["frame"]).astype(np.float32)
            y[i] = keras.utils.to_categorical(not smp["result"], 2)
        yield X, y
    collection.database.client.close()


def test_forum_preprocessing_byte_for_byte(tmp_path, mongo_uri, db):
    rng = np.random.default_rng(0)
    db.full_set.insert_many([{"i": i, "frame": pickle.dumps(rng.normal(size=FRAME_SHAPE)),
                              "result": bool(rng.random() < 0.5)} for i in range(12)])
    config = feed_config(
        mongo_uri, db, "full_set", {"document": "user_functions:forum_sample",
                                    "reads": ["frame", "result"]},
        fields={"i": {"decode": "scalar", "dtype": "int64"}},
        arrays={"X": {"dtype": "float32", "shape": list(FRAME_SHAPE)},
                "y": {"dtype": "float32", "shape": [2]}, "i": {"dtype": "int64"}},
        output={"inputs": ["X"], "targets": ["y"]}, feeds={"train": {"shuffle": False}})
    ids = sorted(doc["_id"] for doc in db.full_set.find({}, {"_id": 1}))
    with Daemon(write_toml(tmp_path / "forum.toml", config), workers=2) as daemon, \
            Consumer(daemon.bind, timeout=60) as consumer:
        ours = [batch.arrays for batch in consumer.epoch()]
    theirs = list(forum_batches(mongo_uri, db.name, "full_set", ids, 5))
    assert len(ours) == len(theirs) == 3
    order = {doc["_id"]: doc["i"] for doc in db.full_set.find({}, {"i": 1})}
    for k, (arrays, (X, y)) in enumerate(zip(ours, theirs, strict=True)):  # noqa: N806
        assert arrays["i"].tolist() == [order[i] for i in ids[k * 5:(k + 1) * 5]]
        assert arrays["X"].tobytes() == X.tobytes() and arrays["X"].shape == X.shape
        assert arrays["y"].tobytes() == y.tobytes() and arrays["y"].dtype == y.dtype


# -- augmentation: seeded by the plan, not by the worker -----------------------------------------

@pytest.fixture
def images(db):
    rng = np.random.default_rng(1)
    db.images.insert_many([{"i": i, "pixels": rng.integers(0, 256, (6, 6), np.uint8).tobytes(),
                            "unused": b"x" * 1000} for i in range(23)])
    return db


def augment_config(uri, db) -> dict:
    return feed_config(
        uri, db, "images", {"document": "user_functions:crop_and_flip",
                            "batch": "user_functions:noisy_weights"},
        fields={"image": {"path": "pixels", "decode": "raw", "dtype": "uint8", "shape": [6, 6]},
                "label": {"path": "i", "decode": "scalar", "dtype": "int64"}},
        arrays={"image": {"dtype": "uint8", "shape": [4, 4], "cast": "float32",
                          "scale": 1 / 255, "cast_on": "consumer"},
                "label": {"dtype": "int64"}, "weight": {"dtype": "float32"}},
        output={"inputs": ["image"], "targets": ["label"], "sample_weight": "weight"})


def test_augmented_epochs_are_the_same_whoever_makes_them(tmp_path, mongo_uri, images):
    path = write_toml(tmp_path / "augment.toml", augment_config(mongo_uri, images))
    with Daemon(path, workers=1) as one, Daemon(path, workers=3) as three:
        with Consumer(one.bind, timeout=60) as a, Consumer(three.bind, timeout=60) as b:
            assert a.schema.arrays[0].dtype == "uint8"  # the wire carries the stored bytes
            assert a.schema.delivered[0].dtype == "float32"
            first, second = epochs(a, 3), epochs(b, 3)
            x, y, w = model_io(a.get().arrays, a.inputs, a.targets, a.sample_weight)
            assert x.shape == (5, 4, 4) and y.shape == w.shape == (5,)
        with Consumer(one.bind, timeout=60, start_epoch=2) as restarted:
            again = epochs(restarted, 1)[0]
    for epoch_a, epoch_b in [*zip(first, second, strict=True), (first[2], again)]:
        for (ea, ia, arrays_a), (eb, ib, arrays_b) in zip(epoch_a, epoch_b, strict=True):
            assert (ea, ia) == (eb, ib)
            for name in arrays_a:
                assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), (ea, ia, name)
    crops = {}  # label -> the image it got in each epoch
    for epoch in first:
        for _, _, arrays in epoch:
            assert arrays["image"].dtype == np.float32 and arrays["image"].max() <= 1
            for label, image in zip(arrays["label"], arrays["image"], strict=True):
                crops.setdefault(int(label), []).append(image.tobytes())
    assert sorted(crops) == list(range(23)) and all(len(c) == 3 for c in crops.values())
    assert any(len(set(c)) > 1 for c in crops.values())  # augmented anew each epoch


def test_inspect_runs_the_functions_and_reads_only_what_is_used(mongo_uri, images):
    config = parse_config(augment_config(mongo_uri, images), "augment.toml")
    report = inspect_source(config)
    dry = report["dry_run"]
    assert dry["functions"] == {"transform.document": "user_functions:crop_and_flip",
                                "transform.batch": "user_functions:noisy_weights"}
    assert dry["arrays"]["image"]["shape"] == [5, 4, 4] and dry["arrays"]["image"]["dtype"] \
        == "uint8"
    assert dry["arrays"]["weight"]["min"] >= 0.5
    assert "ran transform.document = user_functions:crop_and_flip" in format_report(report)
    client = pymongo.MongoClient(mongo_uri)
    reader = BatchReader(client, config.source, 100, projection(config))
    doc = reader.read([images.images.find_one()["_id"]])[0]
    assert sorted(doc) == ["_id", "i", "pixels"]  # not "unused"
    client.close()


# -- text: strings in, padded tokens and lengths out, into Keras --------------------------------

TEXTS = ["the cat sat on the mat", "a dog ran", "the red dog ran fast", "a big cat",
         "the small blue cat sat", "dog", "a slow dog sat on a mat", "the cat ran"]


def test_text_trains_a_keras_model(tmp_path, mongo_uri, db):
    keras = pytest.importorskip("keras")
    from mongofeed.keras import MongoFeedSequence
    from mongofeed.tf import dataset

    db.texts.insert_many([{"text": text, "label": int("cat" in text), "w": 1.0 + i % 2}
                          for i, text in enumerate(TEXTS * 3)])
    config = feed_config(
        mongo_uri, db, "texts", {"batch": "user_functions:tokenise"},
        fields={"text": {"decode": "string"},
                "label": {"decode": "scalar", "dtype": "int64"},
                "w": {"decode": "scalar", "dtype": "float32"}},
        arrays={"tokens": {"dtype": "int32", "shape": [-1], "max_length": 16, "pad_to": 4,
                           "lengths": "length"},
                "label": {"dtype": "float32"}, "w": {"dtype": "float32"}},
        output={"inputs": ["tokens"], "targets": ["label"], "sample_weight": "w"},
        # Seed 11: epoch 0's batches are 8 tokens wide, epoch 1 begins with one of width 4.
        # Keras would fix a padded dimension from the first two batches of a PyDataset, but
        # MongoFeedSequence shows it the hello reply's None (mongofeed.keras.signature_batch).
        batch={"size": 6, "seed": 11})
    with Daemon(write_toml(tmp_path / "text.toml", config), workers=2) as daemon:
        with Consumer(daemon.bind, timeout=60) as consumer:
            assert consumer.schema.arrays[0].shape == (None,)
            for batch in consumer.epoch():
                tokens, lengths = batch.arrays["tokens"], batch.arrays["length"]
                assert tokens.shape[1] % 4 == 0 and tokens.shape[1] == -(-lengths.max() // 4) * 4
                assert ((tokens != 0).sum(axis=1) == lengths).all()
        spec = dataset(daemon.bind, timeout=60).element_spec
        assert spec[0].shape.as_list() == [None, None] and spec[0].dtype.name == "int32"
        assert len(spec) == 3  # (x, y, sample_weight)
        model = keras.Sequential([keras.Input((None,), dtype="int32"),
                                  keras.layers.Embedding(20, 4, mask_zero=True),
                                  keras.layers.GlobalAveragePooling1D(),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy")
        sequence = MongoFeedSequence(daemon.bind, timeout=60)
        history = model.fit(sequence, epochs=2, verbose=0)
        sequence.close()
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()


# -- failures: named, skipped or sent to the session, never the worker's end ---------------------

def test_user_function_failures_are_named_and_survived(tmp_path, mongo_uri, db):
    db.marked.insert_many([{"i": i, "bad": i == 4, "poison": i == 9} for i in range(20)])
    bad_id = db.marked.find_one({"i": 4})["_id"]

    def config(on_error):
        return feed_config(
            mongo_uri, db, "marked", {"document": "user_functions:fails_on_marked",
                                      "batch": "user_functions:fails_on_batch",
                                      "reads": ["bad", "i"]},
            fields={"poison": {"decode": "scalar", "dtype": "bool"}},
            arrays={"i": {"dtype": "int64"}}, batch={"on_error": on_error, "size": 4},
            feeds={"train": {"filter": {"poison": False}}, "all": {"filter": {}}})

    with Daemon(write_toml(tmp_path / "skip.toml", config("skip")), workers=2) as skip, \
            Daemon(write_toml(tmp_path / "fail.toml", config("fail")), workers=2) as fail:
        with Consumer(skip.bind, timeout=60) as consumer:
            for _ in range(2):
                seen = Counter(i for b in consumer.epoch() for i in b.arrays["i"].tolist())
                assert seen == Counter(i for i in range(20) if i not in (4, 9))  # exactly once
        with Consumer(skip.bind, feed="all", timeout=60) as consumer, \
                pytest.raises(FeedError, match="transform.batch 'user_functions:fails_on_batch'"
                              " raised RuntimeError: poisoned batch"):
            list(consumer.epoch())
        with Consumer(fail.bind, timeout=60) as consumer, \
                pytest.raises(FeedError, match=re.escape(
                    f"_id {bad_id!r}: transform.document 'user_functions:fails_on_marked': "
                    f"raised ValueError: cannot use document 4")):
            list(consumer.epoch())
        with Consumer(skip.bind, timeout=60) as consumer:  # the daemon serves on
            assert len(list(consumer.epoch())) == consumer.batches_per_epoch
        for daemon in (skip, fail):
            workers = daemon.status()["workers"]
            assert [w["restarts"] for w in workers] == [0, 0]
    log = skip.stderr_path.read_text()
    assert f"_id {bad_id!r}: transform.document 'user_functions:fails_on_marked': raised " \
           f"ValueError: cannot use document 4" in log


def test_serve_refuses_a_function_it_cannot_import(tmp_path, mongo_uri, db):
    config = feed_config(mongo_uri, db, "none", {"document": "user_functions:missing"},
                         fields={"i": {"decode": "scalar", "dtype": "int64"}},
                         arrays={"i": {"dtype": "int64"}})
    path = write_toml(tmp_path / "bad.toml", config)
    done = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode != 0
    assert (f"{path}: transform.document = 'user_functions:missing': module user_functions "
            f"({TESTS}/user_functions.py) has no 'missing'") in done.stderr
