"""The runtimes' small HTTP face: health, Prometheus metrics, acknowledgements, push links.

    GET  /healthz   200 when connected to the broker, 503 when degraded (JSON either way)
    GET  /metrics   Prometheus text format
    POST /acks      acknowledgements (JSON object or array of {alert_id, ts, note?}) with
                    `Authorization: Bearer <token>` (a user of acks.users); 202 once queued
                    for the engine's loop, 401 without a known token, 403 naming someone else
    GET  /ack?t=    a push's acknowledge link: a confirmation page, acknowledging nothing
    POST /ack       t=<token> (the page's form): acknowledges as the token's recipient; 403 if
                    the token is forged, tampered with, expired or malformed; 410 (both) if
                    the firing it came with has resolved
    GET  /alerts/{alert_id}/timeline   notices and push receipts of one alert (JSON)
    /silences       make, list and end silences (pipeline/shared/silence_http.py)

Starlette on uvicorn (h11), on a thread of its own, bound to localhost unless configured
otherwise. A request never touches the engine: an ack is handed to the runtime's loop, which
journals and applies it like one that came over MQTT. The server is the part exposed to
whoever can reach the port, so it is bounded: a malformed request gets a 400 from h11 (no
traceback), a connection must send its whole request within `http.header_timeout`, an idle one
is closed after `http.keep_alive`, and at most `http.max_connections` stay open.
"""

from __future__ import annotations

import asyncio
import html
import socket
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import h11
import uvicorn
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from connectors.push import ack_label
from pipeline.core.ack_tokens import MAX_TOKEN, BadToken
from pipeline.core.identity import Forbidden
from pipeline.core.models import AckRequest
from pipeline.shared.metrics import collecting, text
from pipeline.shared.ops_runtime import OpsRuntime, Reloading, Silencing
from pipeline.shared.silence_http import silence_routes

if TYPE_CHECKING:
    from pipeline.shared.config import HttpSettings

MAX_BODY = 64 * 1024
_requests = TypeAdapter(AckRequest | list[AckRequest])
# The acknowledge page: a GET only shows it (chat apps fetch links to preview them, and that
# must not acknowledge anything); the button POSTs the token. No outside resources, never
# framed, never cached, no Referer carrying the token anywhere.
_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                            "form-action 'self'; frame-ancestors 'none'"}
_REFUSED = {"expired": "确认链接已过期，请在值班系统中确认。"}


def _page(code: int, title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f'<!doctype html><html lang="zh-CN"><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        f'<body style="font-family:sans-serif;max-width:32em;margin:2em auto;padding:0 1em">'
        f"{body}</body></html>", code, headers=_PAGE_HEADERS)


def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, code)


