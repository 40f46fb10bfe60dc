"""The console's pages and JSON API (Starlette, Jinja2 templates, server-sent events).

    GET  /login, POST /login, POST /logout
    GET  /                     to the user's own page (city: the big screen; grid: my pushes)
    GET  /city                 大屏: open incidents by severity, category, district; escalations
                               waiting; the last 24 h; a map (all within the user's scope)
    GET  /incidents            the scope's incidents: filters, sorting, counts
    GET  /incidents/{id}       one incident and its whole timeline; acknowledge
    POST /incidents/{id}/ack   (form: csrf, note, from; state and to: a handling state —
                               dispatched, on_site, handled, closed — instead of an ack)
    GET  /me                   a grid worker's pushes, newest first, one-tap acknowledge
    GET  /silences             silences and maintenance windows (pipeline/runtimes/opscentre/silences.py)
    GET  /events               server-sent events: `change` when an incident of the scope changed
    GET  /api/incidents?category=&severity=&state=&district=&street=&community=&grid=&sort=&order=&limit=
    GET  /api/incidents/{id}   POST /api/incidents/{id}/ack ({"note", "state", "to"}; header
                               X-CSRF-Token)
    GET  /api/overview         GET /api/pushes       GET /healthz

Every page and call needs a login; what a user sees is their scope's only (another scope's
incident is a 404, as if it did not exist). Every response carries a strict
Content-Security-Policy: scripts, styles and images from the console itself, nothing inline,
no framing. Jinja2 escapes everything it prints (autoescape), and the live updates put only
the console's own rendered fragments into the page.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.core.identity import AckUsers, Forbidden, Scope
from pipeline.core.models import AckRequest, HandlingState, Tier
from pipeline.runtimes.opscentre.auth import check_password, csrf_ok, new_csrf
from pipeline.runtimes.opscentre.geo import CityMap
from pipeline.runtimes.opscentre.silences import silence_routes
from pipeline.runtimes.opscentre.store import PAGE_ROWS, SEVERITIES, STATES, Change, Filters, Store

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store"}
SEVERITY_ZH = {"blue": "蓝色", "yellow": "黄色", "orange": "橙色", "red": "红色"}
STATE_ZH = {"firing": "报警中", "escalated": "已升级", "acknowledged": "已确认",
            "resolved": "已解除", "reminder": "提醒", "open": "未解除", "dispatched": "已派遣",
            "on_site": "已到场", "handled": "已处置", "closed": "已结案"}
TIER_ZH = {"city": "市城运中心", "district": "区运行中心", "street": "街道联勤中心",
           "dept": "部门分中心", "grid": "网格员", "community": "社区联勤联动站"}
# what the incident page offers after acknowledgement (快速处置, pipeline/core/handling.py)
HANDLING_ZH = {"dispatched": "派遣", "on_site": "到场", "handled": "处置完毕", "closed": "结案"}
CATEGORY_ZH = {"gas": "燃气", "waterlogging": "内涝", "flood": "防汛", "weather": "气象",
               "environment": "环境", "construction": "建筑工地", "facility": "城市设施",
               "security": "公共安全", "device": "设备"}
PAGES = {"incident": "事件详情页", "list": "事件列表页", "me": "网格员页面", "city": "大屏",
         "api": "API"}
MAX_NOTE = 500
MAX_FORM = 16 * 1024
LOGIN_TRIES, LOGIN_WINDOW_S = 10, 600       # failed logins of one user from one client


@dataclass(frozen=True, slots=True)
class _Where:
    """An incident's place as Scope.covers reads it."""

    district: str | None
    street: str | None
    grid: str | None
    community: str | None = None


class AckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=MAX_NOTE)
    state: HandlingState | None = None
    to: str | None = Field(default=None, min_length=1, max_length=64)


async def form_of(request: Request) -> dict[str, str]:
    """A small urlencoded form (the console's forms are a few fields; no multipart here)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


class Hub:
    """Who is watching (server-sent events), told when an incident of their scope changed."""

    def __init__(self, users: AckUsers) -> None:
        self.users = users
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watchers: dict[asyncio.Queue, tuple[str, Scope]] = {}
        self.closing = False

    def changed(self, changes: list[Change]) -> None:
        """From the feed's thread."""
        if self.loop is not None and self.watchers:
            self.loop.call_soon_threadsafe(self._fan_out, changes)

    def close(self) -> None:
        """Ends every event stream (the server is stopping)."""
        self.closing = True
        if self.loop is not None:
            for q in list(self.watchers):
                self.loop.call_soon_threadsafe(lambda q=q: q.full() or q.put_nowait(0))

    def sees(self, user: str, scope: Scope, c: Change) -> bool:
        return (user in c.pushed_to or scope.covers(
            _Where(c.district, c.street, c.grid, c.community),
            self.users.registry.dept_of_category.get(c.category)))

    def _fan_out(self, changes: list[Change]) -> None:
        for q, (user, scope) in list(self.watchers.items()):
            if q.empty() and any(self.sees(user, scope, c) for c in changes):
                q.put_nowait(len(changes))


