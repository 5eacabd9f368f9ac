"""Where a consumer is in its feed: a small, versioned state for a checkpoint, and the rules
that turn a saved state into where a new session starts.

A rank's state (``Consumer.state_dict()``), a few numbers and no ids::

    {"v": 1, "feed": "train", "plan": {...}, "ordered": true,
     "epoch": 3, "offset": 0, "shard": [1, 4], "taken": 17, "extra": []}

- ``plan``: the plan the daemon announced (seed, batch size, drop_last, shuffle, order,
  window, the number and digest of the ``_id``s); a state of another plan is refused,
  naming each setting that differs;
- ``epoch``, ``offset``: the epoch in progress, and how many of its global batches the job
  had consumed when this rank's stream of it began (0 unless a resume began it);
- ``shard``: the rank's part of every epoch (its daemon's ``--shard`` times its own): its
  batch j is global batch ``offset + r + R*j``;
- ``taken``: the rank took its batches ``j < taken``;
- ``extra`` (unordered feeds): the global batches it took beyond those, out of order; as
  many as were in flight at most.

A state resumes (``FeedState.resume``):

- on the same shard: exactly where that rank stopped, whatever the others did: from global
  batch ``offset + taken*R``, leaving out ``extra``;
- on another shard (another rank, another world size), by the rule of synchronous training,
  where every rank takes as many batches as the others: the job consumed the global batches
  ``[0, offset + taken*R)``, whatever R was, so every rank of any world size starts there.
  Not for unordered feeds: their ranks take batches in different orders, so what they took
  together is no prefix; each resumes from its own state, on its own shard.

``merge_states`` checks that rule where every rank's state is at hand (all ranks of one
world, one epoch, the same count): it refuses states that disagree, naming them, and
returns the job's state (no shard), which any rank of any world size resumes.

``EpochProgress`` is the bookkeeping behind it: which of an epoch's batches a session has
delivered (the receiver) or handed on (the consumer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import FeedError
from .wire import MAX_SHARD_WORLD, MAX_SKIP, SessionStart, _is_count

STATE_VERSION = 1

# The plan fields a hello reply announces, and the setting a user changes for each.
PLAN_SETTINGS = (
    ("batch_size", "batch.size"), ("seed", "batch.seed"), ("drop_last", "batch.drop_last"),
    ("shuffle", "feeds.{feed}.shuffle"), ("order", "order (the mongofeed version's)"),
    ("window", "window shape (documents per range, ranges per window: batch.window_bytes)"),
    ("ids", "documents selected"), ("ids_digest", "digest of the selected _ids"),
)
IDS_SETTINGS = {"ids", "ids_digest"}  # these differ when the daemons listed other documents


def plan_differences(feed: str, plans: list[tuple[str, dict]]) -> dict[str, str]:
    """The settings in which ``plans`` (where each was found, and the plan) differ: for each
    plan key, the setting a user changes and its value at each place."""
    differ = {}
    for key, setting in PLAN_SETTINGS:
        values = [plan.get(key) for _, plan in plans]
        if any(value != values[0] for value in values):
            differ[key] = f"{setting.format(feed=feed)}: " + ", ".join(
                f"{value} {where}" for (where, _), value in zip(plans, values, strict=True))
    return differ


@dataclass(frozen=True)
class FeedState:
    """A rank's position in an epoch (``shard`` set) or a job's (``shard`` None, nothing
    taken beyond ``offset``). ``to_dict``/``from_dict`` give the checkpoint's form."""

    feed: str
    plan: dict
    ordered: bool
    epoch: int
    offset: int = 0
    shard: tuple[int, int] | None = None
    taken: int = 0
    extra: tuple[int, ...] = ()

    @property
    def job_offset(self) -> int:
        """Global batches of ``epoch`` that the job consumed, if every rank took ``taken``."""
        return self.offset + self.taken * (self.shard[1] if self.shard else 0)

    def to_dict(self) -> dict:
        return {"v": STATE_VERSION, "feed": self.feed, "plan": dict(self.plan),
                "ordered": self.ordered, "epoch": self.epoch, "offset": self.offset,
                "shard": list(self.shard) if self.shard else None, "taken": self.taken,
                "extra": list(self.extra)}

    @classmethod
    def from_dict(cls, value) -> FeedState:
        """A state as ``to_dict`` made it, every field checked (it comes from a file)."""
        if isinstance(value, FeedState):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"a mongofeed state is a dict (Consumer.state_dict()), not "
                             f"{type(value).__name__}")
        if value.get("v") != STATE_VERSION:
            raise ValueError(f"mongofeed state version {value.get('v')!r:.20}; this mongofeed "
                             f"reads version {STATE_VERSION}"
                             + (" (is this a MultiConsumer's state?)" if "daemons" in value
                                else ""))
        feed, plan, ordered = value.get("feed"), value.get("plan"), value.get("ordered")
        counts = {key: value.get(key) for key in ("epoch", "offset", "taken")}
        shard, extra = value.get("shard"), value.get("extra", [])
        problems = [name for name, bad in (
            ("feed", not isinstance(feed, str)), ("plan", not isinstance(plan, dict)),
            ("ordered", not isinstance(ordered, bool)),
            *((key, not _is_count(count)) for key, count in counts.items()),
            ("shard", shard is not None and not (
                isinstance(shard, list) and len(shard) == 2 and all(map(_is_count, shard))
                and shard[0] < shard[1] <= MAX_SHARD_WORLD)),
            ("extra", not (isinstance(extra, list) and len(extra) <= MAX_SKIP
                           and all(map(_is_count, extra)) and len(set(extra)) == len(extra))),
        ) if bad]
        if problems:
            raise ValueError(f"malformed mongofeed state ({', '.join(problems)}): "
                             f"{str(value)[:200]}")
        state = cls(feed, plan, ordered, counts["epoch"], counts["offset"],
                    tuple(shard) if shard else None, counts["taken"], tuple(sorted(extra)))
        if state.shard is None and (state.taken or state.extra):
            raise ValueError("malformed mongofeed state: a job's state (no shard) with "
                             "batches taken beyond its offset")
        for g in state.extra:
            j, rest = divmod(g - state.offset - state.shard[0], state.shard[1])
            if rest or j <= state.taken:
                raise ValueError(f"malformed mongofeed state: extra global batch {g} is not "
                                 f"one of shard {state.shard[0]}/{state.shard[1]}'s beyond "
                                 f"its first {state.taken}")
        return state

    @property
    def needs_its_shard(self) -> bool:
        """Whether only a session of this state's own shard can resume it: an unordered
        rank's batches say nothing about what the other ranks took."""
        return self.shard is not None and (not self.ordered or bool(self.extra))

    def resume(self, feed: str, plan: dict, shard: tuple[int, int], where: str):
        """Check that a session of ``feed`` with ``plan`` on ``shard`` (at ``where``) can
        resume this state: it started at ``(epoch, job_offset)``, leaving out ``extra``."""
        if feed != self.feed:
            raise FeedError(f"this state is of feed {self.feed!r}, not {feed!r}")
        differ = plan_differences(feed, [("in the state", self.plan), (f"at {where}", plan)])
        if differ:
            raise FeedError(f"this state of feed {feed!r} was saved from another plan, so "
                            f"resuming it would repeat and skip documents: "
                            f"{'; '.join(differ.values())}. Serve the feed as when it was "
                            f"saved, or start a new run")
        self.check_shard(shard)

    def check_shard(self, shard: tuple[int, int]):
        if self.needs_its_shard and tuple(shard) != self.shard:
            raise FeedError(
                f"this state is shard {self.shard[0]}/{self.shard[1]}'s of an unordered feed "
                f"and this session is shard {shard[0]}/{shard[1]}: the ranks of an unordered "
                f"feed take their batches in different orders, so one rank's state does not "
                f"say what the others took. Resume every rank from its own state, with the "
                f"same world size (and --shard layout)")


