"""A SIGKILLed daemon cannot remove its ipc folder; the next daemon to start removes it, also
when another daemon starts at the same moment; a TMPDIR too long for an ipc path is refused
naming TMPDIR (issue 9, item 17). Only where the daemon uses ipc: over the tcp internal
transport (Windows) there is no folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mongofeed import portable
from mongofeed.dev.portable import port_is_free
from mongofeed.portable import (
    ipc_path_max,
    remove_stale_runtime_dirs,
    resolve_internal_transport,
)
from mongofeed.testing import Daemon, free_port_pair, internal_transport
from tests.chaos.support import feed_config, private_tmp
from tests.chaos.test_bad_input import refused
from tests.support import REPO

STALE_FOLDERS = 300
CLEANERS = 4

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


def test_a_folder_another_daemon_removes_mid_scan_is_no_error(tmp_path, monkeypatch):
    """Two daemons starting at once both list the stale folders; the one that comes second
    to a folder finds it gone. Here the "other daemon" removes the next folder while this
    one removes the first."""
    dead = dead_pid()
    first, second = (tmp_path / f"mongofeed-{dead}-{n}" for n in ("a", "b"))
    for folder in (first, second):
        folder.mkdir()
    real_rmtree = shutil.rmtree

    def rmtree_raced(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        for other in (first, second):
            real_rmtree(other, ignore_errors=True)  # the other daemon, meanwhile

    monkeypatch.setattr(portable.shutil, "rmtree", rmtree_raced)
    remove_stale_runtime_dirs(str(tmp_path))
    assert not first.exists() and not second.exists()


CLEANER = ("import sys; from mongofeed.portable import remove_stale_runtime_dirs; "
           "remove_stale_runtime_dirs(sys.argv[1])")


def test_daemons_starting_at_once_all_clean_up_without_error(tmp_path):
    dead = dead_pid()
    for n in range(STALE_FOLDERS):
        (tmp_path / f"mongofeed-{dead}-{n}" / "inner").mkdir(parents=True)
    cleaners = [subprocess.Popen([sys.executable, "-c", CLEANER, str(tmp_path)], cwd=REPO,
                                 stderr=subprocess.PIPE, text=True) for _ in range(CLEANERS)]
    errors = [c.communicate(timeout=60)[1] for c in cleaners]
    assert [c.returncode for c in cleaners] == [0] * CLEANERS, errors
    assert list(tmp_path.iterdir()) == []


def test_a_tmpdir_too_long_for_ipc_is_refused_naming_tmpdir(tmp_path, mongo_uri, db):
    """Refused rather than moving the internal sockets to loopback tcp (see mongofeed/portable:
    the private folder is what keeps other local users off the workers' sockets)."""
    config = feed_config(tmp_path, mongo_uri, db)
    long_tmp = tmp_path / ("t" * max(1, ipc_path_max() - len(str(tmp_path))))
    long_tmp.mkdir()
    port = free_port_pair()
    error = refused(config, port, env={"TMPDIR": str(long_tmp)})
    assert f"TMPDIR ({long_tmp}) is too long" in error and "shorter folder" in error
    assert port_is_free(port) and port_is_free(port + 1)
    assert list(long_tmp.iterdir()) == []  # its private folder is removed again
