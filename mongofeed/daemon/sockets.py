"""The supervisor's sockets, bound: the public ones consumers reach and the internal ones its
workers connect to.

```
 consumers                                            workers
 DEALER ── hello/heartbeat/bye/status ──▶ control ROUTER  (serve.control)
 DEALER ◀─ batches ── credit, releases ─▶ data ROUTER     (serve.bind)
 datagrams ◀─ descriptors ── credit ───▶ channel          (same host, shared memory)
                                          tasks ROUTER  ── task/warm/stop ──▶ DEALER (slot)
                                          sink PULL     ◀── batches ───────── PUSH
```

The public sockets speak CurveZMQ when ``serve.server_key`` is set, and get their limits
(largest message, send queue) before the bind, because every connection takes them from
the listener, which copies them when it binds. A monitor of the data socket
(``data_closed``) reports each consumer connection that closes: a ROUTER cannot drop the
batches queued to one peer, so a session's connection counts until it closes. The internal
ones use ``serve.internal_transport``: ipc in a private folder (removed on close), or
loopback tcp [portable] that asks for the run's password (``security``). No socket lingers:
at the close nothing waits for a peer. The channel (``mongofeed.channel``, Linux) is a plain
Unix datagram socket, polled with the others.
"""

from __future__ import annotations

import shutil

import zmq
from zmq.utils.monitor import parse_monitor_message

from ..channel import DaemonChannel, channels_supported
from ..errors import SourceError
from ..portable import bind_internal, make_runtime_dir
from ..security import (
    CurveServer,
    InternalEndpoints,
    guard_internal,
    internal_password,
    start_authenticator,
)
from ..wire import MAX_CONTROL_BYTES
from .config import ServeConfig

SOCKET_LINGER_MS = 0


class Sockets:
    def __init__(self, serve: ServeConfig):
        """Bind every socket; raises (a port in use, a bad key) with nothing left open."""
        self.context = zmq.Context()
        self.authenticator = None  # the ZAP handler, for client keys and internal tcp
        self.curve = None  # CurveServer when serve.server_key is set
        self.runtime_dir = None  # the ipc endpoints' private folder
        self.channel = None  # DaemonChannel where the system has them
        try:
            if serve.server_key or serve.internal_transport != "ipc":
                self.authenticator = start_authenticator(self.context)
            if serve.server_key:
                self.curve = CurveServer(self.authenticator, serve.server_key,
                                         serve.client_keys)
            # Replies keep ZeroMQ's default queue: with a small one, replies to a peer that
            # reads every one were dropped now and then (seen in the fuzz test; a ROUTER
            # counts a queue's fill from the reader's lagging reports, and drops beyond it).
            self.control = self.public(zmq.ROUTER, serve.control, MAX_CONTROL_BYTES)
            # Batches sent but not read stay in this queue: at most max_pending per consumer.
            self.data = self.public(zmq.ROUTER, serve.bind, MAX_CONTROL_BYTES, serve.max_pending)
            self.data.router_mandatory = 1
            # Which consumer connections close: batches queued to one stay until it does.
            self.data_closed = self.data.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            if serve.internal_transport == "ipc":
                self.runtime_dir = make_runtime_dir()
            password = None if self.runtime_dir else internal_password(self.authenticator)
            self.tasks = self.internal(zmq.ROUTER, password)
            task_endpoint = bind_internal(self.tasks, self.runtime_dir, "tasks")
            self.tasks.router_mandatory = 1
            self.tasks.router_handover = 1  # a restarted worker reuses its slot's identity
            self.sink = self.internal(zmq.PULL, password)
            self.internal_endpoints = InternalEndpoints(
                task_endpoint, bind_internal(self.sink, self.runtime_dir, "sink"), password)
            if channels_supported():
                self.channel = DaemonChannel()
        except BaseException:
            self.close()
            raise

    def socket(self, kind: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.linger = SOCKET_LINGER_MS
        return socket

    def internal(self, kind: int, password: str | None) -> zmq.Socket:
        """An internal socket, guarded by ``password`` (on tcp) before its bind."""
        socket = self.socket(kind)
        if password is not None:
            guard_internal(socket)
        return socket

    def public(self, kind: int, endpoint: str, max_message: int,
               sndhwm: int | None = None) -> zmq.Socket:
        """A public socket, its limits set before the bind (see the module)."""
        socket = self.socket(kind)
        socket.maxmsgsize = max_message
        if sndhwm is not None:
            socket.sndhwm = sndhwm
        if self.curve is not None:
            self.curve.apply(socket)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            socket.close()
            raise SourceError(f"cannot bind {endpoint}: {exc.strerror}; is another "
                              f"'mongofeed serve' running? choose another --bind") from None
        return socket

    def poller(self) -> zmq.Poller:
        """A poller for what arrives on any of them."""
        poller = zmq.Poller()
        for socket in (self.control, self.data, self.data_closed, self.tasks, self.sink):
            poller.register(socket, zmq.POLLIN)
        if self.channel is not None:
            poller.register(self.channel.fileno(), zmq.POLLIN)
        return poller

    def close(self):
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.curve = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.context is not None:
            self.context.destroy(linger=SOCKET_LINGER_MS)
            self.context = None
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None


def connection_of(frame: zmq.Frame) -> int | None:
    """The connection a received message came on (its socket's file descriptor, as the
    monitor's events name it); None where ZeroMQ does not say."""
    try:
        return frame.get(zmq.SRCFD)
    except (zmq.ZMQError, ValueError):
        return None


def closed_connection(frames: list) -> int | None:
    """The connection a monitor event of ``data_closed`` says was closed."""
    event = parse_monitor_message(frames)
    return event["value"] if event["event"] == zmq.EVENT_DISCONNECTED else None
