"""A feed's sorted ``_id``s, kept compactly: the one part of a plan that grows with N.

- ObjectIds: 12-byte rows (numpy ``S12``), which sort byte-wise as MongoDB orders them;
- integers (BSON int32 and int64): int64;
- anything else, or a mix of types: a sorted Python list (the fallback: about 100 bytes per
  id instead of 12 or 8), ordered by type first (``sort_key``) so values of different types
  are never compared.

``IdsBuilder`` streams the listing's raw BSON replies (documents ``{_id: value}``) into these
arrays without making a Python object per id where every document of a reply has the same
layout (the common case), so listing 100 million ObjectIds needs their 1.2 GB and a copy
while they are joined, not a list of 100 million objects.
"""

from __future__ import annotations

import hashlib

import bson
import numpy as np
from bson import Decimal128, ObjectId

OBJECTID, INT64, OBJECTS = "objectid", "int64", "objects"
DIGEST_BYTES = 16
DIGEST_CHUNK_IDS = 1 << 20   # rows hashed per update (bounds the copy of a non-contiguous chunk)

# A reply document {_id: value} with nothing else, by BSON element type: its length, and the
# bytes before the value (int32 length, element type, the key "_id" and its NUL).
_ELEMENT = {0x07: (22, 12), 0x12: (18, 8), 0x10: (14, 4)}  # ObjectId, int64, int32


def _prefix(length: int, element_type: int) -> np.ndarray:
    return np.frombuffer(length.to_bytes(4, "little") + bytes([element_type]) + b"_id\x00",
                         np.uint8)


_PREFIXES = {t: _prefix(length, t) for t, (length, _) in _ELEMENT.items()}


def sort_key(value):
    """Order of mixed ``_id`` types: by type first, so sorting never compares str with int."""
    return (type(value).__name__, value)


def id_bytes(value) -> bytes:
    """An ``_id`` as the server tells them apart: its BSON type and value. Python's ``==``
    and ``hash`` merge true, 1 and 1.0, which are three ``_id``s to MongoDB."""
    return bson.encode({"": value})


class Ids:
    """Sorted ``_id``s of one kind. ``ids[i]`` is the BSON value (an ObjectId, an int)."""

    def __init__(self, kind: str, values):
        self.kind = kind
        self.values = values  # np.ndarray (S12 or int64) or, for OBJECTS, a list

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int):
        return self._value(self.values[index])

    def _value(self, item):
        if self.kind == OBJECTID:
            return ObjectId(item.ljust(12, b"\x00"))  # numpy drops an S12's trailing NULs
        if self.kind == INT64:
            return int(item)
        return item

    def take(self, positions) -> list:
        """The BSON values at ``positions`` (an array of indices), in that order."""
        return rows_to_values(self.rows(positions))

    def rows(self, positions):
        """The ids at ``positions`` as stored: a numpy array (S12 or int64) for the compact
        kinds, which a task carries as bytes (no Python object per id on the loop thread),
        or a list of values."""
        if self.kind == OBJECTS:
            return [self.values[i] for i in np.asarray(positions).tolist()]
        return self.values[np.asarray(positions)]

    @property
    def nbytes(self) -> int:
        """Bytes these ids keep resident (the fallback's list counted per object)."""
        if self.kind == OBJECTS:
            import sys

            return sys.getsizeof(self.values) + sum(sys.getsizeof(v) for v in self.values)
        return self.values.nbytes

    def digest(self) -> str:
        """BLAKE2b of the ids in order: equal on two daemons exactly when they listed the same
        documents (and so the same for a windowed plan of the same ids, see ``IdsDigest``)."""
        digest = IdsDigest()
        for start in range(0, len(self), DIGEST_CHUNK_IDS):
            digest.update(self.kind, self.values[start:start + DIGEST_CHUNK_IDS])
        return digest.hexdigest()

    @classmethod
    def from_values(cls, values) -> Ids:
        """Sorted ``Ids`` from Python values (tests, in-memory sources)."""
        builder = IdsBuilder()
        builder.add_values(list(values))
        return builder.finish()


def rows_to_values(rows) -> list:
    """BSON values of ``Ids.rows``: ObjectIds of 12-byte rows, ints of int64, else as is."""
    if isinstance(rows, list):
        return rows
    if rows.dtype.kind == "S":
        return [ObjectId(row.ljust(12, b"\x00")) for row in rows.tolist()]
    return rows.tolist()


class IdsDigest:
    """The digest of a stream of ids in sorted order, fed in chunks of one kind."""

    def __init__(self):
        self.hash = hashlib.blake2b(digest_size=DIGEST_BYTES)

    def update(self, kind: str, values):
        """Each id hashes the same whichever kind of chunk holds it: an ObjectId as its 12
        bytes, an integer as int64 little-endian, anything else as its BSON element; so the
        digest does not depend on how the listing's replies were cut."""
        if kind != OBJECTS:
            dtype = "S12" if kind == OBJECTID else "<i8"
            self.hash.update(np.ascontiguousarray(values, dtype=dtype).tobytes())
            return
        for value in values:
            if type(value) is ObjectId:
                self.hash.update(value.binary)
            elif isinstance(value, int) and not isinstance(value, bool):
                self.hash.update(value.to_bytes(8, "little", signed=True))
            else:
                self.hash.update(id_bytes(value))

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


