"""Shared memory as pure logic and files: the region format and its checks, the daemon's slab
accounting, the consumer's leases, the re-issue rule, and the stale-file cleanup."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import zmq

from mongofeed.daemon.planner import Plan, Shard
from mongofeed.daemon.sessions import SessionTable
from mongofeed.daemon.slabs import SessionSlabs
from mongofeed.leases import JoinBuffers, Slabs
from mongofeed.portable import remove_stale_shared_memory, shared_memory_name
from mongofeed.region import (
    ARRAY_ALIGN_BYTES,
    HEADER_BYTES,
    Region,
    RegionError,
    SlabLayout,
)
from mongofeed.wire import ArraySpec, BatchHeader, Schema, frame_sizes

SPECS = (ArraySpec("image", "uint8", (3, 5)), ArraySpec("label", "int64", ()),
         ArraySpec("tokens", "int32", (None,), (7,)))
SCHEMA = Schema("train", 4, SPECS)


def test_layout_gives_each_array_an_aligned_place_for_a_full_batch():
    layout = SlabLayout.of(SPECS, 4)
    assert layout.room == [60, 32, 112]
    assert layout.offsets == [0, 64, 128]
    assert all(o % ARRAY_ALIGN_BYTES == 0 for o in layout.offsets)
    assert layout.slab_bytes == 256


@pytest.fixture
def region(tmp_path):
    made = Region.create(str(tmp_path / "mongofeed-1-r"), 3, SlabLayout.of(SPECS, 4).slab_bytes)
    yield made
    made.remove()


def test_a_batch_written_by_a_worker_is_read_in_place_by_the_consumer(region):
    layout = SlabLayout.of(SPECS, 4)
    arrays = [np.arange(30, dtype=np.uint8).reshape(2, 3, 5), np.array([7, 8]),
              np.full((2, 6), 9, np.int32)]
    Region.open(region.path).write(2, layout, arrays)
    reader = Region.attach(region.path, region.nonce, region.slabs, region.slab_bytes)
    base = reader.slab_bytes_view(2)
    header = BatchHeader.of(0, 0, arrays, SPECS)
    views = [np.ndarray(p.shape, p.dtype, base, offset)
             for p, offset in zip(SCHEMA.placements(header), layout.offsets, strict=True)]
    for view, array in zip(views, arrays, strict=True):
        assert np.array_equal(view, array)
        assert not view.flags.writeable and view.base is base
    assert os.stat(region.path).st_mode & 0o777 == 0o600
    with pytest.raises(RegionError, match="slab 3 is not one of the 3"):
        reader.slab_bytes_view(3)
    with pytest.raises(RegionError, match="exceeds"):
        Region.open(region.path).write(0, layout, [np.zeros((5, 3, 5), np.uint8)] + arrays[1:])


def test_a_consumer_attaches_only_to_the_region_its_daemon_announced(region, tmp_path):
    with pytest.raises(RegionError, match="not the region the daemon announced"):
        Region.attach(region.path, b"\0" * 16, region.slabs, region.slab_bytes)
    with pytest.raises(RegionError, match="cannot open"):
        Region.attach(str(tmp_path / "elsewhere"), region.nonce, 3, region.slab_bytes)
    with pytest.raises(RegionError, match="mode 0600"):
        Region.attach(region.path, region.nonce, 4, region.slab_bytes)  # another size
    os.chmod(region.path, 0o644)
    with pytest.raises(RegionError, match="mode 0600"):
        Region.attach(region.path, region.nonce, region.slabs, region.slab_bytes)
    impostor = tmp_path / "impostor"
    impostor.write_bytes(b"\0" * (HEADER_BYTES + 3 * region.slab_bytes))
    impostor.chmod(0o600)
    with pytest.raises(RegionError, match="not a mongofeed region"):
        Region.attach(str(impostor), region.nonce, 3, region.slab_bytes)
    with pytest.raises(FileExistsError):
        Region.create(region.path, 1, 64)  # never someone else's file


def test_slabs_go_free_task_lent_released_and_never_to_two_owners(tmp_path):
    slabs = SessionSlabs.create(tmp_path, 3, SlabLayout.of(SPECS, 4))
    assert os.path.basename(slabs.path).startswith(f"mongofeed-{os.getpid()}-")
    taken = [slabs.acquire() for _ in range(3)]
    assert taken == [0, 1, 2] and slabs.acquire() is None
    slabs.lend(0)
    slabs.lend(1)
    assert slabs.release([0]) and not slabs.release([0])  # twice: refused
    assert not slabs.release([2])  # never lent
    assert slabs.acquire() == 0 and slabs.acquire() is None
    slabs.give_back(2)
    assert slabs.status()["free"] == 1 and slabs.status()["lent"] == 1
    slabs.close()
    assert not os.path.exists(slabs.path)


def test_slabs_sent_without_a_copy_are_free_once_zeromq_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr("mongofeed.wire.batches.FRAME_MAX_BYTES", zmq.COPY_THRESHOLD)
    specs = (ArraySpec("x", "uint8", (100_000,)),)
    layout = SlabLayout.of(specs, 2)
    slabs = SessionSlabs.create(tmp_path, 2, layout)
    slab = slabs.acquire()
    Region.open(slabs.path).write(slab, layout, [np.full((2, 100_000), 5, np.uint8)])
    placements = Schema("f", 2, specs).placements(BatchHeader(0, 0, 2))
    frames, trackers = slabs.frames(slab, placements)
    assert [len(memoryview(f)) for f in frames] == frame_sizes(200_000)
    assert len(trackers) == 3  # the 3,392-byte tail is copied
    context = zmq.Context()
    try:
        pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart(frames, copy=False)
        slabs.sent(slab, trackers)
        del frames
        assert b"".join(pull.recv_multipart()) == b"\5" * 200_000
        for tracker in trackers:
            tracker.wait(5)
        slabs.poll_sent()
        assert slabs.status()["free"] == 2 and slabs.status()["sending"] == 0
    finally:
        context.destroy(linger=0)
        slabs.close()


def slab_bytes() -> np.ndarray:
    """Bytes that stand for a slab: like ``Region.slab_bytes_view``, not another array's view
    (numpy would make that array the base of every view)."""
    return np.frombuffer(bytearray(64), np.uint8)


def test_a_lease_ends_when_the_last_array_viewing_the_slab_is_gone():
    book = Slabs()
    base = slab_bytes()
    lease = book.lease(base, 4)
    view = np.ndarray((4,), np.int64, base, 8)
    del base
    assert book.take_released() == ()
    assert book.hand(lease, limit=1) and book.held == 1
    converted = book.lease(slab_bytes(), 5)  # every array converted on receipt
    assert book.take_released() == (5,)
    assert book.hand(converted, limit=1)  # nothing views it, so it is never refused
    kept = slab_bytes()
    assert not book.hand(book.lease(kept, 6), limit=1)  # holds one already: a copy instead
    del view
    gc.collect()
    assert book.take_released() == (4,) and book.held == 0
    del kept
    assert book.take_released() == (6,) and book.pending == 0


def test_join_buffers_are_reused_once_their_arrays_are_gone():
    buffers = JoinBuffers(kept=1)
    first = buffers.take(1000)
    array = np.frombuffer(first, np.float32).reshape(10, 25)
    address = array.__array_interface__["data"][0]
    del first
    second = buffers.take(1000)  # the first is still viewed
    assert second.__array_interface__["data"][0] != address
    del array, second
    third = buffers.take(1000)
    assert third.__array_interface__["data"][0] == address and third.flags.writeable


def test_a_reissued_task_is_a_new_attempt_and_the_old_one_is_dropped():
    table = SessionTable({"train": Plan(list(range(12)), 4, seed=0)}, max_pending=2,
                         max_sessions=4)
    session = table.open("train", Shard(0, 1), 0, True, schema=SCHEMA)
    session.active = True
    table.plan_tasks()
    first = table.take_pending()
    table.requeue([first.id])  # its worker died
    assert first.attempt == 2 and table.take_pending() is first
    assert table.finish(first.id, 1) == (None, None)  # the dead worker's batch: dropped
    assert table.finish(first.id, 2) == (first, session)
    assert table.finish(first.id, 2) == (None, None)  # a duplicate of the delivered one


def test_stale_region_files_are_removed_only_when_their_daemon_is_gone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"mongofeed-{int(dead.stdout)}-abc"
    live = tmp_path / f"mongofeed-{os.getppid()}-abc"
    mine = tmp_path / shared_memory_name("old")  # our own pid: a previous incarnation's
    other = tmp_path / "not-ours-1-abc"
    for path in (stale, live, mine, other):
        open(path, "w").close()
    remove_stale_shared_memory(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    remove_stale_shared_memory(tmp_path, owner=os.getppid())  # its workers, once it died
    assert [p.name for p in tmp_path.iterdir()] == [other.name]
