"""What used to kill a worker or fail a session, through the real daemon: _ids that Python
merges (true and 1), _ids so long that one batch's $in passes 16 MiB, a server error that
pymongo itself would retry, and decode = "image" without Pillow. Every batch is delivered
exactly once, or the session gets a FeedError naming what failed; no worker restarts.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from bson import ObjectId

from mongofeed import Consumer, FeedError
from mongofeed.testing import Daemon, free_port_pair
from tests.chaos.proxy import Proxy
from tests.support import REPO, write_toml

TIMEOUT_S = 60
SERVE_TIMEOUT_S = 60
NUMBER = {"n": {"decode": "scalar", "dtype": "int64"}}  # each document's own number

# 1.0 is not among them: MongoDB and FerretDB both refuse it next to 1 (a duplicate key);
# tests/test_source.py checks that the worker would still keep the two apart.
MERGED_IN_PYTHON = [True, 1, False, 0, 2.5, "1", ObjectId()]
LONG_ID_CHARS = 4_700_000  # 4 of them: a $in of 18.8 MB, over the 16 MiB command cap
LONG_IDS = 8
LONG_BATCH = 4
INJECTED_ERRORS = 3  # pymongo retries a read once itself: the worker sees the second


def config(tmp_path: Path, uri: str, db, batch: int, fields=None, **feed) -> Path:
    return write_toml(tmp_path / "feed.toml", {
        "source": {"uri": uri, "database": db.name, "collection": "docs"},
        "feeds": {"train": {"filter": {}, "shuffle": True, **feed}},
        "batch": {"size": batch},
        "fields": fields or NUMBER,
        "output": {"inputs": list(fields or NUMBER)},
        "serve": {"max_pending": 2},  # no reading far ahead: every query costs a scan here
    })


def never_restarted(daemon) -> bool:
    return all(worker["restarts"] == 0 for worker in daemon.status()["workers"])


def numbers_per_epoch(consumer: Consumer, epochs: int) -> list[Counter]:
    return [Counter(int(n) for batch in consumer.epoch() for n in batch.arrays["n"])
            for _ in range(epochs)]


def test_ids_that_python_merges_are_each_served_once_per_epoch(tmp_path, mongo_uri, db):
    """true and 1 (false and 0) are one dict key in Python: one document came twice, the
    other never. One batch holds them all, so one query returns both."""
    db.docs.insert_many([{"_id": i, "n": n} for n, i in enumerate(MERGED_IN_PYTHON)])
    path = config(tmp_path, mongo_uri, db, batch=len(MERGED_IN_PYTHON))
    with Daemon(path, workers=1) as daemon, \
            Consumer(daemon.bind, "train", timeout=TIMEOUT_S) as consumer:
        epochs = numbers_per_epoch(consumer, 2)
        assert never_restarted(daemon)
    everyone_once = Counter(range(len(MERGED_IN_PYTHON)))
    assert epochs == [everyone_once, everyone_once]


def test_ids_too_long_for_one_query_are_read_in_several(tmp_path, mongo_uri, db):
    """pymongo refuses to send a command over 16 MiB (DocumentTooLarge)."""
    for n in range(LONG_IDS):  # ids differ in their first character: cheap to compare
        db.docs.insert_one({"_id": chr(ord("a") + n) * LONG_ID_CHARS, "n": n})
    path = config(tmp_path, mongo_uri, db, batch=LONG_BATCH)
    with Daemon(path, workers=1) as daemon, \
            Consumer(daemon.bind, "train", timeout=TIMEOUT_S) as consumer:
        [epoch] = numbers_per_epoch(consumer, 1)
        assert never_restarted(daemon)
    assert epoch == Counter(range(LONG_IDS))


@pytest.fixture
def flaky_server(mongo_uri):
    """A proxy that fails the workers' first INJECTED_ERRORS batch queries with code 262
    (ExceededTimeLimit, which a mongos returns when a shard does not answer in time)."""
    failures = itertools.count()

    def answer(command: dict):
        wanted = command.get("find") == "docs" and "$in" in command.get("filter", {}).get("_id", {})
        if wanted and next(failures) < INJECTED_ERRORS:
            return {"ok": 0.0, "code": 262, "codeName": "ExceededTimeLimit",
                    "errmsg": "injected by the test proxy"}
        return None

    proxy = Proxy(mongo_uri, answer=answer)
    yield proxy
    proxy.close()


def test_a_server_error_pymongo_would_retry_is_retried(tmp_path, flaky_server, db):
    db.docs.insert_many([{"_id": i, "n": i} for i in range(8)])
    path = config(tmp_path, flaky_server.uri, db, batch=4)
    with Daemon(path, workers=1) as daemon, \
            Consumer(daemon.bind, "train", timeout=TIMEOUT_S) as consumer:
        [epoch] = numbers_per_epoch(consumer, 1)
        [worker] = daemon.status()["workers"]
    assert epoch == Counter(range(8))
    assert "injected by the test proxy" in worker["last_error"]  # shown while it waited
    assert worker["restarts"] == 0


def fake_pillow(folder: Path, fails: str) -> dict:
    """The environment of a daemon whose ``import PIL`` raises ImportError where ``fails``
    (a Python condition) is true, while the real Pillow stays installed."""
    package = folder / "PIL"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import multiprocessing\n"
        f"if {fails}:\n"
        "    raise ImportError('No module named PIL (simulated by the test)')\n")
    (package / "Image.py").write_text("")
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


IMAGE = {"img": {"decode": "image", "dtype": "uint8", "shape": [2, 2, 1]}}


def test_image_without_pillow_is_refused_before_serving(tmp_path, mongo_uri, db):
    db.docs.insert_many([{"_id": i, "img": b"png"} for i in range(4)])
    path = config(tmp_path, mongo_uri, db, batch=2, fields=IMAGE)
    done = subprocess.run(
        [sys.executable, "-m", "mongofeed", "serve", "--config", str(path), "--workers", "1",
         "--bind", f"tcp://127.0.0.1:{free_port_pair()}"],
        capture_output=True, text=True, cwd=REPO, timeout=SERVE_TIMEOUT_S,
        env={**os.environ, **fake_pillow(tmp_path / "nopil", fails="True")})
    assert done.returncode != 0
    assert "mongofeed ready" not in done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert "fields.img.decode = 'image' needs Pillow" in done.stderr
    assert "pip install 'mongofeed[image]'" in done.stderr


def test_image_without_pillow_in_a_worker_fails_the_session_not_the_worker(
        tmp_path, mongo_uri, db):
    """Pillow imports in the daemon (the config check passes) but not in its workers: any
    exception the worker does not expect ends that batch's session, naming where."""
    db.docs.insert_many([{"_id": i, "img": b"png"} for i in range(4)])
    path = config(tmp_path, mongo_uri, db, batch=2, fields=IMAGE, shuffle=False)
    env = fake_pillow(tmp_path / "nopil", fails="multiprocessing.parent_process() is not None")
    with Daemon(path, workers=1, env=env) as daemon:
        with Consumer(daemon.bind, "train", timeout=TIMEOUT_S) as consumer, \
                pytest.raises(FeedError) as failed:
            consumer.get()
        [worker] = daemon.status()["workers"]
    message = str(failed.value)
    assert "feed 'train', epoch 0, batch 0: " in message
    assert "_id 0: field 'img': ImportError: decode = 'image' needs Pillow" in message
    assert worker["restarts"] == 0
