"""Turns a batch of MongoDB documents into one numpy array per field.

Every value is checked strictly against its ``FieldConfig``: a document that does not fit
raises a ``DecodeError`` naming the collection, ``_id``, field and path, so that bad data is
never silently truncated, wrapped or resized. A batch whose values all have the plain form
(raw bytes of the right size, numbers the dtype holds) is decoded a column at a time; any
other, per document into staging arrays allocated once per batch, which names the document
that does not fit. The transforms (one_hot, cast, scale) then run on the whole array at
once. A text field (``decode = "string"`` or ``"bytes"``) becomes an array of Python
objects, for the user's functions (``transform.py``) only.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from collections.abc import Callable, Mapping

import numpy as np
from gridfs.errors import GridFSError

from ..errors import DecodeError
from ..wire.arrays import convert
from .config import ON_ERROR, FieldConfig
from .source import is_transient
from .values import Mismatch, misfits, numbers

log = logging.getLogger(__name__)

_BYTES = (bytes, bytearray, memoryview)
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class DocumentFailure(Exception):
    """Decoding a document failed for a reason that is not its data (a missing package, a
    bug): no ``on_error`` applies, the batch fails naming the document and field."""

    def __init__(self, collection: str, doc_id, field: str, cause: Exception):
        super().__init__(f"collection {collection!r}, _id {doc_id!r}: field {field!r}: "
                         f"{type(cause).__name__}: {cause}")


def get_path(doc: Mapping, path: str):
    """The value at a dotted path ("a.b.0.c": digit parts index lists); KeyError if absent."""
    if "." not in path and type(doc) is dict:  # the common case, at a batch's every document
        return doc[path]
    value = doc
    for part in path.split("."):
        if isinstance(value, list) and part.isascii() and part.isdigit():
            part = int(part)
            if part >= len(value):
                raise KeyError(path)
        elif not isinstance(value, Mapping) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


class BatchDecoder:
    """Decodes a list of documents into one array per field, preallocated once per batch."""

    def __init__(self, fields: dict[str, FieldConfig], collection: str, on_error: str = "fail",
                 read_gridfs: Callable[[str, object], bytes] | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
        if read_gridfs is None and any(f.gridfs for f in fields.values()):
            raise ValueError("a field has gridfs = true but no read_gridfs was given")
        self.fields = fields
        self.collection = collection
        self.on_error = on_error
        self.read_gridfs = read_gridfs
        self._warned_pickle = False

    def decode(self, docs: list[dict]) -> tuple[dict[str, np.ndarray], list[DecodeError]]:
        """Arrays of the documents that fit, in order, and the errors of those that do not.

        With on_error = "fail" the first bad document raises its DecodeError. With "skip" it is
        left out of every array, so all arrays keep the same length.
        """
        arrays, errors, _ = self.decode_kept(docs)
        return arrays, errors

    def decode_kept(self, docs: list[dict], collections: list[str] | None = None, out=None
                    ) -> tuple[dict[str, np.ndarray], list[DecodeError], list[int]]:
        """As ``decode``, and the index in ``docs`` of each row of the arrays. ``collections``:
        each document's, for the errors, where they come from several (a feed of sources).
        ``out(name, shape, dtype)`` may give where a field's final array is to be written (a
        worker's slab). A batch whose every field ``decode_column`` can take is decoded a
        column at a time; any other, document by document (``_decode_rows``)."""
        staging = self._decode_columns(docs)
        if staging is not None:
            errors, kept = [], list(range(len(docs)))
        else:
            staging, errors, kept = self._decode_rows(docs, collections)
        arrays = {}
        for name, field in self.fields.items():
            target = None
            if out is not None and not field.is_text:
                target = out(name, (len(kept), *field.out_shape), field.out_dtype)
            arrays[name] = _transform(field, staging[name], target)
        return arrays, errors, kept

    def _decode_columns(self, docs: list[dict]) -> dict[str, np.ndarray] | None:
        columns = {}
        for name, field in self.fields.items():
            column = decode_column(field, docs)
            if column is None:
                return None
            columns[name] = column
        return columns

    def _decode_rows(self, docs: list[dict], collections: list[str] | None):
        """Each document's fields into staging arrays allocated once per batch, kept rows
        written compactly (trimming them needs no copy); the arrays, errors and kept rows."""
        staging = {name: np.empty((len(docs), *f.shape), f.dtype or object)
                   for name, f in self.fields.items()}
        errors, kept = [], []
        for index, doc in enumerate(docs):
            collection = collections[index] if collections else self.collection
            try:
                for name, field in self.fields.items():
                    staging[name][len(kept)] = self._decode_field(field, doc, collection)
            except DecodeError as err:
                if self.on_error == "fail":
                    raise
                errors.append(err)
                continue
            kept.append(index)
        return {name: array[:len(kept)] for name, array in staging.items()}, errors, kept

    def sample_nbytes(self) -> int:
        """Bytes of one sample over all output arrays, to bound the memory of a batch."""
        return sum(f.out_nbytes for f in self.fields.values())

    def _decode_field(self, field: FieldConfig, doc: Mapping, collection: str):
        """One field of one document, as a value that fits a row of its staging array."""
        try:
            try:
                value = get_path(doc, field.path)
            except KeyError:
                expected = _describe(field)
                if field.gridfs:
                    expected = f"a GridFS file id ({expected})"
                raise Mismatch("missing", expected) from None
            if field.gridfs:
                value = self._fetch(field, value)
            if field.decode == "pickle":
                self._warn_pickle(field)
            decoded = _DECODERS[field.decode](field, value)
            if field.one_hot:
                _check_labels(field, decoded)
            return decoded
        except Mismatch as bad:
            raise DecodeError(collection, doc.get("_id"), field.name, field.path,
                              bad.expected or _describe(field), bad.found) from bad.__cause__
        except Exception as exc:
            if is_transient(exc):  # a database outage while reading GridFS: the worker retries
                raise
            raise DocumentFailure(collection, doc.get("_id"), field.name, exc) from exc

    def _fetch(self, field: FieldConfig, file_id) -> bytes:
        """The bytes of a GridFS file; other database errors propagate to the worker."""
        try:
            return self.read_gridfs(field.bucket, file_id)
        except GridFSError as exc:  # no such file, or its chunks are missing
            raise Mismatch(f"GridFS file {file_id!r} missing in bucket {field.bucket!r} "
                            f"({type(exc).__name__})", f"a GridFS file ({_describe(field)})"
                            ) from exc

    def _warn_pickle(self, field: FieldConfig) -> None:
        if not self._warned_pickle:
            self._warned_pickle = True
            log.warning("field %r uses decode = 'pickle': unpickling executes code stored in "
                        "the database; use it for trusted legacy data only", field.name)


def decode_column(field: FieldConfig, docs: list[dict]) -> np.ndarray | None:
    """The values of ``field`` in all of ``docs`` as one array, with a few calls per batch
    instead of several per document, where every value has the plain form of its kind: raw
    bytes of the field's size, or numbers all ints (bools included) or all floats that the
    dtype holds exactly (and class labels in range). None for anything else, which the
    per-document path then decodes, or refuses naming the document. Same arrays either way:
    a batch of ints is not mixed with floats (float64 would round ints past 2**53)."""
    if not docs or field.decode not in ("raw", "scalar") or field.gridfs:
        return None
    try:
        values = [get_path(doc, field.path) for doc in docs]
    except KeyError:
        return None
    if field.decode == "raw":
        nbytes = _nbytes(field)
        if not all(isinstance(v, bytes) and len(v) == nbytes for v in values):
            return None
        column = np.empty((len(values), *field.shape), field.dtype)  # writable, like rows
        flat = memoryview(column).cast("B")
        for i, value in enumerate(values):
            flat[i * nbytes:(i + 1) * nbytes] = value
        return column
    if not (all(isinstance(v, int) for v in values)
            or all(isinstance(v, float) for v in values)):
        return None
    try:
        array = np.array(values)
    except (OverflowError, ValueError, TypeError):
        return None
    dtype = np.dtype(field.dtype)
    if array.dtype.kind not in "biuf" or (not np.can_cast(array.dtype, dtype, "safe")
                                          and misfits(array, dtype).any()):
        return None
    if field.one_hot and ((array < 0) | (array >= field.one_hot)).any():
        return None
    return array.astype(dtype)


def _describe(field: FieldConfig) -> str:
    """What a field's value should be, for the 'expected' part of an error."""
    dtype, shape = field.dtype, field.shape
    if field.decode == "raw":
        return f"{_nbytes(field)} bytes ({dtype} {shape})"
    if field.decode == "npy":
        return f".npy bytes of {dtype} {shape}"
    if field.decode == "scalar":
        return f"a number ({dtype})"
    if field.decode == "list":
        return f"a list of numbers of shape {shape} ({dtype})"
    if field.decode == "image":
        return f"PNG/JPEG bytes of a {shape[0]}x{shape[1]} image (height x width)"
    if field.decode == "string":
        return "a string"
    if field.decode == "bytes":
        return "bytes"
    return f"pickled {dtype} {shape}"


