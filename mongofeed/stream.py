"""One consumer's session with one daemon, once the hello is answered: the data stream and
the heartbeat. Training side: no database code.

``Stream`` owns the data socket (a DEALER whose identity is the session's secret token) and,
with shared memory, the session's channel (``mongofeed.channel``), and checks what arrives
on them, in the thread that calls ``Consumer.get`` (calls take turns): the header against
the hello's schema, the (epoch, index) order, each frame's length, or the slab a batch lies
in. It grants the daemon credit a few batches at once and gives back the
slabs whose arrays are gone (``Flow`` sizes both within the daemon's credit window).
``Heartbeat`` is the small thread that keeps the session alive on the control socket and
says bye at the end; ``end_session`` stops both.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import zmq

from .channel import Channel, queue_length
from .errors import FeedError, ProtocolError
from .leases import JoinBuffers, Slabs
from .region import Region, SlabLayout
from .resume import EpochProgress
from .wire import (
    MAX_HEADER_BYTES,
    BatchHeader,
    ByeRequest,
    Credit,
    HeartbeatRequest,
    Schema,
    SessionStart,
    unpack_frames,
    unpack_header,
)

HEARTBEAT_INTERVAL_S = 1.0
BYE_LINGER_MS = 500
WAIT_SLICE_S = 0.25  # a waiting get looks this often whether the consumer was closed
WAIT_SLICE_MS = int(WAIT_SLICE_S * 1000)
PLACES_KEPT = 1024  # distinct batch shapes whose places in a slab a stream keeps


class Batch(NamedTuple):
    epoch: int
    index: int
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Flow:
    """How many batches a consumer lets the daemon send ahead (``credit``), grants at once
    (``every``, with the slabs released meanwhile), and, with shared memory, holds as views
    before ``get`` hands copies (``held``).

    The daemon lends a session ``window`` slabs (its ``credit_window``, ``serve.max_pending``:
    the other ``max_pending`` of its region are for production) and ``granted`` more for the
    views the consumer asked to keep (its hello's ``held_batches``, within the daemon's
    ``serve.max_held_batches``). The consumer has at most ``credit`` batches on their way or
    waiting in its socket, ``held`` views handed out, and fewer than ``every`` releases
    unsent, so that sum stays within the slabs lent and the daemon never waits for a slab the
    consumer may keep. Credit for ``every`` batches comes first (the least that keeps the
    daemon sending while a grant is on its way), then the views the caller asked to keep,
    then credit for up to twice the prefetch. With shared memory the descriptors wait in the
    channel's queue (``channel.queue_length`` datagrams), so the credit is at most one less:
    the daemon's last word (why a session ends) always finds room."""

    credit: int
    every: int
    held: int

    @classmethod
    def of(cls, prefetch: int, held_batches: int, window, region, granted: int = 0) -> Flow:
        window = window if isinstance(window, int) and window >= 1 else 2 * prefetch
        every = max(1, min(prefetch, window // 4))
        if region is None:  # nothing lent: the credit alone counts
            return cls(max(1, min(2 * prefetch, window)), every, held_batches)
        queued = max(1, queue_length() - 1)
        every = min(every, queued)
        room = window + granted - (every - 1)
        held = max(0, min(held_batches, room - every))
        return cls(max(1, min(2 * prefetch, room - held, queued)), every, held)


class Stream:
    """The data socket and the checks of what arrives on it, used by ``get``'s thread.

    Per batch it does as little as it can, since the training process pays for it: the
    header is a fixed binary layout, the arrays' shapes are computed once per distinct
    sample count, and credit and slab releases go out every few batches (``every``)."""

    def __init__(self, context, endpoint, session, token, schema: Schema, start: SessionStart,
                 ordered, flow: Flow, curve, region: Region | None = None,
                 offered: bool = False, channel: Channel | None = None):
        self.session = session  # the public name, for messages
        self.token = token  # the session's secret: our data identity
        self.token_bytes = token.encode()
        self.schema = schema
        self.session_start = start
        self.ordered = ordered
        self.every = flow.every
        self.endpoint = endpoint
        self.lock = threading.RLock()  # as Consumer._taking: a handler may close it
        self.closed = False
        self.failure: FeedError | None = None  # why the stream broke, raised on every take
        self.progress = EpochProgress.of(start, start.epoch)  # of the batches received
        self.region = region
        self.channel = channel  # with the region: the descriptors come there
        self.gone: FeedError | None = None  # the channel refused a datagram: no daemon
        self.offsets = SlabLayout.of(schema.arrays, schema.batch_size).offsets
        self.slab_places: dict[tuple, tuple] = {}  # place_in_slab's, by (count, dims)
        self.slabs = Slabs()
        self.held_batches = flow.held
        self.join_buffers = JoinBuffers()
        self.data = context.socket(zmq.DEALER)
        self.data.linger = 0
        for option, value in curve.items():
            self.data.setsockopt(option, value)
        self.data.identity = token.encode()
        self.receive_timeout_ms = -1  # the socket's rcvtimeo: next_message sets it
        self.data.maxmsgsize = max(MAX_HEADER_BYTES, schema.batch_size * max(
            spec.sample_nbytes for spec in schema.arrays))
        self.data.connect(endpoint)
        # The first message starts the session: its credit, and whether the consumer maps
        # the region (queued by ZeroMQ until the connection is up).
        attached = (region is not None) if offered else None
        self.data.send(Credit(flow.credit, (), attached).pack())
        self.owed_credit = 0

    def take(self, timeout: float) -> Batch | None:
        """The next batch, None after ``timeout``; after a failure, that failure. The arrays
        of a batch in shared memory are views while the caller holds fewer than
        ``held_batches`` such batches, copies beyond. The caller's interrupt (Ctrl-C, a
        signal handler's exit) goes on as it is; one that stops a batch half received
        leaves a failure for later takes, one that stops the wait leaves the stream usable."""
        with self.lock:
            if self.failure is not None:
                self.raise_failure()
            message = None
            try:
                if self.owed_credit >= self.every or self.slabs.pending >= self.every:
                    self.send_credit()
                message = (self.next_message(timeout) if self.channel is None else
                           self.next_datagram(timeout))
                if message is None:
                    return None
                batch, lease = self.receive(*message)
            except (KeyboardInterrupt, SystemExit):
                if message is not None:
                    self.failure = FeedError(
                        f"session {self.session}: a batch was interrupted while it was "
                        f"received; create a new consumer (from this one's state_dict() to "
                        f"continue with that batch)")
                raise
            except BaseException as exc:  # whatever it is, it is this and every later take's
                if self.closed:
                    raise FeedError(f"session {self.session} was closed") from None
                self.fail(exc)
            self.owed_credit += 1
        if lease is not None and not self.slabs.hand(lease, self.held_batches):
            # The caller holds too many: a copy, and the slab goes back at once.
            batch = Batch(batch.epoch, batch.index,
                          {name: np.array(a) for name, a in batch.arrays.items()})
        return batch

    def next_message(self, timeout: float) -> tuple[bytes, list] | None:
        """The next message as its first frame and the others, None after ``timeout``. On
        the data socket, a blocking receive with a receive timeout, never a poll: a trainer
        faster than the producers waits for every batch, and a poll costs it about 13 us of
        CPU per wait more (measured). It looks every ``WAIT_SLICE_S`` whether the consumer
        was closed meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            wait_ms = int(1000 * min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
            if wait_ms != self.receive_timeout_ms:
                self.data.rcvtimeo = self.receive_timeout_ms = wait_ms
            try:
                head = self.data.recv()
            except zmq.Again:
                pass
            else:
                more = self.data.getsockopt(zmq.RCVMORE)
                return head, self.data.recv_multipart(copy=False) if more else []
            self.check_open()
            if time.monotonic() >= deadline:
                return None

    def next_datagram(self, timeout: float) -> tuple[bytes, list] | None:
        """The next descriptor on the channel, None after ``timeout``. While it waits, it
        looks at the data socket every ``WAIT_SLICE_S`` (a daemon that no longer knows the
        session says so there), and sends the daemon an empty credit on the channel (the
        kernel refuses it if the daemon is gone, even SIGKILLed: ``gone``)."""
        deadline = time.monotonic() + timeout
        wait_ms = WAIT_SLICE_MS if timeout >= WAIT_SLICE_S else int(1000 * max(0.0, timeout))
        while True:
            head = self.channel.receive(0 if self.gone is not None else wait_ms)
            if head is not None:
                return head, []
            if self.gone is not None:  # what the daemon said on the data socket, if anything
                with contextlib.suppress(zmq.Again):
                    frames = self.data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    return frames[0].bytes, frames[1:]
                raise self.gone
            try:
                frames = self.data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            else:
                return frames[0].bytes, frames[1:]
            self.check_open()
            if self.channel.confirmed:
                self.send_datagram(Credit(0, (), token=self.token_bytes).pack())
            if time.monotonic() >= deadline:
                return None
            wait_ms = int(1000 * min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))

    def check_open(self):
        if self.closed:
            raise FeedError(f"session {self.session} was closed")

    def raise_failure(self):
        if self.failure is not None:
            raise self.failure.with_traceback(None)

    def fail(self, exc: BaseException):
        """Keep why the stream broke as a FeedError that names the cause, and raise it."""
        if isinstance(exc, FeedError):
            failure = exc
        else:
            what = ("socket error" if isinstance(exc, zmq.ZMQError) else
                    "the daemon broke the protocol" if isinstance(exc, ProtocolError) else
                    "receiving failed")
            failure = FeedError(f"{what} on session {self.session} from {self.endpoint}: "
                                f"{type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        self.failure = failure
        self.raise_failure()

    def receive(self, head: bytes, frames: list) -> tuple:
        """The batch whose first frame is ``head``, as (epoch, the session's batch number,
        arrays), and the lease of its slab (None if not in a slab); anything the session did
        not announce, or sent already, is a ProtocolError."""
        header = unpack_header(head)
        if isinstance(header, str):
            raise FeedError(f"the daemon ended this session: {header}")
        progress, epoch, index = self.progress, header.epoch, header.index
        if epoch != progress.epoch or index >= progress.size or progress.done(index) or (
                self.ordered and index != progress.prefix):
            expected = f"batch {progress.prefix}" if self.ordered else "a batch not yet sent"
            raise ProtocolError(f"batch {(epoch, index)} out of sequence: expected epoch "
                                f"{progress.epoch}, {expected} of {progress.size}")
        lease = None
        if header.slab is None:
            arrays = unpack_frames(header, frames, self.schema, self.join_buffers.take)
        elif frames:
            raise ProtocolError("a batch in shared memory with frames")
        else:
            arrays, lease = self.view_slab(header)
        progress.mark(index)
        if progress.complete:
            self.progress = EpochProgress.of(self.session_start, epoch + 1)
        return Batch(epoch, index, arrays), lease

    def view_slab(self, header: BatchHeader) -> tuple[dict, object]:
        """The arrays of a batch in slab ``header.slab``: views of the mapped region."""
        if self.region is None:
            raise ProtocolError("a batch in shared memory on a session without it")
        places = self.slab_places.get((header.count, header.dims))
        if places is None:
            places = self.place_in_slab(header)
        base = self.region.slab_bytes_view(header.slab)  # checks the slab number
        arrays = {name: np.ndarray(shape, dtype, base, offset)
                  for name, shape, dtype, offset in places}
        lease = self.slabs.lease(base, header.slab)
        if self.schema.conversions:
            arrays = self.schema.convert(arrays)
        return arrays, lease

    def place_in_slab(self, header: BatchHeader) -> tuple:
        """Each array of a batch of ``header``'s shape as (name, shape, dtype, offset in its
        slab), after the schema's checks; kept for the next batch of that shape."""
        places = tuple((place.name, place.shape, place.dtype, offset)
                       for place, offset in zip(self.schema.placements(header), self.offsets,
                                                strict=True))
        if len(self.slab_places) < PLACES_KEPT:
            self.slab_places[(header.count, header.dims)] = places
        return places

    def send_credit(self):
        """Credit for the batches taken, and the slabs released: ``take`` sends it every
        ``every`` of either (the daemon keeps credit meanwhile, and room for the slabs not
        yet released: ``Flow``)."""
        credit, released = self.owed_credit, self.slabs.take_released()
        if not (self.channel is not None and self.channel.confirmed
                and self.send_datagram(Credit(credit, released, token=self.token_bytes).pack())):
            self.data.send(Credit(credit, released).pack(), flags=zmq.NOBLOCK)  # or a full one
        self.owed_credit = 0

    def send_datagram(self, message: bytes) -> bool:
        """Send on the channel; False when it is full, or gone (``gone`` then says so, once
        the batches already on the channel, and the daemon's last word, are taken)."""
        if self.gone is not None:
            return False
        try:
            return self.channel.send(message)
        except OSError as exc:
            self.gone = FeedError(f"session {self.session}: the daemon of {self.endpoint} is "
                                  f"gone (its channel: {exc.strerror}); is it running?")
            return False

    def close(self):
        self.closed = True
        with self.lock:
            self.data.close()
            if self.channel is not None:
                self.channel.close()



class Heartbeat:
    """The thread that keeps the session alive while the caller is busy elsewhere: a
    heartbeat on the control socket every second, and a bye at the end. It holds no
    reference to the Consumer, so an abandoned Consumer is collected and its session ends."""

    def __init__(self, control_socket: zmq.Socket, session: str, token: str):
        self.control_socket = control_socket
        self.token = token  # the session's secret, which heartbeat and bye need
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"mongofeed-{session}",
                                       daemon=True)
        self.thread.start()

    def run(self):
        request = HeartbeatRequest(self.token).pack()
        try:
            while not self.stopping.wait(HEARTBEAT_INTERVAL_S):
                while self.control_socket.poll(0):
                    self.control_socket.recv()  # the replies: nothing to do with them
                self.control_socket.send(request, flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # not connected (yet or any more): the data socket reports what matters
        finally:
            try:
                self.control_socket.linger = BYE_LINGER_MS
                self.control_socket.send(ByeRequest(self.token).pack(), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.control_socket.close()

    def stop(self):
        self.stopping.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()



def end_session(stream: Stream, heartbeat: Heartbeat):
    """End a session: no more heartbeats, a bye, the data socket closed."""
    heartbeat.stop()
    stream.close()

