"""Hot reload in the runtimes: what asks for one, and how `cityops run` makes it.

Three triggers, one queue, taken by the runtime's own loop between two batches (the engine is
never touched from another thread):

    SIGHUP                      kill -HUP <pid>
    POST /reload                Authorization: Bearer <token> of a city-scope user (acks.users):
                                the city's rules are the city's business; the reply says what
                                changed, or why the new set was refused (file:line)
    the watch                   every `reload.watch_every` the files' sizes and times; once a
                                change has held still for one more look (an editor that writes
                                in pieces), a reload

`cityops run` then (``apply_live``): the new set is read and checked whole (rules, params,
routing, registry, acks users, bound to the registry); a mistake refuses it with file and line,
logged and counted (cityops_reloads_total{result="refused"}), and the running set goes on.
Else the set's files are kept beside the state (pipeline/shared/kept_sets.py), the reload is
journaled, the state is carried into an engine built from it (pipeline/core/reload.py), the resolve
notices of what cannot go on are published, and a snapshot is taken once the broker has them.
A restart before that snapshot replays the journal by the old set up to the reload and makes
the same switch again: the same resolves, nothing lost, no reading judged by the wrong set.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.engine import Output
from pipeline.core.identity import AckUsers
from pipeline.core.models import Tier
from pipeline.core.reload import CitySet, Diff, carry, diff, load_set, same_sensors, stamp
from pipeline.shared.metrics import counter
from pipeline.shared.store import RELOAD
from rules.yamlfile import ConfigError

log = logging.getLogger("cityops.reload")


class ReloadStats:
    """What reloads did, for /metrics: cityops_reloads_total{result}, and per reload the rules
    and sensors it changed."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.last_digest = ""
        self.last_error = ""

    def done(self, d: Diff, resolved: int) -> None:
        self.c["ok"] += 1
        for k, v in d.counts().items():
            self.c["n." + k] += v
        self.c["resolved"] += resolved

    def refused(self, why: str, result: str = "refused") -> None:
        self.c[result] += 1
        self.last_error = why

    def collect(self) -> Iterator[Any]:
        """For /metrics (pipeline/shared/metrics.py)."""
        c = self.c
        yield counter("cityops_reloads_total", "Reloads of rules, params, routing and registry, "
                      "by result (ok; refused: the new set did not pass its checks; mismatch: a "
                      "Kafka worker's files differ from the announced set).",
                      {r: c[r] for r in ("ok", "refused", "mismatch", "unchanged")}, "result")
        yield counter("cityops_reload_changes_total", "What reloads changed, summed over reloads.",
                      {k: c["n." + k] for k in Diff.__dataclass_fields__}, "what")
        yield counter("cityops_reload_resolved_total", "Incidents a reload resolved (rule removed "
                      "or reshaped, sensor retired or moved).", c["resolved"])


@dataclass
class Request:
    source: str                               # SIGHUP, watch, http:<user>
    future: Future = field(default_factory=Future)


class Requests:
    """Reload requests, from any thread (a signal handler included), for the runtime's loop."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Request] = queue.SimpleQueue()

    def ask(self, source: str) -> Future:
        r = Request(source)
        self._q.put(r)
        return r.future

    def take(self) -> list[Request]:
        out = []
        while not self._q.empty():
            out.append(self._q.get_nowait())
        return out


class Watch:
    """Polls the set's files; asks for a reload once a change has stood still for a look."""

    def __init__(self, files: Callable[[], list[Path]], every_s: float,
                 ask: Callable[[str], Any], stop: threading.Event) -> None:
        self.files, self.every, self.ask, self.stop = files, every_s, ask, stop
        self.thread = threading.Thread(target=self._run, name="reload-watch", daemon=True)

    def start(self) -> Watch:
        self.thread.start()
        return self

    def _run(self) -> None:
        seen = stamp(self.files())
        moving: tuple | None = None
        while not self.stop.wait(self.every):
            now = stamp(self.files())
            if now == seen:
                moving = None
            elif now == moving:               # changed, and still for one look: take it
                seen, moving = now, None
                self.ask("watch")
            else:
                moving = now


