"""A Keras fit interrupted by an exception and resumed in a new process by
keras.callbacks.BackupAndRestore: with FollowFitEpochs, every fit epoch sees the documents of
the feed epoch of the same number, in its order, as an uninterrupted run would (the
resumed run starts at epoch 1, whose order is not epoch 0's). TF backend, in processes of
their own (tests/keras_scenarios.py)."""

from __future__ import annotations

import uuid

import pytest

from mongofeed import Consumer
from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml
from tests.test_keras_fit import scenario_results, start_scenarios

pytest.importorskip("tensorflow")

TRAIN, BATCH = 22, 4  # 6 batches per epoch, the last short


@pytest.fixture
def daemon(tmp_path, mongo_client, mongo_uri):
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    insert_samples(db.samples, TRAIN)
    config = sample_config(mongo_uri, db.name, batch={"size": BATCH, "seed": 3},
                           feeds={"train": {"filter": {}, "shuffle": True}},
                           output={"inputs": ["idx", "x"], "targets": ["label"]})
    try:
        with Daemon(write_toml(tmp_path / "feed.toml", config), workers=2) as running:
            yield running
    finally:
        mongo_client.drop_database(db.name)


@pytest.mark.timeout(600)
def test_a_fit_resumed_by_backup_and_restore_sees_each_epochs_own_order(daemon, tmp_path):
    with Consumer(daemon.bind, timeout=30) as feed:
        epochs = [[i for b in feed.epoch() for i in b.arrays["idx"].tolist()]
                  for _ in range(3)]
    assert epochs[0] != epochs[1]  # else a resume at epoch 0's order would pass unseen
    env = {"MONGOFEED_BACKUP_DIR": str(tmp_path / "backup")}
    interrupted = scenario_results(start_scenarios(daemon, "tensorflow",
                                                   ["tf-backup-interrupted"], env))
    interrupted = interrupted["tf-backup-interrupted"]
    assert interrupted["error"].startswith("RuntimeError: interrupted in epoch 1"), \
        interrupted["error"]
    assert interrupted["epochs"] == [0, 1]
    assert interrupted["train"][0] == epochs[0]
    assert interrupted["train"][1] == epochs[1][:3 * BATCH]  # 3 batches, then the exception

    resumed = scenario_results(start_scenarios(daemon, "tensorflow", ["tf-backup-resumed"],
                                               env))["tf-backup-resumed"]
    assert resumed["error"] is None, resumed["error"]
    assert resumed["epochs"] == [1, 2]
    assert resumed["train"] == epochs[1:]
