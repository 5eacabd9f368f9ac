"""Shared memory for batches: one file per session, cut into slabs of one batch each. Used by
the daemon (creates and removes it), its workers (write batches into slabs) and a consumer on
the same host (maps it read-only and hands out arrays that view it).

::

  mongofeed-<daemon pid>-<session>   in portable.shared_memory_dir(), mode 0600
  ┌───────────────┬───────────────────────┬───────────────────────┬─────┐
  │ header (4 KiB)│ slab 0                │ slab 1                │ ... │
  │ MAGIC, nonce, │ array 0 │ array 1 │...│ array 0 │ array 1 │...│     │
  │ slabs, bytes  │ (64-byte aligned)     │                       │     │
  └───────────────┴───────────────────────┴───────────────────────┴─────┘

Each array of a batch has a fixed place in every slab, with room for a full batch at its
largest shape (``SlabLayout``, computed from the announced schema by both sides); a batch's
array lies there in C order in that batch's own shape. Which slab holds which batch, and
when a slab may be written again, is the daemon's business (``daemon/slabs.py``); the
descriptor that names a slab is a batch header in ``wire``.

A consumer attaches only to a file that proves to be the one its daemon made for it: a
regular file of its own user, mode 0600, of the announced size, with the random nonce of its
hello reply in the header. Anything else (another host, another user, no such folder here)
fails the attach, and the session's batches then come over the socket.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct

import numpy as np

MAGIC = b"mongofeed-slabs1"
HEADER = struct.Struct("<16s16sQQ")  # magic, nonce, slabs, slab_bytes
HEADER_BYTES = 4096                   # slabs start on a page
ARRAY_ALIGN_BYTES = 64                # what SIMD loads and TensorFlow's zero-copy want
SLAB_ALIGN_BYTES = ARRAY_ALIGN_BYTES  # slabs follow each other, each aligned like an array
NONCE_BYTES = 16
FILE_MODE = 0o600


class RegionError(Exception):
    """A region that cannot be created or attached; the message says why."""


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class SlabLayout:
    """Where each array of a batch lies in a slab: offsets from the slab's start, each with
    room for ``batch_size`` samples at the array's largest shape."""

    def __init__(self, sample_nbytes: list[int], batch_size: int):
        self.offsets, self.room = [], []
        offset = 0
        for nbytes in sample_nbytes:
            self.offsets.append(offset)
            self.room.append(batch_size * nbytes)
            offset = _round_up(offset + batch_size * nbytes, ARRAY_ALIGN_BYTES)
        self.slab_bytes = _round_up(max(offset, 1), SLAB_ALIGN_BYTES)

    @classmethod
    def of(cls, specs, batch_size: int) -> SlabLayout:
        """The layout for announced ``wire.ArraySpec``s."""
        return cls([spec.sample_nbytes for spec in specs], batch_size)


