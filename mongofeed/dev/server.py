"""The local FerretDB v1.24.2 test server (SQLite backend): built and run under .cache/ferretdb/.

The one implementation behind ``python -m mongofeed.dev server ...`` (and ``bin/ferretdb``),
the test, demo and bench runners, and the tests' conftest. Standard library only: it runs with
a bare ``python3`` before the virtual environment exists (``make ferretdb``).

    .cache/ferretdb/bin/ferretdb[.exe]     the binary, built once (build())
    .cache/ferretdb/run/NAME/              one folder per named server:
        data/ state/ ferretdb.log            its SQLite files, its state.json, its output
        pid port debug_port                  written by start(); stop() removes pid
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..portable import KILL_SIGNAL, STOP_SIGNAL, pid_alive, signal_pid
from .portable import EXE_SUFFIX, detached, exclusive_lock, port_is_free, reap

FERRETDB_VERSION = "v1.24.2"
FERRETDB_MODULE = "github.com/FerretDB/FerretDB"
FERRETDB_PACKAGE = f"{FERRETDB_MODULE}/cmd/ferretdb"

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "ferretdb"
BINARY = CACHE / "bin" / f"ferretdb{EXE_SUFFIX}"

READY_TIMEOUT_S = 30
READY_POLL_S = 0.1
STOP_GRACE_S = 5  # FerretDB itself gives its clients 3 s after SIGTERM
KILL_WAIT_S = 2
STOP_POLL_S = 0.1
LOG_TAIL_LINES = 15
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_PORT = 65535

log = logging.getLogger(__name__)


class ServerError(Exception):
    """A server cannot be built, started, found or stopped; the message says what to do."""


def command() -> str:
    """How the user runs the server commands, for messages that say what to run next."""
    if Path(sys.argv[0]).name == "ferretdb":
        return "bin/ferretdb"
    return "python -m mongofeed.dev server"


@dataclass(frozen=True)
class Server:
    """A running named server."""

    name: str
    pid: int
    port: int
    debug_port: int

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def metrics_url(self) -> str:
        """FerretDB's Prometheus text endpoint (``ferretdb_client_accepts_total`` and more)."""
        return f"http://127.0.0.1:{self.debug_port}/debug/metrics"


