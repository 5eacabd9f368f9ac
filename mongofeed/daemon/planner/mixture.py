"""A feed made of sources: a plan of plans.

Each source (a collection, or a filter of one) has its own sorted ``_id``s (``N_s`` of
them) and a weight that fixes how many draws ``n_s`` it gives every epoch
(``draw_counts``):

- ``proportion`` p: a share of the feed's ``epoch_size`` E. The quotas ``p_s * E / sum(p)``
  (the proportions as the decimals written, which must sum to 1) are rounded down, and the
  draws left over go one each to the sources with the largest remainders (ties: the source
  declared first): every count is its quota rounded down or up, and they sum to E exactly;
- ``repeat`` r: ``r * N_s`` whole or fractional copies, rounded half up;
- ``choose`` k: k documents, at most ``N_s``.

Draw k of source s is position ``k mod N_s`` of copy ``k // N_s`` of the source's order, a
keyed permutation of its ids per ``(seed, epoch, source, copy)``: draws beyond one copy
(``repeat > 1``, or a proportion larger than the source) repeat the source, each copy in
its own order; fewer draws than ``N_s`` are a random subset, another every epoch. The
epoch's sequence is the sources' draws one after the other (``M = sum(n_s)`` samples),
ordered by one more keyed permutation per ``(seed, epoch)``; position i maps to its source
by a search over the cumulative counts. Global batches, shards and offsets (``BatchCut``)
work on that sequence as on a plain feed's, so sessions, shards and resumes need nothing
else. A batch is read per source: ``batch_parts`` gives each source's ids and their places
in the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ...wire.internal import SourceIds
from .batches import BatchCut
from .ids import Ids
from .order import ORDER_VERSION, Permutation, permute_many
from .plans import PlanBase

PROPORTION, REPEAT, CHOOSE = "proportion", "repeat", "choose"
WEIGHT_KINDS = (PROPORTION, REPEAT, CHOOSE)
PROPORTION_SUM_TOLERANCE = 1e-6
MAX_EPOCH_SAMPLES = 2**48  # positions are computed in uint64; far beyond any epoch
MIXTURE_ORDER = f"mixture-{ORDER_VERSION}"  # announced in the plan identity


@dataclass(frozen=True)
class Weight:
    """How much of a source an epoch draws: ``kind`` is proportion, repeat or choose."""

    kind: str
    value: float | int

    def __str__(self) -> str:
        return f"{self.kind} = {self.value:g}" if self.kind != CHOOSE else f"choose = {self.value}"


def _decimal(value) -> Fraction:
    """A config number as the decimal written (0.1 is 1/10, not the nearest binary float)."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def draw_counts(names: list[str], weights: list[Weight], sizes: list[int],
                epoch_size: int | None) -> list[int]:
    """Draws per epoch of each source (the rules in the module's docstring); ``ValueError``
    naming the source for a count the sizes cannot give."""
    if all(w.kind == PROPORTION for w in weights):
        if epoch_size is None:
            raise ValueError("proportions are shares of epoch_size, which is not set")
        shares = [_decimal(w.value) for w in weights]
        quotas = [share * epoch_size / sum(shares) for share in shares]
        counts = [math.floor(q) for q in quotas]
        left = epoch_size - sum(counts)
        by_remainder = sorted(range(len(counts)), key=lambda i: (counts[i] - quotas[i], i))
        for i in by_remainder[:left]:
            counts[i] += 1
    else:
        counts = []
        for name, weight, size in zip(names, weights, sizes, strict=True):
            if weight.kind == CHOOSE and weight.value > size:
                raise ValueError(f"source {name!r} has choose = {weight.value}, more than the "
                                 f"{size} documents it selects")
            counts.append(weight.value if weight.kind == CHOOSE
                          else math.floor(_decimal(weight.value) * size + Fraction(1, 2)))
    for name, weight, size, count in zip(names, weights, sizes, counts, strict=True):
        if size == 0:
            raise ValueError(f"source {name!r} selects no document")
        if count == 0:
            raise ValueError(f"source {name!r} ({weight}) draws no document per epoch "
                             f"(it selects {size}): raise its weight"
                             + (" or epoch_size" if weight.kind == PROPORTION else ""))
    if sum(counts) > MAX_EPOCH_SAMPLES:
        raise ValueError(f"the sources draw {sum(counts)} samples per epoch, more than "
                         f"{MAX_EPOCH_SAMPLES}")
    return counts


@dataclass(frozen=True)
class MixSource:
    """One source of a mixture as listed: its name, collection, sorted ids (``Ids``) and
    their digest, and its weight."""

    name: str
    collection: str
    ids: Ids
    digest: str
    weight: Weight