class Region:
    """One mapped region file. ``create`` (daemon), ``open`` (workers, writable) and
    ``attach`` (consumer, read-only, checked) make one."""

    def __init__(self, path: str, memory: mmap.mmap, slabs: int, slab_bytes: int,
                 nonce: bytes):
        self.path = path
        self.memory = memory
        self.slabs = slabs
        self.slab_bytes = slab_bytes
        self.nonce = nonce

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.slabs * self.slab_bytes

    def slab_offset(self, slab: int) -> int:
        if not 0 <= slab < self.slabs:
            raise RegionError(f"slab {slab} is not one of the {self.slabs} of {self.path}")
        return HEADER_BYTES + slab * self.slab_bytes

    @classmethod
    def create(cls, path: str, slabs: int, slab_bytes: int) -> Region:
        """A new region file of ``slabs`` slabs, its memory reserved now (a full folder is a
        RegionError here, not a SIGBUS in a worker later); mapped read-only."""
        nonce = os.urandom(NONCE_BYTES)
        size = HEADER_BYTES + slabs * slab_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     FILE_MODE)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise RegionError(f"cannot reserve {size / 2**20:,.0f} MiB in "
                                  f"{os.path.dirname(path)}: {exc.strerror}") from None
            os.pwrite(fd, HEADER.pack(MAGIC, nonce, slabs, slab_bytes), 0)
            memory = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(path, memory, slabs, slab_bytes, nonce)

    @classmethod
    def open(cls, path: str) -> Region:
        """Map an existing region for writing (a worker)."""
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        try:
            return cls._map(path, fd, os.fstat(fd).st_size, writable=True)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str, nonce: bytes, slabs: int, slab_bytes: int) -> Region:
        """Map, read-only, the region a hello reply announced, after checking that it is that
        file (see the module's docstring); RegionError says why not."""
        if not hasattr(os, "getuid"):
            raise RegionError("this system has no shared-memory files")
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise RegionError(f"cannot open {path}: {exc.strerror} (another host?)") from None
        try:
            info = os.fstat(fd)
            size = HEADER_BYTES + slabs * slab_bytes
            if not (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
                    and stat.S_IMODE(info.st_mode) == FILE_MODE and info.st_size == size):
                raise RegionError(f"{path} is not a {size}-byte file of this user with mode "
                                  f"0600")
            region = cls._map(path, fd, size, writable=False)
        finally:
            os.close(fd)
        if region.nonce != nonce or (region.slabs, region.slab_bytes) != (slabs, slab_bytes):
            region.close()
            raise RegionError(f"{path} is not the region the daemon announced")
        return region

    @classmethod
    def _map(cls, path: str, fd: int, size: int, writable: bool) -> Region:
        if size < HEADER_BYTES:
            raise RegionError(f"{path} is too short for a region")
        memory = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        magic, nonce, slabs, slab_bytes = HEADER.unpack_from(memory, 0)
        if magic != MAGIC or HEADER_BYTES + slabs * slab_bytes != size:
            memory.close()
            raise RegionError(f"{path} is not a mongofeed region")
        return cls(path, memory, slabs, slab_bytes, nonce)

    def write(self, slab: int, layout: SlabLayout, arrays: list[np.ndarray]):
        """Copy a batch's ``arrays`` (in schema order) into ``slab`` (a worker); those that
        are there already (``placer``) stay."""
        start = self.slab_offset(slab)
        for array, offset, room in zip(arrays, layout.offsets, layout.room, strict=True):
            if array.nbytes > room:
                raise RegionError(f"an array of {array.nbytes} bytes exceeds its {room} in a "
                                  f"slab")
            target = np.ndarray(array.shape, array.dtype, buffer=self.memory,
                                offset=start + offset)
            if array.__array_interface__["data"] != target.__array_interface__["data"]:
                np.copyto(target, array, casting="no")

    def placer(self, slab: int, layout: SlabLayout, names: list[str]):
        """``place(name, shape, dtype)``: where the array ``name`` of a batch of that shape
        lies in ``slab``, for the code that makes it to write it there (None if it does not
        fit, or has no place)."""
        start = self.slab_offset(slab)
        places = dict(zip(names, zip(layout.offsets, layout.room, strict=True), strict=True))

        def place(name: str, shape: tuple, dtype) -> np.ndarray | None:
            offset, room = places.get(name, (0, -1))
            dtype = np.dtype(dtype)
            if math.prod(shape) * dtype.itemsize > room:
                return None
            return np.ndarray(shape, dtype, buffer=self.memory, offset=start + offset)

        return place

    def slab_bytes_view(self, slab: int) -> np.ndarray:
        """The bytes of ``slab`` as a uint8 array viewing the mapping: the base of the
        arrays of the batch it holds (a consumer's release follows this object's life)."""
        return np.frombuffer(self.memory, np.uint8, self.slab_bytes, self.slab_offset(slab))

    def close(self):
        """Unmap, unless arrays still view the mapping (it then goes with the last of them)."""
        try:
            self.memory.close()
        except BufferError:
            pass

    def remove(self):
        """Remove the file (the daemon); mappings stay valid until they are closed."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.close()
