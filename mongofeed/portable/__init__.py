"""What differs between operating systems, in one place: this package; standard library only
at import, so the development commands (``python3 -m mongofeed.dev``) use it before the venv
exists. No module outside it tests ``sys.platform`` or ``os.name`` (tests/test_platforms.py
checks it); where it can, it chooses by capability (does ZeroMQ have ipc, does the signal
exist) rather than by the platform's name.

For the daemon:
- Internal sockets (supervisor, workers, sink): ``serve.internal_transport``, resolved by
  ``resolve_internal_transport``: ``ipc://`` in a private folder where ZeroMQ has it (every
  POSIX system), loopback ``tcp://`` on random ports where it does not (Windows) or when
  asked for (which is how the Windows path is tested on Linux).
- The private folder is ``mongofeed-<pid>-*`` in the temp folder; a daemon killed with
  SIGKILL cannot remove its own, so the next daemon removes those whose pid is gone (two
  daemons starting at once may both try: a folder that vanishes meanwhile is fine).
- Shared memory (batches that workers write and same-host consumers map): files named like
  the private folder (``shared_memory_name``: ``mongofeed-<pid>-<tag>``) in a folder that
  lives in memory, ``/dev/shm`` where there is one (Linux) and a file's memory can be
  reserved up front (``posix_fallocate``: a full folder is an error when a region is made,
  never a SIGBUS in a worker). Elsewhere (macOS, Windows) there is none and batches travel
  in messages. Stale files are removed like stale folders, and by the workers of a daemon
  that was killed.
- An ipc path must fit a socket address (``ipc_path_max()`` bytes). A TMPDIR too long for
  that is refused with a message naming TMPDIR, rather than moving the internal sockets to
  loopback tcp: the private folder is what keeps other local users off the workers' sockets
  (a loopback port is open to all of them), and that is not ours to give up silently.
- Signals: ``STOP_SIGNALS`` ask the daemon to stop (SIGINT, SIGTERM, and SIGBREAK where it
  exists: Windows' Ctrl-Break); workers ignore the ``CONSOLE_INTERRUPTS`` that a terminal
  sends to every process in it. Another process asks a daemon to stop with
  ``STOP_REQUESTS`` (on Windows: CTRL_BREAK_EVENT to a daemon started ``stoppable()``,
  because os.kill with SIGTERM there ends a process at once).
- A worker notices that its supervisor is gone by polling
  ``multiprocessing.parent_process().is_alive()``, which works on every platform (no
  ``prctl``, no ``getppid`` check): nothing here.
- Ending a process: ``end_process`` (terminate, then kill) and ``kill_process_group``.

For the development commands and the tests: ``dev`` (the executable suffix, the venv layout,
a server started detached, a port checked, a file locked, a child's exit status).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"

# SIGTERM asks a process to stop. On Windows os.kill(pid, SIGTERM) is TerminateProcess (there
# is nothing gentler for a process without a console), and there is no SIGKILL.
STOP_SIGNAL = signal.SIGTERM
KILL_SIGNAL = getattr(signal, "SIGKILL", signal.SIGTERM)


def pid_alive(pid: int, command: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, if ``command`` is given, one
    whose command line contains it, so that a recycled pid is not taken for ours (Linux;
    elsewhere only whether the pid is alive)."""
    if WINDOWS:
        return _windows_pid_alive(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or no /proc (macOS)
        try:
            os.kill(pid, 0)  # signal 0: checks without sending anything
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, another user's
        return True
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    if command is None:
        return True
    try:
        return command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    process_query_limited_information = 0x1000
    still_active = 259
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and (
            code.value == still_active
        )
    finally:
        kernel32.CloseHandle(handle)


def signal_pid(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``, which may have exited meanwhile."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the daemon's private folder and internal sockets ------------------------------------

RUNTIME_DIR_PREFIX = "mongofeed-"  # + owner pid + "-": stale once that pid is gone
_RUNTIME_DIR_NAME = re.compile(rf"{RUNTIME_DIR_PREFIX}(\d+)-\w+")


def has_ipc() -> bool:
    """Whether ZeroMQ offers ipc:// here (every POSIX system; not Windows)."""
    import zmq

    return zmq.has("ipc")


def make_runtime_dir() -> str:
    """The daemon's private folder for ipc endpoints, after removing the folders that killed
    daemons left behind."""
    remove_stale_runtime_dirs()
    return tempfile.mkdtemp(prefix=f"{RUNTIME_DIR_PREFIX}{os.getpid()}-")


def remove_stale_runtime_dirs(parent: str | None = None):
    """Remove the ``mongofeed-<pid>-*`` folders of this user whose pid is no longer alive;
    one that another daemon removes meanwhile is simply gone."""
    parent = parent or tempfile.gettempdir()
    try:
        entries = list(os.scandir(parent))
    except OSError as exc:
        log.warning("cannot look for stale folders in %s: %s", parent, exc)
        return
    for entry in entries:
        match = _RUNTIME_DIR_NAME.fullmatch(entry.name)
        if not match or pid_alive(int(match[1])):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or \
                    entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue  # another daemon removed it first
        log.info("removing %s, left behind by a daemon that was killed", entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)


def ipc_path_max() -> int:
    """The longest ipc path a socket address holds (sockaddr_un.sun_path less its final NUL,
    as pyzmq measured it where it was built: 107 on Linux, 103 on macOS); 0 without ipc."""
    import zmq

    return getattr(zmq, "IPC_PATH_MAX_LEN", 0)


def bind_internal(socket, runtime_dir: str | None, name: str) -> str:
    """Bind ``socket`` for the daemon's own processes; returns the endpoint to connect to."""
    import zmq

    if runtime_dir is None:
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    endpoint = f"ipc://{os.path.join(runtime_dir, name)}"
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"TMPDIR ({tempfile.gettempdir()}) is too long for the daemon's "
                              f"private sockets: {endpoint} has more than the "
                              f"{ipc_path_max()} bytes of a socket address; set TMPDIR to a "
                              f"shorter folder, e.g. /tmp") from None
        raise
    return endpoint


INTERNAL_TRANSPORTS = ("auto", "ipc", "tcp")
# The environment variable of serve.internal_transport; the test runner's tcp pass sets it.
INTERNAL_TRANSPORT_ENV = "MONGOFEED_INTERNAL_TRANSPORT"


def resolve_internal_transport(setting: str, ipc_available: bool | None = None) -> str:
    """``ipc`` or ``tcp`` for the daemon's own sockets, from ``serve.internal_transport``:
    ``auto`` is ipc where ZeroMQ has it (every POSIX system) and tcp where it does not
    (Windows). ``ipc_available`` (default: ask ZeroMQ) lets a test decide. ValueError for a
    setting that cannot work here."""
    if setting not in INTERNAL_TRANSPORTS:
        raise ValueError(f"must be one of {', '.join(INTERNAL_TRANSPORTS)}, not {setting!r}")
    if ipc_available is None:
        ipc_available = has_ipc()
    if setting == "auto":
        return "ipc" if ipc_available else "tcp"
    if setting == "ipc" and not ipc_available:
        raise ValueError("'ipc', but the ZeroMQ here has no ipc:// transport (as on Windows);"
                         " use 'tcp' or 'auto'")
    return setting


# -- signals and console interrupts --------------------------------------------------------

# What a terminal sends to every process attached to it: Ctrl-C, and Ctrl-Break on Windows.
CONSOLE_INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGBREAK")
                           if hasattr(signal, name))
