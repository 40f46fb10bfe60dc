"""快速处置: an incident handled to a closed loop, and the community step of escalation.

After acknowledgement an incident is `dispatched` (to a worker, a team, a department), someone
is `on_site`, it is `handled` (with a note: 已关阀、已通知燃气公司) and `closed` by the tier that
owns it. Each state arrives as an acknowledgement does (an ``Ack`` whose ``state`` says which:
the acks topic, ``POST /acks``, a worker's push reply, the console), with the same identity and
scope rules, and goes through the engine's ack path, so it is journaled, in the snapshot and
replayable. Each is a notice to every tier told.

    order      acknowledged < dispatched < on_site < handled < closed; a state may skip the
               ones before it (on_site from a push reply acknowledges too), a state at or
               before the incident's changes nothing (as a second acknowledgement)
    closing    by the owning tier — the highest of community, street, district, city that was
               told (the street when none was) — or a tier above it; after the sensor resolved,
               or, while it has not, with the reason in `note` (传感器故障). A closed incident is
               over: its sensor's later changes tell nobody, until it fires anew
    resolved   an incident somebody took in hand stays open to handling after its sensor
               resolves, for CLOSABLE_FOR, so it can be closed; one nobody took in hand ends
               when it resolves, as before

The community chain (a route that sets `escalate_after.grid` or `.community`): 网格 → 社区 →
街道 → 区 → 市 — nobody answered `grid` after the incident started: the community is told;
nobody answered `community` after that: the street; from there the street's and district's
deadlines as before, each from when that tier was told. `escalate_until: on_site` keeps
escalation and reminders going after an acknowledgement, until someone is on site.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

from pipeline.core import notices as nt
from pipeline.core.models import Ack, State, Tier
from rules.evaluators import RESOLVE

STAGES = ("acknowledged", "dispatched", "on_site", "handled", "closed")
RANK = {s: i + 1 for i, s in enumerate(STAGES)}
# the place tiers, from the grid up: who answers first, and who owns an incident
CHAIN = (Tier.grid, Tier.community, Tier.street, Tier.district, Tier.city)
CLOSABLE_FOR = 7 * 86_400_000           # a resolved incident awaits its closing a week at most
_LIFECYCLE = -1                         # the AlertBook's timers (lifecycle.LIFECYCLE)
TIMELINE = ("fired", "acknowledged", "dispatched", "on_site", "handled", "resolved", "closed")

_DONE = {"dispatched": "已派遣", "on_site": "已到场", "handled": "已处置", "closed": "已结案"}


def stage(times: dict[str, int]) -> int:
    """How far handling has come: the rank of the furthest state in ``times`` (0: none)."""
    return max((RANK[s] for s in times if s in RANK), default=0)


def owning_tier(told: set[Tier]) -> Tier:
    """The tier that closes an incident: the highest place tier above the grid it reached."""
    return next((t for t in reversed(CHAIN[1:]) if t in told), Tier.street)


def may_close(told: set[Tier], tier: Tier) -> str | None:
    """Why ``tier`` may not close an incident told ``told``, or None."""
    owner = owning_tier(told)
    if tier in CHAIN and CHAIN.index(tier) >= CHAIN.index(owner):
        return None
    return (f"closing is for the tier that owns the incident, {owner.value} (or one above it), "
            f"not {tier.value}")


def summary(state: str, ack: Ack) -> str:
    """What a handling notice adds to the summary, in Chinese."""
    who = f"（{ack.by}）"
    if state == "dispatched":
        return f"已派遣至{ack.to or ack.by}{who}。"
    if state == "on_site":
        return f"处置人员已到场{who}。"
    if state == "handled":
        return f"已处置：{ack.note}{who}。" if ack.note else f"已处置{who}。"
    return f"已结案{who}" + (f"，原因：{ack.note}。" if ack.note else "。")


def timeline(times: dict[str, int], started: int, tz: Any) -> dict[str, str]:
    """The closed notice's timeline: each step that happened, in the city's time."""
    at = {"fired": started, **times}
    return {k: nt.fmt_time(at[k], tz) for k in TIMELINE if k in at}


def still_to_come(until: str) -> str:
    """What a reminder or an escalation says nobody has done yet."""
    return "到场" if until == "on_site" else "确认"


class Handling:
    """The handling states and the community chain, as AlertBook (pipeline/core/lifecycle.py) has
    them: its incidents carry ``times`` (state -> ms), ``dispatched_to``, ``community_at``
    and ``street_at``; ``closable`` holds resolved incidents awaiting their closing."""

    closable: dict[str, Any]

    def holds(self, aid: str) -> bool:
        """Whether an acknowledgement or handling state for ``aid`` can find its incident."""
        return aid in self.open or aid in self.closable          # type: ignore[attr-defined]

    def settled(self, inc: Any) -> bool:
        """Whether escalation and reminders are over: acknowledged, or (`escalate_until:
        on_site`) someone on site (or it was closed)."""
        if inc.route.escalate_until == "on_site":
            return stage(inc.times) >= RANK["on_site"]
        return bool(inc.acked_by)

    def handle(self, ack: Ack, out: list[dict],
               may_ack: Callable[[Ack, Any, str], str | None] | None) -> tuple[str, str] | None:
        """Apply a handling state (``ack.state`` past acknowledged); the refusal, or None."""
        book: Any = self
        inc = book.open.get(ack.alert_id) or self.closable.get(ack.alert_id)
        if inc is None:
            return "bad_ack", f"no open incident {ack.alert_id} (closed already, or never existed)"
        why = book._may(inc, ack, may_ack)
        if why:
            return why
        state: str = ack.state  # type: ignore[assignment]  # not None: ack() hands on a handling state only
        if RANK[state] <= stage(inc.times):
            return None                      # already that far: changes nothing
        told = {t.tier for t in inc.sent}
        resolved = inc.aid not in book.open
        if state == "closed":
            refused = may_close(told, ack.tier)
            if refused:
                return "forbidden", f"{ack.by!r}: {refused}; alert {ack.alert_id}"
            if not resolved and not ack.note:
                return "bad_ack", ("the sensor has not resolved: close it with the reason in "
                                   "`note` (e.g. 传感器故障)")
        ts = max(ack.ts_ms, inc.last_ts)
        before = (inc.acked_by, inc.acked_tier, inc.state, inc.seq, inc.last_ts,
                  dict(inc.times), inc.dispatched_to)
        prev = inc.state
        if not inc.acked_by:                 # a later state acknowledges too
            inc.acked_by, inc.acked_tier = ack.by, ack.tier.value
            inc.times.setdefault("acknowledged", ts)
        inc.times[state] = ts
        if state == "dispatched":
            inc.dispatched_to = ack.to or ack.by
        inc.state = State(state)
        fields = {"state_by": ack.by, "state_tier": ack.tier.value,
                  "dispatched_to": inc.dispatched_to, "note": ack.note}
        if state == "closed":
            fields["timeline"] = timeline(inc.times, inc.started, book.registry.tz)
        told_now: list[dict] = []
        try:                                 # as an ack: no state change without its notices
            book._send(inc, State(state), prev, ts, told_now, [], summary(state, ack),
                       handling=fields)
        except Exception:
            (inc.acked_by, inc.acked_tier, inc.state, inc.seq, inc.last_ts, inc.times,
             inc.dispatched_to) = before
            raise
        out += told_now
        if state == "closed":                # (one still firing stays open, silent: closed_early)
            self.closable.pop(inc.aid, None)
        return None

    def closed_early(self, ch: Any) -> bool:
        """Whether ``ch`` (a rise, a step down, a resolve) belongs to an incident closed while
        its sensor still fired: it tells nobody. A resolve ends it as any other (a flapping
        rule may fire it again: a new firing, its `seq` going on)."""
        book: Any = self
        inc = book.open.get(ch.alert_id)
        if inc is None or "closed" not in inc.times:
            return False
        if ch.what == RESOLVE:
            del book.open[inc.aid]
            inc.state = State.resolved
            book.keep_while_flapping(inc, ch.ts)
        return True

    def await_closing(self, inc: Any, ch: Any) -> None:
        """A resolved incident somebody took in hand waits for its closing (CLOSABLE_FOR)."""
        if inc.acked_by:
            ts = ch.ts
            inc.times["resolved"] = ts
            # what its text says of the last reading (absence), as it resolved: a restart must
            # not write it from a track that has moved on since
            inc.times["heard"] = ch.heard or 0
            self.closable[inc.aid] = inc
            self.timers.push(ts + CLOSABLE_FOR, _LIFECYCLE,          # type: ignore[attr-defined]
                             (inc.aid, "unclose", inc.gen))

    def unclose(self, aid: str, gen: int) -> None:
        inc = self.closable.get(aid)
        if inc is not None and inc.gen == gen:
            del self.closable[aid]

    # ---- the community chain ---------------------------------------------------------------
    @staticmethod
    def low_rung(inc: Any, told: set[Tier]) -> Tier | None:
        """The next tier below the street a route's community chain climbs to, or None."""
        r = inc.route
        if Tier.street in told or Tier.district in told:
            return None
        if Tier.community not in told and r.escalate_grid:
            return Tier.community
        if Tier.community in told and r.escalate_community:
            return Tier.street
        return None

    def low_due(self, inc: Any, told: set[Tier], since: int, now: int) -> int | None:
        """When the community chain climbs next (None: not below the street)."""
        if Tier.community in told and inc.community_at is None:
            inc.community_at = now
        rung = self.low_rung(inc, told)
        if rung is Tier.community:
            return since + inc.route.escalate_grid + inc.paused      # (paused: silences)
        if rung is Tier.street:
            return inc.community_at + inc.route.escalate_community
        return None
