"""A feed's plan: which documents form global batch g of epoch e, on every run and machine.

Two orders, one interface (``global_batches``, ``shard_batches``, ``global_index`` from
``BatchCut``; ``identity``; the batch's read):

- ``Plan``, the full order (``shuffle = true``, or ``false`` for ``_id`` order): the sorted
  ids in compact arrays, and each epoch a keyed permutation of all N positions. A batch is
  a list of ``_id``s, read with one ``$in``.
- ``WindowPlan``, the windowed order (``shuffle = "window"``): only every K-th ``_id`` (the
  split points of ranges of K consecutive ids, K a multiple of the batch size) and the last.
  Each epoch permutes the full ranges, groups them into windows of W ranges (the short tail
  range always in the last window) and orders a window's documents, sorted by ``_id``, by a
  permutation keyed by the window. A batch is a slice of one window (``BatchWindow``): a
  worker reads the whole window with one query over its ranges and keeps it for the
  window's other batches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from .batches import WHOLE, BatchCut, Shard
from .ids import Ids
from .order import ORDER_VERSION, epoch_order, range_order

MAX_WINDOW_RANGES = 64      # ranges per window: more mixing, a longer query
ORDER_CHUNK = 4096          # positions of an epoch's order computed at once and kept
ORDER_CHUNKS_KEPT = 16      # per plan: 512 KiB
DOCUMENT_OVERHEAD_BYTES = 64  # what a document holds beside its fields' values (_id, keys)


class PlanBase:
    """What every plan shares: the cut of an epoch into global batches and shards."""

    cut: BatchCut
    mixed = False  # a feed of several sources (``mixture.MixturePlan``)

    @property
    def count(self) -> int:
        return self.cut.count

    def global_batches(self) -> int:
        return self.cut.global_batches()

    def shard_batches(self, shard: Shard = WHOLE, offset: int = 0) -> int:
        return self.cut.shard_batches(shard, offset)

    def global_index(self, shard: Shard, offset: int, j: int) -> int:
        return self.cut.global_index(shard, offset, j)

    def batches_per_epoch(self, shard: Shard = WHOLE) -> int:
        return self.cut.batches_per_epoch(shard)

    def samples_per_epoch(self, shard: Shard = WHOLE) -> int:
        return self.cut.samples_per_epoch(shard)


class Plan(PlanBase):
    """The full order over ``ids`` (an ``Ids``, or values for tests), or ``_id`` order
    when ``shuffle`` is false."""

    windowed = False

    def __init__(self, ids, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, ids_digest: str | None = None):
        self.ids = ids if isinstance(ids, Ids) else Ids.from_values(ids)
        self.cut = BatchCut(len(self.ids), batch_size, drop_last)
        self.batch_size, self.seed, self.shuffle, self.drop_last = (
            batch_size, seed, shuffle, drop_last)
        self.ids_digest = ids_digest or self.ids.digest()
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # order_at's

    def identity(self) -> dict:
        """What two daemons must share for their shards to split one epoch (and what a
        resume state is checked against): the same ids, order and cut into batches."""
        return {"seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle": self.shuffle, "order": ORDER_VERSION if self.shuffle else "_id",
                "window": None, "ids": self.count, "ids_digest": self.ids_digest}

    def positions(self, epoch: int, batches: list[int]) -> np.ndarray:
        """Indices into the sorted ids of the global ``batches`` of ``epoch``, one after the
        other, in order: one vectorised call for all of them."""
        spans = [self.cut.span(g) for g in batches]
        positions = np.concatenate([np.arange(start, stop) for start, stop in spans])
        return self.order_at(epoch, positions) if self.shuffle else positions

    def order_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The epoch's order at ``positions``, from chunks of ``ORDER_CHUNK`` consecutive
        positions computed in one vectorised call each and kept: a session plans a few
        batches at a time, in order, and a call costs about the same for 4,096 positions as
        for the 256 of four batches (numpy's per-call overhead), which the daemon's loop
        paid per batch."""
        chunks = positions // ORDER_CHUNK
        first, last = int(chunks.min()), int(chunks.max())
        if first == last:
            return self._order_chunk(epoch, first)[positions - first * ORDER_CHUNK]
        out = np.empty(len(positions), np.int64)
        for chunk in np.unique(chunks).tolist():
            inside = chunks == chunk
            out[inside] = self._order_chunk(epoch, chunk)[positions[inside] - chunk * ORDER_CHUNK]
        return out

    def _order_chunk(self, epoch: int, chunk: int) -> np.ndarray:
        key = (epoch, chunk)
        values = self._chunks.get(key)
        if values is None:
            start = chunk * ORDER_CHUNK
            values = epoch_order(self.seed, epoch, self.count).at(
                np.arange(start, min(start + ORDER_CHUNK, self.count)))
            self._chunks[key] = values
            if len(self._chunks) > ORDER_CHUNKS_KEPT:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(key)
        return values

    def batch_ids(self, epoch: int, g: int) -> list:
        """The ``_id``s of global batch ``g`` of ``epoch``, in delivery order."""
        return self.ids.take(self.positions(epoch, [g]))

    def batch_rows(self, epoch: int, batches: list[int]) -> list:
        """The ids of each of the global ``batches`` of ``epoch`` as ``Ids.rows`` keeps
        them (what a task carries): the cheap way to plan many batches at once."""
        rows = self.ids.rows(self.positions(epoch, batches))
        starts = np.cumsum([0] + [self.cut.span(g)[1] - self.cut.span(g)[0] for g in batches])
        return [rows[a:b] for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(),
                                          strict=True)]

    @property
    def resident_bytes(self) -> int:
        return self.ids.nbytes + sum(chunk.nbytes for chunk in self._chunks.values())


