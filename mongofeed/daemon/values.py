"""What a value read from a document may be as numbers: the strict checks that the codec
(``codec.BatchDecoder``, per document or per column) and the user's functions'
results (``transform.py``) share, so a value is refused for the same reason wherever it
comes from."""

from __future__ import annotations

import numpy as np


class Mismatch(Exception):
    """A value does not fit its field (or a declared array); the caller adds the context:
    document, field or function."""

    def __init__(self, found: str, expected: str | None = None):
        super().__init__(found)
        self.found = found
        self.expected = expected


def numbers(value, dtype: str, shape: tuple | None) -> np.ndarray:
    """``value`` as an array (of ``shape`` unless None) whose numbers ``dtype`` holds
    exactly; ``Mismatch`` naming what was found otherwise."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Mismatch("a ragged or non-numeric list") from exc
    if array.dtype.kind not in "biuf":
        if array.ndim == 0 and isinstance(value, int):
            raise Mismatch(repr(value), range_text(dtype))  # beyond 64 bits
        raise Mismatch(f"non-numeric values ({array.dtype})")
    if shape is not None and array.shape != shape:
        raise Mismatch(f"shape {array.shape}")
    if np.can_cast(array.dtype, dtype, "safe"):
        return array  # every value fits: no need to look
    bad = misfits(array, np.dtype(dtype))
    if bad.any():
        index = tuple(np.argwhere(bad)[0])
        found = repr(array[index].item())
        if index:
            found += " at " + "".join(f"[{i}]" for i in index)
        raise Mismatch(found, range_text(dtype))
    return array


def misfits(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
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


def range_text(dtype: str) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return f"numbers within ±{np.finfo(dtype).max:.4g} ({dtype})"
    if dtype.kind == "b":
        return "true/false or 0/1 (bool)"
    info = np.iinfo(dtype)
    return f"integers in [{info.min}, {info.max}] ({dtype})"
