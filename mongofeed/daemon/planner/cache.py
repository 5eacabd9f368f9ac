"""Plans on disk, so that a restarted daemon, or a second ``serve --shard`` daemon on the
same host, does not list the ``_id``s again.

One file per (server, database, collection, filter, order), named by a hash of them, in
``serve.plan_cache`` (default ``$XDG_CACHE_HOME/mongofeed/plans``, else
``~/.cache/mongofeed/plans``). A file holds a BSON header (the check, the digest, the kind
and the window shape) and the ids as stored in memory (12-byte rows, int64, or BSON
elements for the fallback). It is used only if the check the daemon makes at start
(``source.fingerprint``: the collection's count and data size, and where the server answers
from its indexes, the first and last ``_id`` and the filter's count) equals the stored one
and the plan's first, middle and last ``_id`` are still stored (``source.still_stored``);
otherwise the daemon lists again and replaces it. A change that keeps all of these goes
unseen: README, Limits, says which.

Files are written to a temporary name and renamed (never half-written), readable by the
user only (the folder 0700, the files 0600).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import bson
import numpy as np

from ...wire import BSON_OPTIONS
from .ids import INT64, OBJECTID, OBJECTS, Ids

log = logging.getLogger(__name__)

FORMAT = 1  # of the files; part of their name, so another format is another file
SUFFIX = ".plan"


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mongofeed" / "plans"


def cache_key(server: str, database: str, collection: str, query: dict, order: dict) -> str:
    """The file name of a plan: what it was listed from and how it is kept."""
    text = json.dumps([FORMAT, server, database, collection, bson.encode(query).hex(), order],
                      sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest() + SUFFIX


class PlanCache:
    """Stored listings in ``folder``."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_folder()

    def load(self, key: str, check: dict) -> dict | None:
        """The stored listing under ``key`` if its check equals ``check``: the header with
        ``ids`` added (an ``Ids``), else None."""
        path = self.folder / key
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(4), "little")
                f.seek(0)
                header = bson.decode(f.read(size), BSON_OPTIONS)
                if header.get("check") != check:
                    log.info("plan cache %s: stale (stored %s, now %s)", path,
                             header.get("check"), check)
                    return None
                header["ids"] = read_ids(f, header["kind"], header["stored"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, bson.errors.BSONError) as exc:
            log.warning("plan cache %s: unreadable (%s); listing again", path, exc)
            return None
        header["path"] = str(path)
        return header

    def store(self, key: str, header: dict, ids: Ids) -> str | None:
        """Write ``header`` and ``ids`` under ``key``, atomically; the path, or None if the
        folder is not writable (the daemon then only loses the cache, with a warning)."""
        path = self.folder / key
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=SUFFIX)
        except OSError as exc:
            log.warning("plan cache %s: cannot write (%s)", self.folder, exc)
            return None
        try:
            with os.fdopen(handle, "wb") as f:  # mkstemp made it 0600
                f.write(bson.encode({**header, "kind": ids.kind, "stored": len(ids)}))
                write_ids(f, ids)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return str(path)


def write_ids(f, ids: Ids):
    if ids.kind == OBJECTS:
        for value in ids.values:
            f.write(bson.encode({"": value}))
    else:
        ids.values.tofile(f)


def read_ids(f, kind: str, count: int) -> Ids:
    if kind == OBJECTS:
        values = [doc[""] for doc in bson.decode_file_iter(f, BSON_OPTIONS)]
    elif kind in (OBJECTID, INT64):
        values = np.fromfile(f, dtype="S12" if kind == OBJECTID else np.int64, count=count)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if len(values) != count:
        raise ValueError(f"{len(values)} ids stored, the header says {count}")
    return Ids(kind, values)