def _nbytes(field: FieldConfig) -> int:
    return math.prod(field.shape) * np.dtype(field.dtype).itemsize


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _bytes(value) -> memoryview:
    """A flat byte view of a bytes-like value, without copying it."""
    if not isinstance(value, _BYTES):
        raise Mismatch(_type_name(value), "bytes")
    return memoryview(value).cast("B")


def _decode_raw(field: FieldConfig, value) -> np.ndarray:
    """A view of the bytes; assigning it to the batch row is the only copy."""
    data = _bytes(value)
    if len(data) != _nbytes(field):
        raise Mismatch(f"{len(data)} bytes")
    return np.frombuffer(data, field.dtype).reshape(field.shape)


def _decode_npy(field: FieldConfig, value) -> np.ndarray:
    """Checks the .npy header before touching the data: object (pickled) arrays are refused
    and a forged shape cannot make numpy allocate memory for data that is not there."""
    data = _bytes(value)
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADERS:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
        shape, fortran, dtype = _NPY_HEADERS[version](stream)
    except (ValueError, TypeError) as exc:
        raise Mismatch(f"not a .npy file ({exc})") from exc
    if dtype != np.dtype(field.dtype) or shape != field.shape:
        raise Mismatch(f"{dtype} {shape}")
    body = data[stream.tell():]
    if len(body) != _nbytes(field):
        raise Mismatch(f"{len(body)} bytes of array data instead of {_nbytes(field)}")
    return np.frombuffer(body, dtype).reshape(shape, order="F" if fortran else "C")