@dataclass(frozen=True)
class BatchWindow:
    """What a worker needs to make one batch of the windowed order: the window (its number
    in the epoch, its ``_id`` ranges and how many documents they held when the plan was
    made) and the batch's slice ``[start, stop)`` of the window's order."""

    window: int
    ranges: tuple  # ((low, high, high_inclusive), ...), sorted, adjacent ranges merged
    count: int
    start: int
    stop: int

    def to_wire(self) -> dict:
        return {"window": self.window, "ranges": [list(r) for r in self.ranges],
                "count": self.count, "start": self.start, "stop": self.stop}

    @classmethod
    def from_wire(cls, body: dict) -> BatchWindow:
        ranges = tuple((low, high, bool(inclusive)) for low, high, inclusive in body["ranges"])
        return cls(int(body["window"]), ranges, int(body["count"]), int(body["start"]),
                   int(body["stop"]))

    def query(self) -> dict:
        """The filter that selects the window's documents (before the feed's own)."""
        clauses = [{"_id": {"$gte": low, "$lte" if inclusive else "$lt": high}}
                   for low, high, inclusive in self.ranges]
        return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def window_shape(batch_size: int, window_docs: int) -> tuple[int, int]:
    """``(range_docs, window_ranges)`` for windows of about ``window_docs`` documents: up to
    ``MAX_WINDOW_RANGES`` ranges per window, each a multiple of the batch size."""
    ranges = max(1, min(MAX_WINDOW_RANGES, window_docs // batch_size))
    range_docs = max(1, window_docs // (ranges * batch_size)) * batch_size
    return range_docs, ranges


class WindowPlan(PlanBase):
    """The windowed order over ``count`` documents whose every ``range_docs``-th ``_id``
    (from the first) is in ``splits`` and whose last is ``last``."""

    windowed = True
    shuffle = "window"

    def __init__(self, splits: Ids, last, count: int, batch_size: int, seed: int,
                 drop_last: bool, range_docs: int, window_ranges: int, ids_digest: str):
        if range_docs % batch_size:
            raise ValueError(f"range_docs {range_docs} is not a multiple of the batch size")
        self.splits, self.last = splits, last
        self.cut = BatchCut(count, batch_size, drop_last)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.range_docs, self.window_ranges, self.ids_digest = (
            range_docs, window_ranges, ids_digest)
        self.full_ranges, self.tail = divmod(count, range_docs)
        self.windows = max(1, -(-self.full_ranges // window_ranges))
        self.window_batches = window_ranges * range_docs // batch_size  # of a full window

    def identity(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle": "window", "order": ORDER_VERSION,
                "window": [self.range_docs, self.window_ranges], "ids": self.count,
                "ids_digest": self.ids_digest}

    def window_of(self, g: int) -> int:
        return min(g // self.window_batches, self.windows - 1)

    def window_ranges_of(self, epoch: int, window: int) -> list[int]:
        """The range numbers of ``window`` in ``epoch``, sorted."""
        start = window * self.window_ranges
        stop = min(start + self.window_ranges, self.full_ranges)
        ranges = range_order(self.seed, epoch, self.full_ranges).at(
            np.arange(start, stop)).tolist() if stop > start else []
        if self.tail and window == self.windows - 1:
            ranges.append(self.full_ranges)  # the short tail range, always last
        return sorted(ranges)

    def bounds(self, ranges: list[int]) -> tuple:
        """``(low, high, high_inclusive)`` of each run of adjacent ranges."""
        runs = []
        for k in ranges:
            if runs and runs[-1][1] == k:
                runs[-1][1] = k + 1
            else:
                runs.append([k, k + 1])
        last_range = self.full_ranges + bool(self.tail)
        return tuple((self.splits[low], self.last, True) if high == last_range
                     else (self.splits[low], self.splits[high], False) for low, high in runs)

    def window_read(self, epoch: int, window: int) -> BatchWindow:
        """Window ``window`` of ``epoch`` as a read spec with an empty slice."""
        ranges = self.window_ranges_of(epoch, window)
        count = sum(self.tail if k == self.full_ranges else self.range_docs for k in ranges)
        return BatchWindow(window, self.bounds(ranges), count, 0, 0)

    def batch_window(self, epoch: int, g: int) -> BatchWindow:
        """Global batch ``g`` of ``epoch`` as a slice of its window."""
        self.cut.span(g)  # checks g
        window = self.window_read(epoch, self.window_of(g))
        start = (g - window.window * self.window_batches) * self.batch_size
        return replace(window, start=start, stop=min(start + self.batch_size, window.count))

    def next_window(self, epoch: int, window: int) -> tuple[int, int]:
        """The window read after ``window`` of ``epoch``: the next, or the next epoch's
        first."""
        return (epoch, window + 1) if window + 1 < self.windows else (epoch + 1, 0)

    @property
    def resident_bytes(self) -> int:
        return self.splits.nbytes
