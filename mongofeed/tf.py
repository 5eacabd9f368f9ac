"""``dataset()``: one feed of a running ``mongofeed serve`` as a ``tf.data.Dataset``.

The element spec comes from the daemon's hello reply (names, dtypes, per-sample shapes; the
batch dimension is None because the last batch of an epoch may be short), so TensorFlow
never reads a batch to infer it and no batch is lost. Each iteration of the dataset is one
epoch of the feed (the rest of the current one, if an earlier iteration stopped early).
Elements are ``(inputs, targets)`` like ``MongoFeedSequence``: one array, or a dict of arrays
when the config's ``[output]`` names several.
"""

from __future__ import annotations

import tensorflow as tf

from .consumer import connect, model_io


def dataset(endpoint: str | list[str], feed: str = "train", **consumer_kwargs) -> tf.data.Dataset:
    """Batches of ``feed`` from the daemon at ``endpoint``; ``consumer_kwargs`` go to
    ``Consumer`` (control, timeout, start_epoch, shard, prefetch). The session lasts as long
    as the dataset. A list of endpoints reads their union (``MultiConsumer``).

    Example::

        train = mongofeed.tf.dataset("tcp://127.0.0.1:5555", feed="train")
        model.fit(train.prefetch(2), epochs=10)
    """
    consumer = connect(endpoint, feed=feed, **consumer_kwargs)
    specs = {spec.name: tf.TensorSpec((None, *spec.shape), tf.as_dtype(spec.dtype), spec.name)
             for spec in consumer.schema.delivered}

    def structure(arrays: dict) -> tuple:
        return model_io(arrays, consumer.inputs, consumer.targets, consumer.sample_weight)

    def one_epoch():
        for batch in consumer.epoch():
            yield structure(batch.arrays)

    return tf.data.Dataset.from_generator(one_epoch, output_signature=structure(specs))
