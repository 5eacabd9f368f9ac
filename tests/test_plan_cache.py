"""The plan cache: files that hold a listing, used at start only while the server's check of
the collection is unchanged. Unit tests of the files, then real daemons on FerretDB: a
restart plans from the cache (no listing query), a changed collection is listed again."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
from bson import ObjectId

from mongofeed import Consumer
from mongofeed.daemon.planner import Ids
from mongofeed.daemon.planner.cache import PlanCache, cache_key
from mongofeed.testing import Daemon
from tests.support import insert_samples, sample_config, write_toml


@pytest.mark.parametrize("values", [
    [ObjectId() for _ in range(50)], list(range(-5, 45)), ["a", 2, 3.5, ObjectId()],
], ids=["objectid", "int64", "objects"])
def test_a_stored_listing_comes_back_while_the_check_holds(tmp_path, values):
    cache = PlanCache(tmp_path / "plans")
    ids = Ids.from_values(values)
    check = {"documents": len(values), "ends": [ObjectId(), None]}
    key = cache_key("mongodb://h", "db", "c", {"split": "train"}, {"order": "full"})
    path = cache.store(key, {"check": check, "digest": ids.digest(), "count": len(ids)}, ids)
    hit = cache.load(key, dict(check))
    assert hit["path"] == path and hit["digest"] == ids.digest() and hit["count"] == len(ids)
    assert hit["ids"].kind == ids.kind
    assert [hit["ids"][i] for i in range(len(ids))] == [ids[i] for i in range(len(ids))]
    assert cache.load(key, {**check, "documents": len(values) + 1}) is None  # stale
    assert cache.load(cache_key("mongodb://h", "db", "c", {}, {"order": "full"}), check) is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "plans").st_mode) == 0o700
    assert os.listdir(tmp_path / "plans") == [os.path.basename(path)]  # no temporary left


def test_an_unreadable_file_is_listed_again_with_a_warning(tmp_path, caplog):
    cache = PlanCache(tmp_path)
    ids = Ids.from_values(np.arange(10).tolist())
    path = cache.store("k.plan", {"check": {"documents": 10}, "digest": "d", "count": 10}, ids)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)  # one id short
    with caplog.at_level(logging.WARNING):
        assert cache.load("k.plan", {"documents": 10}) is None
    assert "unreadable" in caplog.text


def start(path) -> tuple[Daemon, dict]:
    """A daemon on ``path`` and its status once ready."""
    daemon = Daemon(path, workers=1).start()
    return daemon, daemon.status()


def first_batches(daemon: Daemon, feed: str) -> list:
    with Consumer(daemon.bind, feed=feed) as consumer:
        return [consumer.get().arrays["idx"].tolist() for _ in range(3)]


def test_a_restart_plans_from_the_cache_until_the_collection_changes(
        mongo_uri, db, tmp_path):
    insert_samples(db.samples, 3000)
    path = write_toml(tmp_path / "c.toml", sample_config(
        mongo_uri, db.name, batch={"size": 16},
        feeds={"full": {"filter": {}, "shuffle": True}, "win": {"filter": {},
                                                                "shuffle": "window"}},
        serve={"plan_cache": str(tmp_path / "plans")}))
    runs = []
    for _ in range(2):
        daemon, status = start(path)
        try:
            runs.append((status, {f: first_batches(daemon, f) for f in
                                           ("full", "win")}))
        finally:
            daemon.stop()
    (first, first_batches_), (second, second_batches_) = runs
    for feed in ("full", "win"):
        assert first["feeds"][feed]["planned"]["listed"]
        assert first["feeds"][feed]["planned"]["stored"].startswith(str(tmp_path))
        assert second["feeds"][feed]["planned"]["from_cache"] == \
            first["feeds"][feed]["planned"]["stored"]
        assert "documents in the collection 3000" in second["feeds"][feed]["planned"][
            "checked"]
        assert second["feeds"][feed]["plan"] == first["feeds"][feed]["plan"]
    assert second_batches_ == first_batches_  # the same plan, batch for batch
    # Reloaded: the same documents under new _ids (the count and size stay, which is
    # all that FerretDB's check at start sees): listed again, not the stale plan.
    db.samples.delete_many({})
    insert_samples(db.samples, 3000)
    daemon, reloaded = start(path)
    try:
        for feed in ("full", "win"):
            assert reloaded["feeds"][feed]["planned"]["listed"], reloaded["feeds"][feed]
        assert first_batches(daemon, "full") == first_batches_["full"]
    finally:
        daemon.stop()
    db.samples.insert_one({"i": 3000, "x": np.zeros(4, np.float32).tobytes(), "y": 0,
                           "split": "train"})
    daemon, third = start(path)
    daemon.stop()
    for feed in ("full", "win"):
        assert third["feeds"][feed]["planned"]["listed"]
        assert third["feeds"][feed]["plan"]["ids"] == 3001
