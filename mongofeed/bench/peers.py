"""The loaders users would write instead of mongofeed, imitated as faithfully as the numbers
allow (each is one row of ``mongofeed bench``):

- ``ForumPostedSequence`` / ``ForumIntendedSequence``: the two ``keras.utils.Sequence`` patterns
  of the forum thread (shared/background/keras-sequence-mongodb-thread.txt): the answer's code
  as posted (its loop calls ``_connect()`` for every sample: a new MongoClient per sample,
  never closed) and as intended (a client per process, re-made when ``os.getpid()`` changes,
  one ``find`` per sample);
- ``BestPracticeSequence``: a per-process client and one ``$in`` query per batch;
- ``AugmentingSequence``: the best practice, with the augment rows' per-sample transform in
  its ``__getitem__``, where a user's preprocessing lives when the loader cannot run it;
- ``MongoBatchFlow``: tensorpack's ``MultiProcessRunnerZMQ`` around a pymongo reader.
"""

from __future__ import annotations

import os

import numpy as np


def epochs_of(make_epoch):
    """Batches of epoch after epoch, as a training loop sees them."""
    while True:
        yield from make_epoch()


# -- the forum thread's patterns and the best practice, as keras.utils.PyDataset -----------------

def _sequence_base():
    import keras

    return keras.utils.PyDataset


def _decode_sample(doc: dict, data: dict):
    """As the thread does it, one sample at a time (its data was pickled; ours is raw)."""
    x = np.frombuffer(doc[data["x_path"]], np.uint8).reshape(data["shape"])
    return x.astype(np.float32) * np.float32(data["scale"]), doc[data["y_path"]]


def make_sequences() -> dict:
    """The Sequence classes by row name; built on first use so that keras is imported only by
    their rows."""
    import pymongo

    from .augment import augment

    base = _sequence_base()

    class ForumPostedSequence(base):
        """The answer's ``MongoSequence`` as posted: ``_connect()`` (a new MongoClient) per
        sample, never closed. Obvious typos of the post fixed; its behaviour kept."""

        def __init__(self, uri, data, batch_size, **kwargs):
            super().__init__(**kwargs)
            self._server, self._data, self._batch_size = uri, data, batch_size
            self._collection = self._connect()
            self._object_ids = [smp["_id"] for smp in
                                self._collection.find(data["filter"], {"_id": True})]
            self._pid = os.getpid()
            del self._collection  # "to be sure, that we've disconnected" (it does not)
            self._collection = None

        def _connect(self):
            client = pymongo.MongoClient(self._server)
            return client[self._data["database"]][self._data["collection"]]

        def __len__(self):
            return int(np.ceil(len(self._object_ids) / float(self._batch_size)))

        def _find(self, oid):
            return self._connect().find({"_id": oid}).next()

        def __getitem__(self, item):
            if self._collection is None or self._pid != os.getpid():
                self._collection = self._connect()
                self._pid = os.getpid()
            oids = self._object_ids[item * self._batch_size:(item + 1) * self._batch_size]
            X = np.empty((len(oids), *self._data["shape"]), dtype=np.float32)  # noqa: N806
            y = np.empty(len(oids), dtype=np.int64)
            for i, oid in enumerate(oids):
                X[i], y[i] = _decode_sample(self._find(oid), self._data)
            return X, y

    class ForumIntendedSequence(ForumPostedSequence):
        """The same, as the answer meant it: the per-process client, one find per sample."""

        def _find(self, oid):
            return self._collection.find({"_id": oid}).next()

    class BestPracticeSequence(ForumPostedSequence):
        """A per-process client and ONE ``$in`` query per batch, decoded batch-wise."""

        def __getitem__(self, item):
            oids = self._oids_and_client(item)
            return decode_batch(self._read(oids), oids, self._data)

        def _oids_and_client(self, item):
            """The batch's ids, with this process's client made if it has none yet."""
            if self._collection is None or self._pid != os.getpid():
                self._collection = self._connect()
                self._pid = os.getpid()
            return self._object_ids[item * self._batch_size:(item + 1) * self._batch_size]

        def _read(self, oids):
            return list(self._collection.find({"_id": {"$in": oids}}))

    class AugmentingSequence(BestPracticeSequence):
        """The best practice with the per-sample augmentation in ``__getitem__``."""

        def __getitem__(self, item):
            oids = self._oids_and_client(item)
            images, y = stored_batch(self._read(oids), oids, self._data)
            rng = np.random.default_rng(item)  # one per call: Keras calls from several threads
            return np.stack([augment(image, rng) for image in images]), y

    return {"keras-forum-posted": ForumPostedSequence,
            "keras-forum-intended": ForumIntendedSequence,
            "keras-best-practice": BestPracticeSequence, "keras-augment": AugmentingSequence}


def stored_batch(docs: list, oids: list, data: dict):
    """Documents put back in ``oids`` order: their uint8 images and their labels."""
    by_id = {doc["_id"]: doc for doc in docs}
    ordered = [by_id[i] for i in oids]
    raw = b"".join(doc[data["x_path"]] for doc in ordered)
    x = np.frombuffer(raw, np.uint8).reshape((len(ordered), *data["shape"]))
    y = np.fromiter((doc[data["y_path"]] for doc in ordered), np.int64, len(ordered))
    return x, y


def decode_batch(docs: list, oids: list, data: dict):
    """Documents put back in ``oids`` order, decoded into one float32 batch and its labels."""
    x, y = stored_batch(docs, oids, data)
    return x.astype(np.float32) * np.float32(data["scale"]), y


# -- tensorpack ----------------------------------------------------------------------------------

def tensorpack_batches(spec: dict):
    """tensorpack's MultiProcessRunnerZMQ around a pymongo DataFlow (client made in
    ``reset_state``, after the fork; random i.i.d. batches, as the runner assumes)."""
    import pymongo
    from tensorpack.dataflow import DataFlow, MultiProcessRunnerZMQ

    data, batch = spec["data"], spec["batch_size"]
    client = pymongo.MongoClient(spec["uri"])
    ids = [d["_id"] for d in client[data["database"]][data["collection"]].find(
        data["filter"], {"_id": 1})]
    client.close()

    class MongoBatchFlow(DataFlow):
        def reset_state(self):
            self.collection = pymongo.MongoClient(spec["uri"])[data["database"]][
                data["collection"]]
            self.rng = np.random.default_rng(os.getpid())

        def __len__(self):
            return -(-len(ids) // batch)

        def __iter__(self):
            for _ in range(len(self)):
                oids = [ids[i] for i in self.rng.choice(len(ids), batch, replace=False)]
                yield list(decode_batch(list(self.collection.find({"_id": {"$in": oids}})),
                                        oids, data))

    runner = MultiProcessRunnerZMQ(MongoBatchFlow(), num_proc=spec["workers"])
    runner.reset_state()
    return epochs_of(lambda: iter(runner))