# What asks the daemon to stop. SIGTERM exists everywhere, but on Windows nothing delivers it
# from outside (os.kill with SIGTERM there is TerminateProcess): SIGBREAK stands in for it.
STOP_SIGNALS = (*CONSOLE_INTERRUPTS, signal.SIGTERM)

if hasattr(signal, "CTRL_BREAK_EVENT"):  # Windows
    # What another process can send to stop a daemon gracefully: Ctrl-Break, to the process
    # group of a daemon started with stoppable() (it arrives as SIGBREAK).
    STOP_REQUESTS: tuple[int, ...] = (signal.CTRL_BREAK_EVENT,)
else:
    STOP_REQUESTS = (signal.SIGTERM, signal.SIGINT)

# Whether a process can be frozen and thawed (SIGSTOP, SIGCONT): how tests make a worker or a
# trainer hang. Windows has no such signal.
CAN_SUSPEND = hasattr(signal, "SIGSTOP")


def on_stop_signals(handler) -> None:
    """Install ``handler(signum, frame)`` for every signal that asks the daemon to stop."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def ignore_console_interrupts() -> None:
    """For worker processes: a Ctrl-C (Ctrl-Break) in the terminal reaches every process in
    it; the supervisor gets it too and stops the workers in order."""
    for sig in CONSOLE_INTERRUPTS:
        signal.signal(sig, signal.SIG_IGN)


def stoppable() -> dict:
    """Popen keywords for a child that ``STOP_REQUESTS[0]`` must reach alone: on Windows its
    own process group (its workers share it; a Ctrl-C in the terminal no longer reaches it)."""
    if hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP"):
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {}


# -- ending processes ------------------------------------------------------------------------


def end_process(process, grace_s: float) -> None:
    """End a ``multiprocessing`` child that did not stop when asked: terminate (SIGTERM),
    then kill (SIGKILL) if it is still there after ``grace_s``. On Windows both are
    TerminateProcess, so the first already ends it."""
    process.terminate()
    process.join(grace_s)
    if process.is_alive():
        process.kill()
        process.join()


def own_process_group() -> dict:
    """Popen keywords that give a child a process group of its own, so that
    ``kill_process_group`` ends it with every process it started."""
    if hasattr(os, "killpg"):
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}


def kill_process_group(process: subprocess.Popen) -> None:
    """Kill a child started with ``own_process_group()`` and all its descendants: SIGKILL to
    its group, or on Windows ``taskkill /T /F`` over its process tree."""
    if hasattr(os, "killpg"):
        try:
            os.killpg(process.pid, KILL_SIGNAL)
        except ProcessLookupError:
            pass
    else:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- shared memory -----------------------------------------------------------------------------

# A name is at most 31 bytes on macOS (PSHMNAMLEN), the leading "/" included.
SHARED_MEMORY_NAME_MAX = 30


def shared_memory_name(tag: str, owner_pid: int | None = None) -> str:
    """The name of a shared-memory segment that the daemon ``owner_pid`` (default: this
    process) creates: ``mongofeed-<pid>-<tag>``, the pattern of its private folder, so a
    killed daemon's segments are found the same way. ValueError when too long for macOS."""
    name = f"{RUNTIME_DIR_PREFIX}{owner_pid or os.getpid()}-{tag}"
    if len(name) > SHARED_MEMORY_NAME_MAX or not re.fullmatch(r"[\w-]+", tag):
        raise ValueError(f"shared memory name {name!r}: the tag must be letters, digits, _ "
                         f"or -, and the name at most {SHARED_MEMORY_NAME_MAX} characters")
    return name


