"""The development runners: the test suite, the demo and the benchmark, each against a FerretDB
of its own that is always stopped again: on success, on failure, on Ctrl-C (exit 130) and on
SIGTERM (exit 143).

The whole test suite runs twice over the daemon's internal sockets where it can: everything
over ipc (what POSIX systems use), then the tests of those sockets (``TCP_PASS``) again over
loopback tcp, the transport of Windows, which is how that path is exercised on Linux.

Standard library only, like server.py: the runner itself may run with a bare ``python3``;
pytest, ``mongofeed`` and the example run with the checkout's virtual environment (``.venv``),
in the checkout, so they use this tree's code.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import NamedTuple

from ..portable import INTERNAL_TRANSPORT_ENV, STOP_REQUESTS, stoppable
from . import server
from .portable import exit_status, interrupt, venv_python

ROOT = server.ROOT
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_REPORT_S = 3  # a child that got the terminal's Ctrl-C too has this long to report
CHILD_STOP_S = 5

# The tests of the internal sockets, run again over tcp: exactly once with 1 to 8 workers,
# the stepped loop, worker kill, crash loop and hang, daemon stop (and its time), stop while
# planning, daemon kill, hostile peers, garbage on the internal sockets, a stranger without
# the run's password on them (tcp only). Chosen tests, not
# whole modules, to keep the pass near a minute (tests/test_platforms.py checks each exists).
TCP_PASS = (
    "tests/test_supervisor_loop.py",
    "tests/test_serve.py::test_every_document_exactly_once_per_epoch",
    "tests/chaos/test_workers.py::test_sigkilled_worker_is_replaced_and_its_tasks_reissued",
    "tests/chaos/test_workers.py::test_crash_loop_is_backed_off_and_reported",
    "tests/chaos/test_workers.py::test_hung_worker_is_killed_and_its_tasks_reissued",
    "tests/chaos/test_daemon_stop.py",
    "tests/chaos/test_hostile_peers.py::"
    "test_hostile_peers_are_rejected_and_others_keep_being_served",
    "tests/chaos/test_loop_faults.py::test_garbage_on_the_internal_sockets_is_refused_and_counted",
    "tests/chaos/test_loop_faults.py::"
    "test_a_local_stranger_on_the_internal_tcp_sockets_can_take_no_task_nor_push_a_batch",
)

DEMO_SERVER = "demo"
DEMO_CONFIG = "configs/digits.toml"
DEMO_WORKERS = 8
DEMO_BIND = "tcp://127.0.0.1:5555"
DEMO_READY_LINE = "mongofeed ready"
DEMO_READY_TIMEOUT_S = 60
DEMO_READY_POLL_S = 0.5

log = logging.getLogger(__name__)


class RunError(Exception):
    """A runner cannot start; the message says what to fix."""


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the runner: it stops everything and exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def find_python() -> str:
    """The Python with the project's dependencies: $PYTHON if set, else the checkout's .venv
    (``.venv/bin/python`` or ``.venv\\Scripts\\python.exe``)."""
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    python = venv_python(ROOT / ".venv")
    if python is None:
        raise RunError(
            f"no virtual environment in {ROOT / '.venv'}; create it with `make install`, or "
            "`python -m venv .venv` then `.venv/bin/python -m pip install -e '.[dev]'` "
            "(Windows: `.venv\\Scripts\\python -m pip install -e .[dev]`)"
        )
    return str(python)


def _runner(function: Callable[..., int]) -> Callable[..., int]:
    """Run a runner with SIGINT and SIGTERM raised as Interrupted; then exit 128 + signum."""

    def raise_interrupted(signum, frame):
        for sig in ENDING_SIGNALS:  # once: the clean-up that follows must finish
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    @functools.wraps(function)
    def wrapper(*args, **kwargs) -> int:
        previous = {sig: signal.signal(sig, raise_interrupted) for sig in ENDING_SIGNALS}
        try:
            return function(*args, **kwargs)
        except Interrupted as interrupted:
            return 128 + interrupted.signum
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper


@contextmanager
def _cleanups() -> Iterator[ExitStack]:
    """An ExitStack whose clean-ups run with SIGINT and SIGTERM ignored, so they finish."""
    stack = ExitStack()
    try:
        yield stack
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ENDING_SIGNALS}
        try:
            stack.close()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _private_server(cleanups: ExitStack, prefix: str) -> server.Server:
    """Start a FerretDB for this run only; at the end it is stopped and its run folder
    deleted (also when the start itself is interrupted)."""
    name = f"{prefix}-{os.getpid()}"
    cleanups.callback(_stop_server, name, delete=True)
    started = server.start(name)
    log.info("FerretDB '%s' at %s", name, started.uri)
    return started


def _stop_server(name: str, delete: bool) -> None:
    try:
        if delete:
            server.discard(name)
        else:
            server.stop(name)
    except server.ServerError as error:
        log.error("could not stop FerretDB '%s': %s", name, error)


def _run(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run a command in the checkout, in the foreground, and return its exit status. On
    Interrupted, stop it as its user would expect, then re-raise."""
    process = _popen(command, env=env)
    try:
        return exit_status(process.wait())
    except Interrupted as interrupted:
        if interrupted.signum == signal.SIGINT:
            # A terminal's Ctrl-C reaches the child directly: let it stop and report first.
            if not _exited(process, CHILD_REPORT_S):
                interrupt(process)
                _exited(process, CHILD_STOP_S)
        raise
    finally:
        _stop_child(process)


