"""The user's functions ([transform]), run in every worker, and the batch they make.

A worker's batch goes through ``BatchMaker.make``::

    documents as read: a projection of the fields' paths and transform.reads
      -> decode the [fields]                                        (codec.BatchDecoder)
      -> document function, per document: f(fields, doc, rng[, feed]) -> {array: value}
      -> assemble: a fixed-shape array gets one row per document, a variable one a list
      -> batch function: f(arrays, rng[, feed]) -> {array: rows}
      -> check against [arrays], pad variable dimensions, lengths, cast and scale
      -> the arrays the hello reply announced

Without functions the decoded fields are the batch, as before. A function with a parameter
named ``feed`` also gets the feed's name (to augment ``train`` only, say).

**Randomness.** ``rng`` is a ``numpy.random.Generator`` (PCG64) seeded with
``SeedSequence`` of the 64-bit words ``(batch.seed, epoch, batch index, kind, position)``
(kind 0: the document at ``position`` in its batch, as planned; kind 1: the batch, position
0). Nothing else enters it, neither the worker nor the other batches read with it nor a
restart, so an epoch is augmented the same way whoever makes it and whenever. The batch
index is the session's (within its shard): shards' batch i draw the same numbers for other
documents.

**Failures.** An exception in the document function, or a value it returns that does not
fit its array, is an error of that document (``FunctionError``, a ``DecodeError``:
``batch.on_error`` fails or skips it). In the batch function, or in what it returns, it is an
error of the batch (``BatchFunctionError``), which ends the session with that message. The
worker goes on either way.

The functions are imported, and their signatures checked, by ``functions``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import DecodeError, MongoFeedError
from ..wire import convert
from .codec import BatchDecoder
from .config import VARIABLE, ArrayConfig, Config
from .functions import describe, load_functions, takes_feed
from .values import Mismatch, numbers

log = logging.getLogger(__name__)

DOCUMENT, BATCH = 0, 1  # the kind word of a generator's seed


class FunctionError(DecodeError):
    """The document function failed on one document, or returned a value that does not fit
    an array: an error of that document, which ``batch.on_error`` fails or skips."""

    def __init__(self, collection: str, doc_id, function: str, problem: str):
        MongoFeedError.__init__(self, f"collection {collection!r}, _id {doc_id!r}: "
                                      f"{function}: {problem}")
        self.collection, self.doc_id, self.field, self.path = collection, doc_id, function, None
        self.expected, self.found = None, problem


class BatchFunctionError(MongoFeedError):
    """The batch function failed, or the batch does not fit the declared arrays: an error of
    the batch, sent to its session."""


# -- what the workers read ----------------------------------------------------------------

def read_paths(config: Config) -> list[str]:
    """The document paths a worker fetches: the fields' and transform.reads, without those
    inside another (MongoDB refuses a projection of both "a" and "a.b"), each cut before its
    first numeric part (a projection cannot pick a list element)."""
    paths = []
    for path in [f.path for f in config.fields.values()] + list(config.transform.reads):
        parts = path.split(".")
        cut = next((i for i, p in enumerate(parts) if i and p.isascii() and p.isdigit()),
                   len(parts))
        paths.append(".".join(parts[:cut]))
    paths = sorted(set(paths))
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]


def projection(config: Config) -> dict:
    """The projection of every batch query: the ``_id`` and the paths read (never empty,
    which would mean whole documents)."""
    return {"_id": 1, **{path: 1 for path in read_paths(config)}}


class ProjectedDocument(dict):
    """The document a function sees: the projected top-level keys only (the same whatever
    the source), and reading one that is not projected names the fix."""

    def __init__(self, doc: Mapping, fetched: frozenset):
        super().__init__((key, doc[key]) for key in fetched if key in doc)
        self.fetched = fetched

    def __missing__(self, key):
        if key in self.fetched:
            raise KeyError(f"{key!r}: the document has no such key")
        raise KeyError(f"{key!r} is not read: add it to transform.reads")


# -- randomness ----------------------------------------------------------------------------

def generator(seed: int, epoch: int, index: int, kind: int, position: int = 0
              ) -> np.random.Generator:
    """The generator of one document (kind DOCUMENT) or batch (kind BATCH). Each number is
    given as two 32-bit words, so that no two tuples share a seed (SeedSequence would take
    ``[2**32, 5]`` and ``[0, 1, 5]`` as the same words)."""
    words = [w for n in (seed, epoch, index, kind, position) for w in (n & 0xFFFFFFFF, n >> 32)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        np.array(words, dtype=np.uint32))))


# -- making a batch ------------------------------------------------------------------------

class BatchMaker:
    """Documents (in plan order) in, the batch's arrays out, through the decoder and the
    user's functions; one per worker (and one in ``mongofeed inspect``)."""

    def __init__(self, config: Config, read_gridfs=None):
        self.config = config
        self.collection = config.source.collection
        self.decoder = BatchDecoder(config.fields, self.collection, config.batch.on_error,
                                    read_gridfs=read_gridfs)
        functions = load_functions(config.transform, config.path)
        self.document_function = functions.get("transform.document")
        self.batch_function = functions.get("transform.batch")
        self.names = {key: f"{key} {ref!r}" for key, ref in config.transform.functions.items()}
        self.takes_feed = {key: takes_feed(function) for key, function in functions.items()}
        self.fetched = frozenset(["_id"] + [p.split(".")[0] for p in read_paths(config)])
        self.declared = {name: a for name, a in config.arrays.items() if a.lengths_of is None}
        self.traceback_logged = False

    def sample_nbytes(self) -> int:
        return self.decoder.sample_nbytes()

    def make(self, feed: str, epoch: int, index: int, docs: list[tuple[int, dict]],
             collections: list[str] | None = None, out=None
             ) -> tuple[dict[str, np.ndarray], list[DecodeError]]:
        """The arrays of batch ``index`` of ``epoch`` of ``feed`` from its readable documents
        (each with its position in the batch), and the documents left out under
        on_error = "skip". ``collections``: the collection of each position of the batch,
        for the errors, where they differ (a feed of sources). ``out(name, shape, dtype)``
        may give where an array's final value is to be written (a worker's shared-memory
        slab), for those the daemon converts."""
        of_docs = [collections[position] for position, _ in docs] if collections else None
        if not (self.document_function or self.batch_function):
            fields, problems, _ = self.decoder.decode_kept([doc for _, doc in docs], of_docs,
                                                           out)
            return fields, problems
        fields, problems, kept = self.decoder.decode_kept([doc for _, doc in docs], of_docs)
        rows = [docs[k] for k in kept]
        batch = dict(fields)
        origin = {name: f"field {name!r}" for name in fields}
        if self.document_function:
            batch, rows = self._documents(feed, epoch, index, rows, batch, origin, problems,
                                          collections)
        if self.batch_function and rows:  # not on a batch whose documents were all skipped
            self._batch(feed, epoch, index, batch, origin)
        return self._finish(batch, len(rows), origin, out), problems

    def _documents(self, feed, epoch, index, rows, fields, origin, problems, collections):
        """Run the document function on each row: the batch with its outputs (they replace
        fields of the same name), and the rows kept."""
        name = self.names["transform.document"]
        seed, n = self.config.batch.seed, len(rows)
        extra = {"feed": feed} if self.takes_feed["transform.document"] else {}
        fixed = {}  # array name -> preallocated rows, written compactly as for the decoder
        listed: dict[str, list] = {}  # variable arrays, and values kept for the batch function
        kept, keys = [], None
        for k, (position, doc) in enumerate(rows):
            sample = {field: values[k] for field, values in fields.items()}
            try:
                result = self.document_function(
                    sample, ProjectedDocument(doc, self.fetched),
                    generator(seed, epoch, index, DOCUMENT, position), **extra)
                values = self._document_values(result, keys)
            except (Exception, SystemExit) as exc:  # user code: never the worker's end
                problem = exc.args[0] if isinstance(exc, _Misfit) else f"raised {describe(exc)}"
                error = FunctionError(collections[position] if collections else
                                      self.collection, doc.get("_id"), name, problem)
                if not self.traceback_logged and not isinstance(exc, _Misfit):
                    self.traceback_logged = True  # once per worker; each failure is in status
                    log.warning("%s", error, exc_info=exc)
                if self.config.batch.on_error == "fail":
                    raise error from exc
                problems.append(error)
                continue
            if keys is None:  # the first document that succeeds sets the batch's keys
                keys = set(values)
            for key, value in values.items():
                array = self.declared.get(key)
                if array is None and not self.batch_function:
                    continue  # a field handed back, for no one
                if array is not None and not array.variable_dims:
                    if key not in fixed:
                        fixed[key] = np.empty((n, *array.shape), array.dtype)
                    fixed[key][len(kept)] = value
                else:
                    listed.setdefault(key, []).append(value)
            kept.append(k)
        batch = {field: values[kept] if len(kept) < n else values
                 for field, values in fields.items()}
        batch.update({key: rows_[:len(kept)] for key, rows_ in fixed.items()})
        batch.update(listed)
        origin.update({key: name for key in (*fixed, *listed)})
        return batch, [rows[k] for k in kept]

    def _document_values(self, result, keys: set | None) -> dict:
        """What the document function returned, each declared array checked."""
        if not isinstance(result, Mapping):
            raise _Misfit(f"returned a {type(result).__name__}, not a dict of arrays")
        if keys is not None and set(result) != keys:
            raise _Misfit(f"returned the keys {sorted(result)}, the batch's other documents "
                          f"{sorted(keys)}")
        values = {}
        for key, value in result.items():
            array = self.declared.get(key)
            if array is None:
                if not (self.batch_function or key in self.config.fields):
                    raise _Misfit(f"returned {key!r}, which is not an [arrays.*] table "
                                  f"(declared: {', '.join(self.declared)})")
                values[key] = value  # for the batch function
                continue
            try:
                values[key] = _sample(array, value)
            except Mismatch as bad:
                raise _Misfit(f"returned array {key!r}: expected "
                              f"{bad.expected or _expected(array)}, found {bad.found}") from None
        return values

    def _batch(self, feed, epoch, index, batch, origin):
        name = self.names["transform.batch"]
        rng = generator(self.config.batch.seed, epoch, index, BATCH)
        extra = {"feed": feed} if self.takes_feed["transform.batch"] else {}
        try:
            result = self.batch_function(batch, rng, **extra)
        except (Exception, SystemExit) as exc:  # user code: never the worker's end
            raise BatchFunctionError(f"{name} raised {describe(exc)}") from exc
        if not isinstance(result, Mapping):
            raise BatchFunctionError(f"{name} returned a {type(result).__name__}, not a dict "
                                     f"of arrays")
        for key in result:
            if key not in self.declared and key not in batch:  # "return arrays" is fine
                raise BatchFunctionError(f"{name} returned {key!r}, which is not an "
                                         f"[arrays.*] table (declared: "
                                         f"{', '.join(self.declared)})")
        batch.update(result)
        origin.update({key: name for key in result})

    def _finish(self, batch: dict, n: int, origin: dict, out=None) -> dict[str, np.ndarray]:
        """The declared arrays from ``batch``: checked, padded, with their lengths, cast and
        scaled where the daemon does that; in the order of the config."""
        arrays = {}
        for name, array in self.config.arrays.items():
            if array.lengths_of is not None:
                continue  # made with the array it measures
            if n == 0:  # every document skipped: an empty batch of the announced arrays
                value = [] if array.variable_dims else np.empty((0, *array.shape), array.dtype)
            elif name in batch:
                value = batch[name]
            else:
                given = " or ".join(self.names.values())
                raise BatchFunctionError(f"array {name!r} ([arrays.{name}]) is neither a field "
                                         f"nor returned by {given}")
            try:
                if array.variable_dims:
                    arrays[name], lengths = _pad(array, _rows(array, value, n))
                    if array.lengths:
                        arrays[array.lengths] = lengths
                else:
                    arrays[name] = _rows(array, value, n)
            except Mismatch as bad:
                raise BatchFunctionError(
                    f"array {name!r} from {origin[name]}: expected "
                    f"{bad.expected or _expected(array, n)}, found {bad.found}") from None
            if array.cast_on == "daemon" and (array.cast or array.scale is not None):
                value = arrays[name]
                arrays[name] = convert(value, array.wire_dtype, array.scale,
                                       out and out(name, value.shape, array.wire_dtype))
        return {name: arrays[name] for name in self.config.arrays}


