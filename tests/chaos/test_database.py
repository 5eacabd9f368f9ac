"""The database goes away mid-epoch, comes back or never does; it refuses us at the start."""

from __future__ import annotations

import time

import pytest

from mongofeed import Consumer, FeedTimeout
from mongofeed.testing import Daemon, wait_until
from tests.chaos.proxy import Proxy
from tests.chaos.support import BATCHES, assert_exactly_once, feed_config, read_batches
from tests.support import sample_config, write_toml

OUTAGE_S = 4


@pytest.fixture
def proxy(mongo_uri):
    proxy = Proxy(mongo_uri)
    yield proxy
    proxy.close()


def waiting_for_database(daemon) -> bool:
    return any(w["state"] == "waiting for database" for w in daemon.status()["workers"])


def test_outage_mid_epoch_is_waited_out_and_the_epoch_completes_exactly_once(
        tmp_path, proxy, db):
    config = feed_config(tmp_path, proxy.uri, db, serve={"max_pending": 4})
    with Daemon(config, workers=2) as daemon, \
            Consumer(daemon.bind, "train", timeout=60) as consumer:
        batches = read_batches(consumer, BATCHES // 2)
        proxy.cut()
        started = time.monotonic()
        assert wait_until(lambda: waiting_for_database(daemon), 15), daemon.status()
        time.sleep(OUTAGE_S)
        proxy.restore()
        batches += read_batches(consumer, 2 * BATCHES - len(batches))
        print(f"outage of {time.monotonic() - started:.1f} s waited out")
        status = daemon.status()
    assert_exactly_once(batches, epochs=(0, 1))
    assert any("cannot reach MongoDB" in e for e in status["errors"] + [
        w["last_error"] or "" for w in status["workers"]]), status


def test_database_that_never_comes_back_gives_the_consumer_a_clear_error(tmp_path, proxy, db):
    config = feed_config(tmp_path, proxy.uri, db)
    with Daemon(config, workers=1) as daemon, \
            Consumer(daemon.bind, "train", timeout=5) as consumer:
        read_batches(consumer, 2)
        proxy.cut()
        started = time.monotonic()
        with pytest.raises(FeedTimeout, match="database reachable"):
            for _ in range(2 * BATCHES):
                consumer.get()
        assert time.monotonic() - started < 60
        assert waiting_for_database(daemon)


def test_unreachable_database_at_start_is_one_clear_message_with_no_password(tmp_path, db):
    uri = "mongodb://trainer:s3cr3t-pw@127.0.0.1:9/?serverSelectionTimeoutMS=1000"
    config = write_toml(tmp_path / "feed.toml", sample_config(uri, db.name))
    daemon = Daemon(config, workers=1)
    with pytest.raises(RuntimeError, match="did not become ready") as failed:
        daemon.start()
    assert daemon.process.returncode not in (0, None)
    message = str(failed.value)
    assert "cannot reach MongoDB at mongodb://trainer:***@127.0.0.1:9" in message
    assert "s3cr3t-pw" not in message
