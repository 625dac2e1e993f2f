"""A loopback TCP proxy that delays everything the server writes by a fixed ``delay`` before the
client sees it, as a link with that much one-way latency would: bytes keep their order and
several writes in flight overlap, so a client that pipelines pays the delay once per exchange,
not once per reply. Client→server bytes pass at once; one wait for an answer therefore costs
``delay`` (plus processing), which makes wall time ÷ ``delay`` a count of round trips.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from typing import Any


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"delay-proxy-{self.port}", daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            link = _Link(client, server, self._forget)
            pending: queue.Queue[tuple[float, bytes]] = queue.Queue()
            for target, args in (
                (_pass, (client, server, link)),
                (_read_later, (server, pending, self.delay)),
                (_write_when_due, (pending, client, link)),
            ):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)


class _Link:
    """Closes both sockets once both directions have ended."""

    def __init__(self, client: socket.socket, server: socket.socket, forget: Any) -> None:
        self._sockets = (client, server)
        self._open = 2
        self._lock = threading.Lock()
        self._forget = forget

    def direction_done(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open:
                return
        self._forget(*self._sockets)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def _pass(source: socket.socket, sink: socket.socket, link: _Link) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
    link.direction_done()


def _read_later(source: socket.socket, pending: queue.Queue[tuple[float, bytes]], delay: float) -> None:
    try:
        while data := source.recv(65536):
            pending.put((time.monotonic() + delay, data))
    except OSError:
        pass
    pending.put((time.monotonic() + delay, b""))


def _write_when_due(pending: queue.Queue[tuple[float, bytes]], sink: socket.socket, link: _Link) -> None:
    while True:
        due, data = pending.get()
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if not data:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            break
        try:
            sink.sendall(data)
        except OSError:
            break
    link.direction_done()
