"""``dataset()``: one feed of a running ``mongofeed serve`` as a ``tf.data.Dataset``.

The element spec comes from the daemon's hello reply (names, dtypes, per-sample shapes; the
batch dimension is None because the last batch of an epoch may be short), so TensorFlow
never reads a batch to infer it. Each iteration of the dataset is one whole epoch of the
feed (the rest of it, after a resume in the middle of one). An iteration that stops before
the end of its epoch (Keras's symbolic build under a ``tf.distribute`` strategy reads one
batch, and a prefetch a few more, from an iterator it then drops; a ``take`` or a
``break``) is handed again, first, to the next iteration (``Replay``), so no batch is lost
and every epoch is whole. Elements are ``(inputs, targets)`` like ``MongoFeedSequence``: one
array, or a dict of arrays when the config's ``[output]`` names several.

The dataset's ``feed_state`` is its position for a checkpoint: a
``tf.train.Checkpoint(..., feed=train.feed_state)`` saves and restores it with the model.
``distributed_dataset`` gives each input pipeline of a ``tf.distribute`` strategy its part.
"""

from __future__ import annotations

import json

import tensorflow as tf

from .consumer import DEFAULT_HELD_BATCHES, connect, model_io
from .distributed import JobRank
from .replay import DEFAULT_REPLAY_BATCHES, Replay


class DatasetState(tf.train.experimental.PythonState):
    """Where a ``dataset``'s stream is, for ``tf.train.Checkpoint``: saved as the
    consumer's state (``Consumer.state_dict``), restored by continuing there.

    The state counts the batches the dataset handed to TensorFlow. At an epoch's end it is
    exact; in the middle of one, batches that a ``prefetch`` after the dataset read ahead of
    training count as used (a resume skips them): iterate the dataset itself for exact
    mid-epoch states (mongofeed's consumer reads ahead already).
    """

    def __init__(self, replay: Replay):
        self.replay = replay

    def state_dict(self) -> dict:
        return self.replay.state_dict()

    def load_state_dict(self, state: dict):
        self.replay.load_state_dict(state)

    def align_epoch(self, epoch: int):
        """Make the next iteration feed epoch ``epoch`` (``keras.FollowFitEpochs``)."""
        self.replay.align_epoch(epoch)

    def serialize(self) -> bytes:
        return json.dumps(self.state_dict()).encode()

    def deserialize(self, string_value):
        self.load_state_dict(json.loads(bytes(string_value).decode()))


def dataset(endpoint: str | list[str], feed: str = "train",
            replay_batches: int = DEFAULT_REPLAY_BATCHES, **consumer_kwargs) -> tf.data.Dataset:
    """Batches of ``feed`` from the daemon at ``endpoint``; ``consumer_kwargs`` go to
    ``Consumer`` (control, timeout, start_epoch, shard, prefetch, state, shared_memory; the
    batches kept to hand again count as held). The session lasts as long as the dataset. A
    list of endpoints reads their union (``MultiConsumer``). An iteration that stops early
    is replayed up to ``replay_batches`` batches; beyond that, the next iteration raises
    rather than lose the rest.

    Example::

        train = mongofeed.tf.dataset("tcp://127.0.0.1:5555", feed="train")
        checkpoint = tf.train.Checkpoint(model=model, feed=train.feed_state)
        model.fit(train, epochs=10)
    """
    consumer_kwargs.setdefault("held_batches", replay_batches + DEFAULT_HELD_BATCHES)
    consumer = connect(endpoint, feed=feed, **consumer_kwargs)
    replay = Replay(consumer, replay_batches)
    specs = {spec.name: tf.TensorSpec((None, *spec.shape), tf.as_dtype(spec.dtype), spec.name)
             for spec in consumer.schema.delivered}

    def structure(arrays: dict) -> tuple:
        return model_io(arrays, consumer.inputs, consumer.targets, consumer.sample_weight)

    def one_epoch():
        pass_number = replay.restart()
        for left in reversed(range(replay.pass_length())):
            batch = replay.take(pass_number)
            if not left:
                replay.commit()  # the whole epoch was handed: the next iteration is the next
            yield structure(batch.arrays)

    data = tf.data.Dataset.from_generator(one_epoch, output_signature=structure(specs))
    data.feed_state = DatasetState(replay)
    return data


def dataset_fn(endpoint: str | list[str], feed: str = "train", **dataset_kwargs):
    """A function for ``strategy.distribute_datasets_from_function``: input pipeline i of n
    (``InputContext.input_pipeline_id``, ``num_input_pipelines``) reads rank i of n's part
    of the feed (``mongofeed.distributed``: all of a whole feed's daemon, or its host's
    daemon's part). The datasets it made are in its ``datasets`` list (for their
    ``feed_state``). Each batch of the feed goes to one replica: the feed's
    ``batch.size`` is the batch per replica."""
    made = []

    def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
        rank = JobRank(context.input_pipeline_id, context.num_input_pipelines,
                       "tf.distribute InputContext")
        made.append(dataset(endpoint, feed, shard=rank, **dataset_kwargs))
        return made[-1]

    make.datasets = made
    return make


def distributed_dataset(strategy: tf.distribute.Strategy, endpoint: str | list[str],
                        feed: str = "train", **dataset_kwargs):
    """``feed`` for ``strategy`` (``MultiWorkerMirroredStrategy``: one input pipeline per
    worker, each reading its part; see ``dataset_fn``)::

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        train = mongofeed.tf.distributed_dataset(strategy, "tcp://127.0.0.1:5555")
    """
    return strategy.distribute_datasets_from_function(dataset_fn(endpoint, feed,
                                                                 **dataset_kwargs))
