"""``dataset()``: one feed of a running ``mongofeed serve`` as a ``tf.data.Dataset``.

The element spec comes from the daemon's hello reply (names, dtypes, per-sample shapes; the
batch dimension is None because the last batch of an epoch may be short), so TensorFlow
never reads a batch to infer it. Each iteration of the dataset is one whole epoch of the
feed. An iteration that stops before the end of its epoch (Keras's symbolic build under a
``tf.distribute`` strategy reads one batch, and a prefetch a few more, from an iterator it
then drops; a ``take`` or a ``break``) is handed again, first, to the next iteration
(``Replay``), so no batch is lost and every epoch is whole. Elements are ``(inputs,
targets)`` like ``MongoFeedSequence``: one array, or a dict of arrays when the config's
``[output]`` names several.
"""

from __future__ import annotations

import tensorflow as tf

from .consumer import connect, model_io
from .replay import DEFAULT_REPLAY_BATCHES, Replay


def dataset(endpoint: str | list[str], feed: str = "train",
            replay_batches: int = DEFAULT_REPLAY_BATCHES, **consumer_kwargs) -> tf.data.Dataset:
    """Batches of ``feed`` from the daemon at ``endpoint``; ``consumer_kwargs`` go to
    ``Consumer`` (control, timeout, start_epoch, shard, prefetch). The session lasts as long
    as the dataset. A list of endpoints reads their union (``MultiConsumer``). An iteration
    that stops early is replayed up to ``replay_batches`` batches; beyond that, the next
    iteration raises rather than lose the rest.

    Example::

        train = mongofeed.tf.dataset("tcp://127.0.0.1:5555", feed="train")
        model.fit(train.prefetch(2), epochs=10)
    """
    consumer = connect(endpoint, feed=feed, **consumer_kwargs)
    replay = Replay(consumer, replay_batches)
    specs = {spec.name: tf.TensorSpec((None, *spec.shape), tf.as_dtype(spec.dtype), spec.name)
             for spec in consumer.schema.delivered}

    def structure(arrays: dict) -> tuple:
        return model_io(arrays, consumer.inputs, consumer.targets, consumer.sample_weight)

    def one_epoch():
        pass_number = replay.restart()
        for left in reversed(range(consumer.batches_per_epoch)):
            batch = replay.take(pass_number)
            if not left:
                replay.commit()  # the whole epoch was handed: the next iteration is the next
            yield structure(batch.arrays)

    return tf.data.Dataset.from_generator(one_epoch, output_signature=structure(specs))
