"""Every message on mongofeed's sockets, as pack/unpack pairs, and the checks a receiver
makes before trusting one.

::

  public (tcp or ipc; CurveZMQ off loopback)
    consumer DEALER ──hello / heartbeat / status / bye──▶ control ROUTER
                    ◀──reply──────────────────────────────
    consumer DEALER ──credit (and slab releases)──▶ data ROUTER
                    ◀──[header, array...] or [header naming a slab]──

  same host (mongofeed.channel: Unix datagrams, Linux), once the consumer mapped the region
    consumer sockets ──its token, then credit naming it──▶ daemon's channel
                     ◀──header naming a slab, or an error──

  internal (serve.internal_transport: ipc:// in the daemon's private folder by default;
            loopback tcp on random ports with "tcp", or where ZeroMQ has no ipc)
    supervisor ROUTER ──task / warm / stop──▶ worker DEALER
                      ◀──ready / event──
    worker PUSH ──[meta, header] (arrays in a slab) or [meta, header, array...]──▶ sink PULL

Each part in its module: ``control`` (steps 1 and 2, and what the consumer reads in a hello
reply), ``batches`` (step 3 and the ``Schema`` a batch is checked against), ``internal``
(steps 4 to 6); beneath them ``arrays`` (an array's spec and the cast on receipt),
``checks`` (the protocol's version, JSON read safely, counts) and ``endpoints`` (the
addresses a config or a Consumer names). The names the rest of mongofeed uses are
re-exported here.

Public messages (what a consumer, or a stranger, can send or receive):

1. control request/reply: one frame, a JSON object, at most ``MAX_CONTROL_BYTES``:
   ``{"op": "hello", "protocol", "feed", "start_epoch", "shard": [r, R], "start_offset",
   "skip": [g, ...], "shared_memory"}`` opens a session (from global batch ``start_offset``
   of its first epoch, without the global batches in ``skip``: a resume); its reply says
   where the session starts (``"start_epoch"``, ``"start_offset"``, ``"skip"``,
   ``"start_batches"``: the first epoch's batch numbers, skipped ones included), names the
   session (``"session"``, public) and gives its secret ``"token"``, which only the peer
   that said hello knows: it is the identity of that consumer's data socket and what
   ``{"op": "bye", "token"}`` and ``{"op": "heartbeat", "token"}`` (every second) need.
   With ``"shared_memory": true`` the reply names the session's region
   (``SharedMemoryOffer``). ``{"op": "status"}`` never shows a token. Replies carry ``"ok"``
   and, when false, ``"error"``.
2. credit: one frame, ``{"credit": n, "release": [slab...], "attached": bool}`` (``Credit``),
   on the data socket whose identity is the session's token; the consumer grants the daemon
   n more batches, within a window: the daemon keeps at most ``credit_window`` (from the
   hello reply) granted and unsent, and drops the rest. ``release`` gives back shared-memory
   slabs the consumer no longer reads; ``attached`` (first message only) says whether it
   mapped the region. On the channel, ``"token"`` names the session.
3. batch: frame 0 is the header (``BatchHeader``): 36 bytes, epoch, index, sample count,
   slab (or none) and the lengths of the variable dimensions; the arrays' names, dtypes and
   shapes are the hello reply's. Then either nothing (the arrays lie in that slab of the
   session's shared memory) or the arrays' raw C-order bytes, one frame per array, cut into
   frames of at most ``FRAME_MAX_BYTES`` (on the channel: the header alone, one datagram).
   An error is one JSON frame ``{"v", "kind":
   "error", "message"}``. A hello reply may announce a dimension as null (padded per batch,
   up to a fourth element, the bound) and ``convert``: the casts the consumer applies on
   receipt.

Internal messages (supervisor, workers and sink; the peers are our own processes, but every
frame is still checked, so a bug shows as a counted rejection, not a crash):

4. task (supervisor → worker): ``[b"task", BSON {task, feed, epoch, index, ids, attempt,
   region, slab}]`` (a feed of several sources: ``parts``, each source's ids and their places
   in the batch, in place of ``ids``); ``[b"warm", ...]`` reads a window ahead; ``[b"stop"]``
   asks the worker to exit.
5. ready / event (worker → supervisor): ``[b"ready", {slot, pid}]`` once the worker's client
   and sockets exist; ``[b"event", {slot, waiting, error}]`` when it starts or stops waiting
   for the database.
6. batch (worker → sink): ``[meta, header]`` when the arrays were written into the task's
   slab, else ``[meta, header, array...]``: ``meta`` (JSON) names the task and its attempt
   and carries the worker's counts or an ``error``; the rest goes on to the consumer.

Nothing received is ever unpickled: headers are a fixed binary layout or JSON, arrays are
raw bytes of plain numeric dtypes, and every length is checked against dtype x shape before
``np.frombuffer``. Every message from outside is parsed in this package, once, into a
checked value (``HelloRequest``, ``ByeRequest``, ``HeartbeatRequest``, ``StatusRequest``,
``Credit``, ``BatchHeader``) or a ``ProtocolError`` that says why: JSON nested deeper than
``MAX_JSON_DEPTH``, numbers longer than ``MAX_NUMBER_CHARS`` or not finite, and every wrong
type are refused before any handler sees them.
"""

