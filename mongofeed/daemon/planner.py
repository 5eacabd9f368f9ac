"""Deterministic epoch plans: which documents form batch i of epoch e, for every run.

The planner never talks to the database: it gets the sorted list of ``_id``s once and
derives everything else from ``(seed, epoch)``. That is what makes a restart at epoch e,
sharding across trainers and reproducible runs exact without any coordination.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

ORDERS_CACHED = 4  # sessions of one feed are usually within an epoch or two of each other


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
    _orders: OrderedDict = field(default_factory=OrderedDict, repr=False)

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
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
            else:
                order = np.arange(len(self.ids))
            self._orders[epoch] = order
            if len(self._orders) > ORDERS_CACHED:
                self._orders.popitem(last=False)
        return order

    def batch_ids(self, epoch: int, index: int, shard: Shard = WHOLE) -> list:
        """The ``_id``s of batch ``index`` of ``epoch`` for ``shard``, in delivery order."""
        if not 0 <= index < self.batches_per_epoch(shard):
            raise IndexError(f"batch {index} of a {self.batches_per_epoch(shard)}-batch epoch")
        per_shard = self.samples_per_epoch(shard)
        start = shard.rank * per_shard + index * self.batch_size
        stop = min(start + self.batch_size, (shard.rank + 1) * per_shard)
        return [self.ids[i] for i in self.epoch_order(epoch)[start:stop]]
