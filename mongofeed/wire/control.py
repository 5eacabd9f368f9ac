"""What a consumer and the daemon say about a session, batches aside: the control requests
(step 1 of the protocol: hello, bye, heartbeat, status), the parts of the hello reply the
consumer relies on (its schema, shared memory, where the session starts), and the credit on
the data socket (step 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from ..errors import ProtocolError
from .arrays import ArraySpec, Conversion
from .batches import Schema
from .checks import MAX_CONTROL_BYTES, PROTOCOL_VERSION, _is_count, decode_json, encode_json

MAX_CREDIT = 1_000_000         # per credit message; the daemon caps a session's total lower
MAX_NAME_CHARS = 256           # a feed name in a hello
MAX_SHARD_WORLD = 2**20
MAX_SKIP = 2048                # batches a resumed session skips: an unordered feed's extras
TOKEN_CHARS = 32               # a session token: 128 random bits as hex


# -- control requests (step 1) -------------------------------------------------------------

@dataclass(frozen=True)
class HelloRequest:
    """Open a session: its own stream of ``feed`` from epoch ``start_epoch``, part
    ``shard[0]`` of ``shard[1]`` of every epoch. A resume starts after the first
    ``start_offset`` global batches of ``start_epoch`` (which the job consumed) and leaves
    out the global batches in ``skip`` (which this rank took out of order).
    ``shared_memory``: the consumer offers to map the session's shared memory (it may be on
    the daemon's host); ``held_batches``: how many batches it means to keep as views of that
    memory beyond its credit (the daemon grants up to its ``serve.max_held_batches``)."""

    feed: str
    start_epoch: int = 0
    shard: tuple[int, int] = (0, 1)
    start_offset: int = 0
    skip: tuple[int, ...] = ()
    shared_memory: bool = False
    held_batches: int = 0

    def pack(self) -> bytes:
        return encode_json({"op": "hello", "protocol": PROTOCOL_VERSION, "feed": self.feed,
                            "start_epoch": self.start_epoch, "shard": list(self.shard),
                            "start_offset": self.start_offset, "skip": list(self.skip),
                            "shared_memory": self.shared_memory,
                            "held_batches": self.held_batches})

    @classmethod
    def from_json(cls, body: dict) -> HelloRequest:
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            raise ProtocolError(f"consumer speaks protocol {protocol!r:.20}, the daemon speaks "
                                f"{PROTOCOL_VERSION}: upgrade one of them")
        feed = body.get("feed")
        if not (isinstance(feed, str) and 0 < len(feed) <= MAX_NAME_CHARS):
            raise ProtocolError(f"hello needs a feed name (a string of 1 to {MAX_NAME_CHARS} "
                                f"characters), got {feed!r:.60}")
        start_epoch, start_offset = body.get("start_epoch", 0), body.get("start_offset", 0)
        held_batches = body.get("held_batches", 0)
        for name, value in (("start_epoch", start_epoch), ("start_offset", start_offset),
                            ("held_batches", held_batches)):
            if not _is_count(value):
                raise ProtocolError(f"{name} must be an integer from 0 to {2**40 - 1}, got "
                                    f"{value!r:.60}")
        shard = body.get("shard", [0, 1])
        if not (isinstance(shard, list) and len(shard) == 2 and all(map(_is_count, shard))
                and shard[0] < shard[1] <= MAX_SHARD_WORLD):
            raise ProtocolError(f"shard must be [r, R] with 0 <= r < R <= {MAX_SHARD_WORLD}, "
                                f"got {shard!r:.60}")
        skip = body.get("skip", [])
        if not (isinstance(skip, list) and len(skip) <= MAX_SKIP and all(map(_is_count, skip))
                and len(set(skip)) == len(skip)):
            raise ProtocolError(f"skip must be a list of at most {MAX_SKIP} distinct global "
                                f"batch numbers, got {skip!r:.60}")
        shared_memory = body.get("shared_memory", False)
        if not isinstance(shared_memory, bool):
            raise ProtocolError(f"shared_memory must be true or false, got "
                                f"{shared_memory!r:.20}")
        return cls(feed, start_epoch, (shard[0], shard[1]), start_offset, tuple(sorted(skip)),
                   shared_memory, held_batches)


@dataclass(frozen=True)
class TokenRequest:
    """A request about the session whose secret token this is (only the peer that said hello
    knows it); ``op`` says which request."""

    token: str
    op: ClassVar[str]

    def pack(self) -> bytes:
        return encode_json({"op": self.op, "token": self.token})

    @classmethod
    def from_json(cls, body: dict) -> Self:
        token = body.get("token")
        if not (isinstance(token, str) and len(token) == TOKEN_CHARS):
            raise ProtocolError(f"{cls.op} needs the session's token ({TOKEN_CHARS} characters), "
                                f"as the hello reply gave it")
        return cls(token)


class ByeRequest(TokenRequest):
    """End the session whose token this is."""

    op = "bye"


class HeartbeatRequest(TokenRequest):
    """The consumer of the session whose token this is is alive (sent every second, also
    while it takes no batch)."""

    op = "heartbeat"


@dataclass(frozen=True)
class StatusRequest:
    """What ``mongofeed status`` shows."""

    def pack(self) -> bytes:
        return encode_json({"op": "status"})

    @classmethod
    def from_json(cls, body: dict) -> StatusRequest:
        return cls()


ControlRequest = HelloRequest | ByeRequest | HeartbeatRequest | StatusRequest
_REQUESTS = {"hello": HelloRequest, "bye": ByeRequest, "heartbeat": HeartbeatRequest,
             "status": StatusRequest}


def unpack_request(frames: list) -> ControlRequest:
    """A control request, checked field by field; keys it does not know are ignored."""
    if len(frames) != 1:
        raise ProtocolError(f"control request of {len(frames)} frames, expected 1")
    body = decode_json(frames[0], MAX_CONTROL_BYTES, "control request")
    op = body.get("op")
    kind = _REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"unknown op {op!r:.40}; known: {', '.join(_REQUESTS)}")
    return kind.from_json(body)


# -- the hello reply, as the consumer checks it --------------------------------------------

def hello_schema(reply: dict) -> Schema:
    """The schema a hello reply announces, checked like any other message from a peer."""
    if reply.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"daemon speaks protocol {reply.get('protocol')!r}, this "
                            f"mongofeed speaks {PROTOCOL_VERSION}: upgrade one of them")
    size = reply.get("batch_size")
    if not _is_count(size) or size < 1 or not isinstance(reply.get("feed"), str):
        raise ProtocolError("hello reply lacks feed or batch_size")
    token = reply.get("token")
    if not (isinstance(token, str) and len(token) == TOKEN_CHARS and token.isascii()):
        raise ProtocolError("hello reply lacks the session's token")
    specs = reply.get("arrays")
    if not isinstance(specs, list) or not specs:
        raise ProtocolError("hello reply lacks arrays")
    arrays = tuple(ArraySpec.from_json(s) for s in specs)
    conversions = reply.get("convert", [])
    if not isinstance(conversions, list):
        raise ProtocolError("hello reply's convert must be a list")
    conversions = tuple(Conversion.from_json(c) for c in conversions)
    if not {c.name for c in conversions} <= {a.name for a in arrays}:
        raise ProtocolError("hello reply converts an array it does not announce")
    return Schema(reply["feed"], size, arrays, conversions)


@dataclass(frozen=True)
class SharedMemoryOffer:
    """A hello reply's ``shared_memory``: the session's region file on the daemon's host
    (``region``), which a consumer on that host maps instead of receiving the arrays, how
    many of its slabs the consumer may keep as views beyond its credit window
    (``held_batches``, what the daemon granted of what the hello asked), and the name of the
    daemon's channel (``mongofeed.channel``), where the batches' descriptors then travel."""

    path: str
    nonce: bytes
    slabs: int
    slab_bytes: int
    held_batches: int
    channel: str

    def to_json(self) -> dict:
        return {"path": self.path, "nonce": self.nonce.hex(), "slabs": self.slabs,
                "slab_bytes": self.slab_bytes, "held_batches": self.held_batches,
                "channel": self.channel}

    @classmethod
    def from_reply(cls, reply: dict) -> SharedMemoryOffer | None:
        offer = reply.get("shared_memory")
        if offer is None:
            return None
        try:
            made = cls(offer["path"], bytes.fromhex(offer["nonce"]), offer["slabs"],
                       offer["slab_bytes"], offer["held_batches"], offer["channel"])
        except (TypeError, KeyError, ValueError):
            raise ProtocolError(f"malformed shared_memory in the hello reply: "
                                f"{offer!r:.200}") from None
        if not (isinstance(made.path, str) and isinstance(made.channel, str)
                and _is_count(made.slabs) and made.slabs > 0
                and _is_count(made.slab_bytes) and made.slab_bytes > 0
                and _is_count(made.held_batches) and made.held_batches < made.slabs):
            raise ProtocolError(f"malformed shared_memory in the hello reply: {offer!r:.200}")
        return made


@dataclass(frozen=True)
class SessionStart:
    """Where a hello reply says the session's stream begins: epoch ``epoch`` after its first
    ``offset`` global batches, with the session's batch numbers ``skip`` of that epoch left
    out; that epoch numbers ``first_batches`` batches (skipped ones included), every later
    one ``batches_per_epoch``. ``shard`` is the session's share (the daemon's times the
    consumer's): its batch j of an epoch is global batch ``offset + rank + world * j``."""

    epoch: int
    offset: int
    first_batches: int
    skip: frozenset[int]
    batches_per_epoch: int
    shard: tuple[int, int]

    @classmethod
    def from_reply(cls, reply: dict) -> SessionStart:
        values = [reply.get(key) for key in ("start_epoch", "start_offset", "start_batches",
                                             "batches_per_epoch")]
        shard, skip = reply.get("shard"), reply.get("skip")
        if not (all(map(_is_count, values)) and isinstance(shard, list) and len(shard) == 2
                and all(map(_is_count, shard)) and shard[0] < shard[1]
                and isinstance(skip, list) and all(map(_is_count, skip))):
            raise ProtocolError("hello reply lacks where the session starts (start_epoch, "
                                "start_offset, start_batches, skip, batches_per_epoch, shard)")
        epoch, offset, first, size = values
        numbers = set()
        for g in skip:
            j, rest = divmod(g - offset - shard[0], shard[1])
            if rest or not 0 <= j < first:
                raise ProtocolError(f"hello reply skips global batch {g}, which is not its "
                                    f"shard's")
            numbers.add(j)
        if len(numbers) >= first or size < 1:
            raise ProtocolError("hello reply announces a session without batches")
        return cls(epoch, offset, first, frozenset(numbers), size, (shard[0], shard[1]))


