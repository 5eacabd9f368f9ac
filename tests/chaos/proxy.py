"""A TCP proxy in front of the test server that a test can cut and restore: the database
becomes unreachable for real (connections reset, new ones refused) without touching the
server other tests share. Given ``answer``, it also reads the commands that clients send and
answers some of them itself: the server fails a query for real, as a replica set in an
election or a mongos with a shard away would."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import bson

BUFFER_BYTES = 64 * 1024
OP_MSG = 2013  # the wire protocol's message op code (every command since MongoDB 3.6)
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode


class Proxy:
    def __init__(self, upstream_uri: str, answer: Callable[[dict], dict | None] | None = None):
        """``answer(command)``: a reply document to send back instead of forwarding the
        command, or None to forward it."""
        parts = urlsplit(upstream_uri)
        self.upstream = (parts.hostname, parts.port or 27017)
        self.answer = answer
        self.port = 0
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.listener = None
        self.restore()

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def restore(self):
        """Listen (again, on the same port) and forward every connection."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self):
        """Refuse new connections and reset the open ones: the server is gone."""
        with self.lock:
            self.listener.close()
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.connections.clear()

    close = cut

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, server]
            to_server = self._pump if self.answer is None else self._pump_commands
            threading.Thread(target=to_server, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump_commands(self, client, server):
        """Forward whole messages from ``client``, answering here those ``answer`` takes. A
        connection has one request in flight, so a reply sent here never splits another."""
        try:
            while header := _receive(client, HEADER.size):
                length, request_id, _, op_code = HEADER.unpack(header)
                body = _receive(client, length - HEADER.size)
                if not body:
                    break
                reply = None
                if op_code == OP_MSG and body[4] == 0:  # flagBits, then a kind 0 section
                    (size,) = struct.unpack_from("<i", body, 5)
                    reply = self.answer(bson.decode(body[5:5 + size]))
                if reply is None:
                    server.sendall(header + body)
                    continue
                payload = struct.pack("<iB", 0, 0) + bson.encode(reply)
                client.sendall(HEADER.pack(HEADER.size + len(payload), 0, request_id, OP_MSG)
                               + payload)
        except OSError:
            pass
        finally:
            _shutdown(client, server)

    @staticmethod
    def _pump(source, target):
        try:
            while data := source.recv(BUFFER_BYTES):
                target.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(source, target)


def _receive(sock, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``; b"" if it closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(BUFFER_BYTES, size - len(data)))
        if not chunk:
            return b""
        data += chunk
    return bytes(data)


def _shutdown(*sockets):
    """Shut both directions of each socket down, whatever state it is in already."""
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
