"""Shared pieces of the chaos suite: a config on disk, reading whole epochs, process checks,
a hand-driven peer on the daemon's sockets, and both ways a batch reaches a consumer (the
daemon's shared memory, or tcp)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import zmq

from mongofeed import Consumer
from mongofeed.portable import KILL_SIGNAL, shared_memory_dir, signal_pid
from mongofeed.security import keygen
from mongofeed.testing import Daemon
from mongofeed.wire import decode_json, encode_json
from tests.support import insert_samples, sample_config, write_toml

REPLY_TIMEOUT_S = 10

DOCS = 240          # train documents; with batch size 8 that is 30 batches per epoch
BATCH = 8
BATCHES = DOCS // BATCH


# Run a test over both paths: the consumer maps the daemon's shared memory, or refuses it
# (shared_memory=False) and gets the batches over tcp, sent from the same slabs. Where there
# is no shared memory (macOS, Windows) both are the messages path ("frames").
BOTH_PATHS = pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "tcp"])
SHARED_MEMORY = shared_memory_dir() is not None


def transport(shared_memory: bool) -> str:
    """The session transport ``mongofeed status`` shows for a consumer of this choice."""
    if not SHARED_MEMORY:
        return "frames"
    return "shared memory" if shared_memory else "tcp"


def feed_config(tmp_path: Path, uri: str, db, docs: int = DOCS, **parts) -> Path:
    """Insert ``docs`` samples into ``db.samples`` and write a config that serves them."""
    insert_samples(db["samples"], docs)
    parts.setdefault("feeds", {"train": {"filter": {}, "shuffle": True}})
    config = sample_config(uri, db.name, batch={"size": BATCH}, **parts)
    return write_toml(tmp_path / "feed.toml", config)


def read_batches(consumer: Consumer, count: int) -> list:
    """The next ``count`` batches as (epoch, index, sample numbers)."""
    out = []
    for _ in range(count):
        batch = consumer.get()
        out.append((batch.epoch, batch.index, [int(i) for i in batch.arrays["idx"]]))
    return out


def assert_exactly_once(batches: list, epochs, docs: int = DOCS):
    """Every epoch in ``epochs`` delivered each document once, its batches in plan order."""
    for epoch in epochs:
        mine = [b for b in batches if b[0] == epoch]
        assert [b[1] for b in mine] == list(range(docs // BATCH)), f"epoch {epoch} order"
        seen = Counter(i for b in mine for i in b[2])
        assert sorted(seen) == list(range(docs)), f"epoch {epoch}: missing documents"
        assert set(seen.values()) == {1}, f"epoch {epoch}: duplicated documents"


def kill_quietly(pid: int):
    """Kill ``pid`` at once (SIGKILL; TerminateProcess on Windows), if it still exists."""
    signal_pid(pid, KILL_SIGNAL)


def exposed(port: int) -> tuple:
    """serve options that bind every address (not loopback) on ``port``."""
    return ("--bind", f"tcp://0.0.0.0:{port}")


def curve_daemon(tmp_path: Path, uri: str, db) -> tuple[Daemon, dict]:
    """A daemon (not started) bound to every address with CurveZMQ keys, admitting only the
    key pair "trainer"; the key files: server_public, trainer_secret, stranger_secret."""
    keys = tmp_path / "keys"
    server_public, server_secret = keygen(str(keys), "daemon")
    _, trainer_secret = keygen(str(keys / "clients"), "trainer")
    _, stranger_secret = keygen(str(keys / "strangers"), "stranger")
    daemon = Daemon(feed_config(tmp_path, uri, db), workers=1)
    daemon.command += [*exposed(daemon.port), "--server-key", server_secret,
                       "--client-keys", str(keys / "clients")]
    return daemon, {"server_public": server_public, "trainer_secret": trainer_secret,
                    "stranger_secret": stranger_secret}


def private_tmp(tmp_path):
    """A TMPDIR of the daemon's own, so its ipc folder is told apart from other daemons',
    and a shared-memory folder of its own beside it (``shm``), for its region files."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    (tmp_path / "shm").mkdir()
    return folder, {"TMPDIR": str(folder), "MONGOFEED_SHM_DIR": str(tmp_path / "shm")}


def regions(tmp: Path) -> list[Path]:
    """The region files in the shared-memory folder beside ``private_tmp``'s TMPDIR."""
    return sorted((tmp.parent / "shm").glob("mongofeed-*"))


def one_region() -> int:
    """How many region files a daemon with one session has: 1, or 0 without shared memory."""
    return 1 if SHARED_MEMORY else 0


class RawPeer:
    """A DEALER on one of the daemon's public sockets, driven by hand: what a stranger or a
    hostile client can send, frame by frame."""

    def __init__(self, context: zmq.Context, endpoint: str, identity: bytes | None = None,
                 **options):
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        if identity is not None:
            self.socket.identity = identity
        for name, value in options.items():
            setattr(self.socket, name, value)
        self.socket.connect(endpoint)

    def send(self, *frames):
        """Send one message; a dict is sent as JSON."""
        self.socket.send_multipart([encode_json(f) if isinstance(f, dict) else f
                                    for f in frames])

    def request(self, *frames) -> dict:
        """Send one control request and return its reply."""
        self.send(*frames)
        assert self.socket.poll(REPLY_TIMEOUT_S * 1000), "the daemon did not answer"
        return decode_json(self.socket.recv(), 2**24, "reply")

    def received(self, quiet_s: float = 1.0) -> list[list[bytes]]:
        """Every message that arrives until none has for ``quiet_s`` seconds."""
        messages = []
        while self.socket.poll(int(quiet_s * 1000)):
            messages.append(self.socket.recv_multipart())
        return messages
