"""The pure logic of resuming (issue 12): states and their checks, the merge of every rank's
state, a session's progress through an epoch, the daemon's session cursor with a start
offset and skipped batches, the hello's new fields, the sources of a job's rank, and the
Replay's alignment to fit's epoch. The same with real daemons: tests/test_resume.py."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from mongofeed import FeedError
from mongofeed.consumer import Batch
from mongofeed.daemon.planner import Shard
from mongofeed.daemon.sessions import Session
from mongofeed.distributed import JobRank, detect, resolve_shard, shard_within, slurm, torchrun
from mongofeed.errors import ProtocolError
from mongofeed.replay import Replay
from mongofeed.resume import EpochProgress, FeedState, merge_states
from mongofeed.wire import PROTOCOL_VERSION, HelloRequest, SessionStart, unpack_request

PLAN = {"seed": 0, "batch_size": 4, "drop_last": False, "shuffle": True, "order": "o",
        "window": None, "ids": 100, "ids_digest": "d"}


def rank_state(rank=0, world=4, taken=3, epoch=2, offset=0, extra=(), ordered=True) -> dict:
    return FeedState("train", PLAN, ordered, epoch, offset, (rank, world), taken,
                     tuple(extra)).to_dict()


# -- states ----------------------------------------------------------------------------------

def test_a_state_is_small_json_and_round_trips():
    state = rank_state(rank=1, taken=5, extra=[1 + 4 * 7], ordered=False)
    assert FeedState.from_dict(json.loads(json.dumps(state))).to_dict() == state
    assert FeedState.from_dict(state).job_offset == 20
    assert len(json.dumps(state)) < 400


@pytest.mark.parametrize("change, reason", [
    ({"v": 0}, "version 0"),
    ({"epoch": -1}, r"\(epoch\)"),
    ({"shard": [4, 4]}, r"\(shard\)"),
    ({"extra": [5, 5]}, r"\(extra\)"),
    ({"extra": [5]}, "extra global batch 5 is not one of shard 0/4's beyond its first 3"),
    ({"extra": [8]}, "extra global batch 8 is not one of shard 0/4's beyond its first 3"),
    ({"shard": None}, "a job's state .* with batches taken"),
    ({"plan": "digest"}, r"\(plan\)"),
])
def test_malformed_states_are_refused_naming_the_field(change, reason):
    with pytest.raises(ValueError, match=reason):
        FeedState.from_dict({**rank_state(), **change})


def test_a_state_resumes_its_own_shard_and_by_the_synchronous_rule_any_other():
    ordered = FeedState.from_dict(rank_state(rank=1))
    ordered.resume("train", PLAN, (1, 4), "here")
    ordered.resume("train", PLAN, (0, 3), "here")  # the job's offset: 3 * 4
    unordered = FeedState.from_dict(rank_state(rank=1, ordered=False, extra=[1 + 4 * 5]))
    unordered.resume("train", PLAN, (1, 4), "here")
    with pytest.raises(FeedError, match="shard 1/4's of an unordered feed and this session "
                                        "is shard 0/4"):
        unordered.resume("train", PLAN, (0, 4), "here")
    with pytest.raises(FeedError, match=r"batch.seed: 0 in the state, 1 at here; "
                                        r"documents selected: 100 in the state, 99 at here"):
        ordered.resume("train", {**PLAN, "seed": 1, "ids": 99}, (1, 4), "here")


def test_merge_states_of_every_rank_agreeing():
    job = merge_states([rank_state(rank=r) for r in (2, 0, 3, 1)])
    assert job == FeedState("train", PLAN, True, 2, 12).to_dict()
    FeedState.from_dict(job).resume("train", PLAN, (2, 3), "here")


@pytest.mark.parametrize("states, reason", [
    ([rank_state(rank=r, taken=3 + (r == 2)) for r in range(4)], r"taken differs \(3, 4\)"),
    ([rank_state(rank=r, epoch=2 + (r == 0)) for r in range(4)], r"epoch differs \(2, 3\)"),
    ([rank_state(rank=r) for r in (0, 1, 1, 3)], "shards 0/4, 1/4, 1/4, 3/4"),
    ([rank_state(rank=r, world=2) for r in range(2)] + [rank_state(rank=2)],
     "not every rank of one world once"),
    ([rank_state(rank=r, ordered=False, extra=[r + 16] if r else []) for r in range(4)],
     "out of order"),
    ([], "got none"),
])
def test_merge_states_refuses_states_that_disagree(states, reason):
    with pytest.raises((FeedError, ValueError), match=reason):
        merge_states(states)


def test_progress_through_an_epoch_out_of_order():
    progress = EpochProgress(epoch=1, offset=6, size=5, base=3, done=[2])
    assert (progress.prefix, progress.extra, progress.count) == (0, {2}, 1)
    for j in (0, 4, 1):
        progress.mark(j)
    assert (progress.prefix, progress.extra, progress.complete) == (3, {4}, False)
    state = progress.state("train", PLAN, False, (1, 2))
    assert (state.offset, state.taken, state.extra) == (6, 3, (6 + 1 + 2 * 4,))
    progress.mark(3)
    assert progress.complete and progress.count == 5


# -- the daemon's side: a session's cursor ----------------------------------------------------

def test_a_session_plans_and_delivers_after_its_offset_without_its_skips():
    session = Session(b"t" * 32, "s1", "train", Shard(0, 1), batches_per_epoch=4,
                      start_epoch=3, ordered=True, start_batches=5, start_offset=2,
                      skip=frozenset({0, 3}))
    planned = [session.next_task() for _ in range(6)]
    assert planned == [(3, 1), (3, 2), (3, 4), (4, 0), (4, 1), (4, 2)]
    assert session.to_deliver(3) == 3 and session.to_deliver(4) == 4
    for key in planned[:4]:
        session.ready[key], session.credit = [b""], 1
        assert session.next_deliverable() == key
        session.sent(key)
    assert (session.deliver_epoch, session.deliver_index, session.delivered_in_epoch) == (
        4, 1, 1)


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_a_session_fails_at_a_batch_that_cannot_be_made_after_every_batch_before_it(ordered):
    """A worker's error or a poison task for batch 2 of 4: the consumer still gets batches
    0 and 1 (unordered: 0, 1 and 3, the rest of its epoch), then the error."""
    session = Session(b"t" * 32, "s1", "train", Shard(0, 1), batches_per_epoch=4,
                      start_epoch=0, ordered=ordered, start_batches=4)
    for _ in range(6):
        session.next_task()
    session.in_production = 6
    session.fail_at(0, 2, "feed 'train', epoch 0, batch 2: bad")
    assert session.in_production == 5
    assert session.after_failure(0, 3) is ordered and session.after_failure(1, 2)
    assert not session.after_failure(0, 1)
    delivered = []
    for key in [(1, 0), (0, 3), (0, 1), (0, 0)]:  # as the workers finish them
        session.ready[key], session.credit = [b""], 4
        while session.failure_due() is None and (next_key := session.next_deliverable()):
            session.sent(next_key)
            delivered.append(next_key)
    assert delivered == ([(0, 0), (0, 1)] if ordered else [(0, 3), (0, 1), (0, 0)])
    assert session.failure_due() == "feed 'train', epoch 0, batch 2: bad"


def test_hello_start_and_skip_are_parsed_and_checked():
    def hello(**fields):
        body = {"op": "hello", "protocol": PROTOCOL_VERSION, "feed": "train", **fields}
        return unpack_request([json.dumps(body).encode()])

    assert hello(start_offset=12, skip=[30, 14]) == HelloRequest("train", 0, (0, 1), 12,
                                                                 (14, 30))
    request = HelloRequest("train", 2, (1, 3), 7, (9,))
    assert unpack_request([request.pack()]) == request
    for field, value in [("start_offset", -1), ("start_offset", 2**40), ("skip", [1, 1]),
                         ("skip", [-1]), ("skip", "1"), ("skip", list(range(3000)))]:
        with pytest.raises(ProtocolError, match=field):
            hello(**{field: value})


def test_a_hello_reply_without_a_sound_start_is_refused():
    reply = {"start_epoch": 1, "start_offset": 4, "start_batches": 3, "skip": [4 + 1 + 2 * 2],
             "batches_per_epoch": 5, "shard": [1, 2]}
    start = SessionStart.from_reply(reply)
    assert (start.first_batches, start.skip) == (3, frozenset({2}))
    for change in ({"skip": [6]}, {"skip": [4 + 1 + 2 * 3]}, {"start_batches": None},
                   {"shard": [2, 2]}, {"skip": [5, 7, 9]}):
        with pytest.raises(ProtocolError):
            SessionStart.from_reply({**reply, **change})


# -- the job's rank -----------------------------------------------------------------------------

def test_ranks_come_from_torchrun_and_slurm_variables():
    assert torchrun({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == JobRank(
        3, 8, "torchrun (RANK, WORLD_SIZE)")
    assert torchrun({"RANK": "3"}) is None and slurm({}) is None
    assert slurm({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}).rank == 1
    for environ in ({"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="RANK"):
            torchrun(environ)


def test_the_default_reads_launchers_only_and_auto_also_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    assert resolve_shard(None) == (0, 1) and resolve_shard((1, 3)) == (1, 3)
    with pytest.raises(ValueError, match="shard='auto' found no distributed job"):
        resolve_shard("auto")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_shard(None) == (0, 1)  # a lone python in an allocation reads everything
    assert resolve_shard("auto") == JobRank(1, 4, "SLURM (SLURM_PROCID, SLURM_NTASKS)")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun under srun: torchrun numbers the ranks
    assert resolve_shard(None) == resolve_shard("auto") == JobRank(
        5, 8, "torchrun (RANK, WORLD_SIZE)")
    assert resolve_shard(JobRank(0, 1)) == (0, 1)


def test_launchers_that_disagree_are_named(monkeypatch):
    """A process group initialised with another rank than torchrun's variables say (a
    stand-in for torch.distributed: it is not installed here)."""
    group = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                            get_rank=lambda: 1, get_world_size=lambda: 2)
    monkeypatch.setitem(sys.modules, "torch.distributed", group)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect() == JobRank(1, 2, "torch.distributed")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"ambiguous: rank 1 of 2 \(torch.distributed\); "
                                         r"rank 0 of 2 \(torchrun"):
        detect()


def test_a_jobs_ranks_share_the_daemons_of_their_hosts():
    assert shard_within(JobRank(5, 8), (0, 1), "e") == (5, 8)
    assert [shard_within(JobRank(r, 4), (r // 2, 2), "e") for r in range(4)] == [
        (0, 2), (1, 2), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="3 ranks cannot share 2 daemons"):
        shard_within(JobRank(0, 3), (0, 2), "e")


# -- the Replay under Keras and tf.data: alignment to fit's epoch ------------------------------

class Stream:
    """Stands in for a Consumer: 3 batches per epoch, in order, from ``epoch``."""

    feed, batches_per_epoch = "train", 3

    def __init__(self):
        self.seeks, self.current_epoch, self.taken_in_epoch = [], 0, 0

    def get(self) -> Batch:
        batch = Batch(self.current_epoch, self.taken_in_epoch, {})
        self.taken_in_epoch += 1
        if self.taken_in_epoch == self.batches_per_epoch:
            self.current_epoch, self.taken_in_epoch = self.current_epoch + 1, 0
        return batch

    def seek_epoch(self, epoch: int):
        self.seeks.append(epoch)
        self.current_epoch, self.taken_in_epoch = epoch, 0


def test_a_replay_reopens_only_when_the_next_pass_is_not_the_epoch_asked_for():
    stream = Stream()
    replay = Replay(stream, limit=4)
    replay.align_epoch(0)
    replay.take()  # a pass that Keras drops after one batch: epoch 0's first, kept
    replay.align_epoch(0)
    assert stream.seeks == []
    replay.restart()
    assert [replay.take()[:2] for _ in range(3)] == [(0, 0), (0, 1), (0, 2)]
    replay.commit()
    replay.align_epoch(1)
    assert stream.seeks == []
    replay.align_epoch(3)  # BackupAndRestore restored epoch 3
    assert stream.seeks == [3]
    replay.restart()
    assert replay.take()[:2] == (3, 0)