def _decode_scalar(field: FieldConfig, value):
    if not isinstance(value, (int, float)):  # bool and bson Int64 are ints
        raise Mismatch(_type_name(value))
    return numbers(value, field.dtype, field.shape)


def _decode_list(field: FieldConfig, value) -> np.ndarray:
    if not isinstance(value, list):
        raise Mismatch(_type_name(value))
    return numbers(value, field.dtype, field.shape)


def _decode_image(field: FieldConfig, value) -> np.ndarray:
    data = _bytes(value)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        message = "decode = 'image' needs Pillow: pip install 'mongofeed[image]'"
        raise ImportError(message) from exc
    height, width, channels = field.shape
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            if image.size != (width, height):
                raise Mismatch(f"a {image.height}x{image.width} image")
            pixels = np.asarray(image.convert(_IMAGE_MODES[channels]))
    except Mismatch:
        raise
    except UnidentifiedImageError as exc:
        raise Mismatch("not a PNG/JPEG image (unrecognised data)") from exc
    except Exception as exc:  # Pillow raises many kinds of errors for bad bytes
        raise Mismatch(f"not a PNG/JPEG image ({exc})") from exc
    return pixels.reshape(field.shape)


def _decode_pickle(field: FieldConfig, value) -> np.ndarray:
    if not field.allow_pickle:
        raise Mismatch("decode = 'pickle' without allow_pickle = true", "no pickled data")
    data = _bytes(value)
    try:
        obj = pickle.loads(data)
    except Exception as exc:  # unpickling can fail in any way
        raise Mismatch(f"not a pickle ({type(exc).__name__}: {exc})") from exc
    return numbers(obj, field.dtype, field.shape)


def _decode_string(field: FieldConfig, value) -> str:
    if not isinstance(value, str):
        raise Mismatch(_type_name(value))
    return value


def _decode_bytes(field: FieldConfig, value) -> bytes:
    return bytes(_bytes(value))


_DECODERS = {
    "raw": _decode_raw,
    "npy": _decode_npy,
    "scalar": _decode_scalar,
    "list": _decode_list,
    "image": _decode_image,
    "pickle": _decode_pickle,
    "string": _decode_string,
    "bytes": _decode_bytes,
}


def _check_labels(field: FieldConfig, labels) -> None:
    """Refuses class labels outside [0, one_hot) before the batch is assembled."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= field.one_hot)
    if bad.any():
        raise Mismatch(f"label {labels[tuple(np.argwhere(bad)[0])].item()!r}",
                        f"a class label in [0, {field.one_hot})")


def _transform(field: FieldConfig, array: np.ndarray, out: np.ndarray | None = None
               ) -> np.ndarray:
    """one_hot, then cast, then scale (unless cast_on = "consumer"), on the whole batch; the
    staging array if none apply. With ``out``, the result is written there."""
    if field.is_text:
        return array
    if field.one_hot:
        one_hot = np.zeros((*array.shape, field.one_hot), field.out_dtype)
        np.put_along_axis(one_hot, array[..., None].astype(np.intp), 1, axis=-1)
        array = one_hot
    return convert(array, field.out_dtype, field.scale if field.cast_on == "daemon" else None,
                   out)
