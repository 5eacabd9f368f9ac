"""Resume anywhere, with real daemons (issue 12): a consumer stopped after k batches of an
epoch saves its state; a new consumer in a new process, given that state, continues with
exactly the batches the uninterrupted stream would have delivered next: no batch twice,
none missing, in the same order (per epoch, as sets, for an unordered feed). The same
through a MultiConsumer over daemons with ``--shard``, for sharded consumers, across world
sizes (4 ranks stop, 3 resume), and for ranks that find their shard themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack

import pytest

from mongofeed import Consumer, FeedError, MultiConsumer
from mongofeed.distributed import JobRank
from mongofeed.resume import merge_states
from mongofeed.testing import Daemon
from tests.support import REPO, insert_samples, sample_config, write_toml

COUNT, BATCH = 48, 2   # 24 global batches per epoch: 6 per rank of 4, 8 per rank of 3
GLOBAL = COUNT // BATCH
READER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, mongo_client, mongo_uri):
    """One collection served five ways: ordered, unordered, by two daemons of one
    ``--shard x/2`` split (ordered), and as a feed of two sources (a mixture)."""
    db = mongo_client[f"mongofeed_test_{uuid.uuid4().hex[:12]}"]
    insert_samples(db.samples, COUNT)
    folder = tmp_path_factory.mktemp("resume")

    def config(name, ordered=True, feed=None):
        return write_toml(folder / f"{name}.toml", sample_config(
            mongo_uri, db.name, batch={"size": BATCH, "seed": 7},
            feeds={"train": feed or {"filter": {}, "shuffle": True}},
            output={"inputs": ["idx", "x"], "targets": ["label"]},
            serve={"ordered": ordered}))

    mixture = {"sources": {"low": {"filter": {"i": {"$lt": 16}}, "repeat": 2},   # 32 draws
                           "high": {"filter": {"i": {"$gte": 16}}, "choose": 16}}}

    try:
        with ExitStack() as stack:
            def serve(path, *args):
                return stack.enter_context(Daemon(path, workers=2, args=args)).bind

            ordered = config("ordered")
            yield {"ordered": serve(ordered), "unordered": serve(config("unordered", False)),
                   "shards": [serve(ordered, "--shard", f"{r}/2") for r in range(2)],
                   "mixture": serve(config("mixture", feed=mixture))}
    finally:
        mongo_client.drop_database(db.name)


def as_json(batch) -> list:
    return [batch.epoch, batch.index, batch.arrays["idx"].tolist()]


def read(consumer, count: int) -> list:
    return [as_json(consumer.get()) for _ in range(count)]


def test_threads_taking_turns_count_every_batch_once(daemons):
    """``get`` from two threads: each batch goes to one of them, and the state counts each
    once, also when a thread is slow between receiving a batch and counting it (the last of
    epoch 0 here, held back while the other thread asks for epoch 1's first)."""
    with Consumer(daemons["ordered"], "train", timeout=30) as consumer:
        receive = consumer._stream.take

        def slow_after_the_last_of_an_epoch(timeout):
            batch = receive(timeout)
            if batch is not None and batch.index == GLOBAL - 1:
                time.sleep(0.3)
            return batch

        consumer._stream.take = slow_after_the_last_of_an_epoch
        taken = []

        def read():
            for _ in range(GLOBAL):
                batch = consumer.get()
                taken.append((batch.epoch, batch.index))

        threads = [threading.Thread(target=read) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(taken) == [(e, i) for e in (0, 1) for i in range(GLOBAL)]
        state = consumer.state_dict()
        assert (state["epoch"], state["taken"], state["extra"]) == (2, 0, []), state


def resume_in_new_process(endpoint, state, take, shard=None, env=None) -> dict:
    """``tests/resume_reader.py``: a new process that resumes ``state`` and takes ``take``."""
    job = {"endpoint": endpoint, "state": state, "take": take, "shard": shard}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "resume_reader.py")], input=json.dumps(job),
        capture_output=True, text=True, timeout=READER_TIMEOUT_S, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def by_epoch(batches: list) -> dict:
    """An unordered stream's batches, per epoch, in a fixed order."""
    epochs = {}
    for epoch, index, ids in batches:
        epochs.setdefault(epoch, []).append((index, ids))
    return {epoch: sorted(found) for epoch, found in epochs.items()}


