"""The console's silences page: what is silenced now and what it holds back; make and end one.

    GET  /silences             the silences in force or to come (as the pipeline last published
                               them, retained on `{prefix}/silence-list`), the incidents each
                               mutes, and a form for a silence over a place of the user's scope
    POST /silences             (form: csrf, place, category, hours | days + from + to, reason)
    POST /silences/{id}/end    (form: csrf)

A silence is published on `{prefix}/silences/{user}`, as the user who made it, as an
acknowledgement is (the pipeline checks the user's scope again, journals it and applies it;
pipeline/shared/silence_http.py). The console checks first, so that a mistake is told on the page.
Kafka consoles show the page without the form: make silences there with `cityops silence`
against a worker's HTTP port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from pipeline.core.identity import Scope
from pipeline.core.models import Tier
from pipeline.core.silences import DAYS, AddSilence, refusal
from pipeline.runtimes.opscentre.auth import csrf_ok
from pipeline.shared.silence_http import may_silence

DAY_ZH = dict(zip(DAYS, "一二三四五六日", strict=True))
HOURS = (1, 2, 4, 8, 12, 24, 72)


def silence_routes(*, page: Callable, guard: Callable, form_of: Callable, feed: Any, users: Any,
                   clock: Callable[[], float] = time.time) -> list[Route]:
    registry = users.registry

    def places(scope: Scope) -> list[tuple[str, str, str]]:
        """(label, code, name) of the places the user may silence: districts and streets."""
        if scope.tier is Tier.dept:
            return []
        out = [("district", c, n) for c, n in sorted(registry.districts.items())
               if scope.tier is Tier.city or c in scope.codes]
        out += [("street", c, f"{registry.districts.get(d, '')}{n}")
                for c, (n, d) in sorted(registry.streets.items())
                if scope.tier is Tier.city or c.startswith(tuple(scope.codes | scope.streets))]
        out += [("grid", c, c) for c in sorted(scope.codes) if scope.tier is Tier.grid]
        return out

    def show(request: Request, user: str, scope: Scope, error: str | None = None,
             code: int = 200) -> Response:
        listed = getattr(feed, "silences", None)
        rows = []
        for s in (listed or {}).get("silences", []):
            rows.append({**s, "mine": may_silence(user, scope, s["matchers"], registry) is None})
        return page(request, "silences", {
            "rows": rows, "known": listed is not None, "places": places(scope), "hours": HOURS,
            "days": DAY_ZH, "error": error, "can_make": hasattr(feed, "publish_silence")}, code)

    async def listing(request: Request, user: str, scope: Scope) -> Response:
        return show(request, user, scope)

    async def make(request: Request, user: str, scope: Scope) -> Response:
        form = await form_of(request)
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            return page(request, "missing", {"message": "页面已过期，请刷新后重试。"}, 403)
        label, _, code = str(form.get("place") or "").partition(":")
        matchers: dict[str, Any] = {label: code} if label and code else {}
        if form.get("category"):
            matchers["category"] = form["category"]
        spec: dict[str, Any] = {"matchers": matchers, "reason": str(form.get("reason") or "").strip(),
                                "by": user}
        days = [d for d in DAYS if form.get(f"day_{d}")]
        now = int(clock() * 1000)
        if days:
            spec["schedule"] = {"days": days, "from": form.get("from", ""),
                                "to": form.get("to", ""), "tz": registry.tz.key}
        else:
            try:
                hours = float(form.get("hours") or 0)
            except ValueError:
                hours = 0
            spec.update(starts_at=now, ends_at=now + int(hours * 3_600_000))
        try:         # checked here first, so that a mistake is told on the page
            AddSilence.model_validate({**spec, "op": "add", "id": "s-check"})
        except ValidationError as exc:
            return show(request, user, scope, f"无法设置静默：{refusal(exc)}", 400)
        why = may_silence(user, scope, matchers, registry)
        if why:
            return show(request, user, scope, f"无法设置静默：{why}", 403)
        feed.publish_silence(user, spec)
        return RedirectResponse("/silences", 303)

    async def end(request: Request, user: str, scope: Scope) -> Response:
        form = await form_of(request)
        if not csrf_ok(request.session, str(form.get("csrf") or "")):
            return page(request, "missing", {"message": "页面已过期，请刷新后重试。"}, 403)
        feed.publish_silence(user, {"op": "end", "id": request.path_params["sid"]})
        return RedirectResponse("/silences", 303)

    routes = [Route("/silences", guard(listing))]
    if hasattr(feed, "publish_silence"):
        routes += [Route("/silences", guard(make), methods=["POST"]),
                   Route("/silences/{sid}/end", guard(end), methods=["POST"])]
    return routes
