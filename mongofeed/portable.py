"""What differs between operating systems, in one place.

- Internal sockets (supervisor, workers, sink): ``ipc://`` in a private folder where ZeroMQ
  has it (every POSIX system), loopback ``tcp://`` on a random port where it does not
  (Windows). Chosen by capability (``zmq.has("ipc")``), not by platform name.
- The private folder is ``mongofeed-<pid>-*`` in the temp folder; a daemon killed with
  SIGKILL cannot remove its own, so the next daemon removes those whose pid is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import zmq

log = logging.getLogger(__name__)

RUNTIME_DIR_PREFIX = "mongofeed-"  # + owner pid + "-": stale once that pid is gone
_RUNTIME_DIR_NAME = re.compile(rf"{RUNTIME_DIR_PREFIX}(\d+)-\w+")


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
    """Remove the ``mongofeed-<pid>-*`` folders of this user whose pid is no longer alive."""
    parent = parent or tempfile.gettempdir()
    for entry in os.scandir(parent):
        match = _RUNTIME_DIR_NAME.fullmatch(entry.name)
        if (match and entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_uid == os.getuid()
                and not pid_alive(int(match[1]))):
            log.info("removing %s, left behind by a daemon that was killed", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def bind_internal(socket: zmq.Socket, runtime_dir: str | None, name: str) -> str:
    """Bind ``socket`` for the daemon's own processes; returns the endpoint to connect to."""
    if runtime_dir is None:
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    endpoint = f"ipc://{os.path.join(runtime_dir, name)}"
    socket.bind(endpoint)
    return endpoint
