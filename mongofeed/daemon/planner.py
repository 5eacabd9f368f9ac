"""Deterministic epoch plans: which documents form batch i of epoch e, for every run.

The planner never talks to the database: it gets the sorted list of ``_id``s once and
derives everything else from ``(seed, epoch)``. That is what makes a restart at epoch e,
sharding across trainers and reproducible runs exact without any coordination.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import bson
import numpy as np

# Epoch orders kept, least recently used dropped first. Sessions at different epochs take
# turns (each wants its current and, near the end, its next epoch), so the cache must hold
# all of their epochs or it recomputes a permutation for nearly every task.
ORDER_CACHE_BYTES = 256 * 2**20
ORDERS_CACHED_MIN = 4     # even for the largest plans
ORDERS_CACHED_MAX = 128   # two epochs for each of the daemon's at most 64 sessions
IDS_DIGEST_CHUNK = 1024   # _ids encoded per BSON document while hashing the plan's list


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` disjoint, equal parts of every epoch."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not (isinstance(self.rank, int) and isinstance(self.world, int)
                and 0 <= self.rank < self.world):
            raise ValueError(f"shard must be r/R with 0 <= r < R, got {self.rank}/{self.world}")

    def within(self, outer: Shard) -> Shard:
        """This shard of ``outer``'s share: part ``rank`` of ``world`` of part r/R."""
        return Shard(outer.rank * self.world + self.rank, outer.world * self.world)

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            rank, world = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 0/4 (rank/world), got {text!r}") from None
        return cls(rank, world)

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


WHOLE = Shard()  # every sample of the epoch


def sort_key(value):
    """Order of mixed ``_id`` types: by type first, so sorting never compares str with int."""
    return (type(value).__name__, value)


@dataclass
class Plan:
    """The batches of one feed: ``ids`` sorted, cut per epoch into batches of ``batch_size``."""

    ids: list
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    ids_digest: str = field(init=False)
    orders_cached: int = field(init=False, repr=False)  # epoch orders kept, by the plan's size
    _orders: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self):
        self.ids_digest = digest_ids(self.ids)
        order_bytes = max(1, len(self.ids)) * np.dtype(np.int64).itemsize
        self.orders_cached = min(ORDERS_CACHED_MAX,
                                 max(ORDERS_CACHED_MIN, ORDER_CACHE_BYTES // order_bytes))

    def identity(self) -> dict:
        """What two daemons must share for their shards to split one epoch: the same ids,
        the same order for every epoch and the same cut into batches."""
        return {"seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle": self.shuffle, "ids": len(self.ids), "ids_digest": self.ids_digest}

    def samples_per_epoch(self, shard: Shard = WHOLE) -> int:
        """Samples each shard gets; the remainder of an uneven split sits out that epoch."""
        return len(self.ids) // shard.world

    def batches_per_epoch(self, shard: Shard = WHOLE) -> int:
        samples = self.samples_per_epoch(shard)
        if self.drop_last:
            return samples // self.batch_size
        return math.ceil(samples / self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into ``ids`` in this epoch's order (the same for the same seed)."""
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = self.compute_order(epoch)
            if len(self._orders) > self.orders_cached:
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(epoch)
        return order

    def compute_order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return np.arange(len(self.ids))

    def batch_ids(self, epoch: int, index: int, shard: Shard = WHOLE) -> list:
        """The ``_id``s of batch ``index`` of ``epoch`` for ``shard``, in delivery order."""
        if not 0 <= index < self.batches_per_epoch(shard):
            raise IndexError(f"batch {index} of a {self.batches_per_epoch(shard)}-batch epoch")
        per_shard = self.samples_per_epoch(shard)
        start = shard.rank * per_shard + index * self.batch_size
        stop = min(start + self.batch_size, (shard.rank + 1) * per_shard)
        return [self.ids[i] for i in self.epoch_order(epoch)[start:stop]]


def digest_ids(ids: list) -> str:
    """A short hash of the sorted ``_id`` list (their BSON, streamed in chunks): equal on
    two daemons exactly when they listed the same documents."""
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(ids), IDS_DIGEST_CHUNK):
        digest.update(bson.encode({"ids": ids[start:start + IDS_DIGEST_CHUNK]}))
    return digest.hexdigest()