class UnorderableIds(ValueError):
    """``_id`` values of types that cannot be ordered (documents as ``_id``)."""


def parse_reply(raw: bytes) -> tuple[str, object]:
    """The ids of one raw reply of ``{_id: value}`` documents: ``(kind, values)``, a numpy
    array where every document has the layout of one compact kind, else a list of values."""
    size = len(raw)
    if size:
        first_type = raw[4]
        layout = _ELEMENT.get(first_type)
        if layout is not None and size % layout[0] == 0:
            length, width = layout
            rows = np.frombuffer(raw, np.uint8).reshape(-1, length)
            if (rows[:, :9] == _PREFIXES[first_type]).all() and not rows[:, -1].any():
                values = np.ascontiguousarray(rows[:, 9:9 + width])
                if first_type == 0x07:
                    return OBJECTID, values.view("S12").ravel()
                dtype = "<i8" if first_type == 0x12 else "<i4"
                return INT64, values.view(dtype).ravel().astype(np.int64)
    return classify([doc["_id"] for doc in bson.decode_all(raw)])


def classify(values: list) -> tuple[str, object]:
    """``values`` as the most compact kind that holds all of them."""
    if values and all(type(v) is ObjectId for v in values):
        return OBJECTID, np.array([v.binary for v in values], dtype="S12")
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return INT64, np.array(values, dtype=np.int64)
    return OBJECTS, values


class IdsBuilder:
    """Collects the ids of a listing, reply by reply, then sorts them once (``finish``).

    Chunks stay compact while every reply is of one compact kind; a reply of another kind
    turns everything into the fallback list.
    """

    def __init__(self):
        self.kind = None
        self.chunks: list = []
        self.count = 0

    def add_reply(self, raw: bytes):
        self._add(*parse_reply(raw))

    def add_values(self, values: list):
        self._add(*classify(values))

    def _add(self, kind: str, values):
        if not len(values):
            return
        self.count += len(values)
        if self.kind is None or kind == self.kind:
            self.kind = kind
            self.chunks.append(values)
            return
        if self.kind != OBJECTS:  # a second kind: everything becomes Python values
            self.chunks = [[Ids(self.kind, chunk)._value(v) for v in chunk.tolist()]
                           for chunk in self.chunks]
            self.kind = OBJECTS
        self.chunks.append(values if kind == OBJECTS else
                           [Ids(kind, values)._value(v) for v in values.tolist()])

    def finish(self, sort: bool = True) -> Ids:
        """The ids, sorted (a no-op when the listing came sorted, as an index scan gives),
        or in the order they came with ``sort = False``."""
        if self.kind is None:
            return Ids(INT64, np.empty(0, np.int64))
        if self.kind == OBJECTS:
            values = [v for chunk in self.chunks for v in chunk]
            self.chunks = []
            if sort:
                try:
                    values.sort(key=sort_key)
                except TypeError:
                    raise UnorderableIds("_id values of types that cannot be ordered (e.g. "
                                         "documents as _id) are not supported") from None
            return Ids(OBJECTS, values)
        values = self.chunks[0] if len(self.chunks) == 1 else np.concatenate(self.chunks)
        self.chunks = []
        if sort and not bool((values[1:] >= values[:-1]).all()):
            values.sort()  # in place: no second copy; numpy releases the GIL meanwhile
        return Ids(self.kind, values)


def type_class(value) -> str:
    """The class of values MongoDB's range queries compare with each other: numbers of every
    BSON type together, each other type alone."""
    if isinstance(value, (int, float, Decimal128)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


class MixedIdTypes(ValueError):
    """A windowed listing met ``_id``s of two classes that range queries keep apart."""


class SplitsBuilder:
    """What the windowed order keeps of a listing sorted by the server: every
    ``range_docs``-th id from the first (the split points), the last id, the count and the
    digest of them all, which ``Ids.digest`` of the same ids would equal."""

    def __init__(self, range_docs: int):
        self.every = range_docs
        self.splits = IdsBuilder()
        self.digest = IdsDigest()
        self.count = 0
        self.last = None
        self.classes: set[str] = set()

    def add_reply(self, raw: bytes):
        kind, values = parse_reply(raw)
        if not len(values):
            return
        if kind == OBJECTID:
            self.classes.add("ObjectId")
        elif kind == INT64:
            self.classes.add("number")
        else:
            self.classes.update(type_class(v) for v in values)
        if len(self.classes) > 1:
            raise MixedIdTypes(" and ".join(sorted(self.classes)))
        if kind != OBJECTS and len(values) > 1 and not bool((values[1:] > values[:-1]).all()):
            raise ValueError("the server did not return the _ids in order")
        self.digest.update(kind, values)
        first = (-self.count) % self.every
        picked = values[first::self.every]
        self.splits._add(kind, picked)
        self.last = Ids(kind, values)[len(values) - 1]
        self.count += len(values)

    def finish(self) -> tuple[Ids, object, int, str]:
        """``(splits, last, count, digest)``."""
        return self.splits.finish(sort=False), self.last, self.count, self.digest.hexdigest()