class MixturePlan(PlanBase):
    """The plan of a feed of ``sources`` (``MixSource``s): the interface of ``Plan``
    (``global_batches``, ``shard_batches``, ``global_index``, ``identity``) with
    ``batch_parts`` in place of ``batch_rows``."""

    windowed = False
    mixed = True
    shuffle = True

    def __init__(self, sources: list[MixSource], batch_size: int, seed: int = 0,
                 drop_last: bool = False, epoch_size: int | None = None):
        self.sources = list(sources)
        self.sizes = np.array([len(s.ids) for s in self.sources], np.int64)
        self.draws = np.array(draw_counts([s.name for s in self.sources],
                                          [s.weight for s in self.sources],
                                          self.sizes.tolist(), epoch_size), np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.draws)[:-1]])  # of each source's draws
        self.cut = BatchCut(int(self.draws.sum()), batch_size, drop_last)
        self.batch_size, self.seed, self.drop_last, self.epoch_size = (
            batch_size, seed, drop_last, epoch_size)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def describe_sources(self) -> list[dict]:
        """Each source's documents, weight and draws per epoch (``copies``: draws per
        document, above 1 when the epoch repeats the source)."""
        return [{"name": s.name, "collection": s.collection, s.weight.kind: s.weight.value,
                 "documents": int(size), "draws": int(draws),
                 "copies": round(int(draws) / int(size), 4), "ids_digest": s.digest}
                for s, size, draws in zip(self.sources, self.sizes, self.draws, strict=True)]

    def identity(self) -> dict:
        """As ``Plan.identity``: the sources (their ids, weights and draws) in ``sources``,
        and ``ids``/``ids_digest`` over the whole epoch's sequence, so that a peer that
        compares only those still tells two mixtures apart."""
        sources = self.describe_sources()
        digest = hashlib.blake2b(json.dumps(sources, sort_keys=True).encode(), digest_size=16)
        return {"seed": self.seed, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shuffle": True, "order": MIXTURE_ORDER, "window": None, "ids": self.count,
                "ids_digest": digest.hexdigest(), "epoch_size": self.epoch_size,
                "sources": sources}

    def locate(self, epoch: int, positions) -> tuple[np.ndarray, np.ndarray]:
        """For positions of ``epoch``'s sequence: the source of each (an index into
        ``sources``) and the index of its document in that source's sorted ids."""
        drawn = Permutation(self.count, ("mixture", self.seed, epoch)).at(positions)
        source = np.searchsorted(self.starts, drawn, side="right") - 1
        copy, place = np.divmod(drawn - self.starts[source], self.sizes[source])
        index = np.empty_like(place)
        for s in np.unique(source).tolist():
            here = np.flatnonzero(source == s)
            copies, which = np.unique(copy[here], return_inverse=True)
            keys = [("source", self.seed, epoch, self.sources[s].name, c)
                    for c in copies.tolist()]
            index[here] = permute_many(int(self.sizes[s]), keys, which, place[here])
        return source, index

    def _positions(self, batches: list[int]) -> tuple[np.ndarray, list[int]]:
        """The sequence positions of the global ``batches``, one after the other, and where
        each batch starts among them (and the end)."""
        spans = [self.cut.span(g) for g in batches]
        bounds = np.cumsum([0] + [stop - start for start, stop in spans]).tolist()
        return np.concatenate([np.arange(start, stop) for start, stop in spans]), bounds

    def batch_parts(self, epoch: int, batches: list[int]) -> list[tuple[SourceIds, ...]]:
        """For each of the global ``batches`` of ``epoch``: each source's ids in it (as
        ``Ids.rows``) and their places in the batch, one vectorised call for them all."""
        positions, bounds = self._positions(batches)
        source, index = self.locate(epoch, positions)
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            here_source, here_index = source[a:b], index[a:b]
            parts = []
            for s in np.unique(here_source).tolist():
                at = np.flatnonzero(here_source == s)
                parts.append(SourceIds(self.sources[s].name,
                                       self.sources[s].ids.rows(here_index[at]), at))
            out.append(tuple(parts))
        return out

    def batch_ids(self, epoch: int, g: int) -> list[tuple[str, object]]:
        """``(source name, _id)`` of each sample of global batch ``g`` of ``epoch``, in
        delivery order (tests, inspect)."""
        (positions, _), names = self._positions([g]), self.source_names
        source, index = self.locate(epoch, positions)
        return [(names[s], self.sources[s].ids[i])
                for s, i in zip(source.tolist(), index.tolist(), strict=True)]

    @property
    def resident_bytes(self) -> int:
        return sum(s.ids.nbytes for s in self.sources)
