"""``mongofeed --version`` works through the installed console script and bin/mongofeed."""

import subprocess
import sys
from pathlib import Path

import pytest

from mongofeed import __version__

REPO = Path(__file__).resolve().parent.parent


def version_of(*command):
    result = subprocess.run(
        [*command, "--version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_console_script():
    script = Path(sys.executable).parent / "mongofeed"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}; run `make install`")
    assert version_of(str(script)) == f"mongofeed, version {__version__}"


def test_checkout_launcher():
    assert version_of(str(REPO / "bin" / "mongofeed")) == f"mongofeed, version {__version__}"


def test_checkout_launcher_with_this_python():
    launcher = str(REPO / "bin" / "mongofeed")
    assert version_of(sys.executable, launcher) == f"mongofeed, version {__version__}"
