"""``MongoFeedSequence``: a thin ``keras.utils.PyDataset`` over a ``Consumer``.

The daemon decides the order (shuffled by seed, per epoch), so the index Keras asks for only
counts: each call hands the next batch of the stream, and every epoch of ``fit`` (or pass of
``evaluate``/``predict``) is exactly one epoch of the feed. Keras also reads batches that no
training step sees:

- the TF backend peeks at ``seq[0]`` and ``seq[1]`` for the output signature: those calls
  get empty batches made from the hello reply's schema (a padded dimension differs between
  the two, so Keras sees it as None), and the stream is not touched;
- under a ``tf.distribute`` strategy, and on the JAX and torch backends' first ``fit``, a
  symbolic build takes a batch from a fresh iterator (a prefetching one reads a few more)
  and resets it. Those batches are kept (``Replay``) and handed again, first, to the pass
  that follows, so nothing is lost or repeated:

- ``on_epoch_begin`` begins a pass: whatever Keras read since the last pass it used comes
  first again;
- ``on_epoch_end`` from a pass that training used commits it, after checking that it was one
  whole epoch of the feed: Keras's ``steps_per_epoch`` (or ``steps``) other than the epoch
  is refused loudly, whatever a prefetching iterator read ahead meanwhile.

How a pass *ended*, and which calls are the signature peek, need Keras's internals: see
``keras_pass_end`` and ``keras_reads_the_signature``. Keras's worker threads and
processes are not used (see ``MongoFeedSequence``).

``FollowFitEpochs`` keeps a sequence at fit's epoch: a ``fit`` that
``keras.callbacks.BackupAndRestore`` restored at epoch e (or ``fit(initial_epoch=e)``) gets
feed epoch e, the order an uninterrupted run would have had.
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np

from .consumer import (
    DEFAULT_HELD_BATCHES,
    DEFAULT_PREFETCH,
    DEFAULT_TIMEOUT_S,
    connect,
    model_io,
)
from .errors import FeedError
from .replay import DEFAULT_REPLAY_BATCHES, Replay


class MongoFeedSequence(keras.utils.PyDataset):
    """Batches of one feed of a running ``mongofeed serve``, as ``(inputs, targets)``.

    Example::

        train = MongoFeedSequence("tcp://127.0.0.1:5555", feed="train")
        val = MongoFeedSequence("tcp://127.0.0.1:5555", feed="val")
        model.fit(train, validation_data=val, epochs=10)

    A list of endpoints (one daemon per host, each ``serve --shard r/R``) reads their union
    through a ``MultiConsumer``. ``replay_batches`` bounds how many batches of a pass Keras
    abandons can be handed again (about 8 are needed; more raises, never loses). With
    ``keras.callbacks.BackupAndRestore``, add ``FollowFitEpochs(seq)`` to the callbacks: a
    restored ``fit`` then reads the epoch it restarts at. ``shared_memory`` as for
    ``Consumer``; the batches kept to hand again count as held, so the sequence may hold
    ``replay_batches`` more than a ``Consumer``'s default.

    ``workers`` and ``max_queue_size`` are accepted for ``PyDataset`` compatibility, but
    Keras's worker threads are not used: the daemon already reads and decodes in parallel
    (``serve --workers N``) and the consumer reads ahead (``prefetch``), while Keras's thread
    pool would carry batches read for a discarded pass into the next epoch.
    ``use_multiprocessing=True`` is refused. A subclass that overrides ``on_epoch_begin`` or
    ``on_epoch_end`` must call ``super()``'s.
    """

    def __init__(self, endpoint: str | list[str], feed: str = "train", control: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, start_epoch: int = 0,
                 shard: tuple[int, int] | None = None, prefetch: int = DEFAULT_PREFETCH,
                 server_key: str | None = None, client_key: str | None = None,
                 workers: int = 1, use_multiprocessing: bool = False, max_queue_size: int = 10,
                 replay_batches: int = DEFAULT_REPLAY_BATCHES, shared_memory: bool = True):
        if use_multiprocessing:
            raise ValueError(
                "MongoFeedSequence does not support use_multiprocessing=True: each process "
                "would open its own session and repeat the data. The mongofeed daemon already "
                "reads and decodes in parallel (mongofeed serve --workers N); leave it off.")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.consumer = connect(endpoint, feed=feed, control=control, timeout=timeout,
                                start_epoch=start_epoch, shard=shard, prefetch=prefetch,
                                server_key=server_key, client_key=client_key,
                                shared_memory=shared_memory,
                                held_batches=replay_batches + DEFAULT_HELD_BATCHES)
        self.replay = Replay(self.consumer, replay_batches)
        self._in_pass = False

    def __len__(self) -> int:
        return self.consumer.batches_per_epoch

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range(0, {len(self)})")
        consumer = self.consumer
        if index < SIGNATURE_PEEK_BATCHES and keras_reads_the_signature():
            arrays = signature_batch(consumer.schema, index)
        else:
            arrays = self.replay.take().arrays
        return model_io(arrays, consumer.inputs, consumer.targets, consumer.sample_weight)

    def align_epoch(self, epoch: int):
        """Make the next pass feed epoch ``epoch`` (``FollowFitEpochs`` calls this)."""
        self.replay.align_epoch(epoch)

    def on_epoch_begin(self):
        """Keras begins a pass: batches read since the last pass it used are handed first."""
        self.replay.restart()
        self._in_pass = True

    def on_epoch_end(self):
        """Keras ends a pass: commit it if training used it (one whole epoch, checked)."""
        used, steps = keras_pass_end()
        in_pass, self._in_pass = self._in_pass, False
        if used is False:
            return  # handed again by the next on_epoch_begin
        if used and not in_pass:
            raise FeedError("Keras ended an epoch that MongoFeedSequence did not see begin: a "
                            "subclass that overrides on_epoch_begin must call "
                            "super().on_epoch_begin()")
        handed, epochs = self.replay.commit()
        if used and (handed != len(self) or len(epochs) != 1 or steps not in (None, len(self))):
            what = (f"Keras ended a pass of {handed} batches (feed epochs {epochs})"
                    if steps in (None, len(self)) else
                    f"Keras was asked for {steps} steps per epoch")
            raise FeedError(
                f"{what} but feed "
                f"{self.consumer.feed!r} has {len(self)} per epoch: MongoFeedSequence serves "
                f"whole epochs, so leave steps_per_epoch, validation_steps and steps unset "
                f"(or equal to len(seq)). If they are, this Keras ({keras.__version__}) reads "
                f"a PyDataset in a way mongofeed does not know ({KERAS_CHECKED} is).")

    def close(self):
        """End the session now (otherwise it ends when this object is collected)."""
        self.consumer.close()


class FollowFitEpochs(keras.callbacks.Callback):
    """Each fit epoch e gets feed epoch e from ``feeds`` (``MongoFeedSequence``s, or
    datasets made by ``mongofeed.tf.dataset``): a ``fit`` restored by
    ``keras.callbacks.BackupAndRestore`` at epoch e, or started with ``initial_epoch=e``,
    gets the order an uninterrupted run would have had. A feed that is already there
    (every uninterrupted epoch) is left as it is; one that is not opens a new session at
    that epoch's start::

        train = MongoFeedSequence("tcp://127.0.0.1:5555", feed="train")
        model.fit(train, epochs=10, callbacks=[
            keras.callbacks.BackupAndRestore("backup"), FollowFitEpochs(train)])

    A validation feed follows too when it is evaluated every epoch (``validation_freq=1``).
    """

    def __init__(self, *feeds):
        super().__init__()
        if not feeds:
            raise ValueError("FollowFitEpochs needs the feeds to keep at fit's epoch")
        self.feeds = [_aligned(feed) for feed in feeds]

    def on_epoch_begin(self, epoch, logs=None):
        for feed in self.feeds:
            feed.align_epoch(epoch)


def _aligned(feed):
    """What ``FollowFitEpochs`` aligns for ``feed``: a sequence itself, a tf dataset's
    ``feed_state``."""
    target = getattr(feed, "feed_state", feed)
    if not callable(getattr(target, "align_epoch", None)):
        raise TypeError(f"FollowFitEpochs takes MongoFeedSequence objects and datasets made by "
                        f"mongofeed.tf.dataset, not {type(feed).__name__}")
    return target


def signature_batch(schema, index: int) -> dict:
    """An empty batch with the schema's delivered dtypes and shapes, a padded dimension of
    length ``index``: the two that Keras's signature peek gets tell it the batch dimension
    and every padded one are None, as ``mongofeed.tf.dataset``'s spec does."""
    return {spec.name: np.zeros((0, *(index if d is None else d for d in spec.shape)),
                                spec.dtype) for spec in schema.delivered}


