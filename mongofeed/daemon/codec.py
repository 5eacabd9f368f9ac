"""Turns a batch of MongoDB documents into one numpy array per field.

Every value is checked strictly against its ``FieldConfig``: a document that does not fit
raises a ``DecodeError`` naming the collection, ``_id``, field and path, so that bad data is
never silently truncated, wrapped or resized. Each field is decoded per document into a
staging array allocated once per batch; the transforms (one_hot, cast, scale) then run on the
whole array at once. A text field (``decode = "string"`` or ``"bytes"``) becomes an array of
Python objects, for the user's functions (``transform.py``) only.
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


class Mismatch(Exception):
    """A value does not fit its field (or a declared array); the caller adds the context:
    document, field or function."""

    def __init__(self, found: str, expected: str | None = None):
        super().__init__(found)
        self.found = found
        self.expected = expected


def get_path(doc: Mapping, path: str):
    """The value at a dotted path ("a.b.0.c": digit parts index lists); KeyError if absent."""
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
        """As ``decode``, and the index in ``docs`` of each row of the arrays. Kept rows are
        written compactly, so trimming the staging arrays needs no copy. ``collections``:
        each document's, for the errors, where they come from several (a feed of sources).
        ``out(name, shape, dtype)`` may give where a field's final array is to be written (a
        worker's slab)."""
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
        arrays = {}
        for name, field in self.fields.items():
            target = None
            if out is not None and not field.is_text:
                target = out(name, (len(kept), *field.out_shape), field.out_dtype)
            arrays[name] = _transform(field, staging[name][:len(kept)], target)
        return arrays, errors, kept

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


def numbers(value, dtype: str, shape: tuple | None) -> np.ndarray:
    """``value`` as an array (of ``shape`` unless None) whose numbers ``dtype`` holds
    exactly; ``Mismatch`` naming what was found otherwise."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Mismatch("a ragged or non-numeric list") from exc
    if array.dtype.kind not in "biuf":
        if array.ndim == 0 and isinstance(value, int):
            raise Mismatch(repr(value), _range_text(dtype))  # beyond 64 bits
        raise Mismatch(f"non-numeric values ({array.dtype})")
    if shape is not None and array.shape != shape:
        raise Mismatch(f"shape {array.shape}")
    if np.can_cast(array.dtype, dtype, "safe"):
        return array  # every value fits: no need to look
    bad = _misfits(array, np.dtype(dtype))
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        found = repr(array[index].item())
        if index:
            found += " at " + "".join(f"[{i}]" for i in index)
        raise Mismatch(found, _range_text(dtype))
    return array


def _misfits(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Mask of the elements that dtype cannot hold exactly (casting would change them)."""
    if dtype.kind == "f":
        limit = np.finfo(dtype).max
        return np.isfinite(array) & ((array > limit) | (array < -limit))
    if dtype.kind == "b":
        if array.dtype.kind == "f":
            return np.ones(array.shape, bool)
        return (array != 0) & (array != 1)
    info = np.iinfo(dtype)
    # hi + 1, not hi: float(2**63 - 1) rounds up to 2**63, which int64 cannot hold.
    bad = (array < info.min) | (array >= info.max + 1)
    if array.dtype.kind == "f":
        bad |= ~np.isfinite(array) | (array != np.trunc(array))
    return bad


def _range_text(dtype: str) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return f"numbers within ±{np.finfo(dtype).max:.4g} ({dtype})"
    if dtype.kind == "b":
        return "true/false or 0/1 (bool)"
    info = np.iinfo(dtype)
    return f"integers in [{info.min}, {info.max}] ({dtype})"


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