def run_dir(name: str) -> Path:
    """The folder of the server NAME (refusing a name that is not a plain folder name)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ServerError(f"bad --name {name!r} (letters, digits, . _ -)")
    return CACHE / "run" / name


# ---------------------------------------------------------------------------------------------
# build


def is_built() -> bool:
    return os.access(BINARY, os.X_OK) and BINARY.is_file()


def build() -> Path:
    """Build FerretDB into .cache/ferretdb/bin, unless it is there already (needs Go)."""
    if is_built():
        log.info("already built: %s", BINARY)
        return BINARY
    go = shutil.which("go")
    if go is None:
        raise ServerError("Go is needed to build FerretDB; 'go' is not on PATH")
    CACHE.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(CACHE / "build.lock"):  # one build at a time: parallel runs share CACHE
        if is_built():
            log.info("already built: %s", BINARY)
            return BINARY
        log.info("building FerretDB %s (first time only, about a minute)...", FERRETDB_VERSION)
        try:
            _build(go)
        except BaseException:
            log.error("FerretDB build failed")
            raise
        finally:  # what this or an earlier interrupted or failed build left behind
            for leftover in (*CACHE.glob("bin.tmp.*"), *(CACHE / "src").glob("*.tmp.*")):
                _remove_tree(leftover)
    log.info("built %s", BINARY)
    return BINARY


def _build(go: str) -> None:
    module = CACHE / "mod"
    module.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}

    def run_go(*args: str, quiet: bool = False, **extra_env: str) -> str:
        try:
            done = subprocess.run(
                [go, *args],
                cwd=module,
                env={**env, **extra_env},
                check=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if quiet else None,
                text=True,
            )
        except subprocess.CalledProcessError as error:
            detail = f":\n{error.stderr.strip()}" if error.stderr else ""
            raise ServerError(
                f"`go {' '.join(args)}` failed (exit {error.returncode}){detail}"
            ) from None
        return done.stdout

    # A throwaway module of our own that only holds FerretDB as a tool dependency.
    if not (module / "go.mod").is_file():
        run_go("mod", "init", "ferretdbbuild", quiet=True)
    run_go("mod", "edit", f"-dropreplace={FERRETDB_MODULE}")
    run_go("get", "-tool", f"{FERRETDB_PACKAGE}@{FERRETDB_VERSION}")

    # A binary built from the module cache panics at start ("Invalid
    # build/version/version.txt"): Go records FerretDB's module as the main module, and
    # FerretDB then requires the generated file build/version/version.txt, which the
    # published module lacks. So build from a copy of the module source that has it, through
    # a replace directive in this throwaway module (same module, same version).
    source = CACHE / "src" / f"FerretDB@{FERRETDB_VERSION}"
    if not (source / "build" / "version" / "version.txt").is_file():
        download = run_go("mod", "download", "-json", f"{FERRETDB_MODULE}@{FERRETDB_VERSION}")
        found = json.loads(download)
        copy = source.with_name(f"{source.name}.tmp.{os.getpid()}")
        _remove_tree(source)
        _remove_tree(copy)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(found["Dir"], copy)
        _make_writable(copy)  # the module cache is read-only
        (copy / "build" / "version" / "version.txt").write_text(f"{FERRETDB_VERSION}\n")
        copy.rename(source)
    run_go("mod", "edit", f"-replace={FERRETDB_MODULE}=../src/{source.name}")

    # Install into a private folder and move the binary into place last, so that an
    # interrupted build leaves no binary and is retried next time.
    private_bin = CACHE / f"bin.tmp.{os.getpid()}"
    _remove_tree(private_bin)
    run_go("install", FERRETDB_PACKAGE, GOBIN=str(private_bin))
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    os.replace(private_bin / BINARY.name, BINARY)


def _make_writable(tree: Path) -> None:
    for folder, _, files in os.walk(tree):
        for path in (folder, *(os.path.join(folder, name) for name in files)):
            os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)


def _remove_tree(tree: Path) -> None:
    if tree.exists():
        _make_writable(tree)
        shutil.rmtree(tree, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# start / stop / find


def running(name: str) -> Server | None:
    """The server NAME if it runs, else None."""
    folder = run_dir(name)
    try:
        pid, port, debug_port = (
            int((folder / file).read_text()) for file in ("pid", "port", "debug_port")
        )
    except (OSError, ValueError):
        return None
    if not pid_alive(pid, "ferretdb"):
        return None
    return Server(name, pid, port, debug_port)


def find(name: str) -> Server:
    """The server NAME, which must be running."""
    server = running(name)
    if server is None:
        raise ServerError(
            f"FerretDB '{name}' is not running; start it with: {command()} start --name {name}"
        )
    return server


def start(name: str = "default", port: int = 0) -> Server:
    """Start the server NAME on 127.0.0.1:``port`` (0: any free port), building FerretDB
    first if needed, and return it once it is ready. A failed or interrupted start leaves no
    process behind."""
    folder = run_dir(name)
    if not 0 <= port <= MAX_PORT:
        raise ServerError(f"bad --port {port} (0 = any free port, up to {MAX_PORT})")
    server = running(name)
    if server is not None:
        raise ServerError(
            f"FerretDB '{name}' is already running (pid {server.pid}) at {server.uri}; "
            f"stop it first with: {command()} stop --name {name}"
        )
    if not is_built():
        build()

    if port == 0:
        port = _free_port()
    elif not port_is_free(port):
        raise ServerError(
            f"port {port} on 127.0.0.1 is already in use; pick another with --port "
            "(0 = any free port)"
        )
    debug_port = _free_port()
    while debug_port == port:
        debug_port = _free_port()

    for file in ("pid", "port", "debug_port"):
        (folder / file).unlink(missing_ok=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "state").mkdir(exist_ok=True)
    with open(folder / "ferretdb.log", "wb") as output:
        process = subprocess.Popen(
            [
                str(BINARY),
                "--handler=sqlite",
                # Relative to its working folder: no drive letter (C:) in the URL on Windows.
                "--sqlite-url=file:data/",
                f"--listen-addr=127.0.0.1:{port}",
                f"--debug-addr=127.0.0.1:{debug_port}",
                f"--state-dir={folder / 'state'}",
                "--log-level=warn",
                "--telemetry=disable",
            ],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DO_NOT_TRACK": "1"},
            **detached(),  # outlives this process; a Ctrl-C here does not reach it
        )
    server = Server(name, process.pid, port, debug_port)
    try:
        (folder / "pid").write_text(f"{server.pid}\n")
        (folder / "port").write_text(f"{port}\n")
        (folder / "debug_port").write_text(f"{debug_port}\n")
        _wait_ready(process, server)
    except BaseException:
        _stop_pid(server.pid)
        (folder / "pid").unlink(missing_ok=True)
        raise
    return server


def _wait_ready(process: subprocess.Popen, server: Server) -> None:
    ready_url = f"http://127.0.0.1:{server.debug_port}/debug/readyz"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise ServerError(
                f"FerretDB '{server.name}' exited during startup (port {server.port} or debug "
                f"port {server.debug_port} in use?){_log_tail(server.name)}"
            )
        try:
            with no_proxy.open(ready_url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServerError(
                f"FerretDB '{server.name}' did not become ready within {READY_TIMEOUT_S} s; "
                f"stopped it{_log_tail(server.name)}"
            )
        time.sleep(READY_POLL_S)


def stop(name: str = "default") -> Server | None:
    """Stop the server NAME (SIGTERM, then a kill after STOP_GRACE_S); return it, or None if
    it was not running. Its run folder stays (data included)."""
    server = running(name)
    if server is not None:
        _stop_pid(server.pid)
    (run_dir(name) / "pid").unlink(missing_ok=True)
    return server


def discard(name: str) -> None:
    """Stop the server NAME and delete its run folder, data included: for throwaway servers."""
    try:
        stop(name)
    finally:
        shutil.rmtree(run_dir(name), ignore_errors=True)


def _stop_pid(pid: int) -> None:
    signal_pid(pid, STOP_SIGNAL)
    if not _wait_gone(pid, STOP_GRACE_S):
        log.warning("FerretDB (pid %d) did not stop after SIGTERM; killing it", pid)
        signal_pid(pid, KILL_SIGNAL)
        if not _wait_gone(pid, KILL_WAIT_S):
            raise ServerError(f"could not stop FerretDB (pid {pid})")
    reap(pid)  # when this process started it


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        reap(pid)  # if it is our child: its zombie looks alive where there is no /proc
        if not pid_alive(pid, "ferretdb"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(STOP_POLL_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(name: str) -> str:
    path = run_dir(name) / "ferretdb.log"
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return ""
    if not lines:
        return ""
    return f"\n--- last lines of {path}:\n" + "\n".join(lines) + "\n---"
