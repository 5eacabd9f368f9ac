"""What differs between operating systems stays in mongofeed/portable/, and each difference
can be chosen or exercised here on Linux: the internal transport (the tcp that Windows uses),
its config key and option, the test runner's tcp pass, process termination, the
shared-memory names. The daemon-level checks over tcp are the runner's tcp pass (``TCP_PASS``).
"""

from __future__ import annotations

import ast
import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from mongofeed import portable
from mongofeed.daemon.config import parse_config
from mongofeed.dev import run
from mongofeed.errors import ConfigError
from mongofeed.portable import (
    INTERNAL_TRANSPORT_ENV,
    end_process,
    kill_process_group,
    own_process_group,
    resolve_internal_transport,
    shared_memory_dir,
    shared_memory_name,
)
from mongofeed.tools.cli import main
from tests.support import REPO

# What names the platform instead of testing a capability: (module, attribute).
PLATFORM_QUERIES = {("sys", "platform"), ("sys", "getwindowsversion"), ("os", "name"),
                    ("os", "uname"), ("platform", "system"), ("platform", "win32_ver"),
                    ("platform", "mac_ver"), ("platform", "uname")}
PORTABLE = REPO / "mongofeed" / "portable"


def platform_queries(path: Path) -> list[str]:
    """Where ``path`` reads one of PLATFORM_QUERIES, as ``line: module.attribute``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pairs = [(node.value.id, node.attr)]
        elif isinstance(node, ast.ImportFrom):
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        found += [f"{node.lineno}: {m}.{a}" for m, a in pairs if (m, a) in PLATFORM_QUERIES]
    return found


def python_files() -> list[Path]:
    files = [*REPO.glob("mongofeed/**/*.py"), *REPO.glob("tests/**/*.py"),
             *REPO.glob("examples/**/*.py"), *(p for p in REPO.glob("bin/*") if p.is_file())]
    return sorted(p for p in files if PORTABLE not in p.parents)


def test_only_the_portable_package_asks_which_platform_this_is():
    assert platform_queries(PORTABLE / "__init__.py"), "the scan would not notice a platform query"
    offenders = {str(p.relative_to(REPO)): q for p in python_files() if (q := platform_queries(p))}
    assert offenders == {}, "test a capability, or add a function to mongofeed/portable/"


# -- the internal transport ----------------------------------------------------------------


@pytest.mark.parametrize("setting, ipc_available, resolved", [
    ("auto", True, "ipc"), ("auto", False, "tcp"), ("ipc", True, "ipc"),
    ("tcp", True, "tcp"), ("tcp", False, "tcp"),
])
def test_internal_transport_is_resolved_by_capability(setting, ipc_available, resolved):
    assert resolve_internal_transport(setting, ipc_available) == resolved


def config_with(internal_transport: str = "auto", bind: str = "tcp://127.0.0.1:5555"):
    return parse_config({
        "source": {"database": "d", "collection": "c"},
        "fields": {"x": {"decode": "scalar", "dtype": "int64"}},
        "serve": {"internal_transport": internal_transport, "bind": bind},
    }, "feed.toml")


def test_config_resolves_the_internal_transport_and_refuses_ipc_without_it(monkeypatch):
    assert config_with("tcp").serve.internal_transport == "tcp"
    assert config_with("auto").serve.internal_transport == (
        "ipc" if portable.has_ipc() else "tcp")
    monkeypatch.setattr(portable, "has_ipc", lambda: False)  # a ZeroMQ as on Windows
    assert config_with("auto").serve.internal_transport == "tcp"
    with pytest.raises(ConfigError, match=r"feed.toml: serve.internal_transport = 'ipc', but "
                       r"the ZeroMQ here has no ipc:// transport .*use 'tcp' or 'auto'"):
        config_with("ipc")
    with pytest.raises(ConfigError, match="serve.internal_transport must be one of auto, ipc, "
                       "tcp, not 'udp'"):
        config_with("udp")
    with pytest.raises(ConfigError, match=r"feed.toml: serve.bind = 'ipc:///run/feed', but the "
                       r"ZeroMQ here has no ipc:// transport .*use tcp://127.0.0.1:PORT"):
        config_with(bind="ipc:///run/feed")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_serve_takes_the_internal_transport_as_option_or_environment(how):
    args, env = ["serve", "--internal-transport", "udp"], {}
    if how == "environment":
        args, env = ["serve"], {"MONGOFEED_INTERNAL_TRANSPORT": "udp"}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2
    assert "'udp' is not one of 'auto', 'ipc', 'tcp'" in result.output


# -- the test runner's passes --------------------------------------------------------------


def test_runner_runs_the_internal_socket_tests_again_over_tcp():
    ipc_pass, tcp_pass = run.suite_passes(["-x"], {}, lambda: True)
    assert (ipc_pass.env, ipc_pass.pytest_args) == ({INTERNAL_TRANSPORT_ENV: "ipc"}, ["-x"])
    assert (tcp_pass.env, tcp_pass.pytest_args) == ({INTERNAL_TRANSPORT_ENV: "tcp"},
                                                    ["-x", *run.TCP_PASS])
    # One pass: tests named by path, tcp asked for already, or no ipc here (Windows).
    for args, environ, ipc in ((["-x", "tests/test_wire.py"], {}, True),
                               (["tests/test_wire.py::test_x"], {}, True),
                               ([], {INTERNAL_TRANSPORT_ENV: "tcp"}, True), ([], {}, False)):
        [only] = run.suite_passes(args, environ, lambda ipc=ipc: ipc)
        assert (only.env, only.pytest_args) == ({}, args)


def test_every_test_of_the_tcp_pass_exists():
    for selection in run.TCP_PASS:
        path, _, name = selection.partition("::")
        assert (REPO / path).is_file(), selection
        assert not name or f"def {name}(" in (REPO / path).read_text(), selection


# -- ending processes ------------------------------------------------------------------------


def ignore_sigterm(ready):
    """A child that a polite stop does not end (it ignores SIGTERM, where that exists)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(60)


def test_end_process_kills_a_child_that_ignores_the_polite_stop():
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=ignore_sigterm, args=(ready,), daemon=True)
    child.start()
    assert ready.wait(30)
    end_process(child, grace_s=0.5)
    assert not child.is_alive()


SPAWNS_A_GRANDCHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def test_kill_process_group_ends_the_child_and_what_it_started():
    child = subprocess.Popen([sys.executable, "-c", SPAWNS_A_GRANDCHILD], text=True,
                             stdout=subprocess.PIPE, **own_process_group())
    grandchild = psutil.Process(int(child.stdout.readline()))
    kill_process_group(child)
    child.wait(10)
    child.stdout.close()
    psutil.wait_procs([grandchild], timeout=10)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


# -- shared memory ---------------------------------------------------------------------------


def test_shared_memory_names_follow_the_private_folder_and_fit_macos():
    name = shared_memory_name("ring0", owner_pid=4_194_304)
    assert name == "mongofeed-4194304-ring0"
    assert len(name) <= portable.SHARED_MEMORY_NAME_MAX
    for bad in ("x" * 13, "a/b"):
        with pytest.raises(ValueError, match="shared memory name"):
            shared_memory_name(bad, owner_pid=4_194_304)
    folder = shared_memory_dir()
    assert folder is None or folder.is_dir()
