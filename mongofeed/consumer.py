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
header naming the slab arrives; the arrays handed out view the slab, which goes back to the
daemon once they are gone (``leases``). Elsewhere, or with ``shared_memory=False``, the
arrays come in the messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import zmq

from .distributed import JobRank, resolve_shard, shard_within
from .errors import FeedError, FeedTimeout, ProtocolError
from .leases import JoinBuffers, Slabs
from .region import Region, RegionError, SlabLayout
from .resume import IDS_SETTINGS, STATE_VERSION, EpochProgress, FeedState, plan_differences
from .security import client_options
from .wire import (
    MAX_HEADER_BYTES,
    BatchHeader,
    ByeRequest,
    ControlRequest,
    Credit,
    HeartbeatRequest,
    HelloRequest,
    Schema,
    SessionStart,
    SharedMemoryOffer,
    StatusRequest,
    _is_count,
    check_endpoint,
    decode_json,
    hello_schema,
    next_port,
    unpack_frames,
    unpack_header,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_PREFETCH = 4
DEFAULT_HELD_BATCHES = 2
HEARTBEAT_INTERVAL_S = 1.0
BYE_LINGER_MS = 500
WAIT_SLICE_S = 0.25  # a waiting get looks this often whether the consumer was closed
SHARED_MEMORY_ENV = "MONGOFEED_SHARED_MEMORY"  # "0": never map the daemon's shared memory


class Batch(NamedTuple):
    epoch: int
    index: int
    arrays: dict[str, np.ndarray]


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
    ``held_batches`` batches: while you hold more, ``get`` hands copies instead of views, so
    nothing waits, but each costs a copy. ``get`` may be called from any thread, one at a
    time.
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
        self._pid = os.getpid()
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
                                   shared_memory=self._shared_memory)
        else:
            if state.needs_its_shard:  # before the hello names that shard's batches
                host, hosts = self._daemon_shard()
                state.check_shard((host + hosts * self._shard[0], hosts * self._shard[1]))
            request = HelloRequest(self.feed, state.epoch, self._shard, state.job_offset,
                                   state.extra, self._shared_memory)
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
        region = self._attach(offer) if offer else None
        flow = Flow.of(self.prefetch, self._held_batches, info.get("credit_window"), region)
        self._stream = _Stream(self._context, self.endpoint, self.session, token, schema,
                               start, info.get("ordered", True), flow, self._curve, region,
                               offer is not None)
        heartbeat = _Heartbeat(control_socket, self.session, token)
        self._finalizer = weakref.finalize(self, _close, self._stream, heartbeat)

    def _attach(self, offer: SharedMemoryOffer) -> Region | None:
        """Map the session's shared memory; None (the batches then come over the socket) if
        it is not the daemon's region on this host (see ``region``)."""
        try:
            region = Region.attach(offer.path, offer.nonce, offer.slabs, offer.slab_bytes)
            if SlabLayout.of(self.schema.arrays, self.schema.batch_size).slab_bytes \
                    != offer.slab_bytes:
                region.close()
                raise RegionError("its slabs are not laid out like this mongofeed's")
        except RegionError as exc:
            log.info("session %s: not mapping the daemon's shared memory (%s); batches come "
                     "over the socket", self.session, exc)
            return None
        return region

    @property
    def shared_memory(self) -> bool:
        """Whether the batches come through the daemon's shared memory (same host)."""
        return self._stream.region is not None

    def _reopen(self, state: FeedState | None, start_epoch: int = 0):
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
        if os.getpid() != self._pid:
            raise RuntimeError("a mongofeed Consumer cannot be used in a forked child process; "
                               "create it in the process that reads from it")
        timeout = self.timeout if timeout is None else timeout
        item = self._stream.take(timeout)
        progress = self._progress
        if item is None:
            raise FeedTimeout(f"waited {timeout:g} s (the consumer's timeout) for the next "
                              f"batch of feed {self.feed!r} (epoch {progress.epoch}: "
                              f"{self.taken_in_epoch} of {self.batches_per_epoch} batches "
                              f"taken) from {self.endpoint}: is the daemon running and its "
                              f"database reachable? ('mongofeed status --control "
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
        exactly the batch after the last one ``get`` returned (see ``mongofeed.resume``)."""
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


class MultiConsumer:
    """The union of one feed of several daemons, e.g. one per host with ``serve --shard r/R``.

    It holds one ``Consumer`` per endpoint (``consumer_kwargs`` go to each) and takes batches
    round-robin, skipping a daemon whose epoch is complete until all are: an epoch here is
    one epoch of every daemon, and the daemons' epochs stay aligned. A batch's ``index`` is
    its position in that union epoch. ``shard`` applies within every daemon's shard; a job's
    rank (``"auto"``, or the default in a launcher's job) takes its part of each daemon.

    Before any batch is taken it refuses (``FeedError``) daemons that would give documents
    twice or never: different schemas, different plans (batch size, seed, drop_last,
    shuffle, or other ``_id``s), or shards that overlap or come from different splits. A set
    of shards that leaves some out (0/3 and 1/3 only) is read with a warning.

    Its state (``state_dict``) is the state of each daemon's consumer, by the daemon's
    shard, and the round-robin's place: it resumes on daemons with the same ``--shard``
    layout, in any order of endpoints (and, for ordered feeds, with any number of ranks).
    """

    def __init__(self, endpoints: list[str], feed: str = "train", state: dict | None = None,
                 **consumer_kwargs):
        if not endpoints:
            raise ValueError("MultiConsumer needs at least one endpoint")
        if consumer_kwargs.get("control"):
            raise ValueError("control names one daemon's control endpoint; with several "
                             "endpoints each daemon's is its own (port + 1)")
        shard = resolve_shard(consumer_kwargs.pop("shard", None))
        if isinstance(shard, JobRank):  # every rank reads a part of every daemon
            shard = (shard.rank, shard.world)
        self.feed = feed
        self.consumers: list[Consumer] = []
        try:
            for endpoint in endpoints:
                self.consumers.append(Consumer(endpoint, feed=feed, shard=shard,
                                               **consumer_kwargs))
            self._check_same_schema()
            check_same_plan(feed, [(c.endpoint, c.info.get("plan")) for c in self.consumers])
            self.daemon_shards = self._daemon_shards(shard[1])
            check_shards(feed, self.daemon_shards)
        except BaseException:
            self.close()
            raise
        first = self.consumers[0]
        self.schema, self.inputs, self.targets = first.schema, first.inputs, first.targets
        self.sample_weight = first.sample_weight
        self.batches_per_epoch = sum(c.batches_per_epoch for c in self.consumers)
        self._epoch = min(c.current_epoch for c in self.consumers)  # the union's epoch
        self._position = 0  # batches of it taken
        self._next = 0
        if state is not None:
            try:
                self.load_state_dict(state)
            except BaseException:
                self.close()
                raise

    def _check_same_schema(self):
        def announced(consumer):
            return consumer.schema, consumer.inputs, consumer.targets, consumer.sample_weight

        first = self.consumers[0]
        differ = [c.endpoint for c in self.consumers if announced(c) != announced(first)]
        if differ:
            raise FeedError(f"daemons announce different schemas for feed {self.feed!r}: "
                            f"{', '.join(differ)} differ from {first.endpoint} (batch size, "
                            f"arrays or inputs/targets/sample_weight); serve them with the same "
                            f"config")

    def _daemon_shards(self, consumer_world: int) -> list[tuple[str, tuple[int, int]]]:
        """Each daemon's ``--shard``: a consumer's ``shard`` is taken within the daemon's,
        so the session's shard announced in the hello is the daemon's times the consumer's."""
        shards = []
        for consumer in self.consumers:
            rank, world = consumer._start.shard  # rd/Rd composed with rc/Rc: rd + Rd*rc of Rd*Rc
            daemon_world = world // consumer_world
            shards.append((consumer.endpoint, (rank % daemon_world, daemon_world)))
        return shards

    def _union_epoch(self) -> int:
        """The epoch of the next batch: the current one until every daemon's is complete."""
        if all(c.current_epoch != self._epoch for c in self.consumers):
            self._epoch = min(c.current_epoch for c in self.consumers)
            self._position = 0
        return self._epoch

    def get(self, timeout: float | None = None) -> Batch:
        """The next batch, from the next daemon whose epoch is not yet complete."""
        epoch = self._union_epoch()
        while self.consumers[self._next].current_epoch != epoch:
            self._next = (self._next + 1) % len(self.consumers)
        batch = self.consumers[self._next].get(timeout)
        position, self._position = self._position, self._position + 1
        self._next = (self._next + 1) % len(self.consumers)
        return Batch(batch.epoch, position, batch.arrays)

    @property
    def current_epoch(self) -> int:
        return self._union_epoch()

    @property
    def taken_in_epoch(self) -> int:
        self._union_epoch()
        return self._position

    @property
    def left_in_epoch(self) -> int:
        epoch = self._union_epoch()
        return sum(c.left_in_epoch for c in self.consumers if c.current_epoch == epoch)

    # Iteration as in Consumer: it needs only get() and current_epoch.
    __iter__ = Consumer.__iter__
    epoch = Consumer.epoch

    def state_dict(self) -> dict:
        """Every daemon's consumer's state, by the daemon's shard, and the round-robin's
        place (see the class)."""
        epoch = self._union_epoch()
        return {"v": STATE_VERSION, "feed": self.feed, "epoch": epoch,
                "position": self._position, "next": self._next,
                "daemons": [{"shard": list(shard), "state": consumer.state_dict()}
                            for (_, shard), consumer in zip(self.daemon_shards,
                                                            self.consumers, strict=True)]}

    def load_state_dict(self, state: dict):
        """Continue where ``state`` (a ``MultiConsumer``'s) says: each daemon's consumer
        resumes the state saved for its daemon's shard. Refused (``FeedError``) when the
        daemons serve another ``--shard`` layout than those that made the state."""
        saved = _multi_state(state)
        ours = {tuple(shard): i for i, (_, shard) in enumerate(self.daemon_shards)}
        theirs = [tuple(daemon["shard"]) for daemon in saved["daemons"]]
        if sorted(theirs) != sorted(ours):
            raise FeedError(
                f"this state of feed {self.feed!r} was saved from daemons serving shards "
                f"{', '.join(f'{r}/{w}' for r, w in sorted(theirs))}, and these serve "
                f"{', '.join(f'{r}/{w}' for r, w in sorted(ours))}: resume with one daemon "
                f"per saved --shard (in any order of endpoints)")
        states = [FeedState.from_dict(daemon["state"]) for daemon in saved["daemons"]]
        for shard, sub in zip(theirs, states, strict=True):
            consumer = self.consumers[ours[shard]]
            sub.resume(self.feed, consumer.info.get("plan") or {}, consumer._start.shard,
                       consumer.endpoint)
        for shard, sub in zip(theirs, states, strict=True):
            self.consumers[ours[shard]].load_state_dict(sub)
        self._epoch, self._position = saved["epoch"], saved["position"]
        self._next = ours[theirs[saved["next"]]]

    def seek_epoch(self, epoch: int):
        """Continue at the start of ``epoch`` on every daemon."""
        for consumer in self.consumers:
            consumer.seek_epoch(epoch)
        self._epoch, self._position, self._next = epoch, 0, 0

    def close(self):
        """End every session."""
        for consumer in self.consumers:
            consumer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _multi_state(state) -> dict:
    """A ``MultiConsumer`` state's own fields, checked (the daemons' states are checked by
    ``FeedState``)."""
    if not (isinstance(state, dict) and state.get("v") == STATE_VERSION
            and isinstance(state.get("daemons"), list) and state["daemons"]):
        raise ValueError(f"not a MultiConsumer state of version {STATE_VERSION} (a dict with "
                         f"'daemons'; a Consumer's state goes to Consumer): {str(state)[:200]}")
    daemons = state["daemons"]
    if not (all(map(_is_count, (state.get("epoch"), state.get("position"), state.get("next"))))
            and state["next"] < len(daemons)
            and all(isinstance(d, dict) and isinstance(d.get("shard"), list)
                    and len(d["shard"]) == 2 and all(map(_is_count, d["shard"]))
                    for d in daemons)
            and len({tuple(d["shard"]) for d in daemons}) == len(daemons)):
        raise ValueError(f"malformed MultiConsumer state: {str(state)[:200]}")
    return state


def check_same_plan(feed: str, plans: list[tuple[str, dict | None]]):
    """Refuse daemons (``plans``: endpoint and the plan its hello announced) whose shards
    would not split one epoch: other ids, order or cut. Names each setting that differs,
    with its value at each endpoint."""
    unknown = [endpoint for endpoint, plan in plans if not isinstance(plan, dict)]
    if unknown:
        raise FeedError(f"{', '.join(unknown)} do not announce the plan of feed {feed!r}, so "
                        f"MultiConsumer cannot check that their shards split one epoch: run "
                        f"the same mongofeed version on every daemon")
    differ = plan_differences(feed, [(f"at {endpoint}", plan) for endpoint, plan in plans])
    if not differ:
        return
    fixes = []
    if set(differ) - IDS_SETTINGS:
        fixes.append("the same [batch] settings and feed options")
    if set(differ) & IDS_SETTINGS:
        fixes.append(f"the same filter for feed {feed!r} over the same collection (a daemon "
                     f"lists the _ids when it starts: restart the daemons once the collection "
                     f"has stopped changing)")
    raise FeedError(f"daemons plan feed {feed!r} differently, so their shards would give some "
                    f"documents twice and others never: {'; '.join(differ.values())}. Serve "
                    f"them with {' and '.join(fixes)}")


def check_shards(feed: str, shards: list[tuple[str, tuple[int, int]]]):
    """Refuse daemon shards (endpoint and ``(rank, world)``) that overlap or come from
    different splits, naming the ``--shard`` each daemon needs. A split with ranks missing
    (0/3 and 1/3 only) is read with a warning: a trainer may read part of the data on purpose,
    but never without being told."""
    held = ", ".join(f"{rank}/{world} at {endpoint}" for endpoint, (rank, world) in shards)
    advice = "start " + ", ".join(f"{endpoint} with --shard {i}/{len(shards)}"
                                  for i, (endpoint, _) in enumerate(shards))
    worlds = {world for _, (_, world) in shards}
    if len(worlds) > 1:
        raise FeedError(f"daemons serve shards of different splits of feed {feed!r} ({held}), "
                        f"so some documents would come twice and others never: {advice}")
    ranks = [rank for _, (rank, _) in shards]
    if len(set(ranks)) < len(ranks):
        raise FeedError(f"daemons serve overlapping shards of feed {feed!r} ({held}), so the "
                        f"documents of a shard served twice would come twice per epoch: "
                        f"{advice}")
    world = worlds.pop()
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        warnings.warn(f"MultiConsumer reads {len(ranks)} of {world} shards of feed {feed!r} "
                      f"({held}): every epoch leaves out the documents of shard "
                      f"{', '.join(f'{rank}/{world}' for rank in missing)}", stacklevel=3)


def connect(endpoint: str | list[str], feed: str = "train", **consumer_kwargs):
    """A ``Consumer`` for one endpoint, a ``MultiConsumer`` for a list of them: the one
    place the adapters choose."""
    if isinstance(endpoint, str):
        return Consumer(endpoint, feed=feed, **consumer_kwargs)
    return MultiConsumer(list(endpoint), feed=feed, **consumer_kwargs)


def _close(stream: _Stream, heartbeat: _Heartbeat):
    """End a session: no more heartbeats, a bye, the data socket closed."""
    heartbeat.stop()
    stream.close()


class _Heartbeat:
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


class _Stream:
    """The data socket and the checks of what arrives on it, used by ``get``'s thread.

    Per batch it does as little as it can, since the training process pays for it: the
    header is a fixed binary layout, the arrays' shapes are computed once per distinct
    sample count, and credit and slab releases go out every few batches (``every``)."""

    def __init__(self, context, endpoint, session, token, schema: Schema, start: SessionStart,
                 ordered, flow: Flow, curve, region: Region | None = None,
                 offered: bool = False):
        self.session = session  # the public name, for messages
        self.token = token  # the session's secret: our data identity
        self.schema = schema
        self.session_start = start
        self.ordered = ordered
        self.every = flow.every
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.closed = False
        self.failure: FeedError | None = None  # why the stream broke, raised on every take
        self.progress = EpochProgress.of(start, start.epoch)  # of the batches received
        self.region = region
        self.offsets = SlabLayout.of(schema.arrays, schema.batch_size).offsets
        self.slabs = Slabs()
        self.held_batches = flow.held
        self.join_buffers = JoinBuffers()
        self.data = context.socket(zmq.DEALER)
        self.data.linger = 0
        for option, value in curve.items():
            self.data.setsockopt(option, value)
        self.data.identity = token.encode()
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
        ``held_batches`` such batches, copies beyond."""
        with self.lock:
            self.raise_failure()
            try:
                self.send_credit()
                try:
                    head = self.data.recv(zmq.NOBLOCK)  # usually waiting already
                except zmq.Again:
                    if not self.wait(timeout):
                        return None
                    head = self.data.recv()
                batch, lease = self.receive(head)
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

    def wait(self, timeout: float) -> bool:
        """Whether a message arrived within ``timeout``, looking for a close meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.data.poll(int(1000 * min(WAIT_SLICE_S, max(0.0, deadline
                                                                    - time.monotonic())))):
            if self.closed:
                raise FeedError(f"session {self.session} was closed")
            if time.monotonic() >= deadline:
                return False
        return True

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

    def receive(self, head: bytes) -> tuple:
        """The batch whose first frame is ``head``, as (epoch, the session's batch number,
        arrays), and the lease of its slab (None if not in a slab); anything the session did
        not announce, or sent already, is a ProtocolError."""
        header = unpack_header(head)
        if isinstance(header, str):
            raise FeedError(f"the daemon ended this session: {header}")
        more = self.data.getsockopt(zmq.RCVMORE)
        frames = self.data.recv_multipart(copy=False) if more else []
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
        base = self.region.slab_bytes_view(header.slab)  # checks the slab number
        arrays = {place.name: np.ndarray(place.shape, place.dtype, base, offset)
                  for place, offset in zip(self.schema.placements(header), self.offsets,
                                           strict=True)}
        lease = self.slabs.lease(base, header.slab)
        return self.schema.convert(arrays), lease

    def send_credit(self):
        """Credit for the batches taken, and the slabs released, every ``every`` of them (the
        daemon keeps credit meanwhile, and room for the slabs not yet released: ``Flow``)."""
        if self.owed_credit < self.every and self.slabs.pending < self.every:
            return
        released = self.slabs.take_released()
        self.data.send(Credit(self.owed_credit, released).pack(), flags=zmq.NOBLOCK)
        self.owed_credit = 0

    def close(self):
        self.closed = True
        with self.lock:
            self.data.close()


@dataclass(frozen=True)
class Flow:
    """How many batches a consumer lets the daemon send ahead (``credit``), grants at once
    (``every``, with the slabs released meanwhile), and, with shared memory, holds as views
    before ``get`` hands copies (``held``).

    The daemon lends a session at most ``window`` slabs (its ``credit_window``:
    ``serve.max_pending``, the other half of its region being for production). The consumer
    has at most ``credit`` batches on their way or waiting in its socket, ``held`` views
    handed out, and fewer than ``every`` releases unsent, so that sum stays within the
    window and the daemon never waits for a slab the consumer may keep. Credit for ``every``
    batches comes first (the least that keeps the daemon sending while a grant is on its
    way), then the views the caller asked to keep, then credit for up to twice the
    prefetch."""

    credit: int
    every: int
    held: int

    @classmethod
    def of(cls, prefetch: int, held_batches: int, window, region) -> Flow:
        window = window if isinstance(window, int) and window >= 1 else 2 * prefetch
        every = max(1, min(prefetch // 2, window // 4))
        room = window - (every - 1)
        if region is None:  # nothing lent: the credit alone counts
            return cls(max(1, min(2 * prefetch, window)), every, held_batches)
        held = max(0, min(held_batches, room - every))
        return cls(max(1, min(2 * prefetch, room - held)), every, held)
