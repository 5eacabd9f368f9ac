"""`mongofeed status` of a daemon that uses CurveZMQ keys: a listed key gets the status,
no keys get a clear 'no answer'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mongofeed.testing import Daemon
from tests.chaos.support import curve_daemon
from tests.support import REPO

NO_ANSWER_WITHIN_S = 2


def status(daemon: Daemon, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mongofeed", "status", "--control",
                           daemon.control, "--json", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={**os.environ, **(env or {})})


def test_status_with_curve_keys(tmp_path, mongo_uri, db):
    daemon, keys = curve_daemon(tmp_path, mongo_uri, db)
    server_public, trainer_secret = keys["server_public"], keys["trainer_secret"]
    with daemon:
        by_option = status(daemon, "--server-key", server_public, "--client-key",
                           trainer_secret)
        by_env = status(daemon, env={"MONGOFEED_SERVER_KEY": server_public,
                                     "MONGOFEED_CLIENT_KEY": trainer_secret})
        without = status(daemon, "--timeout", str(NO_ANSWER_WITHIN_S))
        half = status(daemon, "--server-key", server_public)
    for done in (by_option, by_env):
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["pid"] == daemon.process.pid
    assert without.returncode == 1 and "no answer from the mongofeed daemon" in without.stderr
    assert half.returncode == 2 and "--server-key and --client-key go together" in half.stderr