@pytest.mark.parametrize("served, shard, stop_after", [
    ("ordered", None, 7), ("ordered", (1, 2), 5), ("ordered", (1, 2), 12),
    ("mixture", (0, 2), 5)])
def test_a_resumed_consumer_continues_with_exactly_the_next_batches(daemons, served, shard,
                                                                    stop_after):
    """Unsharded, and rank 1 of 2 (stopped in its first epoch, and at its end), and a rank
    of a feed of sources: the stream before the stop and the new process's stream after it
    are the uninterrupted stream, batch for batch, with the same epochs and indices."""
    endpoint = daemons[served]
    with Consumer(endpoint, shard=shard, timeout=30) as whole:
        expected = read(whole, 2 * whole.batches_per_epoch)
    with Consumer(endpoint, shard=shard, timeout=30) as stopped:
        before = read(stopped, stop_after)
        state = stopped.state_dict()
    assert state["taken"] == stop_after % stopped.batches_per_epoch
    after = resume_in_new_process(endpoint, state, len(expected) - stop_after, shard)
    assert before + after["batches"] == expected
    assert (after["state"]["epoch"], after["state"]["taken"]) == (2, 0)


@pytest.mark.parametrize("shard", [None, (1, 2)])
def test_an_unordered_feed_resumes_every_batch_once(daemons, shard):
    """Unordered batches arrive in any order within an epoch: the resumed stream completes
    the stopped one's epoch with exactly the batches it lacked, then whole epochs. A
    state whose rank took batches out of order (its extras) leaves exactly those out."""
    endpoint = daemons["unordered"]
    rank, world = shard or (0, 1)
    with Consumer(endpoint, shard=shard, timeout=30) as whole:
        per_epoch = whole.batches_per_epoch
        expected = by_epoch(read(whole, 2 * per_epoch))
    with Consumer(endpoint, shard=shard, timeout=30) as stopped:
        before = read(stopped, 7)
        state = stopped.state_dict()
    after = resume_in_new_process(endpoint, state, 2 * per_epoch - 7, shard)
    assert by_epoch(before + after["batches"]) == expected

    extras = [rank + world * j for j in (5, 9)]  # global batches of the rank's 5th and 9th
    out_of_order = {**state, "epoch": 1, "offset": 0, "taken": 3, "extra": extras}
    with Consumer(endpoint, shard=shard, timeout=30, state=out_of_order) as resumed:
        rest = [as_json(b) for b in resumed.epoch()]
    assert by_epoch(rest)[1] == [b for b in expected[1] if b[0] not in (0, 1, 2, 5, 9)]


