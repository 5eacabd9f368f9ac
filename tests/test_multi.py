"""Beyond one machine: one daemon per host, each with `serve --shard r/R`, and one
`MultiConsumer` (or an adapter given a list of endpoints) that reads their union, epoch by
epoch, with every document at most once and only the batches left over by an uneven split
(fewer than R) left out."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from contextlib import ExitStack

import pytest

from mongofeed import FeedError
from mongofeed.multi import MultiConsumer, check_same_plan, check_shards
from mongofeed.testing import Daemon, wait_until
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
    count = 45  # 12 global batches of 4, the last of one document: 6 per shard
    with ExitStack() as stack:
        endpoints = start_shards(stack, mongo_uri, db, tmp_path, count)
        with MultiConsumer(endpoints, timeout=30) as feed:
            assert feed.batches_per_epoch == 2 * 6
            assert (feed.inputs, feed.targets) == (["idx", "x"], ["label"])
            for epoch in range(2):
                batches = list(feed.epoch())
                assert [(b.epoch, b.index) for b in batches] == [
                    (epoch, i) for i in range(feed.batches_per_epoch)]
                ids = Counter(i for b in batches for i in b.arrays["idx"].tolist())
                assert max(ids.values()) == 1, f"epoch {epoch}: a document came twice"
                assert set(ids) == set(range(count))  # no batch left over


def test_daemons_with_different_schemas_are_refused(mongo_uri, db, tmp_path):
    insert_samples(db.samples, 20)
    paths = [write_toml(tmp_path / f"c{size}.toml",
                        sample_config(mongo_uri, db.name, batch={"size": size},
                                      feeds={"train": {}}))
             for size in (4, 5)]
    with Daemon(paths[0], workers=1) as a, Daemon(paths[1], workers=1) as b:
        with pytest.raises(FeedError, match=f"different schemas.*{b.bind} differ from {a.bind}"):
            MultiConsumer([a.bind, b.bind], timeout=30)


def test_daemons_whose_shards_do_not_split_one_epoch_are_refused(mongo_uri, db, tmp_path):
    """Three ways two daemons with the same schema would give documents twice and others
    never: the same --shard, another batch.seed, other _ids (filters that select as many
    documents, but others). Each is refused before a batch is taken, naming what differs at
    which endpoint, and the refused sessions end."""
    insert_samples(db.samples, 45)

    def config(name, seed=0, first=0):  # 40 documents: i in [first, first + 40)
        return write_toml(tmp_path / f"{name}.toml", sample_config(
            mongo_uri, db.name, batch={"size": 4, "seed": seed},
            feeds={"train": {"filter": {"i": {"$gte": first, "$lt": first + 40}}}}))

    with ExitStack() as stack:
        def serve(path, shard):
            return stack.enter_context(Daemon(path, workers=1, args=["--shard", shard]))

        base = serve(config("base"), "0/2")
        a, twin = base.bind, serve(config("base"), "0/2").bind
        seeded, other_ids = serve(config("seed", seed=1), "1/2").bind, serve(
            config("ids", first=5), "1/2").bind
        e = re.escape
        refusals = {
            twin: f"overlapping shards of feed 'train' \\(0/2 at {e(a)}, 0/2 at {e(twin)}\\).*"
                  f"start {e(a)} with --shard 0/2, {e(twin)} with --shard 1/2",
            seeded: f"plan feed 'train' differently.*batch\\.seed: 0 at {e(a)}, 1 at "
                    f"{e(seeded)}\\. Serve them with the same \\[batch\\] settings",
            other_ids: f"digest of the selected _ids: [0-9a-f]{{32}} at {e(a)}, [0-9a-f]{{32}} "
                       f"at {e(other_ids)}\\. Serve them with the same filter for feed 'train'",
        }
        for other, message in refusals.items():
            with pytest.raises(FeedError, match=message) as refused:
                MultiConsumer([a, other], timeout=30)
            assert "documents selected" not in str(refused.value)  # 40 on both
        assert wait_until(lambda: not base.status()["sessions"], timeout=30)


def test_shards_of_different_splits_are_refused_and_a_partial_split_is_warned_about():
    with pytest.raises(FeedError, match=re.escape(
            "different splits of feed 'train' (0/2 at A, 1/3 at B), so some documents would "
            "come twice and others never: start A with --shard 0/2, B with --shard 1/2")):
        check_shards("train", [("A", (0, 2)), ("B", (1, 3))])
    with pytest.warns(UserWarning, match=re.escape(
            "reads 2 of 4 shards of feed 'train' (0/4 at A, 2/4 at B): every epoch leaves out "
            "the documents of shard 1/4, 3/4")):
        check_shards("train", [("A", (0, 4)), ("B", (2, 4))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_shards("train", [("B", (1, 2)), ("A", (0, 2))])  # a whole split, in any order


def test_plans_are_compared_setting_by_setting():
    plan = {"seed": 0, "batch_size": 4, "drop_last": False, "shuffle": True, "ids": 40,
            "ids_digest": "ab"}
    check_same_plan("val", [("A", plan), ("B", dict(plan))])
    with pytest.raises(FeedError, match=re.escape(
            "feeds.val.shuffle: True at A, False at B; documents selected: 40 at A, 41 at B; "
            "digest of the selected _ids: ab at A, cd at B. Serve them with the same [batch] "
            "settings and feed options and the same filter for feed 'val'")):
        check_same_plan("val", [("A", plan), ("B", {**plan, "shuffle": False, "ids": 41,
                                                     "ids_digest": "cd"})])
    with pytest.raises(FeedError, match="B do not announce the plan"):
        check_same_plan("val", [("A", plan), ("B", None)])
    windowed = {**plan, "shuffle": "window", "order": "feistel6-splitmix64",
                "window": [1024, 64]}
    with pytest.raises(FeedError, match=re.escape(
            "window shape (documents per range, ranges per window: batch.window_bytes): "
            "[1024, 64] at A, [512, 64] at B")):
        check_same_plan("val", [("A", windowed), ("B", {**windowed, "window": [512, 64]})])


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