SHARED_MEMORY_DIR = Path("/dev/shm")
SHARED_MEMORY_DIR_ENV = "MONGOFEED_SHM_DIR"  # another folder, or "" for none (tests)


def shared_memory_dir() -> Path | None:
    """Where the daemon's shared memory lives, as files it can list and remove: a folder in
    memory, ``/dev/shm`` (Linux), where a file's pages can be reserved up front
    (``os.posix_fallocate``). None elsewhere: macOS (no such folder, and POSIX segments that
    cannot be listed, so a killed daemon's would stay) and Windows (no fallocate); there
    batches travel in messages. ``MONGOFEED_SHM_DIR`` names another folder, or none if
    empty."""
    folder = os.environ.get(SHARED_MEMORY_DIR_ENV)
    folder = SHARED_MEMORY_DIR if folder is None else Path(folder) if folder else None
    if folder is None or not hasattr(os, "posix_fallocate"):
        return None
    return folder if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK) else None


ABSTRACT_SOCKETS = sys.platform.startswith("linux")
"""Unix sockets with abstract names (no file; gone with their process): Linux's. The
same-host channel (``mongofeed.channel``) needs them; elsewhere there is no shared memory
either (``shared_memory_dir``)."""


def remove_stale_shared_memory(folder: Path | None, owner: int | None = None):
    """Remove this user's shared-memory files whose daemon is gone (or, with ``owner``, those
    of that daemon pid: what its workers do when they find it gone). Files of our own pid
    are stale too: a daemon calls this before it creates any."""
    if folder is None:
        return
    for entry in os.scandir(folder):
        match = _RUNTIME_DIR_NAME.fullmatch(entry.name)
        try:
            if not (match and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == os.getuid()):
                continue
            pid = int(match[1])
            if pid == owner or (owner is None and (pid == os.getpid() or not pid_alive(pid))):
                log.info("removing %s, left behind by a daemon that was killed", entry.path)
                os.unlink(entry.path)
        except FileNotFoundError:
            pass  # a sibling (or another daemon starting) removed it first