def test_a_multi_consumer_read_from_threads_gives_the_stream_of_one(daemons):
    """Two threads share a MultiConsumer over two daemons: each position comes once, with
    the batch a single reader gets there, and the state after two epochs is at its end;
    also when the first daemon's batches are slow to come (a thread waits in its get)."""
    endpoints = daemons["shards"]
    with MultiConsumer(endpoints, timeout=30) as whole:
        expected = read(whole, 2 * whole.batches_per_epoch)
    with MultiConsumer(endpoints, timeout=30) as shared:
        first = shared.consumers[0]
        first_get = first.get

        def slow_get(timeout=None):
            time.sleep(0.05)
            return first_get(timeout)

        first.get = slow_get
        taken = []

        def read_half():
            for _ in range(len(expected) // 2):
                taken.append(as_json(shared.get()))

        threads = [threading.Thread(target=read_half) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(taken) == sorted(expected)
        state = shared.state_dict()
    assert (state["epoch"], state["position"]) == (2, 0), state


def test_a_multi_consumer_resumes_on_the_same_shard_layout(daemons):
    """Two daemons of one --shard split, read round-robin; stopped after an odd number of
    batches (in the middle of a round), resumed in a new process with the endpoints listed
    the other way round: the same union stream. Daemons of another layout are refused."""
    endpoints = daemons["shards"]
    with MultiConsumer(endpoints, timeout=30) as whole:
        expected = read(whole, 2 * whole.batches_per_epoch)
    with MultiConsumer(endpoints, timeout=30) as stopped:
        before = read(stopped, 9)
        state = stopped.state_dict()
    after = resume_in_new_process(endpoints[::-1], state, len(expected) - 9)
    assert before + after["batches"] == expected

    other_layout = {**state, "daemons": [{**d, "shard": [r, 3]}
                                         for r, d in enumerate(state["daemons"])]}
    with MultiConsumer(endpoints, timeout=30) as consumer, \
            pytest.raises(FeedError, match=r"saved from daemons serving shards 0/3, 1/3, and "
                                           r"these serve 0/2, 1/2: resume with one daemon per"):
        consumer.load_state_dict(other_layout)


def test_four_ranks_stop_and_three_resume_every_document_once(daemons):
    """Elastic: 4 ranks each take 3 batches (the job's first 12 global batches, whatever the
    ranks), then 3 ranks resume from the job's state, merged from the 4 states or taken
    from any one of them (synchronous training): the epoch's documents, each once. States
    that disagree do not merge; an unordered rank's state does not resume another rank."""
    endpoint = daemons["ordered"]
    ranks = [Consumer(endpoint, shard=(r, 4), timeout=30) for r in range(4)]
    try:
        before = [i for rank in ranks for _, _, ids in read(rank, 3) for i in ids]
        states = [rank.state_dict() for rank in ranks]
        job = merge_states(states)
        assert (job["epoch"], job["offset"], job["shard"]) == (0, 12, None)
        read(ranks[3], 1)
        with pytest.raises(FeedError, match=r"their taken differs \(3, 4\)"):
            merge_states(states[:3] + [ranks[3].state_dict()])
        with pytest.raises(FeedError, match="not every rank of one world once: shards 0/4, "
                                            "1/4, 2/4"):
            merge_states(states[:3])
    finally:
        for rank in ranks:
            rank.close()
    for resumed_from in (job, states[2]):
        after = []
        for r in range(3):
            with Consumer(endpoint, shard=(r, 3), state=resumed_from, timeout=30) as rank:
                batches = [as_json(b) for b in rank.epoch()]
            assert len(batches) == 4 and {b[0] for b in batches} == {0}
            after += [i for _, _, ids in batches for i in ids]
        assert Counter(before + after) == Counter(range(COUNT))

    with Consumer(daemons["unordered"], shard=(0, 2), timeout=30) as rank:
        read(rank, 2)
        unordered = rank.state_dict()
    with pytest.raises(FeedError, match="ranks of an unordered feed take their batches in "
                                        "different orders"):
        Consumer(daemons["unordered"], shard=(1, 2), state=unordered, timeout=30)


def test_states_of_another_plan_or_feed_are_refused_with_the_reason(daemons):
    endpoint = daemons["ordered"]
    with Consumer(endpoint, timeout=30) as consumer:
        read(consumer, 2)
        state = consumer.state_dict()
        reseeded = {**state, "plan": {**state["plan"], "seed": 8}}
        with pytest.raises(FeedError, match=f"saved from another plan.*batch.seed: 8 in the "
                                            f"state, 7 at {endpoint}"):
            consumer.load_state_dict(reseeded)
        with pytest.raises(FeedError, match="this state is of feed 'val', not 'train'"):
            consumer.load_state_dict({**state, "feed": "val"})
        with pytest.raises(ValueError, match=r"malformed mongofeed state \(taken, shard\)"):
            consumer.load_state_dict({**state, "taken": -1, "shard": [2, 2]})
        with pytest.raises(ValueError, match="version 2"):
            consumer.load_state_dict({**state, "v": 2})
        assert read(consumer, 1)[0][:2] == [0, 2]  # the refused loads left the session alone
    with pytest.raises(ValueError, match="start_epoch or state, not both"):
        Consumer(endpoint, start_epoch=1, state=state)


def test_ranks_find_their_shard_under_torchrun_variables(daemons):
    """Two processes with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), one with
    shard="auto", the other with the default: disjoint, equal halves of the epoch."""
    endpoint = daemons["ordered"]
    halves = [resume_in_new_process(endpoint, None, "epoch", "auto" if rank == 0 else None,
                                    env={"RANK": str(rank), "WORLD_SIZE": "2",
                                         "LOCAL_RANK": str(rank)})["batches"]
              for rank in range(2)]
    assert len(halves[0]) == len(halves[1]) == GLOBAL // 2
    assert Counter(i for half in halves for _, _, ids in half for i in ids) == Counter(
        range(COUNT))


def test_ranks_of_a_job_share_their_hosts_daemons(daemons):
    """One daemon per host (--shard h/2), 2 ranks per host numbered host by host: each rank
    takes its part of its own host's daemon, and together they read every document once.
    A rank that reads another host's daemon is told which one is its own."""
    endpoints = daemons["shards"]
    parts = []
    for rank in range(4):
        with Consumer(endpoints[rank // 2], shard=JobRank(rank, 4), timeout=30) as consumer:
            parts.append([i for b in consumer.epoch() for i in b.arrays["idx"].tolist()])
    assert len({len(part) for part in parts}) == 1
    assert Counter(i for part in parts for i in part) == Counter(range(COUNT))
    with pytest.raises(ValueError, match=r"rank 2 of 4 \(given\) reads .*--shard 0/2.*belongs "
                                         r"to the daemon of --shard 1/2"):
        Consumer(endpoints[0], shard=JobRank(2, 4), timeout=30)


def test_tf_dataset_saves_its_state_in_a_checkpoint_and_follows_fit_epochs(daemons, tmp_path):
    """A tf.train.Checkpoint keeps the dataset's position: a new dataset restored from it
    continues with the next batch. FollowFitEpochs's alignment makes the next iteration a
    given epoch, whole."""
    tf = pytest.importorskip("tensorflow")
    from mongofeed.tf import dataset

    endpoint = daemons["ordered"]
    with Consumer(endpoint, timeout=30) as whole:
        expected = [ids for _, _, ids in read(whole, 2 * GLOBAL)]

    def ids_of(elements):
        return [inputs["idx"].numpy().tolist() for inputs, _ in elements]

    train = dataset(endpoint, timeout=30)
    before = ids_of(train.take(5))
    path = tf.train.Checkpoint(feed=train.feed_state).save(str(tmp_path / "ckpt"))
    restored = dataset(endpoint, timeout=30)
    tf.train.Checkpoint(feed=restored.feed_state).restore(path)
    assert before + ids_of(restored) + ids_of(restored) == expected[:5] + expected[5:]
    train.feed_state.align_epoch(1)
    assert ids_of(train) == expected[GLOBAL:]


def test_tf_input_pipelines_read_disjoint_equal_parts(daemons):
    """mongofeed.tf.dataset_fn, as strategy.distribute_datasets_from_function calls it: two
    input pipelines (InputContexts built here, as MultiWorkerMirroredStrategy's two workers
    get them), each an equal, disjoint half of the epoch."""
    tf = pytest.importorskip("tensorflow")
    from mongofeed.tf import dataset_fn

    make = dataset_fn(daemons["ordered"], timeout=30)
    halves = [[i for inputs, _ in make(tf.distribute.InputContext(2, pipeline, 1))
               for i in inputs["idx"].numpy().tolist()] for pipeline in range(2)]
    assert len(halves[0]) == len(halves[1]) == COUNT // 2
    assert Counter(halves[0] + halves[1]) == Counter(range(COUNT))


def test_torch_dataset_resumes_through_its_state_protocol(daemons):
    """What torchdata's StatefulDataLoader calls: state_dict between batches, and
    load_state_dict on a new dataset before iterating it."""
    pytest.importorskip("torch", reason="PyTorch is not installed")
    from torch.utils.data import DataLoader

    from mongofeed.torch import IterableDataset

    endpoint = daemons["ordered"]
    with Consumer(endpoint, timeout=30) as whole:
        expected = [ids for _, _, ids in read(whole, GLOBAL)]
    train = IterableDataset(endpoint, as_dict=True, timeout=30)
    before = []
    for batch in DataLoader(train, batch_size=None):
        before.append(batch["idx"].tolist())
        if len(before) == 7:
            state = train.state_dict()
            break
    train.close()
    resumed = IterableDataset(endpoint, as_dict=True, timeout=30)
    resumed.load_state_dict(state)
    after = [batch["idx"].tolist() for batch in DataLoader(resumed, batch_size=None)]
    resumed.close()
    assert before + after == expected
