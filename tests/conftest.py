"""Shared fixtures: the test server, a client to it, a fresh database per test, and a counter of
the connections the server has accepted.

The server is the one named by ``MONGOFEED_TEST_URI`` (``make test`` starts a private FerretDB
and sets it, with ``MONGOFEED_TEST_METRICS_URL``). Without it, the first test that needs a
server starts a private FerretDB through ``mongofeed.dev.server`` (building it on first use,
which needs Go) and stops it when the session ends, so a plain ``pytest`` works too.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass

import pymongo
import pytest

from mongofeed.dev import server as ferretdb
from mongofeed.testing import ServerCounters

# Daemons started by the tests keep their plan caches here, not in the user's cache folder.
PLAN_CACHE_HOME = tempfile.mkdtemp(prefix="mongofeed-test-cache-")
os.environ["XDG_CACHE_HOME"] = PLAN_CACHE_HOME
atexit.register(shutil.rmtree, PLAN_CACHE_HOME, ignore_errors=True)


@dataclass(frozen=True)
class ServerInfo:
    uri: str
    metrics_url: str | None  # FerretDB's Prometheus endpoint; None for a real MongoDB


class _PrivateFerretDB:
    """A FerretDB started for this pytest session only; stop() is idempotent."""

    def __init__(self) -> None:
        self.name = f"pytest-{os.getpid()}"
        self.started = False

    def start(self) -> ServerInfo:
        self.started = True  # set first: an interrupted start still gets stopped
        atexit.register(self.stop)
        try:
            server = ferretdb.start(self.name)
        except ferretdb.ServerError as error:
            self.stop()
            pytest.exit(
                f"could not start a private FerretDB for the tests:\n{error}\n"
                "Run the suite with `make test` (or `python -m mongofeed.dev test`), or set "
                "MONGOFEED_TEST_URI to a server.",
                returncode=3,
            )
        return ServerInfo(server.uri, server.metrics_url)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            ferretdb.discard(self.name)
        except ferretdb.ServerError as error:
            print(f"conftest: could not stop FerretDB '{self.name}': {error}", file=sys.stderr)


@pytest.fixture(scope="session")
def test_server():
    """The server under test: MONGOFEED_TEST_URI, or a private FerretDB for this session."""
    uri = os.environ.get("MONGOFEED_TEST_URI")
    if uri:
        yield ServerInfo(uri, os.environ.get("MONGOFEED_TEST_METRICS_URL") or None)
        return
    server = _PrivateFerretDB()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_uri(test_server) -> str:
    """The MongoDB URI of the test server."""
    return test_server.uri


@pytest.fixture(scope="session")
def mongo_client(mongo_uri):
    """A pymongo client to the test server, shared by the session."""
    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
    client.admin.command("ping")
    yield client
    client.close()


@pytest.fixture
def db(mongo_client):
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"mongofeed_test_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@pytest.fixture(scope="session")
def accepted_connections(test_server):
    """A callable: how many connections the server has accepted so far.

    FerretDB: ``ferretdb_client_accepts_total`` from its metrics endpoint. A real MongoDB:
    ``serverStatus().connections.totalCreated``.
    """
    counters = ServerCounters(test_server.uri, test_server.metrics_url)
    yield lambda: counters.read()["conns"]
    counters.close()