def merge_states(states: Iterable) -> dict:
    """The job's state from the states of all its ranks (``Consumer.state_dict()`` of each):
    they must be every rank of one world size, at one epoch and offset, each having taken as
    many batches (synchronous training), none beyond (an unordered feed's extras). Any rank of
    any world size resumes the result; states that disagree are refused, naming them."""
    states = [FeedState.from_dict(s) for s in states]
    if not states:
        raise ValueError("merge_states needs the state of every rank, got none")
    first = states[0]
    ranks = sorted(s.shard for s in states if s.shard is not None)
    problems = []
    if len(ranks) != len(states):
        problems.append("some are job states already (no shard)")
    elif ranks != [(r, first.shard[1]) for r in range(first.shard[1])]:
        problems.append(f"they are not every rank of one world once: shards "
                        f"{', '.join(f'{r}/{w}' for r, w in ranks)}")
    for key in ("feed", "plan", "ordered", "epoch", "offset", "taken"):
        values = [getattr(s, key) for s in states]
        if any(v != values[0] for v in values):
            shown = sorted({str(v)[:60] for v in values})
            problems.append(f"their {key} differs ({', '.join(shown)})")
    if any(s.extra for s in states):
        problems.append("some took batches out of order (an unordered feed): resume each rank "
                        "from its own state, with the same world size")
    if problems:
        raise FeedError(f"cannot merge {len(states)} states into the job's: "
                        f"{'; '.join(problems)}")
    return FeedState(first.feed, first.plan, first.ordered, first.epoch,
                     first.job_offset).to_dict()


class EpochProgress:
    """Which batch numbers of one epoch of a session are done: the first ``prefix`` and
    ``extra`` beyond (out of order); ``size`` numbers in all. ``base`` is added to a batch
    number to name it in the epoch as a whole (a resumed rank's batches continue its count)."""

    def __init__(self, epoch: int, offset: int, size: int, base: int, done: Iterable = ()):
        self.epoch, self.offset, self.size, self.base = epoch, offset, size, base
        self.prefix, self.extra = 0, set()
        for j in sorted(done):
            self.mark(j)

    @classmethod
    def of(cls, start: SessionStart, epoch: int) -> EpochProgress:
        """Epoch ``epoch`` of the session that ``start`` describes, nothing done yet."""
        if epoch == start.epoch:
            return cls(epoch, start.offset, start.first_batches,
                       start.offset // start.shard[1], start.skip)
        return cls(epoch, 0, start.batches_per_epoch, 0)

    def done(self, j: int) -> bool:
        return j < self.prefix or j in self.extra

    def mark(self, j: int):
        if j == self.prefix:
            self.prefix += 1
            while self.prefix in self.extra:
                self.extra.remove(self.prefix)
                self.prefix += 1
        else:
            self.extra.add(j)

    @property
    def count(self) -> int:
        return self.prefix + len(self.extra)

    @property
    def complete(self) -> bool:
        return self.prefix == self.size

    def state(self, feed: str, plan: dict, ordered: bool, shard: tuple[int, int]) -> FeedState:
        """This progress as a rank's state."""
        if len(self.extra) > MAX_SKIP:
            raise FeedError(f"{len(self.extra)} batches of epoch {self.epoch} were taken out "
                            f"of order, more than a state keeps ({MAX_SKIP}): lower the "
                            f"daemon's serve.max_pending, or take the state later")
        rank, world = shard
        extra = tuple(sorted(self.offset + rank + world * j for j in self.extra))
        return FeedState(feed, plan, ordered, self.epoch, self.offset, tuple(shard),
                         self.prefix, extra)
