"""The daemon's own messages (steps 4 to 6 of the protocol): tasks and read-aheads from the
supervisor to a worker, a worker's announcements back, and the meta frame in front of each
batch a worker sends the sink. The peers are our own processes, but every frame is still
checked, so a bug shows as a counted rejection, not a crash."""

from __future__ import annotations

from dataclasses import dataclass

import bson
import numpy as np
from bson.codec_options import CodecOptions, DatetimeConversion

from ..errors import ProtocolError
from .checks import MAX_CONTROL_BYTES, _bytes_of, _is_count, decode_json, encode_json

TASK, STOP, READY, EVENT, WARM = b"task", b"stop", b"ready", b"event", b"warm"
# How mongofeed decodes BSON everywhere (documents, ids in tasks, the plan cache): a date
# beyond Python's datetime range stays a DatetimeMS instead of failing the whole document.
BSON_OPTIONS = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)


@dataclass(frozen=True)
class SourceIds:
    """One source's documents in a batch of a feed of several sources: the source's name,
    its ``_id``s (a list, or the planner's compact rows) and their places in the batch (in
    the order of ``ids``)."""

    source: str
    ids: list
    at: list

    def to_wire(self) -> dict:
        return {"source": self.source, **_ids_to_wire(self.ids),
                "at": np.asarray(self.at, "<i4").tobytes()}

    @classmethod
    def from_wire(cls, body) -> SourceIds:
        if not (isinstance(body, dict) and isinstance(body.get("source"), str)
                and isinstance(body.get("at"), bytes) and not len(body["at"]) % 4):
            raise ProtocolError("malformed task parts")
        return cls(body["source"], _ids_from_wire(body), np.frombuffer(body["at"], "<i4").tolist())


@dataclass(frozen=True)
class TaskMessage:
    """One batch to make: the ``_id``s of batch ``index`` of ``epoch`` of ``feed`` (a list,
    or the planner's compact rows, a numpy array sent as bytes and received as a list); for
    a feed of several sources, ``parts`` (``SourceIds``) and no ids; or, in the windowed
    order, its ``window`` (the read spec: the window's ``_id`` ranges and the batch's slice
    of it, ``planner.BatchWindow.to_wire``) and no ids; its ``attempt`` (1 + the times it
    was re-issued) and, when the session has shared memory, the region file and the slab to
    write it into."""

    task: int
    feed: str
    epoch: int
    index: int
    ids: list
    window: dict | None = None
    parts: tuple[SourceIds, ...] | None = None
    attempt: int = 1
    region: str | None = None
    slab: int | None = None

    def pack(self) -> list:
        body = {"task": self.task, "feed": self.feed, "epoch": self.epoch, "index": self.index,
                "attempt": self.attempt, **_ids_to_wire(self.ids)}
        if self.window is not None:
            body["window"] = self.window
        if self.parts is not None:
            body["parts"] = [part.to_wire() for part in self.parts]
        if self.region is not None:
            body.update(region=self.region, slab=self.slab)
        return [TASK, bson.encode(body)]


ROW_KINDS = {"S": "objectid", "i": "int64"}  # numpy dtype kinds of compact id rows


def _ids_to_wire(ids) -> dict:
    """``{"ids": list}``, or the planner's compact rows as bytes (``{"ids": [], "rows"}``)."""
    if isinstance(ids, np.ndarray):
        return {"ids": [], "rows": {"kind": ROW_KINDS[ids.dtype.kind], "bytes": ids.tobytes()}}
    return {"ids": ids}


def _ids_from_wire(body: dict) -> list:
    ids = body.get("ids") if "rows" not in body else _rows_to_ids(body["rows"])
    if not isinstance(ids, list):
        raise ProtocolError("malformed task ids")
    return ids


def _parts_from_wire(parts) -> tuple[SourceIds, ...] | None:
    """A task's parts, checked: as many places as ids in each, and together every place of
    the batch once."""
    if parts is None:
        return None
    if not isinstance(parts, list) or not parts:
        raise ProtocolError("malformed task parts")
    parts = tuple(SourceIds.from_wire(part) for part in parts)
    places = sorted(i for part in parts for i in part.at)
    if any(len(part.ids) != len(part.at) for part in parts) or places != list(
            range(len(places))):
        raise ProtocolError("malformed task parts")
    return parts


def _rows_to_ids(rows) -> list:
    """A task's compact rows as ``_id`` values: ObjectIds of 12 bytes each, or int64s."""
    if not (isinstance(rows, dict) and rows.get("kind") in ("objectid", "int64")
            and isinstance(rows.get("bytes"), bytes)):
        raise ProtocolError("malformed task ids")
    data = rows["bytes"]
    if rows["kind"] == "objectid":
        if len(data) % 12:
            raise ProtocolError("malformed task ids")
        return [bson.ObjectId(data[i:i + 12]) for i in range(0, len(data), 12)]
    if len(data) % 8:
        raise ProtocolError("malformed task ids")
    return np.frombuffer(data, "<i8").tolist()


