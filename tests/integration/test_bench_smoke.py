"""The benchmark machinery itself: the delaying proxy the round-trip figure rests on, and a short
``python -m bench`` run end to end. Nothing here asserts a timing beyond the proxy's lower bound."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.proxy import DelayProxy

ROOT = Path(__file__).resolve().parents[2]
DELAY = 0.05


def _echo_server() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        assert chunk, "the proxy closed early"
        received += chunk
    return received


def test_proxy_delivers_server_bytes_in_order_no_sooner_than_the_delay() -> None:
    # Given an upper-casing echo server behind a proxy that delays server writes by 50 ms
    listener, port = _echo_server()
    with listener, DelayProxy(("127.0.0.1", port), DELAY) as proxy:
        client = socket.create_connection((proxy.host, proxy.port), timeout=5)
        with client:
            # when the client writes twice without waiting and reads both answers
            started = time.monotonic()
            client.sendall(b"mail from\r\n")
            client.sendall(b"rcpt to\r\n")
            answer = _read_exactly(client, len(b"MAIL FROM\r\nRCPT TO\r\n"))
            elapsed = time.monotonic() - started

    # then the answers arrive whole, in order, and not before the delay
    assert answer == b"MAIL FROM\r\nRCPT TO\r\n"
    assert elapsed >= DELAY


def test_bench_smoke_prints_the_table_and_writes_every_row_as_json(tmp_path: Path) -> None:
    # Given three quick figures, when the bench runs them as CI runs the smoke
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--only",
            "cache_hit",
            "--only",
            "connections",
            "--only",
            "http_transports",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # then it exits 0, prints the table, and the JSON holds each figure with baseline and verdict
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| figure" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    figures = {row["figure"] for row in rows}
    assert {
        "network calls on a memory hit",
        "SMTP connections per batch of 10",
        "graph: TLS handshakes per batch of 10",
        "gmail_api: HTTP requests per message (Gmail API)",
    } <= figures
    assert all(row["baseline"] is not None and row["met"] is not None for row in rows)
