"""``type: correlation``: N sensors of one building / grid / community / street with incidents
of the rules it counts, started within T: one group incident."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from rules.evaluators import FIRE, FIRING, REOPEN, RESOLVE, Change, Evaluator, Track, alert_id
from rules.schema import Duration, RuleId, _RuleBase
from rules.types.base import Binding, RuleType, register
from rules.vocabulary import Severity


class CorrelationRule(_RuleBase):
    type: Literal["correlation"]
    of: list[RuleId] = Field(min_length=1, description="rules whose incidents are counted")
    group_by: Literal["building", "grid", "community", "street"]
    min_sensors: int = Field(ge=2)
    within: Duration
    severity: Severity

    def counts(self) -> list[str]:
        return self.of


class Correlation(Evaluator):
    """N distinct sensors of the same building / grid / community / street with incidents of the
    watched rules started within T: one group incident at a raised severity. It resolves when
    the last member incident resolves."""

    type = "correlation"
    reads = "none"

    def __init__(self, *args: Any, group_of: Callable[[int], str | None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.group_of = group_of
        self.members: dict[str, dict[int, int]] = {}   # group -> {sensor: incident start}

    def on_change(self, ch: Change) -> None:
        if not isinstance(ch.subject, int):
            return
        g = self.group_of(ch.subject)
        if g is None:
            return
        members = self.members.get(g)
        if ch.what in (FIRE, REOPEN):
            if members is None:
                members = self.members[g] = {}
            members[ch.subject] = ch.ts
            if g in self.tracks:
                return
            at = self._reached(members)
            if at is not None:
                recent = sorted(m for m, t in members.items() if at - self.spec.within <= t <= at)
                tr = self.tracks[g] = Track(FIRING, at, self.spec.severity.rank, None, None)
                tr.aid = alert_id(self.id, g, at)
                tr.extra = recent
                self.out.append(Change(FIRE, self, g, tr.aid, tr.rank, at, at, None,
                                       float(self.spec.min_sensors), members=recent))
        elif ch.what == RESOLVE and members is not None:
            members.pop(ch.subject, None)
            if not members:
                del self.members[g]
                tr = self.tracks.pop(g, None)
                if tr is not None:
                    self.out.append(Change(RESOLVE, self, g, tr.aid, tr.rank, ch.ts, tr.started,
                                           None, None, members=tr.extra))

    def _reached(self, members: dict[int, int]) -> int | None:
        """The event time at which `min_sensors` members had started within `within`, if they
        have. Judged on the start times, not on the order their alarms arrived in, so a member
        that comes late (another Kafka partition's forwarding, a gateway's backlog) names the
        group incident as it would have been named had everything come in order."""
        n, within = self.spec.min_sensors, self.spec.within
        times = sorted(members.values())
        for j in range(n - 1, len(times)):
            if times[j] - times[j - n + 1] <= within:
                return times[j]
        return None

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["members"] = {g: [[sid(s), t] for s, t in m.items()] for g, m in self.members.items()}
        for _, track in d["tracks"]:
            track.extra = [sid(s) for s in track.extra]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for tr in self.tracks.values():
            tr.extra = [x for x in (sidx(k) for k in tr.extra) if x is not None]
        for g, rows in state.get("members", {}).items():
            m = dict(self.by_sensor(rows, sidx))
            if m:
                self.members[g] = m
        return lost


class CorrelationType(RuleType):
    name = "correlation"
    schema = CorrelationRule
    summary = "{place}：{members_count}个传感器在短时间内相继报警（{group}），预警级别上调。{notes}"
    owner_what = "{members_count}个传感器相继报警"
    shows_unit = False

    def notice_facts(self, spec: Any, subject: int | str, heard: int | None, kind: str,
                     members: int, fmt_time: Callable[[int], str]
                     ) -> tuple[dict, str | None, str | None, list[str]]:
        return {}, str(subject), spec.group_by, []

    def check(self, r: Any, kinds: dict, ids: dict[str, str]) -> None:
        for i, other in enumerate(r.spec.of):
            if other not in ids:
                raise r.doc.error(r.loc + ("of", i), f"rule {r.spec.id}: counts unknown rule {other}")

    def compile(self, r: Any, b: Binding) -> Correlation:
        return Correlation(r.spec, b, group_of=_group_of(b.reg, r.spec.group_by))


def _group_of(reg: Any, by: str) -> Callable[[int], str | None]:
    if by == "building":
        return lambda idx: reg.building[idx] or None
    return lambda idx: getattr(reg.place_of(idx), by)


register(CorrelationType())
