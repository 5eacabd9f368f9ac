"""The OS differences that only the development commands (``python3 -m mongofeed.dev``: the
private FerretDB, the test runner) and the tests need: the executable suffix, the venv
layout, how a server is started detached, interrupted and reaped, how a port is checked and
a file locked, and a child's exit status. Standard library only, like the package; asking
which platform this is stays in ``mongofeed.portable`` (``WINDOWS``), which ships.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..portable import WINDOWS

EXE_SUFFIX = ".exe" if WINDOWS else ""
LOCK_RETRY_S = 0.5


def venv_python(venv: Path) -> Path | None:
    """The Python of a virtual environment, on either layout; None if there is none."""
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return None


def detached() -> dict:
    """Popen keywords for a server that outlives its starter and that a Ctrl-C in the
    starter's terminal does not reach (its own session; on Windows no console)."""
    if WINDOWS:
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
        return {"creationflags": flags}
    return {"start_new_session": True}


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is our exited child (no zombie left)."""
    if WINDOWS:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def interrupt(process: subprocess.Popen) -> None:
    """What a Ctrl-C does to a child: SIGINT, or on Windows (no SIGINT to one process)
    terminate."""
    if WINDOWS:
        process.terminate()
    else:
        process.send_signal(signal.SIGINT)


def exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now."""
    with socket.socket() as sock:
        if not WINDOWS:  # as Go's listener does; on Windows it would allow taking a used port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed), waiting for it."""
    with open(path, "a+b") as file:
        if WINDOWS:
            import msvcrt

            file.seek(0)  # every process locks the same first byte
            while True:
                try:
                    msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    time.sleep(LOCK_RETRY_S)
        else:
            import fcntl

            fcntl.flock(file, fcntl.LOCK_EX)
        yield  # closing the file releases the lock
