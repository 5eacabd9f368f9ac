"""What a hello reply announces about each array of a feed's batches: its name, dtype and
shape (``ArraySpec``), and the cast the consumer applies on receipt (``Conversion``), with
the one rule for that cast (``convert``) that the daemon and the consumer share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError
from .checks import _is_count

ALLOWED_DTYPES = frozenset((
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
))


@dataclass(frozen=True)
class ArraySpec:
    """Name, dtype and per-sample shape of one array of every batch of a feed.

    In a hello reply a dimension may be None: its length varies from batch to batch (padded
    per batch), up to ``max_shape``, which is then announced too. A batch header always
    names the lengths of that batch.
    """

    name: str
    dtype: str
    shape: tuple
    max_shape: tuple[int, ...] | None = None

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample (at most, for a variable shape)."""
        return math.prod(self.max_shape or self.shape) * np.dtype(self.dtype).itemsize

    def accepts(self, header: ArraySpec) -> bool:
        """Whether a batch header's concrete ``header`` fits this announced spec."""
        if (header.name, header.dtype) != (self.name, self.dtype) or header.max_shape:
            return False
        bounds = self.max_shape or self.shape
        return len(header.shape) == len(self.shape) and all(
            d == want or (want is None and d <= bound)
            for d, want, bound in zip(header.shape, self.shape, bounds, strict=True))

    def to_json(self) -> list:
        value = [self.name, self.dtype, list(self.shape)]
        return value + [list(self.max_shape)] if self.max_shape else value

    @classmethod
    def from_json(cls, value) -> ArraySpec:
        if not (isinstance(value, list) and len(value) in (3, 4)):
            raise ProtocolError(f"array spec must be [name, dtype, shape], got {value!r:.100}")
        name, dtype, shape, *max_shape = value
        if not isinstance(name, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"bad array name or dtype: {value!r:.100}")
        if not max_shape:
            if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
                raise ProtocolError(f"bad array shape: {shape!r:.100}")
            return cls(name, dtype, tuple(shape))
        bounds = max_shape[0]
        if not (isinstance(shape, list) and isinstance(bounds, list)
                and len(bounds) == len(shape) and None in shape
                and all(_is_count(b) and (d is None or (_is_count(d) and d == b))
                        for d, b in zip(shape, bounds, strict=True))):
            raise ProtocolError(f"bad variable array shape: {shape!r:.100}, {bounds!r:.100}")
        return cls(name, dtype, tuple(shape), tuple(bounds))


@dataclass(frozen=True)
class Conversion:
    """A cast (and scale) that the consumer applies to one array on receipt, announced in the
    hello reply, so that the wire carries the smaller stored dtype (uint8 images)."""

    name: str
    dtype: str
    scale: float | None = None

    def to_json(self) -> list:
        return [self.name, self.dtype, self.scale]

    @classmethod
    def from_json(cls, value) -> Conversion:
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)
                and value[1] in ALLOWED_DTYPES
                and (value[2] is None or (isinstance(value[2], (int, float))
                                          and not isinstance(value[2], bool)
                                          and math.isfinite(value[2])))):
            raise ProtocolError(f"conversion must be [name, dtype, scale], got {value!r:.100}")
        return cls(*value)


def convert(array: np.ndarray, dtype: str, scale: float | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
    """``array`` cast to ``dtype``, then multiplied by ``scale``: in one pass (uint8 images to
    float32 without a float32 temporary); the daemon and the consumer share this rule, so a
    batch is the same bytes wherever it is converted. With ``out`` (a worker's slab), the
    result is written there, even when nothing is to convert."""
    if scale is not None:
        return np.multiply(array, scale, dtype=dtype, casting="unsafe", out=out)
    if out is not None:
        np.copyto(out, array, casting="unsafe")
        return out
    return array if array.dtype == np.dtype(dtype) else array.astype(dtype)
