"""The runtime's small HTTP face: health, Prometheus metrics, acknowledgements.

    GET  /healthz   200 when connected to the broker, 503 when degraded (JSON either way)
    GET  /metrics   Prometheus text format
    POST /acks      an Ack (JSON object or array); 202 once queued for the engine's loop
    GET  /ack?t=    a push's acknowledge link: a confirmation page, acknowledging nothing
    POST /ack       t=<token> (the page's form): acknowledges as the token's recipient; 403 if
                    the token is forged, tampered with, expired or malformed
    GET  /alerts/{alert_id}/timeline   notices and push receipts of one alert (JSON)

Bound to localhost unless configured otherwise. Standard library only: a few routes do not
need a framework. Requests never touch the engine directly; an ack is journaled and applied
by the runtime's loop like one that came over MQTT.
"""

from __future__ import annotations

import html
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import TypeAdapter, ValidationError

from pipeline.ack_tokens import MAX_TOKEN, BadToken
from pipeline.models import Ack

MAX_BODY = 64 * 1024
_acks = TypeAdapter(Ack | list[Ack])
# The acknowledge page: a GET only shows it (chat apps fetch links to preview them, and that
# must not acknowledge anything); the button POSTs the token. No outside resources, never
# framed, never cached, no Referer carrying the token anywhere.
_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                            "form-action 'self'; frame-ancestors 'none'"}
_REFUSED = {"expired": "确认链接已过期，请在值班系统中确认。"}


def _page(title: str, body: str) -> bytes:
    return (f'<!doctype html><html lang="zh-CN"><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title>"
            f'<body style="font-family:sans-serif;max-width:32em;margin:2em auto;padding:0 1em">'
            f"{body}</body></html>").encode()


class OpsHttpServer:
    def __init__(self, runtime: Any, host: str, port: int) -> None:
        rt = runtime
        push = getattr(runtime, "push", None)     # the push dispatcher, when push is on

        class Handler(BaseHTTPRequestHandler):
            server_version = "cityops"

            def log_message(self, fmt: str, *args: Any) -> None:   # quiet: metrics are polled
                return

            def _send(self, code: int, body: bytes, ctype: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    h = rt.health()
                    self._send(200 if h["status"] == "ok" else 503, json.dumps(h).encode())
                elif self.path == "/metrics":
                    self._send(200, rt.metrics_text().encode(), "text/plain; version=0.0.4")
                elif push is not None and self.path.startswith("/ack?"):
                    self._ack_page(parse_qs(urlsplit(self.path).query).get("t", [""])[0])
                elif push is not None and self.path.startswith("/alerts/") \
                        and self.path.endswith("/timeline"):
                    events = push.timeline(self.path[len("/alerts/"):-len("/timeline")])
                    self._send(200 if events else 404, json.dumps(
                        {"events": events} if events else {"error": "no such alert seen"},
                        ensure_ascii=False).encode())
                else:
                    self._send(404, b'{"error": "try /healthz, /metrics or POST /acks"}')

            def _page(self, code: int, title: str, body: str) -> None:
                self._send(code, _page(title, body), "text/html; charset=utf-8", _PAGE_HEADERS)

            def _refuse(self, exc: BadToken) -> None:
                self._page(403, "无法确认", f"<h1>无法确认</h1><p>"
                           f"{_REFUSED.get(exc.reason, '确认链接无效。')}</p>")

            def _ack_page(self, token: str) -> None:
                try:
                    claim = push.verify_token(token)
                except BadToken as exc:
                    self._refuse(exc)
                    return
                seen = [e for e in push.timeline(claim.alert_id) if e["event"] == "notice"]
                title = seen[-1]["title"] if seen else claim.alert_id
                self._page(200, "确认预警", (
                    f"<h1>确认预警</h1><p>{html.escape(title)}</p>"
                    f'<form method="post" action="ack"><input type="hidden" name="t" '
                    f'value="{html.escape(token)}"><button type="submit" '
                    f'style="font-size:1.2em;padding:.5em 2em">确认接单</button></form>'))

            def _length(self) -> int | None:
                """The body's length; None (and a 400 sent) when the header is not a number."""
                text = self.headers.get("Content-Length") or "0"
                if not text.strip().isdigit():
                    self._send(400, b'{"error": "Content-Length must be a number"}')
                    return None
                return int(text)

            def _ack_by_token(self) -> None:
                length = self._length()
                if length is None:
                    return
                if not 0 < length <= MAX_TOKEN + 16:
                    self._send(413 if length else 411, b'{"error": "send t=<token>"}')
                    return
                form = parse_qs(self.rfile.read(length).decode("ascii", "replace"))
                try:
                    ack = push.accept_token(form.get("t", [""])[0])
                except BadToken as exc:
                    self._refuse(exc)
                    return
                rt.http_acks.put(ack.model_dump_json().encode())
                self._page(200, "已确认", "<h1>已确认</h1><p>谢谢，确认已收到，预警不再升级和提醒。</p>")

            def do_POST(self) -> None:
                if push is not None and self.path == "/ack":
                    self._ack_by_token()
                    return
                if self.path != "/acks":
                    self._send(404, b'{"error": "POST /acks"}')
                    return
                length = self._length()
                if length is None:
                    return
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
