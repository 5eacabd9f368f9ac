"""MongoFeedSequence under real Keras: the signature peek loses nothing, fit sees each
document exactly once per epoch, and multiprocessing is refused clearly."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml

keras = pytest.importorskip("keras")
from mongofeed.keras import MongoFeedSequence  # noqa: E402

DOCS = 45


class RecordingSequence(MongoFeedSequence):
    """Records the ``idx`` of every sample it hands to Keras, and from which thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed = []
        self.threads = set()

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        self.handed.append(x["idx"].tolist())
        self.threads.add(threading.current_thread().name)
        return x, y


@pytest.fixture
def daemon(tmp_path, mongo_uri, db):
    insert_samples(db.samples, DOCS)
    config = sample_config(mongo_uri, db.name, feeds={"train": {}}, batch={"size": 10},
                           output={"inputs": ["idx", "x"], "targets": ["label"]})
    with Daemon(write_toml(tmp_path / "feed.toml", config), workers=2) as running:
        yield running


def tiny_model():
    idx = keras.Input(shape=(), name="idx", dtype="int64")
    x = keras.Input(shape=(4,), name="x")
    out = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model({"idx": idx, "x": x}, out)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


def test_fit_sees_every_document_once_per_epoch(daemon):
    seq = RecordingSequence(daemon.bind, timeout=30)
    assert len(seq) == 5
    tiny_model().fit(seq, epochs=3, verbose=0)  # shuffle=True: Keras asks indices at random
    peek, epochs = seq.handed[:2], seq.handed[2:]
    assert len(epochs) == 3 * len(seq)
    for e in range(3):
        handed = epochs[e * len(seq):(e + 1) * len(seq)]
        ids = Counter(i for batch in handed for i in batch)
        assert ids == Counter(range(DOCS)), f"epoch {e}"
    # The peeked batches reached training, in the first epoch (wherever Keras asked for them).
    assert all(batch in epochs[:len(seq)] for batch in peek)
    assert any(name != threading.main_thread().name for name in seq.threads)
    seq.close()


def test_manual_indexing_walks_the_stream(daemon):
    seq = MongoFeedSequence(daemon.bind, timeout=30)
    first = [seq[i][0]["idx"].tolist() for i in range(len(seq))]
    second = [seq[i][0]["idx"].tolist() for i in range(len(seq))]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(DOCS))
    assert first != second  # the second pass is the next, reshuffled epoch
    seq.close()


def test_multiprocessing_is_refused(daemon):
    with pytest.raises(ValueError, match="use_multiprocessing=True.*--workers"):
        MongoFeedSequence(daemon.bind, use_multiprocessing=True, workers=4)