from .arrays import ALLOWED_DTYPES, ArraySpec, Conversion, convert
from .batches import (
    BATCH_HEADER,
    BATCH_MAGIC,
    MAX_HEADER_BYTES,
    BatchHeader,
    Placement,
    Schema,
    frame_sizes,
    pack_batch,
    pack_error,
    unpack_batch,
    unpack_frames,
    unpack_header,
)
from .checks import (
    MAX_CONTROL_BYTES,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    PROTOCOL_VERSION,
    _is_count,
    decode_json,
    encode_json,
)
from .control import (
    MAX_CREDIT,
    MAX_NAME_CHARS,
    MAX_SHARD_WORLD,
    MAX_SKIP,
    TOKEN_CHARS,
    ByeRequest,
    ControlRequest,
    Credit,
    HeartbeatRequest,
    HelloRequest,
    SessionStart,
    SharedMemoryOffer,
    StatusRequest,
    hello_schema,
    pack_credit,
    unpack_credit,
    unpack_request,
)
from .endpoints import check_endpoint, endpoint_host, next_port
from .internal import (
    BSON_OPTIONS,
    EVENT,
    READY,
    STOP,
    BatchMeta,
    SourceIds,
    TaskMessage,
    WarmMessage,
    WorkerEvent,
    unpack_worker_command,
)

__all__ = [
    # checks
    "MAX_CONTROL_BYTES", "MAX_JSON_DEPTH", "MAX_NUMBER_CHARS", "PROTOCOL_VERSION",
    "_is_count", "decode_json", "encode_json",
    # endpoints
    "check_endpoint", "endpoint_host", "next_port",
    # arrays
    "ALLOWED_DTYPES", "ArraySpec", "Conversion", "convert",
    # batches (step 3)
    "BATCH_HEADER", "BATCH_MAGIC", "MAX_HEADER_BYTES", "BatchHeader", "Placement", "Schema",
    "frame_sizes", "pack_batch", "pack_error", "unpack_batch", "unpack_frames", "unpack_header",
    # control (steps 1 and 2)
    "MAX_CREDIT", "MAX_NAME_CHARS", "MAX_SHARD_WORLD", "MAX_SKIP", "TOKEN_CHARS", "ByeRequest",
    "ControlRequest", "Credit", "HeartbeatRequest", "HelloRequest", "SessionStart",
    "SharedMemoryOffer", "StatusRequest", "hello_schema", "pack_credit", "unpack_credit",
    "unpack_request",
    # internal (steps 4 to 6)
    "BSON_OPTIONS", "EVENT", "READY", "STOP", "BatchMeta", "SourceIds", "TaskMessage",
    "WarmMessage", "WorkerEvent", "unpack_worker_command",
]
