"""The TensorFlow and PyTorch adapters against a real daemon: the element spec comes from
the hello reply, and every iteration is one epoch with every document exactly once."""

from __future__ import annotations

import pytest

from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml

COUNT, BATCH = 45, 8  # 45 train documents: 5 full batches and a short one of 5


@pytest.fixture
def daemon(mongo_uri, db, tmp_path):
    insert_samples(db.samples, COUNT + 5, val=5)
    config = sample_config(mongo_uri, db.name, batch={"size": BATCH},
                           output={"inputs": ["idx", "x"], "targets": ["label"]})
    with Daemon(write_toml(tmp_path / "c.toml", config), workers=2) as running:
        yield running


def test_tf_dataset_spec_and_two_full_epochs(daemon):
    tf = pytest.importorskip("tensorflow")
    from mongofeed.tf import dataset

    train = dataset(daemon.bind, feed="train")
    inputs, targets = train.element_spec
    assert inputs["idx"] == tf.TensorSpec((None,), tf.int64, "idx")
    assert inputs["x"] == tf.TensorSpec((None, 4), tf.float32, "x")
    assert targets == tf.TensorSpec((None, 3), tf.float32, "label")
    for _ in range(2):
        seen = []
        for inputs, targets in train:
            seen += inputs["idx"].numpy().tolist()
            assert targets.shape[0] == inputs["x"].shape[0]
        assert sorted(seen) == list(range(COUNT))


def test_tf_dataset_iteration_stopped_early_is_handed_again(daemon):
    """As Keras's symbolic build under a strategy does: a batch from an iterator it drops.
    The next iteration hands it again, first, in a whole epoch; an iteration that reads on
    after a newer one began gets an error (once past what it had read ahead)."""
    pytest.importorskip("tensorflow")
    from mongofeed.tf import dataset

    train = dataset(daemon.bind, feed="train")
    dropped = iter(train)
    first = next(dropped)[0]["idx"].numpy().tolist()
    del dropped
    stale = iter(train)
    next(stale)
    epoch = [inputs["idx"].numpy().tolist() for inputs, _ in train]
    assert epoch[0] == first and sorted(sum(epoch, [])) == list(range(COUNT))
    with pytest.raises(Exception, match="iterate one at a time"):
        list(stale)
    assert sorted(i for inputs, _ in train for i in inputs["idx"].numpy()) == list(range(COUNT))


def test_torch_dataset_one_epoch_per_iteration(daemon):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from torch.utils.data import DataLoader

    from mongofeed.torch import IterableDataset

    train = IterableDataset(daemon.bind, feed="train")
    loader = DataLoader(train, batch_size=None, num_workers=0)
    assert len(loader) == len(train) == 6
    for _ in range(2):
        seen = []
        for inputs, targets in loader:
            assert inputs["x"].dtype == torch.float32 and targets.shape[1:] == (3,)
            seen += inputs["idx"].tolist()
        assert sorted(seen) == list(range(COUNT))
    train.close()


def test_torch_dict_batches_and_workers_refused(daemon):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    from torch.utils.data import DataLoader

    from mongofeed.torch import IterableDataset

    train = IterableDataset(daemon.bind, feed="val", as_dict=True)
    batch = next(iter(train))
    assert set(batch) == {"idx", "x", "label"}
    with pytest.raises(Exception, match="num_workers > 0"):
        next(iter(DataLoader(train, batch_size=None, num_workers=1)))
    train.close()