class _Misfit(Exception):
    """A document function's return value does not fit (its one argument says how)."""


def _expected(array: ArrayConfig, n: int | None = None) -> str:
    shape = tuple("any" if d == VARIABLE else d for d in array.shape)
    if n is not None:
        shape = (n, *shape)
    bound = f", lengths up to {array.max_length}" if array.variable_dims else ""
    return f"{array.dtype} of shape {shape}{bound}"


def _sample(array: ArrayConfig, value) -> np.ndarray:
    """One sample's value of ``array`` as a checked numpy array; ``Mismatch`` if it does not
    fit (shape, the variable lengths' bound, or values the dtype cannot hold)."""
    if not array.variable_dims:
        return numbers(value, array.dtype, array.shape)
    checked = numbers(value, array.dtype, None)
    if checked.ndim != len(array.shape) or any(
            d != want and not (want == VARIABLE and d <= array.max_length)
            for d, want in zip(checked.shape, array.shape, strict=True)):
        raise Mismatch(f"shape {checked.shape}", _expected(array))
    return checked


def _rows(array: ArrayConfig, value, n: int):
    """A batch's value of ``array``: an array of n rows (fixed shape) or n checked samples
    (variable shape)."""
    if not array.variable_dims:
        checked = numbers(value, array.dtype, None)
        if checked.shape != (n, *array.shape):
            raise Mismatch(f"shape {checked.shape}", _expected(array, n))
        return checked if checked.dtype == np.dtype(array.dtype) else checked.astype(array.dtype)
    if isinstance(value, np.ndarray) and value.dtype != object:
        value = list(value)  # an array of n rows: each row one sample at its full length
    if not isinstance(value, Sequence) or len(value) != n:
        found = f"{len(value)} rows" if isinstance(value, Sequence) else type(value).__name__
        raise Mismatch(found, f"a list of {n} rows, one per document ({_expected(array)})")
    return [_sample(array, row) for row in value]


def _pad(array: ArrayConfig, rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows padded to one shape (pad_to), and each row's lengths along the variable
    dimensions (int32: shape (n,) for one such dimension, (n, k) for k)."""
    dims = array.variable_dims
    lengths = np.array([[row.shape[d] for d in dims] for row in rows],
                       dtype=np.int32).reshape(len(rows), len(dims))
    if array.pad_to == "max_length":
        target = [array.max_length] * len(dims)
    else:
        longest = lengths.max(axis=0) if rows else np.zeros(len(dims), np.int32)
        step = 1 if array.pad_to == "longest" else array.pad_to
        target = [min(array.max_length, step * math.ceil(int(d) / step)) for d in longest]
    shape = list(array.shape)
    for d, length in zip(dims, target, strict=True):
        shape[d] = length
    padded = np.full((len(rows), *shape), array.pad_value, dtype=array.dtype)
    for i, row in enumerate(rows):
        padded[(i, *(slice(0, s) for s in row.shape))] = row
    return padded, (lengths[:, 0] if len(dims) == 1 else lengths)
