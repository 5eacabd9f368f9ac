"""A SIGKILLed daemon cannot remove its ipc folder; the next daemon to start removes it.
(Only where the daemon uses ipc: there is no folder with the tcp internal transport.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mongofeed.portable import remove_stale_runtime_dirs, resolve_internal_transport
from mongofeed.testing import Daemon, internal_transport
from tests.chaos.support import feed_config, private_tmp

pytestmark = pytest.mark.skipif(resolve_internal_transport(internal_transport()) != "ipc",
                                reason="the daemon uses no ipc folder here (tcp)")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_next_daemon_removes_the_folder_of_a_killed_one(tmp_path, mongo_uri, db):
    config = feed_config(tmp_path, mongo_uri, db)
    tmp, env = private_tmp(tmp_path)
    killed = Daemon(config, workers=1, env=env).start()
    [left] = tmp.glob(f"mongofeed-{killed.process.pid}-*")
    killed.kill()
    assert left.exists()
    with Daemon(config, workers=1, env=env) as daemon:
        assert not left.exists()
        assert len(list(tmp.glob(f"mongofeed-{daemon.process.pid}-*"))) == 1


def test_only_our_dead_daemons_folders_are_removed(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f"mongofeed-{dead}-abc_12"
    kept = [tmp_path / f"mongofeed-{os.getpid()}-abc_12",  # its daemon is alive
            tmp_path / f"mongofeed-{dead}",                # not our pattern
            tmp_path / f"other-{dead}-abc_12"]
    for folder in [stale, *kept]:
        folder.mkdir()
    if os.geteuid() == 0:  # another user's folder, even of a dead pid
        foreign = tmp_path / f"mongofeed-{dead}-foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        kept.append(foreign)
    remove_stale_runtime_dirs(str(tmp_path))
    assert not stale.exists()
    assert all(folder.exists() for folder in kept)