class BodyRefused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, at most ``limit`` bytes (h11 has checked Content-Length's form)."""
    declared = request.headers.get("content-length")
    if declared is not None and int(declared) > limit:
        raise BodyRefused(_error(413, f"send {what} up to {limit // 1024} KiB"))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyRefused(_error(413, f"send {what} up to {limit // 1024} KiB"))
        chunks.append(chunk)
    if not size:
        raise BodyRefused(_error(411, f"send {what}"))
    return b"".join(chunks)


def ops_app(rt: OpsRuntime) -> Starlette:
    """The routes, over a runtime (pipeline/shared/ops_runtime.py): LiveRuntime, Bridge or CityWorker."""
    push = rt.push                       # the push dispatcher, when push is on
    collected = collecting(rt)           # /metrics: rt.collect() on every scrape

    async def healthz(request: Request) -> Response:
        h = rt.health()
        return JSONResponse(h, 200 if h["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        return Response(text(collected), media_type="text/plain; version=0.0.4")

    async def post_acks(request: Request) -> Response:
        users = rt.users                 # a reload may have replaced them (registry workers)
        user = users.bearer(request.headers.get("authorization"))
        if user is None:
            return JSONResponse({"error": "send Authorization: Bearer <your token> (a user of "
                                 "acks.users with a token_sha256)"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="cityops"'})
        try:
            body = await _body(request, MAX_BODY, "a JSON body")
        except BodyRefused as exc:
            return exc.response
        try:
            got = _requests.validate_json(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            return _error(400, f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
        try:
            acks = [users.ack(user, r) for r in (got if isinstance(got, list) else [got])]
        except Forbidden as exc:
            return _error(403, str(exc))
        for ack in acks:
            rt.http_acks.put(ack.model_dump_json(exclude_none=True).encode())
        return JSONResponse({"status": "queued"}, 202)

    def refuse(exc: BadToken) -> Response:
        return _page(403, "无法确认", f"<h1>无法确认</h1><p>"
                     f"{_REFUSED.get(exc.reason, '确认链接无效。')}</p>")

    def over(claim: Any) -> Response | None:
        """The page of a link whose firing has resolved (the incident may be firing again:
        this link does not acknowledge that)."""
        ended = push.firing_over(claim)
        if ended is None:
            return None
        return _page(410, "预警已结束", f"<h1>预警已结束</h1><p>{html.escape(ended['title'])}</p>"
                     "<p>这条链接对应的报警已经解除，无需再确认。如再次报警，请使用新推送中的链接。</p>")

    async def ack_page(request: Request) -> Response:
        token = request.query_params.get("t", "")
        try:
            claim = push.verify_token(token)
        except BadToken as exc:
            return refuse(exc)
        if (ended := over(claim)) is not None:
            return ended
        seen = [e for e in push.timeline(claim.alert_id) if e["event"] == "notice"]
        title = seen[-1]["title"] if seen else claim.alert_id
        return _page(200, "确认预警", (
            f"<h1>确认预警</h1><p>{html.escape(title)}</p>"
            f'<form method="post" action="ack"><input type="hidden" name="t" '
            f'value="{html.escape(token)}"><button type="submit" '
            f'style="font-size:1.2em;padding:.5em 2em">{ack_label({"tier": claim.tier})}'
            '</button></form>'))

    async def ack_by_token(request: Request) -> Response:
        try:
            body = await _body(request, MAX_TOKEN + 16, "t=<token>")
        except BodyRefused as exc:
            return exc.response
        token = parse_qs(body.decode("ascii", "replace")).get("t", [""])[0]
        try:
            if (ended := over(push.verify_token(token))) is not None:
                return ended
            ack = push.accept_token(token)
        except BadToken as exc:
            return refuse(exc)
        rt.http_acks.put(ack.model_dump_json(exclude_none=True).encode())
        return _page(200, "已确认", "<h1>已确认</h1><p>谢谢，确认已收到，预警不再升级和提醒。</p>")

    async def timeline(request: Request) -> Response:
        events = push.timeline(request.path_params["alert_id"])
        if not events:
            return _error(404, "no such alert seen")
        return JSONResponse({"events": events})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 404
        return _error(code, "try /healthz, /metrics or POST /acks")

    routes = [Route("/healthz", healthz), Route("/metrics", metrics),
              Route("/acks", post_acks, methods=["POST"])]
    if isinstance(rt, Reloading):        # cityops run and worker: hot reload (pipeline/shared/reload_runtime.py)
        from pipeline.shared.reload_runtime import http_route
        routes.append(Route("/reload", http_route(rt), methods=["POST"]))
    if push is not None:
        routes += [Route("/ack", ack_page, methods=["GET"]),
                   Route("/ack", ack_by_token, methods=["POST"]),
                   Route("/alerts/{alert_id}/timeline", timeline)]
    if isinstance(rt, Silencing):             # POST/GET /silences, DELETE /silences/{id}
        routes += silence_routes(rt)
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the two bounds it lacks. uvicorn times out only the wait
    *between* requests, so a client that connects and sends nothing (or a header a minute)
    would hold a file descriptor for ever; and its `limit_concurrency` answers 503 to requests
    but still accepts and keeps every connection. Here a connection has `header_timeout` to
    send its request, and a connection past `max_connections` closes the oldest idle one (or
    itself, if every other is busy), so idle clients cannot use up the descriptors that
    /healthz needs."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:    # type: ignore[override]
            super().connection_made(transport)
            self._arm()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and c._idle()]
                victim = min(idle, key=lambda c: c._since) if idle else self
                victim.transport.close()

        def _arm(self) -> None:
            self._since = self.loop.time()
            old = getattr(self, "_overdue", None)
            if old is not None:
                old.cancel()
            self._overdue = self.loop.call_later(header_timeout_s, self._request_overdue)

        def _idle(self) -> bool:
            return (self.conn.their_state is h11.IDLE and not self.transport.is_closing()
                    and (self.cycle is None or self.cycle.response_complete))

        def _request_overdue(self) -> None:
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._overdue.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class OpsHttpServer:
    def __init__(self, runtime: OpsRuntime, http: HttpSettings) -> None:
        """``http``: host, port, max_connections, header_timeout, keep_alive."""
        self.host, self.port = http.host, http.port
        self.config = uvicorn.Config(
            ops_app(runtime), http=guarded_protocol(http.max_connections, http.header_timeout / 1000),
            timeout_keep_alive=max(1, round(http.keep_alive / 1000)),
            # uvicorn counts open connections here; the protocol keeps them to max_connections
            limit_concurrency=http.max_connections + 1,
            h11_max_incomplete_event_size=16 * 1024,      # request line + headers
            # asyncio accepts up to `backlog` connections before any of them runs: a small
            # one lets the protocol close surplus connections before descriptors run out
            backlog=128,
            lifespan="off", access_log=False, log_config=None, server_header=False)
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Listening when it returns; an address in use fails here, with the address."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConnectionError(f"cannot listen on {self.host}:{self.port}: "
                                  f"{exc.strerror}") from None
        sock.listen(self.config.backlog)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="http", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(5.0)
