"""Feeds of several sources through real daemons and FerretDB: exact draws per source for
repeat and choose, a class-balanced feed over a 90/10 collection at 50/50 per epoch (also
as a small Keras model sees it), the same order on two daemons, at a restart and after
workers are killed, one query per collection a batch reads, status and inspect per source,
and sources whose documents do not fit the declared fields refused before the daemon
starts, naming source and field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter

import numpy as np
import pytest
from pymongo import MongoClient

from mongofeed import Consumer
from mongofeed.daemon.config import parse_config
from mongofeed.daemon.planning import plan_feed
from mongofeed.daemon.source import MongoSource
from mongofeed.errors import SourceError
from mongofeed.testing import Daemon, ServerCounters
from mongofeed.tools.inspect import format_report, inspect_source
from tests.support import REPO, write_toml

CATS, DOGS, EXTRA = range(0, 90), range(90, 100), range(1000, 1020)  # idx of each
BATCH = 8
SOURCES = {  # feed "counted": 25 + 7 + 10 = 42 per epoch, 6 batches (the last of 2)
    "dogs": {"filter": {"y": 1}, "repeat": 2.5},
    "extra": {"collection": "extra", "choose": 7},
    "cats": {"filter": {"y": 0}, "choose": 10},
}
BALANCED = {"cats": {"filter": {"y": 0}, "proportion": 0.5},  # 20 + 20 per epoch
            "dogs": {"filter": {"y": 1}, "proportion": 0.5}}


def documents(ids, label: int, x_bytes: int = 16) -> list[dict]:
    return [{"i": i, "y": label, "x": np.full(x_bytes // 4, i, np.float32).tobytes()}
            for i in ids]


def config(uri: str, database: str, feeds: dict) -> dict:
    return {
        "source": {"uri": uri, "database": database, "collection": "animals"},
        "feeds": feeds,
        "batch": {"size": BATCH, "seed": 4},
        "fields": {"idx": {"path": "i", "decode": "scalar", "dtype": "int64"},
                   "cls": {"path": "y", "decode": "scalar", "dtype": "int64"},
                   "x": {"decode": "raw", "dtype": "float32", "shape": [4]},
                   "label": {"path": "y", "decode": "scalar", "dtype": "int64", "one_hot": 2}},
        "output": {"inputs": ["cls", "x"], "targets": ["label"]},
        "serve": {"max_pending": 4},
    }


@pytest.fixture(scope="module")
def data(mongo_client, mongo_uri, tmp_path_factory):
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    db.animals.insert_many(documents(CATS, 0) + documents(DOGS, 1))
    db.extra.insert_many(documents(EXTRA, 1))
    raw = config(mongo_uri, db.name, {
        "counted": {"sources": SOURCES},
        "balanced": {"epoch_size": 40, "sources": BALANCED}})
    path = write_toml(tmp_path_factory.mktemp("mixture") / "feed.toml", raw)
    try:
        yield db, raw, path
    finally:
        mongo_client.drop_database(db.name)


def epochs(consumer: Consumer, count: int) -> list[list[int]]:
    return [[i for b in consumer.epoch() for i in b.arrays["idx"].tolist()]
            for _ in range(count)]


def check_counted(epoch: list[int]):
    """repeat 2.5 of 10 dogs, choose 7 of 20 extra, choose 10 of 90 cats: exactly."""
    seen = Counter(epoch)
    dogs = sorted(seen[i] for i in DOGS)
    assert dogs == [2] * 5 + [3] * 5
    assert [seen[i] for i in EXTRA if seen[i]] == [1] * 7
    assert [seen[i] for i in CATS if seen[i]] == [1] * 10
    assert len(epoch) == 42


def test_exact_draws_same_order_on_two_daemons_and_a_restart(data, test_server):
    db, _, path = data
    counters = ServerCounters(test_server.uri, test_server.metrics_url)
    with Daemon(path, workers=2) as daemon:
        before = counters.read()["queries"]
        with Consumer(daemon.bind, feed="counted") as consumer:
            reference = epochs(consumer, 2)
            plan = consumer.info["plan"]
        queries = counters.read()["queries"]
        for epoch in reference:
            check_counted(epoch)
        assert reference[0] != reference[1]
        if before is not None:  # 12 batches and up to 8 made ahead, 2 collections each
            assert queries - before <= 2 * (12 + 8) < 2 * 42
        with Consumer(daemon.bind, feed="counted", start_epoch=1) as consumer:
            first = consumer.get().arrays["idx"].tolist()  # a restart at epoch 1, and
            for worker in daemon.status()["workers"]:     # workers killed mid-epoch
                os.kill(worker["pid"], signal.SIGKILL)
            rest = [i for _ in range(5) for i in consumer.get().arrays["idx"].tolist()]
            assert first + rest == reference[1]
            after_kill = epochs(consumer, 1)[0]  # made (also) by the restarted workers
        assert sum(w["restarts"] for w in daemon.status()["workers"]) == 2
        with Consumer(daemon.bind, feed="counted", start_epoch=2) as consumer:
            assert epochs(consumer, 1) == [after_kill]
        check_counted(after_kill)
        with Consumer(daemon.bind, feed="balanced") as consumer:
            balanced = [Counter(y for b in consumer.epoch() for y in b.arrays["cls"].tolist())
                        for _ in range(3)]
            assert balanced == [{0: 20, 1: 20}] * 3
            status = daemon.status()
            [session] = status["sessions"]
            delivered = session["delivered"]
            labels = Counter(y for _ in range(delivered - 15)
                             for y in consumer.get().arrays["cls"].tolist())
        assert session["drawn"] == {"cats": 60 + labels[0], "dogs": 60 + labels[1]}
        assert drawn_metric(status) == session["drawn"]
        sources = {s["name"]: s for s in status["feeds"]["balanced"]["sources"]}
        assert (sources["dogs"]["documents"], sources["dogs"]["draws"]) == (10, 20)
        assert sources["cats"]["filter"] == '{"y": 0}'
    with Daemon(path, workers=1) as daemon:  # another daemon: the same epochs
        with Consumer(daemon.bind, feed="counted") as consumer:
            assert consumer.info["plan"] == plan
            assert epochs(consumer, 1) == reference[:1]
        planned = daemon.status()["feeds"]["counted"]["planned"]["sources"]
        assert all("from_cache" in origin for origin in planned.values())


def drawn_metric(status: dict) -> dict | None:
    """``mongofeed_session_drawn_samples`` per source, as Prometheus would scrape it from
    ``status`` (None without the 'metrics' extra)."""
    try:
        from mongofeed.daemon.metrics import StatusCollector
        [family] = [f for f in StatusCollector(lambda: status).collect()
                    if f.name == "mongofeed_session_drawn_samples"]
    except ImportError:
        return status["sessions"][0]["drawn"]
    return {sample.labels["source"]: sample.value for sample in family.samples}


def test_inspect_shows_each_source_and_what_an_epoch_draws(data):
    _, raw, _ = data
    report = inspect_source(parse_config(raw), "counted")
    counted = {s["name"]: s for s in report["feeds"]["counted"]["sources"]}
    assert {name: (s["documents"], s["draws"]) for name, s in counted.items()} == {
        "dogs": (10, 25), "extra": (20, 7), "cats": (90, 10)}
    assert report["feeds"]["counted"]["batches_per_epoch"] == 6
    assert report["dry_run"]["documents"] == BATCH and not report["dry_run"]["skipped"]
    text = format_report(report)
    assert "dogs" in text and "repeat = 2.5" in text and "extra, {}" in text


def test_a_source_whose_documents_misfit_is_refused_before_serving(data, tmp_path):
    db, raw, _ = data
    db.odd.insert_many(documents(range(2000, 2010), 0, x_bytes=8))  # x: 2 floats, not 4
    feeds = {"train": {"sources": {"dogs": {"filter": {"y": 1}, "repeat": 1},
                                   "odd": {"collection": "odd", "repeat": 1}}}}
    path = write_toml(tmp_path / "odd.toml", {**raw, "feeds": feeds})
    result = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(path),
                             "--workers", "1"], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode != 0 and "mongofeed ready" not in result.stdout
    assert "source 'odd' (collection 'odd')" in result.stderr
    assert "field 'x'" in result.stderr and "expected 16 bytes" in result.stderr
    config = parse_config(raw)
    source, client = MongoSource(config.source), MongoClient(config.source.uri)
    try:
        for sources, message in [
                ({"none": {"filter": {"y": 7}, "repeat": 1}}, "source 'none' selects no"),
                ({"gone": {"collection": "gone", "repeat": 1}},
                 "source 'gone': collection .*gone does not exist")]:
            feed = parse_config({**raw, "feeds": {"train": {"sources": sources}}}).feeds["train"]
            with pytest.raises(SourceError, match=f"feed 'train'.*{message}"):
                plan_feed(source, client, config, feed)
    finally:
        client.close()


def test_a_keras_model_sees_both_classes_equally(data, tmp_path):
    """fit over the 50/50 feed of a 90/10 collection: 20 of each class reach the model in
    every epoch (recorded inside it)."""
    keras = pytest.importorskip("keras")
    from mongofeed.keras import MongoFeedSequence

    seen = []

    class Recorder(keras.layers.Layer):
        def call(self, cls, x):
            try:
                seen.append(keras.ops.convert_to_numpy(cls).reshape(-1).tolist())
            except Exception:  # noqa: BLE001 - symbolic tensors while Keras builds the model
                pass
            return x

    class Epochs(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(None)

    cls = keras.Input(shape=(), name="cls", dtype="int64")
    x = keras.Input(shape=(4,), name="x")
    model = keras.Model({"cls": cls, "x": x},
                        keras.layers.Dense(2, activation="softmax")(Recorder()(cls, x)))
    model.compile(optimizer="sgd", loss="categorical_crossentropy", run_eagerly=True)
    _, _, path = data
    with Daemon(path, workers=2) as daemon:
        train = MongoFeedSequence(daemon.bind, feed="balanced", timeout=30)
        model.fit(train, epochs=2, verbose=0, callbacks=[Epochs()])
        train.close()
    per_epoch, current = [], Counter()
    for labels in seen:
        if labels is None:
            per_epoch.append(current)
            current = Counter()
        else:
            current.update(labels)
    assert per_epoch == [{0: 20, 1: 20}] * 2
