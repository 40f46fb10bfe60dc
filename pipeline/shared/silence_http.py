"""Silences over HTTP: who may make one, and the routes `cityops silence` talks to.

    POST   /silences        a silence or a maintenance window (JSON, pipeline/core/silences.py without
                            `op`, `id` and `by`: those are the server's and the sender's); 202
                            with its id once queued for the engine's loop
    GET    /silences        the silences in force or to come, each with the incidents it mutes
    DELETE /silences/{id}   end one now; 202 once queued

Every route takes `Authorization: Bearer <token>` (a user of acks.users, as POST /acks). A
silence holds back alerts, so it is taken only within its maker's scope: a district user may
silence places of their district (the matchers must name districts, streets, communities or
grids inside it, without globs), a department its categories, the city anything. Ending one
needs the same scope over it. Like an acknowledgement, the request never touches the engine:
the runtime's loop journals it and hands it to the engine, which applies it at its watermark.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.core.identity import Scope
from pipeline.core.models import Severity, Tier
from pipeline.core.silences import AddSilence, new_id, refusal

PLACES = ("grid", "community", "street", "district")     # most precise first
MAX_BODY = 16 * 1024


def _literals(want: Any) -> list[str] | None:
    """A matcher's values when each names one place (no globs), else None."""
    values = want if isinstance(want, list) else [want]
    if not values or not all(isinstance(v, str) and not any(c in v for c in "*?[") for v in values):
        return None
    return values


def may_silence(user: str, scope: Scope | None, matchers: dict[str, Any], registry: Any) -> str | None:
    """Why ``user`` may not silence what ``matchers`` match, or None."""
    if scope is None:
        return f"{user!r} may not make silences (not a registry worker, not in acks.users)"
    if scope.tier is Tier.city:
        return None
    if scope.tier is Tier.dept:
        mine = {c for c, d in registry.dept_of_category.items() if d in scope.codes}
        cats = _literals(matchers.get("category"))
        if cats and set(cats) <= mine:
            return None
        return (f"{user!r} answers for {scope.describe()}: a silence must name its categories "
                f"(category: {sorted(mine)})")
    codes = tuple(scope.codes | scope.streets)      # place codes nest: district ⊂ street ⊂ grid
    for label in PLACES:
        values = _literals(matchers.get(label))
        if values and all(v.startswith(codes) for v in values):
            return None
    return (f"{user!r} answers for {scope.describe()}: a silence must name places inside it "
            f"({', '.join(PLACES)}: codes, no globs)")


class Refused(Exception):
    """A silence request that may not be made: the HTTP status, the dead letter's reason, why."""

    def __init__(self, status: int, reason: str, why: str) -> None:
        super().__init__(why)
        self.status, self.reason, self.why = status, reason, why


def command(rt: Any, user: str, spec: Any, now: int) -> bytes:
    """The journaled command a user's request stands for — ``spec`` is a silence (matchers,
    starts_at, ends_at or schedule, reason) or ``{"op": "end", "id": …}`` — or Refused. The
    same for POST /silences, DELETE /silences/{id} and `{prefix}/silences/{user}` on MQTT
    (the console)."""
    users = rt.users
    if not isinstance(spec, dict):
        raise Refused(400, "bad_silence", "send a JSON object: matchers, starts_at, ends_at or "
                      "schedule, reason (or op: end and the id)")
    if spec.get("by", user) != user:
        raise Refused(403, "forbidden", f"sent by {user!r} but says by {spec['by']!r}")
    if spec.get("op") == "end":
        sid = spec.get("id")
        found = next((s for s, _ in rt.silences_in_force() if s.id == sid), None)
        if found is None:
            raise Refused(404, "bad_silence", f"no silence {sid} in force")
        why = may_silence(user, users.scopes.get(user), found.matchers, rt.registry)
        if why:
            raise Refused(403, "forbidden", why)
        return orjson.dumps({"op": "end", "id": sid, "by": user})
    spec = {"starts_at": now, **spec} if "schedule" not in spec else dict(spec)
    spec.update(by=user, op="add")
    spec["id"] = new_id(spec, now)
    try:
        silence = AddSilence.model_validate(spec)
    except ValidationError as exc:
        raise Refused(400, "bad_silence", refusal(exc)) from None
    why = may_silence(user, users.scopes.get(user), silence.matchers, rt.registry)
    if why:
        raise Refused(403, "forbidden", why)
    return silence.model_dump_json(by_alias=True, exclude_none=True).encode()


def silence_routes(rt: Any) -> list[Route]:
    """Over a runtime with users, registry, http_silences (the loop's queue) and
    silences_in_force() -> [(Silence, [muted incident dicts])]."""
    users = rt.users

    def who(request: Request) -> str | Response:
        user = users.bearer(request.headers.get("authorization"))
        if user is None:
            return JSONResponse({"error": "send Authorization: Bearer <your token> (a user of "
                                 "acks.users with a token_sha256)"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="cityops"'})
        return user

    def queue(user: str, spec: Any) -> Response:
        try:
            cmd = command(rt, user, spec, int(time.time() * 1000))
        except Refused as exc:
            return JSONResponse({"error": exc.why}, exc.status)
        rt.http_silences.put(cmd)
        return JSONResponse({"status": "queued", "id": orjson.loads(cmd)["id"]}, 202)

    async def add(request: Request) -> Response:
        user = who(request)
        if isinstance(user, Response):
            return user
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"send a silence up to {MAX_BODY // 1024} KiB"}, 413)
        try:
            spec = orjson.loads(body or b"null")
        except orjson.JSONDecodeError as exc:
            return JSONResponse({"error": f"not JSON: {exc}"}, 400)
        if isinstance(spec, dict) and "op" in spec:
            return JSONResponse({"error": "end a silence with DELETE /silences/{id}"}, 400)
        return queue(user, spec)

    async def listing(request: Request) -> Response:
        user = who(request)
        if isinstance(user, Response):
            return user
        return JSONResponse(listed(rt))

    async def end(request: Request) -> Response:
        user = who(request)
        if isinstance(user, Response):
            return user
        return queue(user, {"op": "end", "id": request.path_params["sid"]})

    return [Route("/silences", add, methods=["POST"]), Route("/silences", listing, methods=["GET"]),
            Route("/silences/{sid}", end, methods=["DELETE"])]


def listed(rt: Any) -> dict[str, Any]:
    """What GET /silences answers (and the console shows): every silence, what it mutes."""
    return {"silences": [{**s.view(), "muting": muted} for s, muted in rt.silences_in_force()]}


def in_force(books: list[Any], now: int | None = None) -> list[tuple[Any, list[dict]]]:
    """The silences of the engines' books (one per engine; a Kafka worker has one per
    partition), each with the incidents it mutes. Read from the HTTP thread: copies only."""
    found: dict[str, Any] = {}
    muted: dict[str, list[dict]] = {}
    for book in books:
        for s in list(book.silences.items.values()):
            if now is None or not s.over(now):
                found.setdefault(s.id, s)
        for inc in list(book.open.values()):
            if inc.muted:
                muted.setdefault(inc.muted, []).append({
                    "alert_id": inc.aid, "rule_id": inc.rule, "sensor_id": book.subject_name(
                        inc.idx if inc.idx is not None else inc.subject),
                    "severity": Severity.of_rank(inc.rank).value,
                    "title": inc.base.get("_title") if inc.base else None,
                    "started": inc.started, "held": inc.held})
    return [(s, muted.get(s.id, [])) for _, s in sorted(found.items())]