# -- credit, on the data socket (step 2) ---------------------------------------------------

@dataclass(frozen=True)
class Credit:
    """A consumer's message on the data socket: ``credit`` more batches it may be sent (0: a
    heartbeat); the shared-memory slabs it no longer reads (``release``); and, in its first
    message of a session offered shared memory, whether it could map it (``attached``). On
    the channel (``mongofeed.channel``) it names its session by its secret ``token``."""

    credit: int
    release: tuple[int, ...] = ()
    attached: bool | None = None
    token: bytes | None = None

    def pack(self) -> bytes:
        """The JSON ``unpack_credit`` reads, written out by hand: a training process sends
        one every few batches, and ``json.dumps`` would cost it several microseconds."""
        body = b'{"credit":%d' % self.credit
        if self.token is not None:
            body += b',"token":"%s"' % self.token
        if self.release:
            body += b',"release":[%s]' % b",".join(b"%d" % slab for slab in self.release)
        if self.attached is not None:
            body += b',"attached":true' if self.attached else b',"attached":false'
        return body + b"}"


MAX_RELEASES = 4096  # slabs one credit message may release


def pack_credit(credit: int) -> bytes:
    return Credit(credit).pack()


def unpack_credit(frames: list) -> Credit:
    if len(frames) != 1:
        raise ProtocolError(f"credit message of {len(frames)} frames, expected 1")
    body = decode_json(frames[0], MAX_CONTROL_BYTES, "credit")
    credit, release, attached = body.get("credit"), body.get("release", []), body.get("attached")
    token = body.get("token")
    if not _is_count(credit) or credit > MAX_CREDIT:
        raise ProtocolError(f"credit must be an integer from 0 to {MAX_CREDIT}, got "
                            f"{credit!r:.50}")
    if not (isinstance(release, list) and len(release) <= MAX_RELEASES
            and all(_is_count(slab) for slab in release)):
        raise ProtocolError(f"release must be a list of slab numbers, got {release!r:.50}")
    if attached is not None and not isinstance(attached, bool):
        raise ProtocolError(f"attached must be true or false, got {attached!r:.50}")
    if token is not None and not (isinstance(token, str) and len(token) == TOKEN_CHARS):
        raise ProtocolError(f"token must be a session's token, got {token!r:.50}")
    return Credit(credit, tuple(release), attached, None if token is None else token.encode())