# -- Keras internals, read from Keras 3.15.1 ----------------------------------------------------
# Every pass Keras makes over a PyDataset ends in PyDatasetAdapter.on_epoch_end
# (keras/src/trainers/data_adapters/py_dataset_adapter.py), called from one of three places in
# keras/src/trainers/epoch_iterator.py. EpochIterator.reset() ends a pass that no training step
# used: the symbolic build (TF trainer's
# _maybe_symbolic_build under a strategy, Trainer._symbolic_build, the JAX predict build),
# which all call reset() right after. _enumerate_iterator (end of an epoch) and
# catch_stop_iteration (the iterator ran out) end a pass that training used. A pass's end is
# an event a PyDataset cannot classify from what it is asked, so this looks at Keras's frames;
# any other Keras caller raises instead of guessing. The other such event is the signature
# peek: PyDatasetAdapter.get_tf_dataset reads seq[0] and seq[1] and fixes every dimension on
# which they agree (keras_reads_the_signature); elsewhere the calls are a pass's.

KERAS_CHECKED_VERSION = "3.15.1"
KERAS_CHECKED = f"Keras {KERAS_CHECKED_VERSION}"
FRAMES_SEARCHED = 8  # our on_epoch_end, a subclass's override or two, then Keras's adapter


def _pass_end_callers():
    try:
        from keras.src.trainers.data_adapters.data_adapter_utils import (
            NUM_BATCHES_FOR_TENSOR_SPEC,
        )
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
        from keras.src.trainers.epoch_iterator import EpochIterator

        return PyDatasetAdapter.on_epoch_end.__code__, {
            EpochIterator.reset.__code__: False,
            EpochIterator._enumerate_iterator.__code__: True,
            EpochIterator.catch_stop_iteration.__wrapped__.__code__: True,
        }, PyDatasetAdapter.get_tf_dataset.__code__, NUM_BATCHES_FOR_TENSOR_SPEC
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"mongofeed.keras knows how {KERAS_CHECKED} ends an epoch pass over a PyDataset, "
            f"and this Keras ({keras.__version__}) is built differently ({exc}); use "
            f"keras=={KERAS_CHECKED_VERSION}, or mongofeed.Consumer directly") from exc


