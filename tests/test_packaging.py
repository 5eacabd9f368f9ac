"""What `pip install mongofeed` puts on a machine: a wheel built from this checkout holds every
module of the source tree (but the development commands) and its CLI runs from it alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mongofeed

SOURCE = Path(mongofeed.__file__).parent
NOT_SHIPPED = {"mongofeed/dev"}  # checkout-only: the test server and the runners


def source_modules() -> set[str]:
    """Every .py file of the package, as the wheel names it, but those of NOT_SHIPPED."""
    return {path.relative_to(SOURCE.parent).as_posix() for path in SOURCE.rglob("*.py")
            if "__pycache__" not in path.parts
            and not any(path.relative_to(SOURCE.parent).as_posix().startswith(folder + "/")
                        for folder in NOT_SHIPPED)}


def test_the_wheel_holds_every_module_and_its_cli_runs_from_it(tmp_path):
    # From a copy: pip builds in the source folder, and a build/ left there by an earlier
    # build would put files into the wheel that the tree no longer has.
    checkout = tmp_path / "checkout"
    shutil.copytree(SOURCE, checkout / "mongofeed",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(SOURCE.parent / name, checkout)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(checkout)],
                   check=True, timeout=300)
    wheel, = tmp_path.glob("mongofeed-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert shipped == source_modules()

    # Only the wheel on the path (not the checkout): the CLI imports every side from it.
    env = {"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin"}
    code = ("import mongofeed, mongofeed.daemon.supervisor, mongofeed.tools.cli; "
            "print(mongofeed.__file__)")
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(wheel))
    for command in (["--help"], ["serve", "--help"], ["bench", "--help"]):
        run = subprocess.run([sys.executable, "-m", "mongofeed", *command], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (command, run.stderr)
