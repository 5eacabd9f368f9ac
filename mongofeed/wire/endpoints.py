"""ZeroMQ endpoints as a config or a Consumer names them: checked, the default control
endpoint beside the data one, and the host (CurveZMQ's test for loopback)."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigError


def check_endpoint(endpoint: str, key: str, where: str = "<option>") -> str:
    """A ZeroMQ endpoint we can bind and connect: tcp://HOST:PORT or ipc://PATH."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"{where}: {key} must be a string endpoint")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or not 0 < port < 65535:
        raise ConfigError(f"{where}: {key} = {endpoint!r} is not an endpoint like "
                          f"tcp://127.0.0.1:5555 or ipc:///tmp/mongofeed.sock")
    return endpoint


def next_port(endpoint: str) -> str:
    """The default control endpoint: the same host, port + 1 (ipc: a sibling path)."""
    if endpoint.startswith("ipc://"):
        return endpoint + ".control"
    parts = urlsplit(endpoint)
    host = parts.netloc.rsplit(":", 1)[0]
    return f"tcp://{host}:{parts.port + 1}"


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint, None for ipc://."""
    return urlsplit(endpoint).hostname if endpoint.startswith("tcp://") else None
