"""A TCP proxy in front of the test server that a test can cut and restore: the database
becomes unreachable for real (connections reset, new ones refused) without touching the
server other tests share."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit

BUFFER_BYTES = 64 * 1024


class Proxy:
    def __init__(self, upstream_uri: str):
        parts = urlsplit(upstream_uri)
        self.upstream = (parts.hostname, parts.port or 27017)
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
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        try:
            while data := source.recv(BUFFER_BYTES):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
