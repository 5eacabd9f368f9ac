"""What differs between operating systems, in one place.

- Internal sockets (supervisor, workers, sink): ``ipc://`` in a private folder where ZeroMQ
  has it (every POSIX system), loopback ``tcp://`` on a random port where it does not
  (Windows). Chosen by capability (``zmq.has("ipc")``), not by platform name.
- The private folder is ``mongofeed-<pid>-*`` in the temp folder; a daemon killed with
  SIGKILL cannot remove its own, so the next daemon removes those whose pid is gone (two
  daemons starting at once may both try: a folder that vanishes meanwhile is fine).
- An ipc path must fit a socket address (``IPC_PATH_MAX`` bytes). A TMPDIR too long for
  that is refused with a message naming TMPDIR, rather than moving the internal sockets to
  loopback tcp: the private folder is what keeps other local users off the workers' sockets
  (a loopback port is open to all of them), and that is not ours to give up silently.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile

import zmq

from .errors import ConfigError

log = logging.getLogger(__name__)

RUNTIME_DIR_PREFIX = "mongofeed-"  # + owner pid + "-": stale once that pid is gone
_RUNTIME_DIR_NAME = re.compile(rf"{RUNTIME_DIR_PREFIX}(\d+)-\w+")
# sockaddr_un.sun_path less its final NUL, as pyzmq measured it where it was built (107 on
# Linux, 103 on macOS); 0 where ZeroMQ has no ipc.
IPC_PATH_MAX = getattr(zmq, "IPC_PATH_MAX_LEN", 0)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX: signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def has_ipc() -> bool:
    return zmq.has("ipc")


def make_runtime_dir() -> str | None:
    """The daemon's private folder for ipc endpoints (None where ipc is missing), after
    removing the folders that killed daemons left behind."""
    if not has_ipc():
        return None
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


def bind_internal(socket: zmq.Socket, runtime_dir: str | None, name: str) -> str:
    """Bind ``socket`` for the daemon's own processes; returns the endpoint to connect to."""
    if runtime_dir is None:
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    endpoint = f"ipc://{os.path.join(runtime_dir, name)}"
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"TMPDIR ({tempfile.gettempdir()}) is too long for the daemon's "
                              f"private sockets: {endpoint} has more than the {IPC_PATH_MAX} "
                              f"bytes of a socket address; set TMPDIR to a shorter folder, "
                              f"e.g. /tmp") from None
        raise
    return endpoint
