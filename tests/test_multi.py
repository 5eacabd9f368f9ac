"""Beyond one machine: one daemon per host, each with `serve --shard r/R`, and one
`MultiConsumer` (or an adapter given a list of endpoints) that reads their union, epoch by
epoch, with every document at most once and only the remainder of an uneven split left out."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import pytest

from mongofeed import FeedError
from mongofeed.consumer import MultiConsumer
from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml

WORLD = 2


def start_shards(stack: ExitStack, mongo_uri, db, tmp_path, count: int) -> list[str]:
    """``WORLD`` daemons over the same ``count`` documents, daemon r with ``--shard r/WORLD``;
    returns their endpoints."""
    insert_samples(db.samples, count)
    path = write_toml(tmp_path / "c.toml", sample_config(
        mongo_uri, db.name, batch={"size": 4}, feeds={"train": {"filter": {}, "shuffle": True}},
        output={"inputs": ["idx", "x"], "targets": ["label"]}))
    return [stack.enter_context(Daemon(path, workers=1, args=["--shard", f"{r}/{WORLD}"])).bind
            for r in range(WORLD)]


def test_multi_consumer_reads_the_union_of_shards_each_epoch(mongo_uri, db, tmp_path):
    count = 45  # odd on purpose: one document is the remainder of the split
    with ExitStack() as stack:
        endpoints = start_shards(stack, mongo_uri, db, tmp_path, count)
        with MultiConsumer(endpoints, timeout=30) as feed:
            assert feed.batches_per_epoch == 2 * 6  # 22 documents per shard, batches of 4
            assert (feed.inputs, feed.targets) == (["idx", "x"], ["label"])
            for epoch in range(2):
                batches = list(feed.epoch())
                assert [(b.epoch, b.index) for b in batches] == [
                    (epoch, i) for i in range(feed.batches_per_epoch)]
                ids = Counter(i for b in batches for i in b.arrays["idx"].tolist())
                assert max(ids.values()) == 1, f"epoch {epoch}: a document came twice"
                assert set(ids) <= set(range(count)) and count - len(ids) <= WORLD - 1


def test_daemons_with_different_schemas_are_refused(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 20)
    paths = [write_toml(tmp_path / f"c{size}.toml",
                        sample_config(mongo_uri, db.name, batch={"size": size},
                                      feeds={"train": {}}))
             for size in (4, 5)]
    with Daemon(paths[0], workers=1) as a, Daemon(paths[1], workers=1) as b:
        with pytest.raises(FeedError, match=f"different schemas.*{b.bind} differ from {a.bind}"):
            MultiConsumer([a.bind, b.bind], timeout=30)


# Keras learns the length of a dataset of unknown cardinality by running out of it, and warns.
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_tf_dataset_over_shards_drives_keras_fit(mongo_uri, db, tmp_path):
    """``model.fit`` on ``mongofeed.tf.dataset([...])`` trains on every document exactly once
    per epoch. To see what training really got (not just what the dataset produced), the
    model runs eagerly and a pass-through layer records the ``idx`` input of each step; a
    callback starts a new record at each epoch."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from mongofeed.tf import dataset

    count = 48  # even: the two shards cover every document

    class Recorder(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def call(self, idx, x):
            if tf.executing_eagerly():  # not while the model is being built
                self.epochs[-1] += keras.ops.convert_to_numpy(idx).tolist()
            return x

    recorder = Recorder()
    idx = keras.Input(shape=(), name="idx", dtype="int64")
    x = keras.Input(shape=(4,), name="x")
    out = keras.layers.Dense(3, activation="softmax")(recorder(idx, x))
    model = keras.Model({"idx": idx, "x": x}, out)
    model.compile(optimizer="sgd", loss="categorical_crossentropy", run_eagerly=True)
    new_epoch = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: recorder.epochs.append([]))

    with ExitStack() as stack:
        train = dataset(start_shards(stack, mongo_uri, db, tmp_path, count), timeout=30)
        model.fit(train, epochs=2, shuffle=False, callbacks=[new_epoch], verbose=0)
    assert len(recorder.epochs) == 2
    for epoch, ids in enumerate(recorder.epochs):
        assert Counter(ids) == Counter(range(count)), f"epoch {epoch}"