# The signature peek reads the first SIGNATURE_PEEK_BATCHES batches (seq[0] and seq[1]).
_ADAPTER_END, _PASS_USED_BY_CALLER, _SIGNATURE_PEEK, SIGNATURE_PEEK_BATCHES = _pass_end_callers()
PEEK_FRAMES_SEARCHED = 3  # our __getitem__, the peek's list comprehension, get_tf_dataset
_KERAS_DIR = os.path.dirname(keras.__file__) + os.sep


def keras_pass_end() -> tuple[bool | None, int | None]:
    """How the pass that ``on_epoch_end`` ends was used: whether training used it (True) or
    discarded it (False), None when the call does not come from Keras's own training loop
    (user code); and the steps per epoch Keras was asked for (``steps_per_epoch`` or
    ``steps``; None when it reads whole epochs), from its epoch iterator: a prefetching
    iterator may have read the whole epoch when Keras stops after fewer steps."""
    frame = sys._getframe(2)
    for _ in range(FRAMES_SEARCHED):
        if frame is None:
            return None, None
        if frame.f_code is _ADAPTER_END:
            caller = frame.f_back
            if caller is None or not caller.f_code.co_filename.startswith(_KERAS_DIR):
                return None, None  # code of the user's that drives Keras's adapter itself
            used = _PASS_USED_BY_CALLER.get(caller.f_code)
            if used is None:
                raise FeedError(
                    f"Keras ({keras.__version__}) ended an epoch pass from "
                    f"{caller.f_code.co_qualname} ({caller.f_code.co_filename}), which "
                    f"mongofeed does not know ({KERAS_CHECKED} is): it cannot tell whether "
                    f"training used those batches. Use {KERAS_CHECKED}, or mongofeed.Consumer")
            return used, getattr(caller.f_locals.get("self"), "steps_per_epoch", None)
        frame = frame.f_back
    return None, None


def keras_reads_the_signature() -> bool:
    """Whether ``__getitem__`` is called by the TF backend's signature peek
    (``PyDatasetAdapter.get_tf_dataset`` reads ``seq[0]`` and ``seq[1]`` for the output
    signature, then drops them), not by a pass over the data."""
    frame = sys._getframe(2)
    for _ in range(PEEK_FRAMES_SEARCHED):
        if frame is None:
            return False
        if frame.f_code is _SIGNATURE_PEEK:
            return True
        frame = frame.f_back
    return False
