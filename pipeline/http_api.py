"""The runtime's small HTTP face: health, Prometheus metrics, acknowledgements.

    GET  /healthz   200 when connected to the broker, 503 when degraded (JSON either way)
    GET  /metrics   Prometheus text format
    POST /acks      an Ack (JSON object or array); 202 once queued for the engine's loop

Bound to localhost unless configured otherwise. Standard library only: three routes do not
need a framework. Requests never touch the engine directly; an ack is journaled and applied
by the runtime's loop like one that came over MQTT.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.models import Ack

MAX_BODY = 64 * 1024
_acks = TypeAdapter(Ack | list[Ack])


class OpsHttpServer:
    def __init__(self, runtime: Any, host: str, port: int) -> None:
        rt = runtime

        class Handler(BaseHTTPRequestHandler):
            server_version = "cityops"

            def log_message(self, fmt: str, *args: Any) -> None:   # quiet: metrics are polled
                return

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    h = rt.health()
                    self._send(200 if h["status"] == "ok" else 503, json.dumps(h).encode())
                elif self.path == "/metrics":
                    self._send(200, rt.metrics_text().encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b'{"error": "try /healthz, /metrics or POST /acks"}')

            def do_POST(self) -> None:
                if self.path != "/acks":
                    self._send(404, b'{"error": "POST /acks"}')
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    self._send(413 if length else 411, b'{"error": "send a JSON body up to 64 KiB"}')
                    return
                body = self.rfile.read(length)
                try:
                    got = _acks.validate_json(body)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    msg = f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                    self._send(400, json.dumps({"error": msg}, ensure_ascii=False).encode())
                    return
                for ack in got if isinstance(got, list) else [got]:
                    rt.http_acks.put(ack.model_dump_json().encode())
                self._send(202, b'{"status": "queued"}')

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
