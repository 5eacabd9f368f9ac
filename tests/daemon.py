"""Test helpers: sample data, config files, and a real `mongofeed serve` process.

Tests import this module directly (pytest puts tests/ on sys.path). The daemon runs exactly
as a user runs it (`python -m mongofeed serve ...`), with free ports and its stderr in a file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mongofeed.consumer import daemon_status

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20


def insert_samples(collection, count: int, val: int = 0) -> list:
    """``count`` documents: ``i`` (0..count-1), ``x`` = float32 [i, i, i, i] as raw bytes,
    ``y`` = i % 3, and ``split`` ("val" for the last ``val`` of them). Returns their _ids."""
    docs = [{"i": i, "x": np.full(4, i, dtype=np.float32).tobytes(), "y": i % 3,
             "split": "val" if i >= count - val else "train"} for i in range(count)]
    return collection.insert_many(docs).inserted_ids


def sample_config(uri: str, database: str, collection: str = "samples", *, batch=None,
                  feeds=None, fields=None, output=None, serve=None) -> dict:
    """A config as nested dicts for the documents of ``insert_samples``."""
    return {
        "source": {"uri": uri, "database": database, "collection": collection},
        "feeds": feeds or {"train": {"filter": {"split": "train"}, "shuffle": True},
                           "val": {"filter": {"split": "val"}, "shuffle": False}},
        "batch": {"size": 8, "seed": 0, **(batch or {})},
        "fields": fields or {
            "idx": {"path": "i", "decode": "scalar", "dtype": "int64"},
            "x": {"decode": "raw", "dtype": "float32", "shape": [4]},
            "label": {"path": "y", "decode": "scalar", "dtype": "int64", "one_hot": 3},
        },
        "output": output or {"inputs": ["x"], "targets": ["label"]},
        "serve": serve or {},
    }


def write_toml(path: Path, config: dict) -> Path:
    """A small TOML writer for our config shapes (tables, scalars, lists, inline tables)."""
    lines = []

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    def table(name, body):
        scalars = {k: v for k, v in body.items() if not (isinstance(v, dict) and k != "filter")}
        lines.append(f"[{name}]")
        lines.extend(f"{json.dumps(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict) and k != "filter":
                table(f"{name}.{json.dumps(k)}", v)

    for section, body in config.items():
        table(section, body)
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (data and control endpoints)."""
    for _ in range(200):
        port = random.randint(20_000, 32_000)  # below Linux's ephemeral range (32768-)
        sockets = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port pair")


class Daemon:
    """`mongofeed serve` as a child process; use as a context manager."""

    def __init__(self, config_path: Path, workers: int = 2, args=(), env=None):
        self.port = free_port_pair()
        self.bind = f"tcp://127.0.0.1:{self.port}"
        self.control = f"tcp://127.0.0.1:{self.port + 1}"
        self.command = [sys.executable, "-m", "mongofeed", "serve", "--config", str(config_path),
                        "--workers", str(workers), "--bind", self.bind, *args]
        self.env = {**os.environ, **(env or {})}
        self.stderr_path = Path(config_path).with_suffix(f".{self.port}.stderr")
        self.process = None
        self.ready_line = None

    def start(self) -> Daemon:
        self.stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, cwd=REPO, env=self.env)
        lines = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        if not lines or not lines[0].startswith("mongofeed ready"):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"daemon did not become ready: {lines!r}\n"
                               f"{self.stderr_path.read_text()}")
        self.ready_line = lines[0]
        return self

    def status(self) -> dict:
        return daemon_status(self.control, timeout=10)

    def stop(self, sig=signal.SIGTERM) -> int:
        """Stop the daemon; returns its exit code (waits at most STOP_TIMEOUT_S)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon ignored {sig!r} for {STOP_TIMEOUT_S} s") from None
        finally:
            self.process.stdout.close()
            self.stderr.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
