"""The ground the project stands on: the test server keeps binary data byte-exact, a process
started with ``spawn`` can open its own client, and the server's connection counter is exact
enough to count the clients a test opens. And the development commands that provide that
server (``python -m mongofeed.dev``): they run with the standard library only, and the test
runner passes pytest's exit status on and leaves no server behind, however pytest ends."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pymongo
import pytest
from bson import Binary

from mongofeed.dev import server
from mongofeed.dev.portable import exit_status, venv_python

REPO = Path(__file__).resolve().parent.parent
# -S: no site-packages, so these commands prove that they need the standard library only.
DEV = [sys.executable, "-S", "-m", "mongofeed.dev"]
COMMAND_TIMEOUT_S = 60

SIZES = {"10KB": 10 * 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


def payload(size: int) -> bytes:
    """Deterministic bytes of every value (so no encoding can hide a change)."""
    return random.Random(size).randbytes(size)


def checksums(collection) -> dict[str, str]:
    return {
        doc["_id"]: hashlib.sha256(bytes(doc["data"])).hexdigest()
        for doc in collection.find({}, batch_size=1)
    }


def read_in_child(uri: str, db_name: str, coll_name: str, queue) -> None:
    """Run in a spawned process: open a client of its own and report the checksums."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
    try:
        queue.put(checksums(client[db_name][coll_name]))
    finally:
        client.close()


@pytest.fixture
def blobs(db):
    collection = db.blobs
    collection.insert_many(
        [{"_id": name, "data": Binary(payload(size))} for name, size in SIZES.items()]
    )
    return collection


@pytest.mark.parametrize("name", list(SIZES))
def test_binary_round_trips_byte_exact(blobs, name):
    doc = blobs.find_one({"_id": name})
    data = doc["data"]
    assert isinstance(data, bytes)
    assert len(data) == SIZES[name]
    assert data == payload(SIZES[name])


def test_spawned_process_reads_with_its_own_client(mongo_uri, blobs):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=read_in_child, args=(mongo_uri, blobs.database.name, blobs.name, queue)
    )
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    expected = {name: hashlib.sha256(payload(size)).hexdigest() for name, size in SIZES.items()}
    assert got == expected


def settled(read, quiet: float = 0.3, timeout: float = 10.0):
    """Read a value until it stays unchanged for ``quiet`` seconds; return it."""
    deadline = time.monotonic() + timeout
    value = read()
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, stable_since = now, time.monotonic()
    return value


def open_clients(uri: str, k: int) -> list[pymongo.MongoClient]:
    clients = []
    for _ in range(k):
        client = pymongo.MongoClient(uri, maxPoolSize=1, serverSelectionTimeoutMS=10_000)
        client.admin.command("ping")  # forces the monitor's and the pool's connections
        clients.append(client)
    return clients


def test_connection_counter_counts_each_client(mongo_uri, mongo_client, accepted_connections):
    mongo_client.admin.command("ping")  # the session client is connected before we count

    # pymongo opens a monitoring connection besides the pool's; measure the per-client count
    # (2 against FerretDB v1.24.2, which does not stream heartbeats, so no RTT monitor).
    before = settled(accepted_connections)
    clients = open_clients(mongo_uri, 1)
    per_client = settled(accepted_connections) - before
    for client in clients:
        client.close()
    assert per_client in (2, 3)

    k = 3
    before = settled(accepted_connections)
    clients = open_clients(mongo_uri, k)
    try:
        opened = settled(accepted_connections) - before
    finally:
        for client in clients:
            client.close()
    assert opened == k * per_client


# ---------------------------------------------------------------------------------------------
# python -m mongofeed.dev: the test server and the test runner

needs_ferretdb = pytest.mark.skipif(
    not server.is_built(), reason="FerretDB is not built (python3 -m mongofeed.dev server build)"
)


def dev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )


