"""A window of the windowed order as a worker holds it: the raw replies of its one query,
sorted by ``_id``, from which each batch's documents are decoded in the window's order."""

from __future__ import annotations

import bson
import numpy as np

from ..errors import WHOLE_DOCUMENT, DecodeError
from ..wire import BSON_OPTIONS
from .planner import BatchWindow
from .planner.order import window_order


class WindowChanged(Exception):
    """A window's ``_id`` ranges hold other documents than when the plan was made."""


def expect_count(window: BatchWindow, found: Window) -> Window:
    """``found`` if it holds the documents the plan counted in ``window``'s ranges: any
    other number would move documents between batches, so none of them is made."""
    if len(found) != window.count:
        raise WindowChanged(
            f"the documents of window {window.window} changed since the daemon planned: "
            f"its _id ranges held {window.count} when they were listed and hold "
            f"{len(found)} now (documents were inserted or deleted). Restart the daemon "
            f"to plan again; if the collection kept its count and its first and last "
            f"_id, delete its plan cache (serve.plan_cache) first")
    return found


class Window:
    """One window's documents: the raw replies as read, and each document's place in them,
    sorted by ``_id``. Documents are decoded one at a time, when a batch takes them, so the
    window costs its BSON bytes and three integers per document."""

    def __init__(self, replies: list[bytes]):
        self.replies = replies
        reply_of, offsets, sizes, keys = [], [], [], []
        for number, raw in enumerate(replies):
            offset = 0
            while offset < len(raw):
                size = int.from_bytes(raw[offset:offset + 4], "little")
                reply_of.append(number)
                offsets.append(offset)
                sizes.append(size)
                keys.append(raw_id_key(raw, offset, size))
                offset += size
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.reply_of = np.array(reply_of, np.int32)[order]
        self.offsets = np.array(offsets, np.int64)[order]
        self.sizes = np.array(sizes, np.int64)[order]
        self.nbytes = sum(len(raw) for raw in replies)

    def __len__(self) -> int:
        return len(self.offsets)

    def batch(self, spec: BatchWindow, seed: int, epoch: int, collection: str):
        """The ``_id``s and documents of the batch ``spec`` slices from this window: its
        positions of the window's order, which is keyed by seed, epoch and window."""
        order = window_order(seed, epoch, spec.window, spec.count)
        return self.documents(order.at(np.arange(spec.start, spec.stop)), collection)

    def documents(self, positions, collection: str) -> tuple[list, list]:
        """The ``_id``s and documents at ``positions`` of the sorted window: each document
        decoded, or the DecodeError of one that pymongo cannot decode."""
        ids, docs = [], []
        for p in np.asarray(positions).tolist():
            offset, size = int(self.offsets[p]), int(self.sizes[p])
            raw = memoryview(self.replies[self.reply_of[p]])[offset:offset + size]
            try:
                doc = bson.decode(raw, BSON_OPTIONS)
            except Exception as exc:  # bson raises several kinds of errors for bad bytes
                doc_id = raw_id_value(raw)
                doc = DecodeError(collection, doc_id, WHOLE_DOCUMENT, WHOLE_DOCUMENT,
                                  "BSON that pymongo decodes",
                                  f"a document that pymongo cannot decode "
                                  f"({type(exc).__name__}: {exc})")
                ids.append(doc_id)
            else:
                ids.append(doc["_id"])
            docs.append(doc)
        return ids, docs


# _id as a document's first element, by BSON type: its value's width and how to read it
_ID_READERS = {
    0x07: (12, bytes),                                                      # ObjectId
    0x10: (4, lambda b: int.from_bytes(b, "little", signed=True)),          # int32
    0x12: (8, lambda b: int.from_bytes(b, "little", signed=True)),          # int64
}


def raw_id_key(raw: bytes, offset: int, size: int):
    """A sort key of a raw document's ``_id`` that orders one type as MongoDB does (bytes
    of an ObjectId, an integer's value), read without decoding the document where ``_id``
    is its first element of a common type (as MongoDB stores it); decoded otherwise."""
    element = raw[offset + 4]
    reader = _ID_READERS.get(element)
    if reader is not None and raw[offset + 5:offset + 9] == b"_id\x00":
        width, read = reader
        return read(raw[offset + 9:offset + 9 + width])
    value = raw_id_value(memoryview(raw)[offset:offset + size])
    return value.binary if isinstance(value, bson.ObjectId) else value


def raw_id_value(raw) -> object:
    """The ``_id`` of a raw document, also of one that does not decode as a whole."""
    try:
        return bson.decode(raw, BSON_OPTIONS)["_id"]
    except Exception:  # noqa: BLE001 - pymongo cannot decode it: say so
        return "(an _id pymongo cannot decode)"
