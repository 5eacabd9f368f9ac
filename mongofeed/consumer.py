"""The training side: receive batches from a running ``mongofeed serve``. No database code.

``Consumer`` says hello on the daemon's control endpoint and gets a session: its own stream
of one feed, starting at a full epoch or where a saved state says (``state_dict``,
``load_state_dict``; see ``mongofeed.resume``). The daemon sends batches ahead, within the
credit the consumer grants (``prefetch``); ZeroMQ's own thread receives them meanwhile, so
the caller's ``get`` finds the next one waiting, checks it and hands it on, with no thread
of ours in between (a hand-over between threads costs more than the rest of a batch). One
small thread sends heartbeats on the control socket, also while training is busy
elsewhere. Each socket is used by one thread at a time (``get`` holds a lock).

On the daemon's host the batches do not cross the socket: the daemon's workers write them
into the session's shared memory, which the consumer maps (``region``), and only a small
header naming the slab arrives, as a datagram on the session's channel (``channel``: it
wakes a waiting ``get`` for a fraction of what a ZeroMQ message costs); the arrays handed
out view the slab, which goes back to the daemon once they are gone (``leases``).
Elsewhere, or with ``shared_memory=False``, the arrays come in the messages.

The session's sockets, once the hello is answered, are ``stream``'s (the data stream and
its checks, the heartbeat thread); ``multi`` reads one feed of several daemons.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator

import zmq

from .channel import Channel, ChannelError
from .distributed import JobRank, resolve_shard, shard_within
from .errors import FeedError, FeedTimeout, ProtocolError
from .region import Region, RegionError, SlabLayout
from .resume import EpochProgress, FeedState
from .security import client_options
from .stream import BYE_LINGER_MS, Batch, Flow, Heartbeat, Stream, end_session
from .wire import (
    MAX_HEADER_BYTES,
    ByeRequest,
    ControlRequest,
    HelloRequest,
    SessionStart,
    SharedMemoryOffer,
    StatusRequest,
    _is_count,
    check_endpoint,
    decode_json,
    hello_schema,
    next_port,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_PREFETCH = 4
DEFAULT_HELD_BATCHES = 2
SHARED_MEMORY_ENV = "MONGOFEED_SHARED_MEMORY"  # "0": never map the daemon's shared memory

# Forks since this module was imported, counted in each child: a consumer compares this with
# its own count on every get, where asking for the pid would be a system call per batch.
_forks = 0


def _count_fork():
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # no fork, no count: Windows
    os.register_at_fork(after_in_child=_count_fork)


def model_io(arrays: dict, inputs: list[str], targets: list[str],
             sample_weight: str | None = None) -> tuple:
    """A batch as a model takes it, per the config's [output]: ``(inputs, targets)``, each
    one array or, when it names several, a dict of arrays; ``(inputs,)`` without targets;
    ``(inputs, targets, weights)`` with a sample_weight array (Keras's ``fit`` takes that).
    Works on any dict keyed by array name (arrays, tensors, tensor specs)."""
    def pick(names):
        return arrays[names[0]] if len(names) == 1 else {n: arrays[n] for n in names}

    if sample_weight is not None:
        return pick(inputs), pick(targets), arrays[sample_weight]
    return (pick(inputs), pick(targets)) if targets else (pick(inputs),)


def control_connect(context: zmq.Context, control: str, curve: dict | None = None) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    for option, value in (curve or {}).items():
        socket.setsockopt(option, value)
    socket.connect(control)
    return socket


def ask(socket: zmq.Socket, control: str, request: ControlRequest,
        timeout: float) -> dict:
    """One control request and its reply; a clear error if the daemon does not answer."""
    socket.send(request.pack())
    if not socket.poll(int(timeout * 1000)):
        raise FeedTimeout(f"no answer from the mongofeed daemon at {control} within "
                          f"{timeout:g} s: is 'mongofeed serve' running with this "
                          f"--bind/--control?")
    reply = decode_json(socket.recv(), MAX_HEADER_BYTES * 16, "control reply")
    if not reply.get("ok"):
        raise FeedError(f"{control}: {reply.get('error', 'request refused')}")
    return reply


def daemon_status(control: str, timeout: float = 5.0, server_key: str | None = None,
                  client_key: str | None = None) -> dict:
    """The daemon's status (workers, sessions, feeds, counters), as ``mongofeed status``;
    the keys as for ``Consumer``, for a daemon that uses CurveZMQ."""
    curve = client_options(server_key, client_key)
    context = zmq.Context()
    try:
        return ask(control_connect(context, check_endpoint(control, "control"), curve),
                   control, StatusRequest(), timeout)
    finally:
        context.destroy(linger=0)


class Consumer:
    """One session of one feed of a running daemon.

    ``endpoint`` is the daemon's ``--bind`` address; the control endpoint defaults to the
    same host with port + 1. ``start_epoch`` starts at a full epoch; ``state`` (what
    ``state_dict()`` returned, maybe in another process) resumes exactly where that consumer
    stopped, or where its job did (``mongofeed.resume``).

    ``shard=(r, R)`` takes part r of R disjoint, equal parts of every epoch of the daemon's
    shard. ``shard="auto"`` finds this process's rank in its distributed job
    (``mongofeed.distributed``: torch.distributed, Horovod, torchrun, SLURM) and takes its
    part; the default does so inside a launcher's job (torch.distributed, Horovod,
    torchrun) and reads the whole feed elsewhere.

    ``server_key`` (the daemon's public .key file) and ``client_key`` (this client's
    .key_secret file, listed by the daemon) speak CurveZMQ to a daemon off loopback.

    On the daemon's host (``shared_memory``, on unless False or ``MONGOFEED_SHARED_MEMORY=0``)
    the arrays of a batch view the daemon's shared memory, read-only, and the daemon reuses
    that memory once they are gone. Drop them (or copy what you keep) within the next
    ``held_batches`` batches (the daemon lends up to its ``serve.max_held_batches``, 18 by
    default, for them): while you hold more, ``get`` hands copies instead of views, so
    nothing waits, but each costs a copy. ``get`` may be called from any thread, also from
    several at once: the calls take turns, and each batch goes to exactly one of them.
    Ctrl-C while ``get`` waits raises KeyboardInterrupt and leaves the consumer usable; a
    signal handler may call ``state_dict`` and ``close`` while this thread waits in ``get``
    (a preemption notice).
    """

    def __init__(self, endpoint: str, feed: str = "train", control: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, start_epoch: int = 0,
                 shard: tuple[int, int] | str | JobRank | None = None,
                 prefetch: int = DEFAULT_PREFETCH, server_key: str | None = None,
                 client_key: str | None = None, state: dict | None = None,
                 shared_memory: bool = True, held_batches: int = DEFAULT_HELD_BATCHES):
        self.endpoint = check_endpoint(endpoint, "endpoint")
        self.control = check_endpoint(control or next_port(endpoint), "control")
        self.feed = feed
        self.timeout = timeout
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if state is not None and start_epoch:
            raise ValueError("pass start_epoch or state, not both: the state says where to "
                             "start")
        if held_batches < 0:
            raise ValueError("held_batches must be at least 0")
        self.prefetch = prefetch
        self._held_batches = held_batches
        self._shared_memory = shared_memory and os.environ.get(SHARED_MEMORY_ENV) != "0"
        self._forks = _forks  # the forks of the process that created it
        # get, state_dict and a reopen: one thread at a time; reentrant for a signal handler
        # (a preemption handler that saves the state while this thread waits in get)
        self._taking = threading.RLock()
        self._curve = client_options(server_key, client_key)
        self._context = zmq.Context()
        try:
            self._shard = self._own_shard(resolve_shard(shard))
            self._open(None if state is None else FeedState.from_dict(state), start_epoch)
        except BaseException:
            self._context.destroy(linger=0)
            raise

    def _own_shard(self, shard: tuple[int, int] | JobRank) -> tuple[int, int]:
        """This consumer's part of its daemon's shard; for a job's rank, the daemon's shard
        decides it."""
        if not isinstance(shard, JobRank):
            return shard
        return shard_within(shard, self._daemon_shard(), self.endpoint)

    def _daemon_shard(self) -> tuple[int, int]:
        """The daemon's ``--shard``, from its status."""
        socket = control_connect(self._context, self.control, self._curve)
        try:
            feeds = ask(socket, self.control, StatusRequest(), self.timeout).get("feeds")
        finally:
            socket.close()
        shard = next(iter(feeds.values()), {}).get("shard") if isinstance(feeds, dict) else None
        if not (isinstance(shard, list) and len(shard) == 2 and all(map(_is_count, shard))
                and shard[0] < shard[1]):
            raise ProtocolError(f"{self.endpoint}: the daemon's status lacks its shard")
        return shard[0], shard[1]

    def _open(self, state: FeedState | None, start_epoch: int = 0):
        """Say hello (at ``state``'s position, or at ``start_epoch``) and start receiving."""
        if state is None:
            request = HelloRequest(self.feed, start_epoch, self._shard,
                                   shared_memory=self._shared_memory,
                                   held_batches=self._held_batches)
        else:
            if state.needs_its_shard:  # before the hello names that shard's batches
                host, hosts = self._daemon_shard()
                state.check_shard((host + hosts * self._shard[0], hosts * self._shard[1]))
            request = HelloRequest(self.feed, state.epoch, self._shard, state.job_offset,
                                   state.extra, self._shared_memory, self._held_batches)
        control_socket = control_connect(self._context, self.control, self._curve)
        info = None
        try:
            try:
                info = ask(control_socket, self.control, request, self.timeout)
            except FeedTimeout as exc:
                raise FeedTimeout(f"{exc} (the control endpoint of {self.endpoint})") from None
            schema = hello_schema(info)
            start = SessionStart.from_reply(info)
            offer = SharedMemoryOffer.from_reply(info)
            if state is not None:
                state.resume(self.feed, info.get("plan") or {}, start.shard, self.endpoint)
        except BaseException:
            if info is not None and isinstance(info.get("token"), str):
                with contextlib.suppress(zmq.ZMQError, ValueError):
                    control_socket.send(ByeRequest(info["token"]).pack(), flags=zmq.NOBLOCK)
            control_socket.close(linger=BYE_LINGER_MS)
            raise
        self.info, self.schema, self._start = info, schema, start
        self.session = info["session"]  # public; the secret token is the stream's
        self._progress = EpochProgress.of(start, start.epoch)
        token = info["token"]
        region, channel = self._attach(offer, token) if offer else (None, None)
        flow = Flow.of(self.prefetch, self._held_batches, info.get("credit_window"), region,
                       offer.held_batches if region else 0)
        self._stream = Stream(self._context, self.endpoint, self.session, token, schema,
                              start, info.get("ordered", True), flow, self._curve, region,
                              offer is not None, channel)
        heartbeat = Heartbeat(control_socket, self.session, token)
        self._finalizer = weakref.finalize(self, end_session, self._stream, heartbeat)

    def _attach(self, offer: SharedMemoryOffer, token: str) -> tuple:
        """Map the session's shared memory and open its channel; (None, None), and the
        batches then come over the socket, if it is not the daemon's region on this host
        (see ``region``) or the daemon's channel cannot be reached (``channel``)."""
        try:
            region = Region.attach(offer.path, offer.nonce, offer.slabs, offer.slab_bytes)
            try:
                if SlabLayout.of(self.schema.arrays, self.schema.batch_size).slab_bytes \
                        != offer.slab_bytes:
                    raise RegionError("its slabs are not laid out like this mongofeed's")
                channel = Channel(offer.channel, token)
            except BaseException:
                region.close()
                raise
        except (RegionError, ChannelError) as exc:
            log.info("session %s: not mapping the daemon's shared memory (%s); batches come "
                     "over the socket", self.session, exc)
            return None, None
        return region, channel

    @property
    def shared_memory(self) -> bool:
        """Whether the batches come through the daemon's shared memory (same host)."""
        return self._stream.region is not None

    def _reopen(self, state: FeedState | None, start_epoch: int = 0):
        with self._taking:  # not under a get of another thread
            self._finalizer()  # no more heartbeats, a bye, the data socket closed
            self._open(state, start_epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch (a resumed session's first epoch may have fewer left)."""
        return self.info["batches_per_epoch"]

    @property
    def current_epoch(self) -> int:
        """The epoch of the next batch."""
        return self._progress.epoch

    @property
    def taken_in_epoch(self) -> int:
        """Batches of the current epoch taken (for a resumed rank: before the resume too)."""
        return self._progress.base + self._progress.count

    @property
    def left_in_epoch(self) -> int:
        """Batches of the current epoch still to take."""
        return self._progress.size - self._progress.count

    @property
    def inputs(self) -> list[str]:
        return self.info["inputs"]

    @property
    def targets(self) -> list[str]:
        return self.info["targets"]

    @property
    def sample_weight(self) -> str | None:
        """The array a model takes as its sample weights (config output.sample_weight)."""
        return self.info.get("sample_weight")

    def get(self, timeout: float | None = None) -> Batch:
        """The next batch of the stream; raises FeedTimeout rather than waiting forever, and
        FeedError, naming the cause, once the session has failed (the daemon's error, a
        broken message, a socket error, or any other failure while receiving), then again on
        every later call."""
        if _forks != self._forks:
            raise RuntimeError("a mongofeed Consumer cannot be used in a forked child process; "
                               "create it in the process that reads from it")
        timeout = self.timeout if timeout is None else timeout
        # A batch and its count together: between them another thread's batch could be
        # counted in the epoch this one completes.
        with self._taking:
            item = self._stream.take(timeout)
            progress = self._progress
            if item is None:
                raise FeedTimeout(f"waited {timeout:g} s (the consumer's timeout) for the "
                                  f"next batch of feed {self.feed!r} (epoch {progress.epoch}: "
                                  f"{self.taken_in_epoch} of {self.batches_per_epoch} batches "
                                  f"taken) from {self.endpoint}: is the daemon running and "
                                  f"its database reachable? ('mongofeed status --control "
                                  f"{self.control}')")
            progress.mark(item.index)  # the receiver checked it: this epoch's, not yet taken
            if progress.complete:
                self._progress = EpochProgress.of(self._start, progress.epoch + 1)
            return Batch(item.epoch, progress.base + item.index, item.arrays)

    def __iter__(self) -> Iterator[Batch]:
        """All batches, epoch after epoch, until ``close``."""
        while True:
            yield self.get()

    def epoch(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch (all of it when called at its start);
        counted, not read from batch indices, which need not ascend with ordered = false."""
        epoch = self.current_epoch
        while True:
            batch = self.get()
            yield batch
            if self.current_epoch != epoch:
                return

    def state_dict(self) -> dict:
        """Where this consumer is: a small dict (no ids) to keep with a checkpoint; a
        ``Consumer(..., state=...)`` or ``load_state_dict`` in any process continues with
        exactly the batch after the last one ``get`` returned (see ``mongofeed.resume``);
        taken between two ``get``s of other threads, never in the middle of one."""
        with self._taking:
            return self._progress.state(self.feed, self.info.get("plan") or {},
                                        self.info.get("ordered", True),
                                        self._start.shard).to_dict()

    def load_state_dict(self, state: dict):
        """Continue where ``state`` says: this session ends and a new one starts there.
        A state of another feed or plan, or of another rank of an unordered feed, is
        refused (``FeedError``) before the current session ends."""
        state = FeedState.from_dict(state)
        state.resume(self.feed, self.info.get("plan") or {}, self._start.shard,
                     self.endpoint)
        self._reopen(state)

    def seek_epoch(self, epoch: int):
        """Continue at the start of ``epoch``: this session ends and a new one starts there."""
        self._reopen(None, epoch)

    def close(self):
        """End the session (the daemon stops producing for it) and release the sockets."""
        self._finalizer()
        self._context.destroy(linger=BYE_LINGER_MS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        raise TypeError("a mongofeed Consumer holds sockets and a thread and cannot be pickled; "
                        "create one per process (with Keras, keep use_multiprocessing=False: "
                        "the daemon already reads in parallel)")



def connect(endpoint: str | list[str], feed: str = "train", **consumer_kwargs):
    """A ``Consumer`` for one endpoint, a ``MultiConsumer`` for a list of them: the one
    place the adapters choose."""
    if isinstance(endpoint, str):
        return Consumer(endpoint, feed=feed, **consumer_kwargs)
    from .multi import MultiConsumer  # multi builds on Consumer

    return MultiConsumer(list(endpoint), feed=feed, **consumer_kwargs)

