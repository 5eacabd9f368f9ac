"""The user's functions ([transform]), imported by reference (``"module:name"``) and checked
to take the arguments that ``transform`` gives them, so that a wrong reference stops
``serve`` at start (the supervisor loads them once, then each worker after its spawn).

**Security.** The daemon imports exactly the modules its config names, from
``transform.paths`` and the installed packages: whoever can change the config can run code
as the daemon, as with ``allow_pickle``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Callable

from ..errors import ConfigError
from .config import TransformConfig

SIGNATURES = {"transform.document": ("fields", "doc", "rng"),
              "transform.batch": ("arrays", "rng")}


def load_functions(transform: TransformConfig, where: str) -> dict[str, Callable]:
    """The configured functions by key, imported (``transform.paths`` first on sys.path);
    a ``ConfigError`` naming the key when one cannot be imported or called so. ``serve``
    calls it once in the supervisor, to stop at start, then each worker after its spawn."""
    for path in reversed(transform.paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    return {key: _load(key, ref, transform, where) for key, ref in transform.functions.items()}


def _load(key: str, ref: str, transform: TransformConfig, where: str) -> Callable:
    module_name, _, attribute = ref.partition(":")
    what = f"{where}: {key} = {ref!r}"
    searched = f"transform.paths {list(transform.paths)} and the installed packages"
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise ConfigError(f"{what}: no module {module_name!r} in {searched}") from None
        raise ConfigError(f"{what}: importing {module_name} failed: {describe(exc)}") from exc
    except Exception as exc:  # the module's own code failed
        raise ConfigError(f"{what}: importing {module_name} failed: {describe(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{what}: module {module_name} ({_file(target)}) has no "
                              f"{attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{what}: {attribute} is a {type(target).__name__}, not a function")
    try:
        feed = {"feed": "train"} if takes_feed(target) else {}
        inspect.signature(target).bind(*SIGNATURES[key], **feed)
    except TypeError:
        raise ConfigError(f"{what}: {attribute} must take ({', '.join(SIGNATURES[key])}) and "
                          f"optionally feed") from None
    except ValueError:
        pass  # no signature to check (a builtin)
    return target


def takes_feed(function: Callable) -> bool:
    """Whether ``function`` has a parameter named feed (it then gets the feed's name)."""
    try:
        return "feed" in inspect.signature(function).parameters
    except ValueError:
        return False


def _file(module) -> str:
    return getattr(module, "__file__", None) or "a namespace package"


def describe(exc: BaseException) -> str:
    """An exception in one line: its type, its message and where it was raised (the
    innermost frame outside installed packages, else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "site-packages" not in f.filename]
    where = ""
    if frames:
        frame = (own or frames)[-1]
        where = f" (at {frame.filename}:{frame.lineno} in {frame.name})"
    return f"{type(exc).__name__}: {exc}{where}"