def _popen(command: list[str], **kwargs) -> subprocess.Popen:
    """Start a command in the checkout."""
    try:
        return subprocess.Popen(command, cwd=ROOT, **kwargs)
    except OSError as error:
        raise RunError(f"cannot run {command[0]}: {error.strerror}") from None


def _exited(process: subprocess.Popen, timeout_s: float) -> bool:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True


def _stop_child(process: subprocess.Popen, ask=subprocess.Popen.terminate) -> None:
    """Ask the child to stop (default: SIGTERM; Windows: terminate), then kill it after
    CHILD_STOP_S."""
    if process.poll() is None:
        ask(process)
        if not _exited(process, CHILD_STOP_S):
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# the runners


class SuitePass(NamedTuple):
    """One pytest run of ``test``: its name, what it covers, the environment it adds."""

    name: str
    about: str
    env: dict[str, str]
    pytest_args: list[str]


@_runner
def test(pytest_args: list[str]) -> int:
    """pytest with ``pytest_args`` against $MONGOFEED_TEST_URI, or else against a private
    FerretDB (exported as MONGOFEED_TEST_URI and MONGOFEED_TEST_METRICS_URL), in the passes
    that ``suite_passes`` gives; the first failing pass's exit status, else 0."""
    python = find_python()
    env = dict(os.environ)
    passes = suite_passes(pytest_args, env, lambda: _has_ipc(python))
    statuses = {}
    with _cleanups() as cleanups:
        if not env.get("MONGOFEED_TEST_URI"):
            ferretdb = _private_server(cleanups, "test")
            env["MONGOFEED_TEST_URI"] = ferretdb.uri
            env["MONGOFEED_TEST_METRICS_URL"] = ferretdb.metrics_url
        for run in passes:
            if len(passes) > 1:
                log.info("== %s: %s", run.name, run.about)
            command = [python, "-m", "pytest", *run.pytest_args]
            statuses[run.name] = _run(command, {**env, **run.env})
    if len(passes) > 1:
        log.info("== exit status: %s", ", ".join(f"{k} {v}" for k, v in statuses.items()))
    return next((status for status in statuses.values() if status), 0)


