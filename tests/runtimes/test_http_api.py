"""The HTTP face under abuse: `cityops run` as a subprocess with a real Mosquitto, its file
descriptors limited to 1024 (a common default), against idle, slow and malformed clients.

A server without timeouts and connection limits loses /healthz to 1,100 clients that connect
and send nothing; this one keeps answering, closes a client that sends its request too slowly,
and answers a malformed request with a 400 and one log line, no traceback.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable

import pytest

from bench.harness.brokers import Mosquitto
from tests.support import Runtime

pytestmark = pytest.mark.broker

FD_LIMIT = 1024
IDLE_CLIENTS = 1100


def fd_limited() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def start(runtime: Callable[..., Runtime], mosquitto: Mosquitto, name: str) -> Runtime:
    rt = runtime(mosquitto.url, name, env={"CITYOPS_HTTP__HEADER_TIMEOUT": "1s"}, start=False)
    rt.preexec = fd_limited
    return rt.start()


def raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, read the answer until the server closes or has said enough."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
            if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                head, _, body = got.partition(b"\r\n\r\n")
                length = [int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                          if k.strip().lower() == b"content-length"]
                if length and len(body) >= length[0]:
                    break
        return got


def test_idle_connections_do_not_take_healthz_away(mosquitto: Mosquitto, runtime) -> None:
    rt = start(runtime, mosquitto, "idle")
    idle = []
    try:
        for _ in range(IDLE_CLIENTS):       # connect, send nothing
            idle.append(socket.create_connection(("127.0.0.1", rt.http_port), timeout=5))
        t = time.perf_counter()
        answer = raw(rt.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        print(f"/healthz with {IDLE_CLIENTS} idle connections open: {answer[:15]!r} in "
              f"{(time.perf_counter() - t) * 1000:.1f} ms")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert rt.health()[0] == 200
    finally:
        for s in idle:
            s.close()
    assert "Traceback" not in rt.stderr()


def test_a_slow_client_is_closed(mosquitto: Mosquitto, runtime) -> None:
    """A request head that does not arrive within http.header_timeout (1 s here): closed."""
    rt = start(runtime, mosquitto, "slow")
    with socket.create_connection(("127.0.0.1", rt.http_port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        sent = time.monotonic()
        while time.monotonic() - sent < 20:
            try:
                s.sendall(b"X-Slow: 1\r\n")     # a header now and then, never the end
            except OSError:
                break                           # reset: closed
            s.settimeout(0.3)
            try:
                if s.recv(1024) == b"":
                    break                       # closed
            except TimeoutError:
                continue
        assert time.monotonic() - sent < 20, "a slow client was kept for 20 s"


def test_a_malformed_request_gets_400_without_a_traceback(mosquitto: Mosquitto, runtime) -> None:
    rt = start(runtime, mosquitto, "malformed")
    answer = raw(rt.http_port, b"POST /acks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert rt.health()[0] == 200
    log = rt.stderr()
    assert "Invalid HTTP request received." in log and "Traceback" not in log, log