def switch_to(rt: Any, new: CitySet, at: int) -> Output:
    """The live runtime ``rt`` judges by ``new`` from here: its engine's state carried into
    the new set's engine (``carry``); returns the resolves of what cannot go on. The same step
    in a live reload and in a restore that meets a journaled reload (pipeline/shared/kept_sets.py)."""
    engine = new.engine(rt.s.engine)
    out = carry(rt.engine, engine, at)
    rt.engine, rt.registry, rt.users, rt.city = engine, new.registry, \
        AckUsers(new.registry, rt.s.acks.users), new
    if rt.push is not None:
        rt.push.registry = new.registry       # who is on call, their channels
    if rt.history is not None and not same_sensors(rt.history.registry, new.registry):
        from connectors.influx import InfluxSink
        closing = rt.history                  # it numbers sensors as the old registry did
        rt.history = InfluxSink(rt.s.influx, new.registry, closing.closed_fields)
        threading.Thread(target=closing.close, args=(10.0,), name="influx-close",
                         daemon=True).start()     # writes what it holds, off the loop
    return out


def apply_live(rt: Any, source: str) -> dict[str, Any]:
    """One reload of the live runtime ``rt`` (on its loop's thread). Returns the reply."""
    s = rt.s
    stats: ReloadStats = rt.reload_stats
    try:
        new = load_set(s)
        AckUsers(new.registry, s.acks.users)
    except ConfigError as exc:
        stats.refused(str(exc))
        log.error("reload (%s) refused, the running rules go on: %s", source, exc)
        return {"result": "refused", "error": str(exc)}
    old: CitySet = rt.city
    if new.digest == old.digest:
        stats.c["unchanged"] += 1
        log.info("reload (%s): the files are as loaded (digest %s); nothing to do", source,
                 new.digest)
        return {"result": "unchanged", "digest": new.digest}
    d = diff(old, new)
    now = int(time.time() * 1000)
    # Durable before anything is told: a restart after this line, kill -9 included, replays
    # the journal to this point by the old set and makes this switch again, resolves and all.
    if not rt.kept.keep(s, new.digest):
        stats.refused("files changed while read")
        return {"result": "refused", "error": "the files changed while they were read; "
                "reload again once they are written"}
    rt.store.append(RELOAD, now, [new.digest])
    out = switch_to(rt, new, now)
    resolved = len({n["alert_id"] for n in out.notices})
    rt._publish(out.notices, [])
    if rt.history is not None:
        rt.history.add(out)                   # the resolves, as every notice
    if rt.link is None or rt.link.wait_published(10.0):
        rt._snapshot()                        # the old set's journal ends here
    else:
        log.warning("reload: the broker did not take every notice in 10 s; the journal keeps "
                    "the reload, and a restart makes it again")
    stats.done(d, resolved)
    stats.last_digest = new.digest
    counts = {k: v for k, v in d.counts().items() if v}
    log.info("reload (%s) done: digest %s → %s; %s; %d incidents resolved by it; %d open go on",
             source, old.digest, new.digest, counts or "no rule, threshold, route or sensor "
             "changed", resolved, len(rt.engine.book.open))
    return {"result": "ok", "digest": new.digest, "previous": old.digest, "changes": counts,
            "resolved": resolved, "open": len(rt.engine.book.open), "diff": d.text()}


def take_requests(rt: Any, apply: Callable[[Any, str], dict[str, Any]]) -> None:
    """Every waiting request; one reload answers all asked before it began."""
    asked = rt.reloads.take()
    if not asked:
        return
    try:
        reply = apply(rt, ", ".join(sorted({r.source for r in asked})))
    except Exception as exc:                  # a bug: the running set goes on
        log.exception("reload failed; the running rules go on")
        rt.reload_stats.refused(repr(exc))
        reply = {"result": "refused", "error": f"reload failed: {exc!r} (see the log)"}
    for r in asked:
        r.future.set_result(reply)


# ---- POST /reload ------------------------------------------------------------------------------

def http_route(rt: Any) -> Callable[..., Any]:
    """The handler of POST /reload (pipeline/shared/http_api.py): a city-scope user's bearer token."""
    from starlette.responses import JSONResponse

    async def post_reload(request: Any) -> Any:
        users = rt.users
        user = users.bearer(request.headers.get("authorization"))
        if user is None:
            return JSONResponse({"error": "send Authorization: Bearer <your token> (a city-scope "
                                 "user of acks.users with a token_sha256)"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="cityops"'})
        scope = users.scopes.get(user)
        if scope is None or scope.tier is not Tier.city:
            return JSONResponse({"error": f"{user!r} may not reload the city's rules: only a "
                                 "city-scope user of acks.users may"}, 403)
        log.info("reload asked over HTTP by %s", user)
        try:
            reply = await asyncio.wait_for(asyncio.wrap_future(rt.reloads.ask(f"http:{user}")), 120)
        except TimeoutError:
            return JSONResponse({"error": "the reload did not finish in 120 s; see the log"}, 504)
        code = {"ok": 200, "unchanged": 200, "announced": 202}.get(reply["result"], 422)
        return JSONResponse(reply, code)
    return post_reload
