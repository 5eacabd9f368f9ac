"""CurveZMQ off loopback: without the right key a client gets nothing; no keys, no bind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mongofeed import Consumer, FeedTimeout
from mongofeed.security import keygen
from mongofeed.testing import Daemon, free_port_pair
from tests.chaos.support import (
    BATCHES,
    assert_exactly_once,
    curve_daemon,
    exposed,
    feed_config,
    read_batches,
)
from tests.support import REPO

REFUSED_WITHIN_S = 3


def test_non_loopback_bind_without_keys_is_refused_before_starting(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    done = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(config),
                           *exposed(free_port_pair())], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "not a loopback address" in done.stderr and "--insecure" in done.stderr
    assert "mongofeed ready" not in done.stdout


def test_insecure_flag_allows_a_non_loopback_bind(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    daemon = Daemon(config, workers=1)
    daemon.command += [*exposed(daemon.port), "--insecure"]
    with daemon, Consumer(daemon.bind, "train", timeout=30) as consumer:
        assert len(read_batches(consumer, 2)) == 2


def test_only_listed_client_keys_get_data(tmp_path, mongo_uri, db):
    daemon, keys = curve_daemon(tmp_path, mongo_uri, db)
    with daemon:
        with pytest.raises(FeedTimeout):  # no keys at all
            Consumer(daemon.bind, "train", timeout=REFUSED_WITHIN_S)
        with pytest.raises(FeedTimeout):  # a key pair the daemon does not list
            Consumer(daemon.bind, "train", timeout=REFUSED_WITHIN_S,
                     server_key=keys["server_public"], client_key=keys["stranger_secret"])
        with Consumer(daemon.bind, "train", timeout=30, server_key=keys["server_public"],
                      client_key=keys["trainer_secret"]) as trainer:
            batches = read_batches(trainer, BATCHES)
    assert_exactly_once(batches, epochs=(0,))


def test_a_server_key_without_client_keys_is_refused(tmp_path, mongo_uri, db):
    _, server_secret = keygen(str(tmp_path / "keys"), "daemon")
    config = feed_config(tmp_path, mongo_uri, db)
    done = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(config),
                           "--server-key", server_secret], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 2 and "serve.client_keys" in done.stderr
