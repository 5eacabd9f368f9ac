"""Keras runs against a real daemon, in a process of their own (tests/test_keras_fit.py starts it).

The Keras backend and TensorFlow's logical devices are fixed when they start, so each backend
runs its scenarios in one such process:

    KERAS_BACKEND=tensorflow python tests/keras_scenarios.py ENDPOINT SCENARIO...

and prints one JSON line: for each scenario, the ``idx`` of every sample that reached the
model, per fit epoch (``train``, ``val``) or per call (``predict``, ``evaluate``), recorded
inside the model by a layer, the fit epochs they were recorded in (``epochs``), and
``error`` (None, or the error the run raised). The ``backup`` scenarios (tests/
test_keras_resume.py) keep Keras's BackupAndRestore files in $MONGOFEED_BACKUP_DIR.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import defaultdict

BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPUs, for MirroredStrategy; set before TensorFlow initialises its devices.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from mongofeed.errors import FeedError  # noqa: E402
from mongofeed.keras import FollowFitEpochs, MongoFeedSequence  # noqa: E402

EPOCHS = 2
TIMEOUT_S = 30


class Log:
    """The ids that reached the model, by phase ("train", "val", ...) and fit epoch."""

    def __init__(self):
        self.ids = defaultdict(lambda: defaultdict(list))
        self.epoch = 0
        self.phase = None  # set for calls outside fit (predict, evaluate)

    def record(self, training: bool, ids):
        phase = self.phase or ("train" if training else "val")
        self.ids[phase][self.epoch].extend(int(i) for i in ids)

    def result(self) -> dict:
        return {"epochs": sorted(self.ids.get("train", {})),
                **{phase: [epochs[e] for e in sorted(epochs)]
                   for phase, epochs in self.ids.items()}}


class Recorder(keras.layers.Layer):
    """Passes ``x`` through and records the ``idx`` of each sample of a real batch (replicas
    of a distribution strategy each record their part)."""

    def __init__(self, log: Log, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def call(self, idx, x, training=None):
        try:
            ids = keras.ops.convert_to_numpy(idx)
        except Exception:  # symbolic tensors: Keras is building the model, no data flows
            return x
        self.log.record(bool(training), ids.reshape(-1))
        return x


class EpochCounter(keras.callbacks.Callback):
    def __init__(self, log: Log):
        super().__init__()
        self.log = log

    def on_epoch_begin(self, epoch, logs=None):
        self.log.epoch = epoch


def build_model(log: Log, strategy=None) -> keras.Model:
    def build():
        idx = keras.Input(shape=(), name="idx", dtype="int64")
        x = keras.Input(shape=(4,), name="x")
        out = keras.layers.Dense(3, activation="softmax")(Recorder(log)(idx, x))
        model = keras.Model({"idx": idx, "x": x}, out)
        # Eager steps, so that the recording layer sees each batch's values.
        model.compile(optimizer="sgd", loss="categorical_crossentropy", run_eagerly=True)
        return model

    if strategy is None:
        return build()
    with strategy.scope():
        return build()


def sequences(endpoint: str, workers: int = 1):
    return (MongoFeedSequence(endpoint, feed="train", workers=workers, timeout=TIMEOUT_S),
            MongoFeedSequence(endpoint, feed="val", workers=workers, timeout=TIMEOUT_S))


def fit(log: Log, endpoint: str, strategy=None, workers: int = 1):
    train, val = sequences(endpoint, workers)
    build_model(log, strategy).fit(train, validation_data=val, epochs=EPOCHS, verbose=0,
                                   callbacks=[EpochCounter(log)])


def fit_then_evaluate(log: Log, endpoint: str, strategy=None):
    """fit, then evaluate twice on the validation sequence fit used: each call one epoch."""
    train, val = sequences(endpoint)
    model = build_model(log, strategy)
    model.fit(train, validation_data=val, epochs=EPOCHS, verbose=0,
              callbacks=[EpochCounter(log)])
    log.phase = "evaluate"
    for call in range(2):
        log.epoch = call
        model.evaluate(val, verbose=0)


def fit_tf_dataset(log: Log, endpoint: str, strategy):
    from mongofeed.tf import dataset

    train = dataset(endpoint, feed="train", timeout=TIMEOUT_S)
    val = dataset(endpoint, feed="val", timeout=TIMEOUT_S)
    build_model(log, strategy).fit(train.prefetch(2), validation_data=val, epochs=EPOCHS,
                                   verbose=0, callbacks=[EpochCounter(log)])


def predict(log: Log, endpoint: str):
    """predict twice with a fresh model: each call reads one whole epoch."""
    _, val = sequences(endpoint)
    model = build_model(log)
    log.phase = "predict"
    for call in range(2):
        log.epoch = call
        model.predict(val, verbose=0)


def steps_per_epoch_below_len(log: Log, endpoint: str):
    train, _ = sequences(endpoint)
    build_model(log).fit(train, epochs=EPOCHS, steps_per_epoch=len(train) - 2, verbose=0)


class Interrupt(keras.callbacks.Callback):
    """Stops fit with an exception after batch ``batch`` of epoch ``epoch``, as a preempted
    machine would (after BackupAndRestore saved the epochs before), or Ctrl-C."""

    def __init__(self, epoch: int, batch: int, error: type[BaseException] = RuntimeError):
        super().__init__()
        self.epoch, self.batch, self.error, self.current = epoch, batch, error, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise self.error(f"interrupted in epoch {self.epoch} after batch {batch}")


def fit_interrupted_then_aligned(log: Log, endpoint: str):
    """Ctrl-C in the first epoch after more batches than are kept to hand again: the next
    fit is refused with the way on (align_epoch); after align_epoch(1), fit reads feed
    epochs 1 and 2 whole. Only those two fits' batches are recorded."""
    train = MongoFeedSequence(endpoint, feed="train", timeout=TIMEOUT_S, replay_batches=4)
    model = build_model(log)
    try:
        model.fit(train, epochs=1, verbose=0, callbacks=[Interrupt(0, 5, KeyboardInterrupt)])
        raise AssertionError("fit was not interrupted")
    except KeyboardInterrupt:
        pass
    try:
        model.fit(train, epochs=1, verbose=0)
        raise AssertionError("a fit after a pass longer than replay_batches was not refused")
    except FeedError as exc:
        if "align_epoch(1) on the sequence" not in str(exc):
            raise
    train.align_epoch(1)
    log.ids.clear()
    model.fit(train, epochs=EPOCHS, verbose=0, callbacks=[EpochCounter(log)])


