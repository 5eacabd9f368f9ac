"""An epoch cut into global batches, and the batches each shard takes.

An epoch of N samples in batches of B has ``G = ceil(N / B)`` global batches
(``floor(N / B)`` with ``drop_last``): batch g is positions ``[g*B, min((g+1)*B, N))`` of the
epoch's order, so only the last one can be short. A shard ``r/R`` takes the global batches
``g = offset + r + R*j`` for ``j < (G - offset) // R``: every rank the same number of
batches, and the ``(G - offset) % R`` left over sit out that epoch. ``offset`` is how many
global batches of the start epoch the job already consumed; after R ranks took k batches
each, the job consumed exactly the prefix ``[0, k*R)`` whatever R was, so a resume with R'
ranks starts at ``offset = k*R`` (later epochs start at 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world``: every ``world``-th global batch, from the ``rank``-th."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not (isinstance(self.rank, int) and isinstance(self.world, int)
                and 0 <= self.rank < self.world):
            raise ValueError(f"shard must be r/R with 0 <= r < R, got {self.rank}/{self.world}")

    def within(self, outer: Shard) -> Shard:
        """This shard of ``outer``'s batches: ``outer`` takes every R-th global batch from
        its rank, and this takes every ``world``-th of those from ``rank``, which is rank
        ``outer.rank + outer.world * rank`` of ``outer.world * world``."""
        return Shard(outer.rank + outer.world * self.rank, outer.world * self.world)

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            rank, world = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 0/4 (rank/world), got {text!r}") from None
        return cls(rank, world)

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


WHOLE = Shard()  # every batch of the epoch


@dataclass(frozen=True)
class BatchCut:
    """``count`` samples per epoch in global batches of ``batch_size``."""

    count: int
    batch_size: int
    drop_last: bool = False

    def global_batches(self) -> int:
        if self.drop_last:
            return self.count // self.batch_size
        return math.ceil(self.count / self.batch_size)

    def span(self, g: int) -> tuple[int, int]:
        """Positions ``[start, stop)`` of the epoch's order that global batch ``g`` holds."""
        if not 0 <= g < self.global_batches():
            raise IndexError(f"global batch {g} of a {self.global_batches()}-batch epoch")
        start = g * self.batch_size
        return start, min(start + self.batch_size, self.count)

    def shard_batches(self, shard: Shard = WHOLE, offset: int = 0) -> int:
        """Batches ``shard`` takes from an epoch whose first ``offset`` global batches the
        job already consumed."""
        return max(0, self.global_batches() - offset) // shard.world

    def global_index(self, shard: Shard, offset: int, j: int) -> int:
        """The global batch that is ``shard``'s ``j``-th of the epoch (after ``offset``)."""
        if not 0 <= j < self.shard_batches(shard, offset):
            raise IndexError(f"batch {j} of shard {shard}'s "
                             f"{self.shard_batches(shard, offset)} in this epoch")
        return offset + shard.rank + shard.world * j

    def shard_samples(self, shard: Shard = WHOLE, offset: int = 0) -> int:
        """Samples in ``shard``'s batches of an epoch: full batches, but for the short last
        global batch if the shard takes it."""
        taken = self.shard_batches(shard, offset)
        samples = taken * self.batch_size
        last = self.global_batches() - 1
        if taken and self.count % self.batch_size and not self.drop_last:
            j, rank = divmod(last - offset - shard.rank, shard.world)
            if rank == 0 and 0 <= j < taken:
                samples -= self.batch_size - self.count % self.batch_size
        return samples

    # What sessions and status use: a fresh epoch (offset 0).
    def batches_per_epoch(self, shard: Shard = WHOLE) -> int:
        return self.shard_batches(shard)

    def samples_per_epoch(self, shard: Shard = WHOLE) -> int:
        return self.shard_samples(shard)
