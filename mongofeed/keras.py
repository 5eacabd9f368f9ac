"""``MongoFeedSequence``: a thin ``keras.utils.PyDataset`` over a ``Consumer``.

The daemon decides the order (shuffled by seed, per epoch), so the index Keras asks for only
counts: each call returns the next batch of the stream, and an epoch of ``fit`` is exactly
one epoch of the feed. Two Keras habits need care:

- Before iterating, Keras (TensorFlow backend) reads ``seq[0]`` and ``seq[1]`` in
  ``get_tf_dataset`` to infer the output signature. Batches taken for that peek are kept
  and returned once more when the epoch asks for the same index: nothing lost or repeated.
- Keras may call ``__getitem__`` from a tf.data thread or its own worker threads; a lock
  makes that safe. Worker *processes* would each need their own session and would repeat
  the data, so ``use_multiprocessing=True`` is refused.
"""

from __future__ import annotations

import sys
import threading

import keras

from .consumer import DEFAULT_PREFETCH, DEFAULT_TIMEOUT_S, connect, model_io

PEEK_FUNCTION = "get_tf_dataset"  # keras/src/trainers/data_adapters/py_dataset_adapter.py
PEEK_FRAMES_SEARCHED = 6


class MongoFeedSequence(keras.utils.PyDataset):
    """Batches of one feed of a running ``mongofeed serve``, as ``(inputs, targets)``.

    Example::

        train = MongoFeedSequence("tcp://127.0.0.1:5555", feed="train")
        val = MongoFeedSequence("tcp://127.0.0.1:5555", feed="val")
        model.fit(train, validation_data=val, epochs=10)

    A list of endpoints (one daemon per host, each ``serve --shard r/R``) reads their union
    through a ``MultiConsumer``.
    """

    def __init__(self, endpoint: str | list[str], feed: str = "train", control: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, start_epoch: int = 0,
                 shard: tuple[int, int] | None = None, prefetch: int = DEFAULT_PREFETCH,
                 server_key: str | None = None, client_key: str | None = None,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10):
        if use_multiprocessing:
            raise ValueError(
                "MongoFeedSequence does not support use_multiprocessing=True: each process "
                "would open its own session and repeat the data. The mongofeed daemon already "
                "reads and decodes in parallel (mongofeed serve --workers N); leave it off.")
        super().__init__(workers=workers, use_multiprocessing=False,
                         max_queue_size=max_queue_size)
        self.consumer = connect(endpoint, feed=feed, control=control, timeout=timeout,
                                 start_epoch=start_epoch, shard=shard, prefetch=prefetch,
                                 server_key=server_key, client_key=client_key)
        self._lock = threading.Lock()
        self._served = 0  # batches taken from the stream in this epoch
        self._peeked: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.consumer.batches_per_epoch

    def __getitem__(self, index: int):
        with self._lock:
            if index in self._peeked:
                return self._peeked.pop(index)
            if self._served == len(self):
                self._served = 0
            consumer = self.consumer
            item = model_io(consumer.get().arrays, consumer.inputs, consumer.targets,
                            consumer.sample_weight)
            self._served += 1
            if _called_by_keras_peek():
                self._peeked[index] = item
            return item

    def close(self):
        """End the session now (otherwise it ends when this object is collected)."""
        self.consumer.close()


def _called_by_keras_peek() -> bool:
    frame = sys._getframe(2)
    for _ in range(PEEK_FRAMES_SEARCHED):
        if frame is None:
            return False
        if frame.f_code.co_name == PEEK_FUNCTION and "keras" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
