"""`mongofeed serve` refuses bad input before serving: one clear message that names what to
fix, a non-zero exit, no process left behind and its ports free again."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pymongo
import pytest

from mongofeed.dev.portable import port_is_free
from mongofeed.security import redact_uri
from mongofeed.testing import free_port_pair
from tests.chaos.support import feed_config
from tests.support import REPO, insert_samples, sample_config, write_toml

SERVE_TIMEOUT_S = 60
MARKER = "MONGOFEED_TEST_MARKER"  # inherited by every process the daemon starts


def processes_with(marker: str) -> list[int]:
    """Pids of the live processes whose environment holds ``marker`` (NAME=VALUE)."""
    name, value = marker.split("=")
    pids = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(name) == value:
                pids.append(process.pid)
        except psutil.Error:
            continue  # gone meanwhile, or not ours to read
    return pids


def refused(config: Path, port: int, *args: str, env: dict | None = None) -> str:
    """Run `mongofeed serve` expecting a refusal; returns its one error line."""
    marker = f"{MARKER}={uuid.uuid4().hex}"
    name, value = marker.split("=")
    done = subprocess.run(
        [sys.executable, "-m", "mongofeed", "serve", "--config", str(config), "--workers", "1",
         "--bind", f"tcp://127.0.0.1:{port}", *args],
        capture_output=True, text=True, cwd=REPO, timeout=SERVE_TIMEOUT_S,
        env={**os.environ, **(env or {}), name: value})
    assert done.returncode != 0, done.stdout
    assert "mongofeed ready" not in done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert processes_with(marker) == []
    return errors[0]


def test_missing_collection(tmp_path, mongo_uri, db):
    config = write_toml(tmp_path / "feed.toml", sample_config(mongo_uri, db.name, "absent"))
    port = free_port_pair()
    error = refused(config, port)
    assert f"collection {db.name}.absent does not exist" in error
    assert "source.collection" in error
    assert port_is_free(port) and port_is_free(port + 1)


def test_filter_that_selects_nothing(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db,
                         feeds={"train": {"filter": {"split": "no such split"}}})
    error = refused(config, free_port_pair())
    assert "feed 'train'" in error and "selects 0 documents" in error
    assert f"{db.name}.samples" in error


def test_data_port_already_in_use(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        error = refused(config, port)
        assert f"cannot bind tcp://127.0.0.1:{port}" in error and "--bind" in error
        assert port_is_free(port + 1)  # the control socket it had bound is released


def test_a_seed_the_planner_cannot_take_is_refused_before_ready(tmp_path, mongo_uri, db):
    """Issue 9, item 5: batch.seed = -1 passed the check, "ready" was printed, and the daemon
    died on the first consumer."""
    insert_samples(db["samples"], 32, val=16)
    config = write_toml(tmp_path / "feed.toml",
                        sample_config(mongo_uri, db.name, batch={"seed": -1}))
    error = refused(config, free_port_pair())
    assert "batch.seed must be from 0 to 2**63 - 1, not -1" in error


def test_malformed_endpoint(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    done = subprocess.run([sys.executable, "-m", "mongofeed", "serve", "--config", str(config),
                           "--bind", "foo"], capture_output=True, text=True, cwd=REPO,
                          timeout=SERVE_TIMEOUT_S)
    assert done.returncode == 2
    assert "serve.bind = 'foo' is not an endpoint like tcp://127.0.0.1:5555" in done.stderr
    assert "Traceback" not in done.stderr


def with_credentials(uri: str, user: str, password: str) -> str:
    """``uri``'s server with these credentials instead of its own."""
    host = urlsplit(uri).netloc.rsplit("@", 1)[-1]
    return f"mongodb://{user}:{password}@{host}/"


def refuses_bad_credentials(uri: str) -> bool:
    """Whether the server rejects a login with made-up credentials (FerretDB v1.24 refuses
    every SCRAM login; a server without authentication would let it in)."""
    client = pymongo.MongoClient(with_credentials(uri, "nobody", "wrong"),
                                 serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
    except pymongo.errors.OperationFailure:
        return True
    finally:
        client.close()
    return False


def test_wrong_credentials(tmp_path, mongo_uri, db):
    if not refuses_bad_credentials(mongo_uri):
        pytest.skip("the test server does not enforce authentication")
    uri = with_credentials(mongo_uri, "trainer", "s3cr3t-pw")
    config = write_toml(tmp_path / "feed.toml", sample_config(uri, db.name))
    error = refused(config, free_port_pair())
    assert f"authentication or authorization failed for {redact_uri(uri)}" in error
    assert "check the user and password" in error and "s3cr3t-pw" not in error