def suite_passes(
    pytest_args: list[str], environ: dict[str, str], ipc_available: Callable[[], bool]
) -> list[SuitePass]:
    """The pytest runs of ``test``. One, as asked, when the arguments name tests or the
    internal transport is tcp already (set so, or the only one here); else the whole suite
    over ipc, then ``TCP_PASS`` over tcp."""
    if any(_names_tests(arg) for arg in pytest_args) or (
        environ.get(INTERNAL_TRANSPORT_ENV, "auto") == "tcp" or not ipc_available()
    ):
        return [SuitePass("pytest", "as asked", {}, pytest_args)]
    return [
        SuitePass("ipc pass", "the whole suite, the daemon's internal sockets over ipc",
                 {INTERNAL_TRANSPORT_ENV: "ipc"}, pytest_args),
        SuitePass("tcp pass", "the tests of those sockets again over loopback tcp, as on "
                 "Windows", {INTERNAL_TRANSPORT_ENV: "tcp"}, [*pytest_args, *TCP_PASS]),
    ]  # fmt: skip


def _names_tests(arg: str) -> bool:
    """Whether a pytest argument selects tests by path (``tests/x.py``, ``tests/x.py::t``)."""
    return not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()


def _has_ipc(python: str) -> bool:
    """Whether the ZeroMQ of the checkout's Python has ipc:// (every POSIX system)."""
    check = "from mongofeed.portable import has_ipc; raise SystemExit(not has_ipc())"
    return subprocess.run([python, "-c", check], cwd=ROOT, capture_output=True).returncode == 0


@_runner
def bench(bench_args: list[str]) -> int:
    """``mongofeed bench --uri ... --metrics-url ... BENCH_ARGS`` against a private FerretDB."""
    python = find_python()
    with _cleanups() as cleanups:
        ferretdb = _private_server(cleanups, "bench")
        return _run(
            [python, "-m", "mongofeed", "bench", "--uri", ferretdb.uri,
             "--metrics-url", ferretdb.metrics_url, *bench_args]
        )  # fmt: skip


@_runner
def demo() -> int:
    """A local FerretDB (or $MONGOFEED_URI), the digits data, ``mongofeed serve`` with
    configs/digits.toml and 8 workers, and examples/train_digits.py; all stopped at the end."""
    python = find_python()
    began = time.monotonic()
    env = dict(os.environ)
    bind = env.get("MONGOFEED_BIND") or DEMO_BIND
    with _cleanups() as cleanups:
        if not env.get("MONGOFEED_URI"):
            ferretdb = server.start(DEMO_SERVER)
            cleanups.callback(_stop_server, DEMO_SERVER, delete=False)
            env["MONGOFEED_URI"] = ferretdb.uri
            print(f"started a local FerretDB at {ferretdb.uri}", flush=True)

        status = _run([python, "-m", "mongofeed", "load", "digits", "--config", DEMO_CONFIG,
                       "--drop"], env)  # fmt: skip
        if status:
            return status

        daemon_log = Path(cleanups.enter_context(tempfile.TemporaryDirectory())) / "serve.log"
        with open(daemon_log, "wb") as output:
            daemon = _popen(
                [python, "-m", "mongofeed", "serve", "--config", DEMO_CONFIG,
                 "--workers", str(DEMO_WORKERS), "--bind", bind],
                env=env, stdout=output, stderr=subprocess.STDOUT, **stoppable(),
            )  # fmt: skip
        cleanups.callback(_stop_child, daemon, _ask_to_stop)
        ready = _wait_for_line(daemon, daemon_log, DEMO_READY_LINE, DEMO_READY_TIMEOUT_S)
        if ready is None:
            print(f"the daemon did not become ready:\n{daemon_log.read_text()}", flush=True)
            return 1
        print(ready, flush=True)

        status = _run([python, "examples/train_digits.py", "--endpoint", bind], env)
        if status:
            return status
        print(f"demo finished in {time.monotonic() - began:.0f} s", flush=True)
        return 0


def _ask_to_stop(daemon: subprocess.Popen) -> None:
    """What stops ``mongofeed serve`` in order: SIGTERM, or Ctrl-Break on Windows."""
    daemon.send_signal(STOP_REQUESTS[0])


def _wait_for_line(
    process: subprocess.Popen, output: Path, prefix: str, timeout_s: float
) -> str | None:
    """The first line of ``output`` that starts with ``prefix``, once the process writes it;
    None if it exits or the time is up first."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in output.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if process.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(DEMO_READY_POLL_S)
