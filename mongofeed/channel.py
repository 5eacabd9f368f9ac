"""The channel of a session whose consumer maps its shared memory: Unix datagrams between
the supervisor and that consumer, for the batch descriptors (daemon to consumer) and the
credit and slab releases (consumer to daemon). The data socket still starts the session
(the first credit says whether the consumer mapped the region) and carries what the
daemon says to a consumer it no longer knows.

Why not the data socket: a ZeroMQ message wakes the receiving process's I/O thread, which
then wakes the thread that reads it, and a send wakes the sender's I/O thread: a trainer that
waits for its batches paid 40 to 100 us of CPU per batch for that on the 2-core machine,
where a datagram costs it 10 to 16 us (``mongofeed bench`` shows both, ``recv_us`` and
``channel_us``). A datagram wakes the reading thread itself, and is one system call a side.

Linux only, as the shared memory is (``portable.shared_memory_dir``): both ends have abstract
socket names, nothing on disk, gone with their process even after SIGKILL. The daemon binds
one socket for all sessions. A consumer binds a random name and connects to the
daemon's, so that the kernel refuses it datagrams from any other socket, and sends its
session's secret token from there: the session's descriptors go to that name (a name
belongs to its socket alone). Its credit messages carry the token, as on the data socket
its identity does. A consumer that cannot open a channel (in another
network namespace than the daemon) does not map the region; its batches come over the data
socket.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct

from .portable import ABSTRACT_SOCKETS
from .wire import MAX_CONTROL_BYTES, MAX_HEADER_BYTES

CHANNEL_PREFIX = "mongofeed-channel-"
OPEN_TIMEOUT_S = 5.0  # for room in the daemon's queue, which its loop empties


class ChannelError(Exception):
    """A channel that cannot be opened; the message says why."""


def channels_supported() -> bool:
    """Whether this system has abstract Unix socket names (Linux)."""
    return ABSTRACT_SOCKETS


QUEUE_LENGTH_FILE = "/proc/sys/net/unix/max_dgram_qlen"
DEFAULT_QUEUE_LENGTH = 10  # Linux's
TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO


def queue_length() -> int:
    """How many datagrams a socket's queue holds before a sender hears it is full."""
    try:
        with open(QUEUE_LENGTH_FILE) as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return DEFAULT_QUEUE_LENGTH


def abstract(name: str) -> bytes:
    return b"\0" + name.encode()


class DaemonChannel:
    """The supervisor's end: one non-blocking socket for every session, polled by its loop."""

    def __init__(self):
        self.name = f"{CHANNEL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        try:
            self.socket.bind(abstract(self.name))
        except OSError:
            self.socket.close()
            raise

    def fileno(self) -> int:
        return self.socket.fileno()

    def receive(self) -> tuple[bytes, bytes] | None:
        """The next datagram and its sender's name, None when there is none. A datagram
        longer than any message comes cut to ``MAX_CONTROL_BYTES + 1`` (refused)."""
        try:
            return self.socket.recvfrom(MAX_CONTROL_BYTES + 1)
        except BlockingIOError:
            return None

    def send(self, consumer: bytes, message: bytes) -> bool:
        """Send ``message`` to the consumer whose channel is named ``consumer``: False when
        its queue is full (its next credit retries); OSError when it is gone."""
        try:
            self.socket.sendto(message, consumer)
        except BlockingIOError:
            return False
        return True

    def close(self):
        self.socket.close()


class Channel:
    """A consumer's end, used by the thread that calls ``get`` (``stream.Stream``): a socket
    that receives, connected to the daemon's (the kernel refuses it datagrams from any other
    socket), and one that sends. They are two because a connected datagram socket that
    finds its peer gone when it sends drops what it had received and not yet read (Linux):
    the batches already announced, and the daemon's last word, would be lost."""

    def __init__(self, daemon: str, token: str):
        """Connect to the daemon's channel named ``daemon`` and introduce this session;
        ChannelError says why not."""
        if not (isinstance(daemon, str) and daemon.startswith(CHANNEL_PREFIX)):
            raise ChannelError(f"{daemon!r:.80} is not a mongofeed channel")
        if not channels_supported():
            raise ChannelError("this system has no abstract Unix sockets")
        self.daemon = abstract(daemon)
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # Never the kernel's automatic name: one of its million could, once this
            # consumer is gone, be another consumer's before the daemon hears of it.
            self.receiver.bind(abstract(f"mongofeed-consumer-{os.getpid()}-"
                                        f"{secrets.token_hex(8)}"))
            self.receiver.connect(self.daemon)
            self.receiver.settimeout(OPEN_TIMEOUT_S)  # the daemon's queue may be full a while
            self.receiver.send(token.encode())  # from here: nothing received yet to lose
            self.receiver.settimeout(None)
        except OSError as exc:
            self.close()
            why = exc.strerror or "its queue stayed full"
            raise ChannelError(f"cannot reach the daemon's channel {daemon}: {why} "
                               f"(another network namespace?)") from None
        self.wait_ms = 0  # the receiver's kernel timeout (SO_RCVTIMEO), 0 while unset
        self.confirmed = False  # a datagram came: the daemon knows this channel

    def receive(self, timeout_ms: int) -> bytes | None:
        """The next datagram, None if none comes within ``timeout_ms``: one system call,
        that sleeps in the kernel (a trainer faster than the producers waits for every
        batch, and a poll before the receive cost it a second call, and a failed receive a
        third, per wait)."""
        if timeout_ms <= 0:
            flags = socket.MSG_DONTWAIT
        else:
            flags = 0
            if timeout_ms != self.wait_ms:
                seconds, ms = divmod(timeout_ms, 1000)
                self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                         TIMEVAL.pack(seconds, ms * 1000))
                self.wait_ms = timeout_ms
        try:
            message = self.receiver.recv(MAX_HEADER_BYTES, flags)
        except BlockingIOError:  # nothing came in time (EAGAIN)
            return None
        self.confirmed = True
        return message

    def send(self, message: bytes) -> bool:
        """Send ``message`` (which names its session) to the daemon: False when its queue is
        full; OSError (connection refused) when the daemon is gone."""
        try:
            self.sender.sendto(message, socket.MSG_DONTWAIT, self.daemon)
        except BlockingIOError:
            return False
        return True

    def close(self):
        self.receiver.close()
        self.sender.close()
