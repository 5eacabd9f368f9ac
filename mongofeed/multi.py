"""The union of one feed of several daemons (``MultiConsumer``), and the checks that refuse
daemons whose shards would give documents twice or never. Training side: no database code.
"""

from __future__ import annotations

import threading
import warnings

from .consumer import Consumer
from .distributed import JobRank, resolve_shard
from .errors import FeedError
from .resume import IDS_SETTINGS, STATE_VERSION, FeedState, plan_differences
from .stream import Batch
from .wire import _is_count


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
        self._taking = threading.RLock()  # get, state_dict, a reopen: as Consumer's
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
        """The next batch, from the next daemon whose epoch is not yet complete. Calls from
        several threads take turns, so the round-robin and the positions stay those of one."""
        with self._taking:
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
        place (see the class); taken between two ``get``s of other threads."""
        with self._taking:
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
        with self._taking:
            for shard, sub in zip(theirs, states, strict=True):
                self.consumers[ours[shard]].load_state_dict(sub)
            self._epoch, self._position = saved["epoch"], saved["position"]
            self._next = ours[theirs[saved["next"]]]

    def seek_epoch(self, epoch: int):
        """Continue at the start of ``epoch`` on every daemon."""
        with self._taking:
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

