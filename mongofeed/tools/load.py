"""Put training data into MongoDB so that a feed can serve it: ``mongofeed load``.

Four sources, each a function that takes a pymongo ``Collection``:

- :func:`load_digits`: scikit-learn's bundled 8x8 digits (no download).
- :func:`load_npz`: a NumPy ``.npz`` file, one field per array.
- :func:`load_synthetic`: random uint8 images with integer labels, any size, for benchmarks.
- :func:`load_images`: a folder with one sub-folder of JPEG/PNG files per class.

Every document carries ``split`` ("train" or "val", or the name given to :func:`load_npz`),
so a config selects a feed with ``filter = {split = "train"}``; an index on ``split`` is
created after each load. The configs in ``configs/`` match the layouts documented on each
function.

Everything is checked before anything is written: a bad input leaves the collection as it was.
With ``drop=True`` the collection is dropped first, so a reload is idempotent; without it, a
load appends to whatever the collection holds. Documents go in ``insert_many(ordered=True)``
batches of at most 1000 documents and about 8 MB, well under MongoDB's 16 MB document and
48 MB message limits (FerretDB, which stores binary as base64, also stays under its limits).
If an insert fails halfway, the documents of the batches before it stay: reload with
``drop=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .load_checks import (
    LoadError,
    check_fraction,
    check_image,
    check_int,
    check_seed,
    check_shape,
    optional_import,
    read_npz,
    split_counts,
    val_mask,
)

Progress = Callable[[int, int], Any]

BATCH_BYTES = 8 * 1024 * 1024
"""Target size of one insert_many batch (the sum of the documents' approximate sizes)."""
MAX_BATCH_DOCS = 1000
"""Most documents in one insert_many batch."""
MAX_DOC_BYTES = 16 * 1024 * 1024 - 64 * 1024
"""Largest document we write: MongoDB's 16 MiB BSON limit, less room for keys and _id."""
DOC_OVERHEAD = 64
"""Approximate BSON bytes of a document's _id, split and framing."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNTHETIC_BLOCK = 64
"""Synthetic samples are drawn in blocks of this many, each block from its own seed."""


# ---------------------------------------------------------------------------------------------
# Loaders


def load_digits(collection, *, val_fraction: float = 0.2, seed: int = 0, drop: bool = False,
                progress: Progress | None = None) -> dict:
    """Load scikit-learn's digits data set (1797 images of 8x8 pixels, 10 classes).

    Documents: ``{"split": "train"|"val", "pixels": bytes, "target": int}``, where ``pixels``
    is a uint8 array of shape (8, 8, 1) in C order with values 0..16 as scikit-learn stores
    them (``configs/digits.toml`` scales them by 1/16), and ``target`` is the digit 0..9.
    Documents go in scikit-learn's order; a random ``val_fraction`` of them (deterministic from
    ``seed``) gets ``split = "val"``.

    ``drop=True`` drops the collection first; without it the documents are appended to what
    the collection holds. ``progress(inserted, total)`` is called after each insert batch.
    Returns ``{"train": n, "val": m, "total": n + m}``. Needs scikit-learn
    (``pip install 'mongofeed[load]'``); its digits ship with it, nothing is downloaded.
    """
    check_fraction(val_fraction)
    check_seed(seed)
    datasets = optional_import("sklearn.datasets", "scikit-learn", "load")
    bunch = datasets.load_digits()
    pixels = np.asarray(bunch.images).astype(np.uint8).reshape(-1, 8, 8, 1)
    targets = np.asarray(bunch.target)
    n = len(pixels)
    is_val = val_mask(n, val_fraction, seed)
    splits = np.where(is_val, "val", "train")

    def docs():
        size = 8 * 8 + DOC_OVERHEAD + 32
        for i in range(n):
            yield {"split": str(splits[i]), "pixels": pixels[i].tobytes(),
                   "target": int(targets[i])}, size

    return _load(collection, docs(), n, split_counts(splits), drop, progress)


def load_npz(collection, path, *, split: str | None = None, val_fraction: float = 0.0,
             seed: int = 0, drop: bool = False, progress: Progress | None = None) -> dict:
    """Load a NumPy ``.npz`` file: one document per row, one field per array.

    All arrays must have the same first dimension (the number of samples). An array with two
    or more dimensions becomes a bytes field holding one sample in C order, in its stored
    dtype (little-endian: a big-endian array is converted, values unchanged), for a field with
    ``decode = "raw"``; a 1-D array becomes a scalar field (Python int, float or bool; str for
    a 1-D string array). Each document also gets ``split``: the given ``split`` for every
    row, or else "val" for a random ``val_fraction`` of rows (deterministic from ``seed``) and
    "train" for the rest.

    Refused with a :class:`LoadError` (a ValueError) naming the array: object arrays (the file
    is read with ``allow_pickle=False``: unpickling runs code), arrays of other than
    bool/int/uint/float (or 1-D str) dtype, arrays without a first dimension or with one that
    differs from the others, field names MongoDB cannot hold or that clash with ``split`` or
    ``_id``, and NaN or infinity in a float array (its index is named). MongoDB would store
    NaN, but FerretDB closes the connection on it, and NaN in training data is a bug anyway.
    Nothing is written unless every array passes.

    ``drop=True`` drops the collection first; without it the documents are appended to what
    the collection holds. ``progress(inserted, total)`` is called after each insert batch.
    Returns ``{"train": n, "val": m, "total": n + m}``, plus a count under ``split`` when
    that is another name.
    """
    check_fraction(val_fraction)
    check_seed(seed)
    if split is not None:
        if not isinstance(split, str) or not split:
            raise LoadError(f"split must be a non-empty string, not {split!r}")
        if val_fraction:
            raise LoadError("give either split (every row gets it) or val_fraction "
                            "(a random share becomes 'val'), not both")
    arrays = read_npz(path)
    n = len(next(iter(arrays.values())))
    if split is not None:
        splits = np.full(n, split, dtype=object)
    else:
        splits = np.where(val_mask(n, val_fraction, seed), "val", "train")

    size = DOC_OVERHEAD + sum(
        len(name) + 16 + int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
        for name, arr in arrays.items()
    )
    if size > MAX_DOC_BYTES:
        raise LoadError(f"{path}: one row takes about {size} bytes, more than a MongoDB "
                        f"document holds ({MAX_DOC_BYTES}); store fewer or smaller arrays")
    bytes_fields = [(name, arr) for name, arr in arrays.items() if arr.ndim >= 2]
    scalar_fields = [(name, arr.tolist()) for name, arr in arrays.items() if arr.ndim == 1]

    def docs():
        for i in range(n):
            doc: dict[str, Any] = {"split": str(splits[i])}
            for name, arr in bytes_fields:
                doc[name] = arr[i].tobytes()
            for name, values in scalar_fields:
                doc[name] = values[i]
            yield doc, size

    return _load(collection, docs(), n, split_counts(splits), drop, progress)


def load_synthetic(collection, n: int, *, shape=(64, 64, 3), classes: int = 10,
                   val_fraction: float = 0.1, seed: int = 0, drop: bool = False,
                   progress: Progress | None = None) -> dict:
    """Load ``n`` random uint8 images with integer labels, for demos and benchmarks.

    Documents: ``{"split": "train"|"val", "image": bytes, "label": int}``, where ``image`` is a
    uint8 array of ``shape`` in C order and ``label`` is in ``[0, classes)``. Pixels are noise
    in 0..127, plus 128 on a band of rows (along the first axis) whose position is given by
    the label, so a model has something to learn. Everything is deterministic from ``seed``:
    the same arguments give the same documents. A random ``val_fraction`` of them gets
    ``split = "val"``.

    ``drop=True`` drops the collection first; without it the documents are appended to what
    the collection holds. ``progress(inserted, total)`` is called after each insert batch.
    Returns ``{"train": n, "val": m, "total": n + m}``.
    """
    n = check_int(n, "n", 1)
    classes = check_int(classes, "classes", 1)
    shape = check_shape(shape)
    check_fraction(val_fraction)
    check_seed(seed)
    sample_bytes = math.prod(shape)
    if sample_bytes > MAX_DOC_BYTES:
        raise LoadError(f"shape {shape} takes {sample_bytes} bytes per image, more than a "
                        f"MongoDB document holds ({MAX_DOC_BYTES})")
    splits = np.where(val_mask(n, val_fraction, seed), "val", "train")
    rows = shape[0]

    def docs():
        size = sample_bytes + DOC_OVERHEAD + 32
        for start in range(0, n, SYNTHETIC_BLOCK):
            count = min(SYNTHETIC_BLOCK, n - start)
            rng = np.random.default_rng([seed, 2, start // SYNTHETIC_BLOCK])
            labels = rng.integers(0, classes, size=SYNTHETIC_BLOCK)[:count]
            images = rng.integers(0, 128, size=(count, *shape), dtype=np.uint8)
            for j in range(count):
                label = int(labels[j])
                top = label * rows // classes
                bottom = max(top + 1, (label + 1) * rows // classes)
                images[j, top:bottom] += 128
                yield {"split": str(splits[start + j]), "image": images[j].tobytes(),
                       "label": label}, size

    return _load(collection, docs(), n, split_counts(splits), drop, progress)


def load_images(collection, folder, *, shape=None, val_fraction: float = 0.2, seed: int = 0,
                drop: bool = False, progress: Progress | None = None) -> dict:
    """Load a folder of JPEG/PNG images with one sub-folder per class.

    The sub-folders, sorted by name, are the classes 0..K-1 (hidden ones are skipped; an empty
    one still takes its label). Files ending in .jpg, .jpeg or .png (any case), also in deeper
    folders, are the samples; other files are ignored. Documents:
    ``{"split": "train"|"val", "image": bytes, "label": int, "class": str, "filename": str}``,
    where ``image`` holds the file's bytes unchanged (for ``decode = "image"``) and
    ``filename`` is the path relative to ``folder``, with "/". A random ``val_fraction`` of
    files (deterministic from ``seed``) gets ``split = "val"``.

    With ``shape = (height, width)`` or ``(height, width, channels)``, every image is decoded
    with Pillow (``pip install 'mongofeed[image]'``) first and must have that height and
    width; the channel count is not compared (the colour mode is the decoder's business).
    Without ``shape`` the files are not decoded. Nothing is written unless all files pass.

    ``drop=True`` drops the collection first; without it the documents are appended to what
    the collection holds. ``progress(inserted, total)`` is called after each insert batch.
    Returns ``{"train": n, "val": m, "total": n + m, "classes": [names]}``.
    """
    check_fraction(val_fraction)
    check_seed(seed)
    if shape is not None:
        shape = check_shape(shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise LoadError(f"shape must be (height, width) or (height, width, channels) with "
                            f"1, 3 or 4 channels, not {shape}")
    root = Path(folder)
    if not root.is_dir():
        raise LoadError(f"{folder}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LoadError(f"{folder}: no class sub-folders; put each class's images in a "
                        f"folder of its own (e.g. {folder}/cat/1.jpg)")
    files: list[tuple[Path, str, int]] = []
    for label, name in enumerate(classes):
        found = []
        for path in (root / name).rglob("*"):
            rel = path.relative_to(root)
            if (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                    and not any(part.startswith(".") for part in rel.parts)):
                found.append((path, rel.as_posix(), label))
        files.extend(sorted(found, key=lambda f: f[1]))
    if not files:
        raise LoadError(f"{folder}: no .jpg, .jpeg or .png files in its class folders "
                        f"({', '.join(classes)})")

    image_module = optional_import("PIL.Image", "Pillow", "image") if shape else None
    for path, rel, _ in files:
        size = path.stat().st_size
        if size > MAX_DOC_BYTES:
            raise LoadError(f"{rel}: {size} bytes, more than a MongoDB document holds "
                            f"({MAX_DOC_BYTES})")
        if shape:
            check_image(image_module, path.read_bytes(), rel, shape)

    n = len(files)
    splits = np.where(val_mask(n, val_fraction, seed), "val", "train")

    def docs():
        for i, (path, rel, label) in enumerate(files):
            data = path.read_bytes()
            yield {"split": str(splits[i]), "image": data, "label": label,
                   "class": classes[label], "filename": rel}, (
                len(data) + len(rel) + len(classes[label]) + DOC_OVERHEAD + 64)

    counts = _load(collection, docs(), n, split_counts(splits), drop, progress)
    return {**counts, "classes": classes}


# ---------------------------------------------------------------------------------------------
# Writing


def _load(collection, docs: Iterable[tuple[dict, int]], total: int, counts: dict, drop: bool,
          progress: Progress | None) -> dict:
    """Drop if asked, insert ``docs`` (document, approximate size) in batches, index split."""
    if drop:
        collection.drop()
    inserted = _insert_batches(collection, docs, total, progress)
    collection.create_index("split")
    return {**counts, "total": inserted}


def _insert_batches(collection, docs: Iterable[tuple[dict, int]], total: int,
                    progress: Progress | None) -> int:
    batch: list[dict] = []
    batch_bytes = 0
    inserted = 0

    def flush():
        nonlocal batch, batch_bytes, inserted
        collection.insert_many(batch, ordered=True)
        inserted += len(batch)
        batch, batch_bytes = [], 0
        if progress is not None:
            progress(inserted, total)

    for doc, size in docs:
        if batch and (batch_bytes + size > BATCH_BYTES or len(batch) >= MAX_BATCH_DOCS):
            flush()
        batch.append(doc)
        batch_bytes += size
    if batch:
        flush()
    return inserted