def fit_with_backup(log: Log, endpoint: str, interrupt: bool):
    """3 epochs with BackupAndRestore and FollowFitEpochs: interrupted in epoch 1 (after
    its third batch), or resumed from what an interrupted run saved."""
    train = MongoFeedSequence(endpoint, feed="train", timeout=TIMEOUT_S)
    callbacks = [keras.callbacks.BackupAndRestore(os.environ["MONGOFEED_BACKUP_DIR"]),
                 FollowFitEpochs(train), EpochCounter(log)]
    if interrupt:
        callbacks.append(Interrupt(epoch=1, batch=2))
    build_model(log).fit(train, epochs=3, verbose=0, callbacks=callbacks)


def strategies():
    return {"one-device": tf.distribute.OneDeviceStrategy("/cpu:0"),
            "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}


def scenarios(endpoint: str) -> dict:
    if BACKEND == "jax":
        return {
            "jax": lambda log: fit(log, endpoint),
            "jax-workers4": lambda log: fit(log, endpoint, workers=4),
            "jax-predict": lambda log: predict(log, endpoint),
            "jax-interrupted": lambda log: fit_interrupted_then_aligned(log, endpoint),
        }
    strategy = strategies()
    return {
        "tf": lambda log: fit(log, endpoint),
        "tf-workers4": lambda log: fit(log, endpoint, workers=4),
        "tf-one-device-workers4": lambda log: fit(log, endpoint, strategy["one-device"], 4),
        "tf-mirrored-evaluate": lambda log: fit_then_evaluate(log, endpoint,
                                                              strategy["mirrored"]),
        "tf-dataset-mirrored": lambda log: fit_tf_dataset(log, endpoint, strategy["mirrored"]),
        "tf-steps-per-epoch": lambda log: steps_per_epoch_below_len(log, endpoint),
        "tf-backup-interrupted": lambda log: fit_with_backup(log, endpoint, interrupt=True),
        "tf-backup-resumed": lambda log: fit_with_backup(log, endpoint, interrupt=False),
    }


def main(endpoint: str, names: list[str]):
    runs = scenarios(endpoint)
    results = {}
    for name in names:
        log = Log()
        try:
            runs[name](log)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        results[name] = {**log.result(), "error": error}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