def console_app(store: Store, users: AckUsers, feed: Any, *, secret: str, secure_cookie: bool,
                session_hours: float, city_map: CityMap, clock: Callable[[], float] = time.time,
                ) -> tuple[Starlette, Hub]:
    registry = users.registry
    tz = registry.tz
    hub = Hub(users)
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)

    def local(ms: int | None, fmt: str = "%m-%d %H:%M:%S") -> str:
        return "" if ms is None else datetime.fromtimestamp(ms / 1000, tz).strftime(fmt)

    def waited(ms: int) -> str:
        m = max(0, ms) // 60_000
        return f"{m // 60}小时{m % 60}分" if m >= 60 else f"{m}分{max(0, ms) // 1000 % 60}秒"

    env.filters.update(t=local, waited=waited)
    env.globals.update(SEVERITY_ZH=SEVERITY_ZH, STATE_ZH=STATE_ZH, TIER_ZH=TIER_ZH,
                       CATEGORY_ZH=CATEGORY_ZH, PAGES=PAGES, SEVERITIES=SEVERITIES,
                       HANDLING_ZH=HANDLING_ZH,
                       STATES=STATES, city_name=registry.city_name)

    # ---- who is asking --------------------------------------------------------------------
    def login_of(request: Request) -> tuple[str, Scope] | None:
        s = request.session
        user = s.get("user")
        if not user or s.get("until", 0) < clock():
            return None
        scope = users.scopes.get(user)
        return None if scope is None or user not in users.passwords else (user, scope)

    def page(request: Request, name: str, ctx: dict, code: int = 200) -> Response:
        """A whole page, or its live part only when the page's script asks (X-Fragment)."""
        who = login_of(request)
        ctx = {"request": request, "user": who and who[0], "scope": who and who[1],
               "csrf": request.session.get("csrf", ""), "now": int(clock() * 1000), **ctx}
        if request.headers.get("x-fragment") == "1":
            name = f"_{name}"
        return HTMLResponse(env.get_template(f"{name}.html").render(ctx), code)

    def guard(handler: Callable) -> Callable:
        """A page: log in first (and come back here afterwards)."""
        async def wrapped(request: Request) -> Response:
            who = login_of(request)
            if who is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?" + urlencode({"next": target}), 303)
            return await handler(request, *who)
        return wrapped

    def api(handler: Callable) -> Callable:
        async def wrapped(request: Request) -> Response:
            who = login_of(request)
            if who is None:
                return JSONResponse({"error": "log in first: POST /login (the console's session "
                                     "cookie)"}, 401)
            return await handler(request, *who)
        return wrapped

    def safe_next(target: str | None) -> str:
        """Only a path of this console (never //elsewhere or a scheme)."""
        if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
            return target
        return "/"

    def home(user: str, scope: Scope) -> str:
        return {Tier.city: "/city", Tier.grid: "/me"}.get(scope.tier, "/incidents")

    # ---- login ----------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        if not request.session.get("csrf"):
            request.session["csrf"] = new_csrf()
        return page(request, "login", {"next": safe_next(request.query_params.get("next")),
                                       "error": None})

    failures: dict[tuple[str, str], list[float]] = {}     # (user, client) -> when it failed

    async def login(request: Request) -> Response:
        form = await form_of(request)
        nxt = safe_next(str(form.get("next") or "/"))
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            request.session["csrf"] = new_csrf()
            return page(request, "login", {"next": nxt, "error": "页面已过期，请重新登录。"}, 403)
        user, password = str(form.get("user") or "")[:64], str(form.get("password") or "")
        # guessing from one client is slowed to LOGIN_TRIES a window, per user (keyed by the
        # client too, so nobody can lock a user out from elsewhere)
        key = (user, request.client.host if request.client else "")
        now = clock()
        recent = [t for t in failures.get(key, []) if t > now - LOGIN_WINDOW_S]
        if len(recent) >= LOGIN_TRIES:
            wait = int(recent[0] + LOGIN_WINDOW_S - now) // 60 + 1
            return page(request, "login", {"next": nxt, "error": f"尝试次数过多，请{wait}分钟后再试。"}, 429)
        ok = await asyncio.to_thread(check_password, users, user, password)
        if not ok:
            failures[key] = [*recent, now]
            return page(request, "login", {"next": nxt, "error": "用户名或密码错误。"}, 401)
        failures.pop(key, None)
        request.session.clear()            # a fresh session (and CSRF token) at every login
        request.session.update(user=user, csrf=new_csrf(), until=clock() + session_hours * 3600)
        return RedirectResponse(nxt if nxt != "/" else home(user, users.scopes[user]), 303)

    async def logout(request: Request) -> Response:
        form = await form_of(request)
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            return Response("CSRF token missing or wrong", 403)
        request.session.clear()
        return RedirectResponse("/login", 303)

    # ---- pages ----------------------------------------------------------------------------
    async def index(request: Request, user: str, scope: Scope) -> Response:
        return RedirectResponse(home(user, scope), 303)

    async def city(request: Request, user: str, scope: Scope) -> Response:
        view = store.overview(scope, int(clock() * 1000))
        return page(request, "city", {"o": view, "map": city_map.draw(view["points"], scope)})

    def filters_of(request: Request) -> Filters:
        q = request.query_params
        values = {f.name: q.get(f.name) or None for f in fields(Filters)
                  if f.name not in ("sort", "desc", "limit")}
        if values["severity"] not in (None, *SEVERITIES):
            values["severity"] = None
        if values["state"] not in (None, "open", *STATES):
            values["state"] = None
        try:
            limit = min(1000, max(1, int(q.get("limit", PAGE_ROWS))))
        except ValueError:
            limit = PAGE_ROWS
        return Filters(**values, sort=q.get("sort", "started"), desc=q.get("order") != "asc",
                       limit=limit)

    async def incidents(request: Request, user: str, scope: Scope) -> Response:
        f = filters_of(request)
        rows, total, counts = store.incidents(scope, f)
        return page(request, "incidents", {
            "rows": rows, "total": total, "counts": counts, "f": f, "places": places(scope, f),
            "query": dict(request.query_params)})

    def places(scope: Scope, f: Filters) -> dict[str, list[tuple[str, str]]]:
        """The place filters' choices within the scope."""
        districts = sorted((c, n) for c, n in registry.districts.items()
                           if scope.tier in (Tier.city, Tier.dept) or c in scope.codes)
        streets = sorted((c, n) for c, (n, d) in registry.streets.items()
                         if (scope.tier in (Tier.city, Tier.dept) and (not f.district or d == f.district))
                         or (scope.tier is Tier.district and d in scope.codes)
                         or c in scope.codes or c in scope.streets)
        shown = {f.street} if f.street else ({c for c, _ in streets} if len(streets) <= 3 else set())
        communities = sorted((c, n) for c, (n, s) in registry.communities.items() if s in shown)
        if scope.tier is Tier.community:          # a community's page: its own communities only
            communities = sorted((c, registry.communities[c][0]) for c in scope.codes)
        return {"districts": districts if scope.tier in (Tier.city, Tier.dept) else [],
                "streets": streets if len(streets) > 1 else [], "communities": communities}

    async def incident(request: Request, user: str, scope: Scope) -> Response:
        got = store.incident(scope, request.path_params["alert_id"])
        if got is None:
            return page(request, "missing", {}, 404)
        return page(request, "incident", {"i": got})

    async def me(request: Request, user: str, scope: Scope) -> Response:
        return page(request, "me", {"pushes": store.pushes(user)})

    async def ack_form(request: Request, user: str, scope: Scope) -> Response:
        form = await form_of(request)
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            return page(request, "missing", {"message": "页面已过期，请刷新后重试。"}, 403)
        alert_id = request.path_params["alert_id"]
        source = str(form.get("from") or "incident")
        note = str(form.get("note") or "").strip()[:MAX_NOTE] or None
        state = str(form.get("state") or "") or None
        if state not in (None, *HANDLING_ZH):
            return page(request, "missing", {"message": "没有这个处置状态。"}, 400)
        to = str(form.get("to") or "").strip()[:64] or None
        refused = acknowledge(user, scope, alert_id, note, source if source in PAGES else "incident",
                              state, to)
        if refused is not None:
            return page(request, "missing", {"message": refused[1]}, refused[0])
        return RedirectResponse(safe_next(str(form.get("back") or f"/incidents/{alert_id}")), 303)

    def acknowledge(user: str, scope: Scope, alert_id: str, note: str | None,
                    source: str, state: str | None = None, to: str | None = None
                    ) -> tuple[int, str] | None:
        """Publish the user's acknowledgement (or handling state: dispatched, on_site,
        handled, closed); (status, why) if it may not be made."""
        if store.incident(scope, alert_id) is None:
            return 404, "没有这个事件（或不在您的管辖范围内）。"
        now = int(clock() * 1000)
        request = AckRequest(alert_id=alert_id, ts=now, note=note, state=state, to=to)
        try:
            ack = users.ack(user, request)
        except Forbidden as exc:
            return 403, str(exc)
        feed.publish_ack(user, request, ack)
        store.record_ack(alert_id, user, source, note, now, state)
        hub.changed(store.changes({alert_id: set()}))
        return None

    # ---- live updates ---------------------------------------------------------------------
    async def events(request: Request, user: str, scope: Scope) -> Response:
        hub.loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(maxsize=1)
        hub.watchers[q] = (user, scope)

        async def stream():
            try:
                yield "retry: 2000\n\n"
                while not hub.closing:
                    try:
                        await asyncio.wait_for(q.get(), 15)
                        if hub.closing:
                            break
                        yield "event: change\ndata: {}\n\n"
                    except TimeoutError:
                        yield ": still here\n\n"       # proxies close silent streams
            finally:
                hub.watchers.pop(q, None)

        return StreamingResponse(stream(), media_type="text/event-stream")

    # ---- JSON API -------------------------------------------------------------------------
    async def api_incidents(request: Request, user: str, scope: Scope) -> Response:
        rows, total, counts = store.incidents(scope, filters_of(request))
        return JSONResponse({"total": total, "counts": counts, "incidents": rows})

    async def api_incident(request: Request, user: str, scope: Scope) -> Response:
        got = store.incident(scope, request.path_params["alert_id"])
        if got is None:
            return JSONResponse({"error": "no such incident in your scope"}, 404)
        return JSONResponse(got)

    async def api_ack(request: Request, user: str, scope: Scope) -> Response:
        if not csrf_ok(request.session, request.headers.get("x-csrf-token")):
            return JSONResponse({"error": "send the page's CSRF token in X-CSRF-Token"}, 403)
        try:
            body = AckBody.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            err = exc.errors()[0]
            return JSONResponse({"error": f"{'.'.join(map(str, err['loc']))}: {err['msg']}"}, 400)
        refused = acknowledge(user, scope, request.path_params["alert_id"], body.note, "api",
                              body.state, body.to)
        if refused is not None:
            return JSONResponse({"error": refused[1]}, refused[0])
        return JSONResponse({"status": "sent"}, 202)

    async def api_overview(request: Request, user: str, scope: Scope) -> Response:
        return JSONResponse(store.overview(scope, int(clock() * 1000)))

    async def api_pushes(request: Request, user: str, scope: Scope) -> Response:
        return JSONResponse({"pushes": store.pushes(user)})

    async def healthz(request: Request) -> Response:
        ok = feed.healthy()
        return JSONResponse({"status": "ok" if ok else "degraded"}, 200 if ok else 503)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "no such call; see README: the console's API"}, code)
        return page(request, "missing", {"message": "没有这个页面。"}, code)

    routes = [
        Route("/login", login_form), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]), Route("/healthz", healthz),
        Route("/", guard(index)), Route("/city", guard(city)), Route("/incidents", guard(incidents)),
        Route("/incidents/{alert_id}", guard(incident)),
        Route("/incidents/{alert_id}/ack", guard(ack_form), methods=["POST"]),
        Route("/me", guard(me)), Route("/events", guard(events)),
        Route("/api/incidents", api(api_incidents)),
        Route("/api/incidents/{alert_id}", api(api_incident)),
        Route("/api/incidents/{alert_id}/ack", api(api_ack), methods=["POST"]),
        Route("/api/overview", api(api_overview)), Route("/api/pushes", api(api_pushes)),
        *silence_routes(page=page, guard=guard, form_of=form_of, feed=feed, users=users,
                        clock=clock),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    middleware=[
                        Middleware(Guarded),
                        Middleware(SessionMiddleware, secret_key=secret, session_cookie="cityops_console",
                                   max_age=int(session_hours * 3600), same_site="strict",
                                   https_only=secure_cookie)])
    return app, hub


class Guarded:
    """Plain ASGI (streams pass through untouched): the security headers on every response,
    and a state-changing request from another origin refused before anything else (the CSRF
    token is the main guard; this is the second)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            heads = dict(scope["headers"])
            origin = heads.get(b"origin")
            if origin is not None and origin.split(b"://", 1)[-1] != heads.get(b"host"):
                response = Response("cross-site request refused", 403, headers=HEADERS)
                return await response(scope, receive, send)
        extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
