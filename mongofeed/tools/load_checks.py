"""Reading and checking what ``mongofeed load`` is given: .npz arrays, images, fractions,
seeds and shapes, each fault a ``LoadError`` naming the array, file or value; and the
optional packages a loader needs."""

from __future__ import annotations

import importlib
import io

import numpy as np

from ..errors import MongoFeedError


class LoadError(MongoFeedError, ValueError):
    """The data to load is not what a loader accepts (it names the array, file or value)."""


class MissingDependencyError(MongoFeedError, ImportError):
    """An optional package that a loader needs is not installed."""


def read_npz(path) -> dict[str, np.ndarray]:
    """Every array of an .npz file, checked; big-endian arrays made little-endian."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: not a NumPy .npz file ({exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise LoadError(f"{path}: a single .npy array, not an .npz file; save it with "
                        f"numpy.savez(path, name=array) so that it has a field name")
    arrays: dict[str, np.ndarray] = {}
    with npz:
        for name in npz.files:
            check_field_name(name, path)
            try:
                arr = npz[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise LoadError(f"{path}: array {name!r} is an object array; refused "
                                    f"because loading it would unpickle (run code from the "
                                    f"file). Store it as a numeric array") from None
                raise LoadError(f"{path}: array {name!r} cannot be read: {exc}") from None
            arrays[name] = check_array(name, arr, path)
    if not arrays:
        raise LoadError(f"{path}: the .npz file holds no arrays")
    lengths = {name: len(arr) for name, arr in arrays.items()}
    first, n = next(iter(lengths.items()))
    for name, length in lengths.items():
        if length != n:
            raise LoadError(f"{path}: array {name!r} has {length} rows but array {first!r} "
                            f"has {n}; all arrays need the same first dimension")
    if n == 0:
        raise LoadError(f"{path}: the arrays have no rows")
    return arrays


def check_field_name(name: str, path) -> None:
    if name in ("split", "_id"):
        raise LoadError(f"{path}: array {name!r} clashes with the {name!r} field that "
                        f"mongofeed writes; rename it")
    if not name or name.startswith("$") or "." in name or "\0" in name:
        raise LoadError(f"{path}: array {name!r} is not a valid MongoDB field name (no "
                        f"leading '$', no '.'); rename it")


def check_array(name: str, arr: np.ndarray, path) -> np.ndarray:
    kind = arr.dtype.kind
    if arr.ndim == 0:
        raise LoadError(f"{path}: array {name!r} is a scalar (0-d); every array needs a "
                        f"first dimension, one entry per sample")
    if kind == "O":  # only reachable if the file was read with pickles allowed
        raise LoadError(f"{path}: array {name!r} is an object array; store it as numeric")
    if kind == "U" and arr.ndim == 1:
        return arr
    if kind not in "biuf" or arr.dtype.names is not None:
        allowed = "bool, int, uint or float" + (" (or str, for a 1-D array)"
                                                 if arr.ndim == 1 else "")
        raise LoadError(f"{path}: array {name!r} has dtype {arr.dtype}, which mongofeed "
                        f"cannot store; use {allowed}")
    if kind == "f" and arr.dtype.itemsize not in (2, 4, 8):
        raise LoadError(f"{path}: array {name!r} has dtype {arr.dtype}; use float16, "
                        f"float32 or float64")
    if kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            what = "NaN" if np.isnan(arr[index]) else "infinity"
            where = index[0] if arr.ndim == 1 else index
            raise LoadError(f"{path}: array {name!r} holds {what} at index {where} (sample "
                            f"{index[0]}); refused: FerretDB closes the connection on NaN, "
                            f"and non-finite values in training data are a bug anyway")
    big_uint = kind == "u" and arr.ndim == 1 and arr.dtype.itemsize == 8 and len(arr)
    if big_uint and int(arr.max()) > np.iinfo(np.int64).max:
        raise LoadError(f"{path}: array {name!r} holds values above the int64 range that "
                        f"MongoDB integers have")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def check_image(image_module, data: bytes, rel: str, shape: tuple[int, ...]) -> None:
    try:
        with image_module.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    # A broken file makes Pillow raise any of these, depending on the format and the fault.
    except (OSError, ValueError, SyntaxError, EOFError, image_module.DecompressionBombError) as exc:
        raise LoadError(f"{rel}: Pillow cannot decode it: {exc}") from None
    if (height, width) != shape[:2]:
        raise LoadError(f"{rel}: the image is {height}x{width} (height x width), but shape "
                        f"asks for {shape[0]}x{shape[1]}")


def val_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for the rows that go to "val": round(n * val_fraction) of them, random by seed."""
    n_val = round(n * val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 1]).permutation(n)[:n_val]] = True
    return mask


def split_counts(splits: np.ndarray) -> dict:
    names, counts = np.unique(splits.astype(str), return_counts=True)
    result = {"train": 0, "val": 0}
    result.update({str(name): int(count) for name, count in zip(names, counts, strict=True)})
    return result


def check_fraction(val_fraction) -> None:
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0.0 <= val_fraction <= 1.0):
        raise LoadError(f"val_fraction must be a number from 0 to 1, not {val_fraction!r}")


def check_seed(seed) -> None:
    check_int(seed, "seed", 0)


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LoadError(f"{name} must be an integer of at least {minimum}, not {value!r}")
    return int(value)


def check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                           and d >= 1 for d in dims):
        raise LoadError(f"shape must be a sequence of positive integers, not {shape!r}")
    return tuple(int(d) for d in dims)


def optional_import(module: str, package: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"this loader needs {package}: pip install "
                                     f"'mongofeed[{extra}]' ({exc})") from None
