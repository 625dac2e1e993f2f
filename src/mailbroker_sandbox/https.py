"""The HTTPS server under the sandbox's token endpoints and mail API stand-ins: threaded, bound to
loopback on a free port, each connection's TLS handshake done in that connection's thread."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_log = logging.getLogger(__name__)


class SandboxRequestHandler(BaseHTTPRequestHandler):
    """What every sandbox stand-in's handler shares: GET and POST go to ``_serve(method)``, no
    Python version in the Server header, and requests logged at debug level only (by path: a
    query may hold a code or a token)."""

    sys_version = ""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        raise NotImplementedError

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        _log.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_error(self, format: str, *args: Any) -> None:
        _log.debug("malformed request from %s", self.client_address[0])


class LoopbackHTTPSServer(ThreadingHTTPServer):
    """Serves ``handler`` over TLS with ``context`` on 127.0.0.1. ``app`` is what the handler
    answers for (``self.server.app``); ``on_connected`` runs once per completed handshake."""

    daemon_threads = True

    def __init__(
        self,
        app: Any,
        context: ssl.SSLContext,
        handler: type[BaseHTTPRequestHandler],
        *,
        socket_timeout: float,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self._context = context
        self._handler = handler
        self._socket_timeout = socket_timeout
        self._on_connected = on_connected
        self._thread: threading.Thread | None = None
        self._closed = False
        super().__init__(("127.0.0.1", 0), handler)

    def serve_in_background(self, name: str) -> None:
        """Serve on a daemon thread named ``name`` (once; later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop serving, wait for the serving thread, and close the socket (once)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # without HTTPServer's reverse DNS lookup
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self._socket_timeout)
        try:
            tls = self._context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            _log.debug("TLS handshake from %s failed: %s", client_address[0], type(exc).__name__)
            return
        if self._on_connected is not None:
            self._on_connected()
        try:
            self._handler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_WR)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("connection from %s failed", client_address[0], exc_info=True)
