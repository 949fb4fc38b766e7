"""A loopback TCP proxy that cuts a service on demand, for fault-injection tests and benchmarks.

Put it in front of PostgreSQL, Redis or the S3 server and point sdq at `proxy.url(...)`; then
`cut("refuse")` (nothing listens: connection refused, open connections reset), `cut("blackhole")`
(connections accepted and open ones kept, but no byte goes through either way) or
`cut("slow", delay)` (every chunk held back), and `restore()`. Threads only, loopback only; every
thread is a daemon and `close()` ends them.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole", "slow"]


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream` (host, port) while the mode allows it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.accepted = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listen()

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        host, port = self.upstream
        return url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")

    def cut(self, mode: Mode, delay: float = 1.0) -> None:
        with self._lock:
            self.mode, self.delay = mode, delay
            if mode == "refuse":
                self._stop_listening()
                self._reset_all()

    def restore(self) -> None:
        with self._lock:
            self.mode = "pass"
            if self._listener is None:
                self._listen()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stop_listening()
            self._reset_all()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="tcp-proxy-accept").start()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def _reset_all(self) -> None:
        # shutdown first: a close alone neither wakes the pump blocked in recv on the socket
        # nor reaches the peer while that recv holds it, so the client and the server would
        # both keep a silent connection (a server transaction cut between two statements then
        # holds its row locks for good).
        for sock in list(self._sockets):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or self.mode == "refuse":
                    client.close()
                    continue
                self.accepted += 1
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, server))
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True,
                                 name="tcp-proxy-pump").start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.mode == "blackhole" and not self._closed:
                    time.sleep(0.05)
                if self.mode == "slow":
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(target)
