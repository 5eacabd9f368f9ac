"""``IterableDataset``: one feed of a running ``mongofeed serve`` for a PyTorch ``DataLoader``.

The daemon already batches, shuffles and reads in parallel, so use
``DataLoader(dataset, batch_size=None, num_workers=0)``: DataLoader worker processes would
each need their own session and would repeat the data, so they are refused. Each iteration
is one epoch of the feed (the rest of the current one, if an earlier iteration stopped early
or a state resumed in the middle of one).

``state_dict``/``load_state_dict`` are the protocol torchdata's ``StatefulDataLoader`` calls
(with ``num_workers=0`` it asks the dataset between batches, so the state is exact): a
resumed loader continues with the batch after the last one it yielded. Under torchrun the
dataset finds its rank by itself (``shard`` defaults to the job's, see
``mongofeed.distributed``).
"""

from __future__ import annotations

import torch
import torch.utils.data

from .consumer import connect, model_io

WORKERS_REFUSED = (
    "mongofeed.torch.IterableDataset does not support DataLoader num_workers > 0: each worker "
    "process would open its own session and repeat the data. The mongofeed daemon already "
    "reads and decodes in parallel (mongofeed serve --workers N); use num_workers=0 and "
    "batch_size=None.")


class IterableDataset(torch.utils.data.IterableDataset):
    """Batches as ``(inputs, targets)`` like ``MongoFeedSequence`` (a tensor, or a dict of
    tensors when ``[output]`` names several), or as one dict of every array with
    ``as_dict=True``. ``consumer_kwargs`` go to ``Consumer``; a list of endpoints reads
    their union (``MultiConsumer``).

    Example::

        train = IterableDataset("tcp://127.0.0.1:5555", feed="train")
        loader = StatefulDataLoader(train, batch_size=None)   # or DataLoader
        for inputs, targets in loader:
            ...
        torch.save({"model": model.state_dict(), "data": loader.state_dict()}, path)
    """

    def __init__(self, endpoint: str | list[str], feed: str = "train", as_dict: bool = False,
                 **consumer_kwargs):
        super().__init__()
        self.consumer = connect(endpoint, feed=feed, **consumer_kwargs)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return self.consumer.batches_per_epoch

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise ValueError(WORKERS_REFUSED)
        for batch in self.consumer.epoch():
            # A copy: the received arrays are read-only views of the message.
            tensors = {name: torch.tensor(array) for name, array in batch.arrays.items()}
            yield tensors if self.as_dict else model_io(tensors, self.consumer.inputs,
                                                        self.consumer.targets,
                                                        self.consumer.sample_weight)

    def state_dict(self) -> dict:
        """Where the stream is: after the last batch this dataset yielded."""
        return self.consumer.state_dict()

    def load_state_dict(self, state: dict):
        """Continue after the batch where ``state`` was taken (a new session)."""
        self.consumer.load_state_dict(state)

    def close(self):
        """End the session now (otherwise it ends when this object is collected)."""
        self.consumer.close()

    def __getstate__(self):
        raise TypeError(WORKERS_REFUSED)
