"""MongoFeedSequence in this process (TF backend): indexing by hand walks the stream, a pass
that Keras's EpochIterator abandons is handed again, Keras's adapter driven by hand reads
whole epochs, a Keras caller mongofeed does not know raises, and multiprocessing is refused.
The fit matrix over backends and strategies is tests/test_keras_fit.py."""

from __future__ import annotations

import os

import pytest

from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml

keras = pytest.importorskip("keras")
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402
from keras.src.trainers.epoch_iterator import EpochIterator  # noqa: E402

from mongofeed.errors import FeedError  # noqa: E402
from mongofeed.keras import _KERAS_DIR, MongoFeedSequence  # noqa: E402

DOCS = 45  # 5 batches of 10, the last one short


@pytest.fixture
def daemon(tmp_path, mongo_uri, db):
    insert_samples(db.samples, DOCS)
    config = sample_config(mongo_uri, db.name, feeds={"train": {"shuffle": True}},
                           batch={"size": 10},
                           output={"inputs": ["idx", "x"], "targets": ["label"]})
    with Daemon(write_toml(tmp_path / "feed.toml", config), workers=2) as running:
        yield running


def ids(batches) -> list[int]:
    return sorted(i for x, _ in batches for i in x["idx"].tolist())


def test_manual_indexing_walks_the_stream(daemon):
    seq = MongoFeedSequence(daemon.bind, timeout=30)
    first = [seq[i][0]["idx"].tolist() for i in range(len(seq))]
    second = [seq[i][0]["idx"].tolist() for i in range(len(seq))]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(DOCS))
    assert first != second  # the second pass is the next, reshuffled epoch
    with pytest.raises(IndexError):
        seq[len(seq)]
    seq.close()


def test_a_pass_keras_abandons_is_handed_again(daemon):
    """What fit does under a strategy or on JAX: one batch from a fresh pass, reset(), then
    the epochs. Workers are accepted, but Keras's thread pool is not used."""
    seq = MongoFeedSequence(daemon.bind, timeout=30, workers=4)
    iterator = EpochIterator(x=seq, shuffle=True)
    _, _, [abandoned] = next(iter(iterator))
    iterator.reset()
    epochs = [[batch for _, _, [batch] in iterator] for _ in range(2)]
    assert ids(epochs[0]) == ids(epochs[1]) == list(range(DOCS))
    assert abandoned[0]["idx"].tolist() == epochs[0][0][0]["idx"].tolist()
    assert seq.workers == 1
    seq.close()


def test_an_adapter_driven_by_hand_reads_whole_epochs(daemon):
    """As mongofeed bench drives Keras's adapter: its passes count as used."""
    seq = MongoFeedSequence(daemon.bind, timeout=30)
    adapter = PyDatasetAdapter(seq, shuffle=False)
    epochs = []
    for _ in range(2):
        adapter.on_epoch_begin()
        epochs.append(list(adapter.get_numpy_iterator()))
        adapter.on_epoch_end()
    assert ids(epochs[0]) == ids(epochs[1]) == list(range(DOCS))
    assert epochs[0][0][0]["idx"].tolist() != epochs[1][0][0]["idx"].tolist()
    seq.close()


def test_a_keras_caller_mongofeed_does_not_know_raises(daemon):
    """A Keras that ends a pass from elsewhere: mongofeed cannot tell if training used it."""
    seq = MongoFeedSequence(daemon.bind, timeout=30)
    adapter = PyDatasetAdapter(seq)
    future_keras = compile("adapter.on_epoch_end()",
                           os.path.join(_KERAS_DIR, "src", "trainers", "future.py"), "exec")
    with pytest.raises(FeedError, match="which mongofeed does not know"):
        exec(future_keras, {"adapter": adapter})
    seq.close()


def test_multiprocessing_is_refused(daemon):
    with pytest.raises(ValueError, match="use_multiprocessing=True.*--workers"):
        MongoFeedSequence(daemon.bind, use_multiprocessing=True, workers=4)
