"""Every document exactly once per fit epoch, on every path Keras takes: the TF backend with
and without a tf.distribute strategy (one device, two mirrored logical CPUs), the JAX
backend, with validation data, with PyDataset workers, evaluate and predict, and
mongofeed.tf.dataset under a strategy. What reaches the model is recorded inside it.

Each backend runs its scenarios in one process of its own (tests/keras_scenarios.py: the
backend and TensorFlow's devices are fixed when they start), against one daemon."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from mongofeed.testing import Daemon
from tests.support import REPO, insert_samples, sample_config, write_toml

pytest.importorskip("keras")

# train: 11 batches per epoch, val: 3, the last of each short. Both shuffled, so that an epoch
# of fit that straddles two feed epochs shows as repeated and missing documents.
TRAIN, VAL, BATCH = 42, 10, 4
TRAIN_IDS, VAL_IDS = range(TRAIN), range(TRAIN, TRAIN + VAL)
EPOCHS = 2  # as tests/keras_scenarios.py runs them
SCENARIOS_TIMEOUT_S = 240

TF_SCENARIOS = ["tf", "tf-workers4", "tf-one-device-workers4", "tf-mirrored-evaluate",
                "tf-dataset-mirrored"]
JAX_SCENARIOS = ["jax", "jax-workers4", "jax-predict"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, mongo_client, mongo_uri):
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    insert_samples(db.samples, TRAIN + VAL, val=VAL)
    config = sample_config(mongo_uri, db.name, batch={"size": BATCH}, feeds={
                               "train": {"filter": {"split": "train"}, "shuffle": True},
                               "val": {"filter": {"split": "val"}, "shuffle": True}},
                           output={"inputs": ["idx", "x"], "targets": ["label"]})
    path = write_toml(tmp_path_factory.mktemp("keras") / "feed.toml", config)
    try:
        with Daemon(path, workers=2) as running:
            yield running
    finally:
        mongo_client.drop_database(db.name)


def start_scenarios(daemon, backend: str, names: list[str], env=None) -> subprocess.Popen:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           **(env or {})}
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "keras_scenarios.py"),
                             daemon.bind, *names], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def scenario_results(process: subprocess.Popen) -> dict:
    try:
        out, err = process.communicate(timeout=SCENARIOS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(daemon):
    """Both backends' processes run at once; a test waits for the one it checks."""
    names = {"tensorflow": [*TF_SCENARIOS, "tf-steps-per-epoch"],
             "jax": [*JAX_SCENARIOS, "jax-interrupted"]}
    processes = {backend: start_scenarios(daemon, backend, scenarios)
                 for backend, scenarios in names.items() if importlib.util.find_spec(backend)}
    done = {}

    def of(backend: str) -> dict:
        if backend not in processes:
            pytest.skip(f"{backend} is not installed")
        if backend not in done:
            done[backend] = scenario_results(processes[backend])
        return done[backend]

    yield of
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def assert_each_once(runs: list, ids: range, what: str, count: int = EPOCHS):
    assert len(runs) == count, f"{what}: {len(runs)} epochs recorded, expected {count}"
    for epoch, seen in enumerate(runs):
        extra = Counter(seen) - Counter(ids)
        missing = Counter(ids) - Counter(seen)
        assert not extra and not missing, (
            f"{what} epoch {epoch}: repeated or foreign {sorted(extra.elements())}, "
            f"missing {sorted(missing.elements())}")


def check(result: dict):
    assert result["error"] is None, result["error"]
    if "predict" in result:
        assert_each_once(result["predict"], VAL_IDS, "predict")
        return
    assert_each_once(result["train"], TRAIN_IDS, "train")
    assert_each_once(result["val"], VAL_IDS, "validation")
    if "evaluate" in result:
        assert_each_once(result["evaluate"], VAL_IDS, "evaluate")


@pytest.mark.timeout(SCENARIOS_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", TF_SCENARIOS)
def test_tensorflow(results, scenario):
    check(results("tensorflow")[scenario])


@pytest.mark.timeout(SCENARIOS_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", JAX_SCENARIOS)
def test_jax(results, scenario):
    check(results("jax")[scenario])


@pytest.mark.timeout(SCENARIOS_TIMEOUT_S + 60)
def test_steps_per_epoch_below_the_epoch_is_refused(results):
    """fit would train on a part of an epoch and carry the rest over: refused, loudly, at the
    end of the first fit epoch, before any batch could be repeated."""
    result = results("tensorflow")["tf-steps-per-epoch"]
    assert result["error"] and result["error"].startswith("FeedError"), result["error"]
    assert "leave steps_per_epoch" in result["error"], result["error"]
    seen = result["train"][0]
    steps = -(-TRAIN // BATCH) - 2  # as keras_scenarios.py asks: the first full batches
    # Refused at the end of the first fit epoch even when tf.data prefetched the whole feed
    # epoch by then (a pass of the right length): the steps Keras was asked for say so.
    assert len(seen) == len(set(seen)) == steps * BATCH
    assert f"asked for {steps} steps per epoch" in result["error"], result["error"]


@pytest.mark.timeout(SCENARIOS_TIMEOUT_S + 60)
def test_a_fit_stopped_past_the_replay_limit_goes_on_after_align_epoch(results):
    """Ctrl-C mid-epoch, more batches read than are kept to hand again: the next fit is
    refused naming align_epoch, and after align_epoch(1) two epochs arrive whole."""
    result = results("jax")["jax-interrupted"]
    assert result["error"] is None, result["error"]
    assert_each_once(result["train"], TRAIN_IDS, "train after align_epoch(1)")
