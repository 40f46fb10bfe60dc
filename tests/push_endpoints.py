"""A local HTTP server playing the far ends of the push channels: a webhook receiver, WeCom and
DingTalk group robots, an SMS gateway. Plain module (no pytest in it).

    with Endpoints() as ep:
        ep.url("/webhook")                 # http://127.0.0.1:PORT/webhook
        ep.answer("/webhook", 500, 200)    # the next requests get these statuses, then 200
        ep.answer("/wecom", (200, {"errcode": 45009, "errmsg": "api freq out of limit"}))
        gate = ep.hold("/slow")            # requests to /slow wait until gate.set()
        ep.wait_for(lambda reqs: len(reqs) >= 2)
        ep.received("/webhook")            # [Request(path, query, headers, body), ...]

Robots answer `{"errcode": 0, "errmsg": "ok"}` by default, as the real ones do.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Endpoints:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requests: list[Request] = []
        self._script: dict[str, list[int | tuple[int, dict]]] = {}
        self._gates: dict[str, threading.Event] = {}
        ep = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                u = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(u.path, {k: v[0] for k, v in parse_qs(u.query).items()},
                              {k.lower(): v for k, v in self.headers.items()}, body)
                with ep._cond:
                    ep._requests.append(req)
                    ep._cond.notify_all()
                    script = ep._script.get(u.path)
                    step = script.pop(0) if script else 200
                    gate = ep._gates.get(u.path)
                if gate is not None:
                    gate.wait(60)
                code, answer = step if isinstance(step, tuple) else (step, {"errcode": 0,
                                                                            "errmsg": "ok"})
                data = json.dumps(answer).encode()
                self.send_response(code)
                if code in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *steps: int | tuple[int, dict]) -> None:
        with self._cond:
            self._script.setdefault(path, []).extend(steps)

    def hold(self, path: str) -> threading.Event:
        gate = threading.Event()
        with self._cond:
            self._gates[path] = gate
        return gate

    def received(self, path: str | None = None) -> list[Request]:
        with self._cond:
            return [r for r in self._requests if path is None or r.path == path]

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0
                 ) -> list[Request]:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self._requests), timeout)
            got = list(self._requests)
        if not ok:
            shown = "\n  ".join(f"{r.path} {r.body[:100]!r}" for r in got)
            raise AssertionError(f"endpoints: condition not met in {timeout} s; "
                                 f"{len(got)} request(s):\n  {shown}")
        return got

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            for gate in self._gates.values():
                gate.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
