"""Two hosts for real: network namespaces joined by a veth pair. The daemon binds its own
address there with CurveZMQ keys (and reads a private FerretDB on its host's loopback); a
trainer on the other host with a listed key gets a full epoch, one without keys gets nothing.
A trainer in a namespace of its own on the daemon's host (a container sharing its ipc folder)
is served over the ipc socket when the channel's abstract name cannot reach it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mongofeed.security import keygen
from mongofeed.testing import Daemon
from tests.chaos.support import BATCH, DOCS, assert_exactly_once, feed_config
from tests.support import REPO, sample_config, write_toml

ADDRESSES = ("10.231.0.1", "10.231.0.2")  # daemon host, trainer host; only inside our namespaces
FERRETDB = REPO / ".cache" / "ferretdb" / "bin" / "ferretdb"
DATABASE_URI = "mongodb://127.0.0.1:27017/"  # the daemon host's own loopback
READY_WITHIN_S = 30
REFUSED_WITHIN_S = 3

LOAD_SAMPLES = """
import sys
import pymongo
from tests.support import insert_samples
client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=int(sys.argv[3]) * 1000)
insert_samples(client[sys.argv[2]]["samples"], int(sys.argv[4]))
"""

READ_EPOCH = """
import json, sys
from mongofeed import Consumer, FeedTimeout
endpoint, timeout, keys = sys.argv[1], float(sys.argv[2]), sys.argv[3:] or [None, None]
try:
    with Consumer(endpoint, "train", timeout=timeout, server_key=keys[0],
                  client_key=keys[1]) as consumer:
        print(json.dumps([[b.epoch, b.index, b.arrays["idx"].tolist()]
                          for b in consumer.epoch()]))
except FeedTimeout:
    print("FeedTimeout")
"""


def ip(*args: str):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def in_namespace(namespace: str, *command) -> list[str]:
    return ["ip", "netns", "exec", namespace, *map(str, command)]


@pytest.fixture
def hosts():
    """Two namespaces linked by a veth pair, addressed 10.231.0.1 and .2; always removed."""
    tag = os.getpid() % 100_000
    namespaces = (f"mf-daemon-{tag}", f"mf-trainer-{tag}")
    links = (f"mfd{tag}", f"mft{tag}")  # interface names: at most 15 characters
    try:
        ip("netns", "add", namespaces[0])
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        pytest.skip(f"cannot create a network namespace (needs root or CAP_SYS_ADMIN and "
                    f"iproute2): {detail}")
    try:
        ip("netns", "add", namespaces[1])
        ip("link", "add", links[0], "netns", namespaces[0], "type", "veth",
           "peer", "name", links[1], "netns", namespaces[1])
        for namespace, link, address in zip(namespaces, links, ADDRESSES, strict=True):
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            ip("-n", namespace, "link", "set", link, "up")
        yield namespaces
    finally:
        for namespace in namespaces:  # takes the veth pair with it
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


@pytest.fixture
def database(hosts, tmp_path):
    """A private FerretDB on the daemon host's loopback, holding DOCS samples."""
    if not FERRETDB.exists():
        pytest.skip(f"{FERRETDB} is not built (bin/ferretdb build)")
    (tmp_path / "ferretdb").mkdir()
    log = open(tmp_path / "ferretdb.log", "w")
    server = subprocess.Popen(
        in_namespace(hosts[0], FERRETDB, "--handler=sqlite",
                     f"--sqlite-url=file:{tmp_path / 'ferretdb'}/",
                     "--listen-addr=127.0.0.1:27017", "--debug-addr=-",
                     f"--state-dir={tmp_path / 'ferretdb'}", "--log-level=warn",
                     "--telemetry=disable"),
        stdout=log, stderr=log, env={**os.environ, "DO_NOT_TRACK": "1"})
    try:
        subprocess.run(in_namespace(hosts[0], sys.executable, "-c", LOAD_SAMPLES, DATABASE_URI,
                                    "netns", READY_WITHIN_S, DOCS),
                       check=True, cwd=REPO, timeout=2 * READY_WITHIN_S)
        yield "netns"
    finally:
        server.terminate()
        server.wait(READY_WITHIN_S)
        log.close()


def read_epoch(namespace: str, endpoint: str, timeout: float, *keys: str):
    done = subprocess.run(in_namespace(namespace, sys.executable, "-c", READ_EPOCH, endpoint,
                                       timeout, *keys),
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout.strip()
    return output if output == "FeedTimeout" else json.loads(output)


def test_a_trainer_on_another_host_needs_a_listed_key(hosts, database, tmp_path):
    daemon_host, trainer_host = hosts
    keys = tmp_path / "keys"
    server_public, server_secret = keygen(str(keys), "daemon")
    _, trainer_secret = keygen(str(keys / "clients"), "trainer")
    config = write_toml(tmp_path / "feed.toml", sample_config(
        DATABASE_URI, database, batch={"size": BATCH},
        feeds={"train": {"filter": {}, "shuffle": True}}))
    daemon = Daemon(config, workers=1)
    endpoint = f"tcp://{ADDRESSES[0]}:{daemon.port}"
    daemon.command = in_namespace(daemon_host, *daemon.command, "--bind", endpoint,
                                  "--server-key", server_secret,
                                  "--client-keys", keys / "clients")
    with daemon:
        batches = read_epoch(trainer_host, endpoint, 30, server_public, trainer_secret)
        refused = read_epoch(trainer_host, endpoint, REFUSED_WITHIN_S)
    assert_exactly_once(batches, epochs=(0,))
    assert refused == "FeedTimeout"


READ_EPOCH_SAYING_HOW = """
import json, logging, sys
from mongofeed import Consumer
logging.basicConfig(level=logging.INFO)
with Consumer(sys.argv[1], "train", timeout=30) as consumer:
    batches = [[b.epoch, b.index, b.arrays["idx"].tolist()] for b in consumer.epoch()]
    print(json.dumps({"batches": batches, "shared_memory": consumer.shared_memory}))
"""


def test_a_trainer_in_another_network_namespace_on_the_ipc_socket_is_served_without_the_channel(
        hosts, tmp_path, mongo_uri, db):
    """A container that shares the daemon's ipc folder and /dev/shm but not its network
    namespace: the daemon offers it shared memory (an ipc peer is on its host), but the
    channel's abstract socket name is not in the trainer's namespace. It must get its epoch
    over the data socket, exactly once, not a hang or an error."""
    config = feed_config(tmp_path, mongo_uri, db)
    daemon = Daemon(config, workers=1)
    daemon.bind = f"ipc://{tmp_path}/data"
    daemon.control = f"{daemon.bind}.control"
    daemon.command += ["--bind", daemon.bind]
    with daemon:
        done = subprocess.run(in_namespace(hosts[1], sys.executable, "-c",
                                           READ_EPOCH_SAYING_HOW, daemon.bind),
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        read = json.loads(done.stdout)
    assert read["shared_memory"] is False
    assert "cannot reach the daemon's channel" in done.stderr  # it was offered, and tried
    assert_exactly_once(read["batches"], epochs=(0,))