def process_exists(pid: int) -> bool:
    """Alive and not a zombie (checked with psutil, independently of mongofeed.dev)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_ferretdb
def test_build_is_a_no_op_once_built():
    built = dev("server", "build")
    assert built.returncode == 0, built.stderr
    assert f"already built: {server.BINARY}" in built.stderr


@needs_ferretdb
def test_server_start_status_uri_metrics_stop():
    name = f"foundation-{os.getpid()}"
    run_dir = server.run_dir(name)
    try:
        started = dev("server", "start", "--name", name)
        assert started.returncode == 0, started.stderr
        uri = started.stdout.strip()
        port = int((run_dir / "port").read_text())
        pid = int((run_dir / "pid").read_text())
        assert uri == f"mongodb://127.0.0.1:{port}/"
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
        try:
            client.admin.command("ping")
        finally:
            client.close()

        status = dev("server", "status", "--name", name)
        assert (status.returncode, status.stdout.strip()) == (0, f"running (pid {pid}) {uri}")
        assert dev("server", "uri", "--name", name).stdout.strip() == uri
        metrics_url = dev("server", "metrics-url", "--name", name).stdout.strip()
        with urllib.request.urlopen(metrics_url, timeout=10) as reply:
            assert "ferretdb_client_accepts_total" in reply.read().decode()

        again = dev("server", "start", "--name", name)
        assert again.returncode == 1
        assert f"FerretDB '{name}' is already running (pid {pid})" in again.stderr

        stopped = dev("server", "stop", "--name", name)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped FerretDB '{name}' (pid {pid})" in stopped.stderr
        assert not process_exists(pid)
        assert not (run_dir / "pid").exists()
        assert (run_dir / "data").is_dir()  # a named server keeps its data between runs
        status = dev("server", "status", "--name", name)
        assert (status.returncode, status.stdout.strip()) == (3, "not running")
        missing = dev("server", "uri", "--name", name)
        assert missing.returncode == 1
        assert f"FerretDB '{name}' is not running; start it with:" in missing.stderr
    finally:
        server.discard(name)
    assert not run_dir.exists()


def test_server_start_refuses_a_bad_name_or_a_used_port():
    bad = dev("server", "start", "--name", "../elsewhere")
    assert bad.returncode == 1
    assert "bad --name '../elsewhere'" in bad.stderr

    name = f"foundation-port-{os.getpid()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = dev("server", "start", "--name", name, "--port", str(port))
    assert refused.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in refused.stderr
    assert not server.run_dir(name).exists()


INNER_TEST = """
import os, pathlib, time, urllib.request

def test_reports_then_fails():
    with urllib.request.urlopen(os.environ["MONGOFEED_TEST_METRICS_URL"], timeout=10) as reply:
        assert reply.status == 200
    marker = pathlib.Path(os.environ["MARKER"])
    partial = marker.with_suffix(".partial")
    partial.write_text(f"{os.getpid()} {os.environ['MONGOFEED_TEST_URI']}")
    partial.rename(marker)
    proceed = marker.with_suffix(".proceed")
    deadline = time.monotonic() + 60
    while not proceed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert False, "fails on purpose"
"""


@needs_ferretdb
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX signals")
@pytest.mark.parametrize(
    "ending, expected_status",
    [("pytest fails", 1), ("SIGTERM to the runner", 143), ("Ctrl-C in its terminal", 130)],
)
def test_runner_passes_the_status_on_and_leaves_no_server(tmp_path, ending, expected_status):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    marker = tmp_path / "marker"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MONGOFEED_")}
    env["MARKER"] = str(marker)
    runner = subprocess.Popen(
        [*DEV, "test", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    name = f"test-{runner.pid}"
    try:
        wait_for(lambda: marker.exists() or runner.poll() is not None, 60, "the inner test")
        assert marker.exists(), runner.communicate()[0]
        pytest_pid, uri = marker.read_text().split()
        run_dir = server.run_dir(name)
        server_pid = int((run_dir / "pid").read_text())
        assert uri == f"mongodb://127.0.0.1:{int((run_dir / 'port').read_text())}/"
        assert process_exists(server_pid)

        if ending == "pytest fails":
            marker.with_suffix(".proceed").touch()
        elif ending == "SIGTERM to the runner":
            runner.send_signal(signal.SIGTERM)
        else:  # a terminal sends SIGINT to its whole foreground process group
            os.killpg(runner.pid, signal.SIGINT)
        output = runner.communicate(timeout=COMMAND_TIMEOUT_S)[0]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
            server.discard(name)
    assert runner.returncode == expected_status, output
    assert not run_dir.exists()
    assert not process_exists(server_pid)
    assert not process_exists(int(pytest_pid))


def test_runner_uses_the_given_server_and_starts_none(tmp_path, mongo_uri):
    (tmp_path / "test_given.py").write_text(
        "import os\n\n"
        "def test_given():\n"
        f"    assert os.environ['MONGOFEED_TEST_URI'] == {mongo_uri!r}\n"
    )
    env = {**os.environ, "MONGOFEED_TEST_URI": mongo_uri}
    done = dev("test", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_given.py"), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FerretDB" not in done.stderr


def test_exit_status_of_a_child_ended_by_a_signal_is_128_plus_the_signal():
    assert exit_status(0) == 0
    assert exit_status(4) == 4
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGINT) == 130


@pytest.mark.parametrize("layout", [("bin", "python"), ("Scripts", "python.exe")])
def test_venv_python_is_found_on_both_layouts(tmp_path, layout):
    assert venv_python(tmp_path) is None
    python = tmp_path.joinpath(*layout)
    python.parent.mkdir()
    python.touch()
    assert venv_python(tmp_path) == python