@dataclass(frozen=True)
class WarmMessage:
    """Read ``window`` (``planner.BatchWindow.to_wire``) of ``epoch`` of ``feed`` ahead of its
    tasks, into the worker's memory: the next window of the windowed order is read while the
    current one's batches are made. No batch comes back."""

    feed: str
    epoch: int
    window: dict

    def pack(self) -> list:
        return [WARM, bson.encode({"feed": self.feed, "epoch": self.epoch,
                                   "window": self.window})]


def unpack_worker_command(frames: list) -> TaskMessage | WarmMessage | None:
    """What the supervisor asks of a worker: a task, a window to read ahead, or None for
    stop."""
    frames = [_bytes_of(f) for f in frames]
    if frames == [STOP]:
        return None
    if len(frames) != 2 or frames[0] not in (TASK, WARM):
        raise ProtocolError(f"unknown worker command {frames[:1]!r:.50}")
    try:
        body = bson.decode(frames[1], BSON_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - InvalidBSON, but also what a C decoder raises
        raise ProtocolError(f"task is not BSON: {type(exc).__name__}: {exc}"[:300]) from None
    if frames[0] == WARM:
        warm = WarmMessage(body.get("feed"), body.get("epoch"), body.get("window"))
        if not (isinstance(warm.feed, str) and _is_count(warm.epoch)
                and isinstance(warm.window, dict)):
            raise ProtocolError("malformed warm command")
        return warm
    task = TaskMessage(body.get("task"), body.get("feed"), body.get("epoch"), body.get("index"),
                       _ids_from_wire(body), body.get("window"),
                       _parts_from_wire(body.get("parts")), body.get("attempt"),
                       body.get("region"), body.get("slab"))
    if not (isinstance(task.task, int) and not isinstance(task.task, bool)
            and isinstance(task.feed, str) and _is_count(task.epoch)
            and _is_count(task.index) and isinstance(task.window, (dict, type(None)))
            and _is_count(task.attempt)
            and ((task.region, task.slab) == (None, None)
                 or (isinstance(task.region, str) and _is_count(task.slab)))):
        raise ProtocolError("malformed task")
    return task


@dataclass(frozen=True)
class WorkerEvent:
    """A worker's announcement: ready (``kind = READY``), or waiting for the database or
    done waiting (``kind = EVENT``)."""

    kind: bytes
    slot: int
    pid: int | None = None
    waiting: bool = False
    error: str | None = None

    def pack(self) -> list:
        if self.kind == READY:
            return [READY, encode_json({"slot": self.slot, "pid": self.pid})]
        return [EVENT, encode_json({"slot": self.slot, "waiting": self.waiting,
                                    "error": self.error})]

    @classmethod
    def unpack(cls, frames: list) -> WorkerEvent:
        """``frames`` as the supervisor's ROUTER receives them: [identity, kind, body]."""
        if len(frames) != 3:
            raise ProtocolError(f"worker message of {len(frames)} frames, expected 3")
        kind = _bytes_of(frames[1])
        body = decode_json(frames[2], MAX_CONTROL_BYTES, "worker event")
        slot = body.get("slot")
        if kind not in (READY, EVENT) or not _is_count(slot):
            raise ProtocolError(f"malformed worker message {kind!r:.20}")
        if kind == READY:
            return cls(READY, slot, pid=body.get("pid"))
        error = body.get("error")
        return cls(EVENT, slot, waiting=body.get("waiting") is True,
                   error=error if isinstance(error, str) else None)


@dataclass(frozen=True)
class BatchMeta:
    """Frame 0 of a worker's batch message: which task (and attempt), and what it cost, or
    why it failed; ``slab`` when its arrays are in that shared-memory slab, not frames."""

    task: int
    slot: int
    attempt: int = 1
    slab: int | None = None
    docs: int = 0
    bytes: int = 0
    skips: int = 0
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None

    def pack(self) -> bytes:
        body = {"task": self.task, "slot": self.slot, "attempt": self.attempt}
        if self.slab is not None:
            body["slab"] = self.slab
        if self.error is not None:
            body["error"] = self.error
        else:
            body.update(docs=self.docs, bytes=self.bytes, skips=self.skips,
                        skipped=list(self.skipped), seconds=self.seconds)
        return encode_json(body)

    @classmethod
    def unpack(cls, frame) -> BatchMeta:
        body = decode_json(frame, MAX_CONTROL_BYTES, "batch meta")
        task, slot, attempt = body.get("task"), body.get("slot"), body.get("attempt")
        slab = body.get("slab")
        if not (isinstance(task, int) and _is_count(slot) and _is_count(attempt)
                and (slab is None or _is_count(slab))):
            raise ProtocolError("batch meta lacks task, slot or attempt")
        if "error" in body:
            if not isinstance(body["error"], str):
                raise ProtocolError("batch meta error must be a string")
            return cls(task, slot, attempt, error=body["error"])
        counts = [body.get(key) for key in ("docs", "bytes", "skips")]
        skipped, seconds = body.get("skipped"), body.get("seconds")
        if not (all(_is_count(c) for c in counts) and isinstance(skipped, list)
                and all(isinstance(s, str) for s in skipped)
                and isinstance(seconds, (int, float))):
            raise ProtocolError("malformed batch meta")
        return cls(task, slot, attempt, slab, *counts, tuple(skipped), float(seconds))
