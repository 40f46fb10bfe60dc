"""``type: absence``: dead-man; a sensor silent for ``absent_for`` raises an incident, and a
gateway whose every watched sensor is silent raises one for all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field

from rules.evaluators import FIRE, FIRING, RESOLVE, Change, Evaluator, Track, alert_id
from rules.schema import Duration, _RuleBase, format_duration
from rules.types.base import Binding, RuleType, register
from rules.vocabulary import Severity


class AbsenceRule(_RuleBase):
    type: Literal["absence"]
    absent_for: Duration | dict[str, Duration] = Field(
        description="silence that counts as absence; one duration, or one per sensor kind")
    severity: Severity = Severity.blue
    group_by_gateway: bool = True


class Absence(Evaluator):
    """Dead-man: a sensor silent for ``absent_for`` (never heard from counts, from the time the
    engine started watching) raises an incident; when every watched sensor behind a gateway is
    silent, one gateway incident stands for all of them. The scan is vectorised by the engine;
    this class keeps the incidents."""

    type = "absence"
    reads = "none"
    scans_silence = True

    def __init__(self, *args: Any, absent_ms: Any, gateway_of: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.absent_ms = absent_ms      # numpy int64 per sensor, 0 = not watched by this rule
        self.gateway_of = gateway_of    # numpy int32 per sensor, -1 = none
        self.silent: dict[int, str] = {}  # sensor -> subject of its incident (itself or gateway)
        # the same, as a mask per sensor and per gateway subject: a city has many silent
        # sensors, and neither a scan nor a gateway coming back may walk all of them
        self.silent_mask = np.zeros(len(absent_ms), dtype=bool)
        self.members: dict[str, set[int]] = {}

    def mark(self, s: int, subject: str) -> None:
        """Sensor ``s`` is silent, in its own incident (``subject`` "") or its gateway's."""
        self.silent[s] = subject
        self.silent_mask[s] = True
        if subject:
            self.members.setdefault(subject, set()).add(s)

    def fire(self, s: int | str, ts: int, last: int, members: list[int] | None) -> None:
        tr = self.tracks[s] = Track(FIRING, ts, self.spec.severity.rank, None, None)
        tr.extra = last                 # last heard from (0 = never)
        tr.aid = alert_id(self.id, self.subject_name(s), ts)
        rank = self.spec.severity.rank
        self.out.append(Change(FIRE, self, s, tr.aid, rank, ts, ts, None, None, members=members,
                               heard=last))

    def recover(self, s: int, ts: int) -> list[int]:
        """Sensor ``s`` reported at ``ts``; returns the sensors no longer silent by it."""
        subject = self.silent.get(s)
        if subject is None:
            return []
        key: int | str = s if subject == "" else subject
        tr = self.tracks.get(key)
        if tr is not None and ts < tr.started - int(self.absent_ms[s]):
            return []   # older than the silence the incident stands for: it goes on (README)
        del self.silent[s]
        self.silent_mask[s] = False
        freed = [s]
        if subject:
            self.members[subject].discard(s)
        tr = self.tracks.pop(key, None)
        if tr is None:
            return freed
        if key != s:   # a gateway is back: its other sensors are looked at again by the next scan
            others = sorted(self.members.pop(subject))
            for m in others:
                del self.silent[m]
            self.silent_mask[others] = False
            freed += others
        self.out.append(Change(RESOLVE, self, key, tr.aid, tr.rank, ts, tr.started, None, None,
                               heard=tr.extra))
        return freed

    def notice_facts(self, subject: int | str, heard: int | None, kind: str, members: int,
                     fmt_time: Callable[[int], str]) -> tuple[dict, str | None, str | None, list[str]]:
        # last heard from: the change says it (a resolve comes after the track is gone)
        if heard is None:
            last = self.tracks.get(subject)
            heard = last.extra if last is not None else 0
        return super().notice_facts(subject, heard, kind, members, fmt_time)

    def dump(self, sid: Callable[[int | str], Any]) -> dict:
        d = super().dump(sid)
        d["silent"] = [[sid(s), subj] for s, subj in self.silent.items()]
        return d

    def load(self, state: dict, sidx: Callable[[Any], int | str | None]) -> int:
        lost = super().load(state, sidx)
        for s, subj in self.by_sensor(state.get("silent", []), sidx):   # subject: itself or gw:…
            self.mark(s, subj)
        return lost


class AbsenceType(RuleType):
    name = "absence"
    schema = AbsenceRule
    summary = "{address}：{kind_name}已{absent_for}未上报数据（最后上报：{last_seen}）。{notes}"
    owner_what = "{kind_name}已{absent_for}未上报数据"
    shows_unit = False

    def notice_facts(self, spec: Any, subject: int | str, heard: int | None, kind: str,
                     members: int, fmt_time: Callable[[int], str]
                     ) -> tuple[dict, str | None, str | None, list[str]]:
        absent = spec.absent_for
        absent_ms = absent.get(kind, 0) if isinstance(absent, dict) else absent
        extra = {"last_seen": fmt_time(heard) if heard else "自接入以来从未上报",
                 "absent_for": format_duration(absent_ms)}
        if isinstance(subject, str):
            group = subject.removeprefix("gw:")
            return extra, group, "gateway", [f"网关{group}下{members}个传感器全部失联"]
        return extra, None, None, []

    def check(self, r: Any, kinds: dict, ids: dict[str, str]) -> None:
        spec = r.spec
        if isinstance(spec.absent_for, dict):
            for k in spec.absent_for:
                if k not in spec.sensors:
                    raise r.doc.error(r.loc + ("absent_for", k), f"rule {spec.id}: absent_for names "
                                      f"kind {k}, which is not in its sensors")

    def compile(self, r: Any, b: Binding) -> Absence:
        spec, reg = r.spec, b.reg
        absent = np.zeros(len(reg), dtype=np.int64)
        kind_of = np.frombuffer(reg.kind_of, dtype=np.uint8) if len(reg) else np.zeros(0, np.uint8)
        for k in spec.sensors:
            if k in reg.kinds:
                ms = spec.absent_for[k] if isinstance(spec.absent_for, dict) and k in spec.absent_for \
                    else (spec.absent_for if not isinstance(spec.absent_for, dict) else 0)
                if ms:
                    absent[kind_of == reg.kinds.index(k)] = ms
        if b.selected is not None:          # `where:`: the others are not watched
            absent[np.frombuffer(bytes(b.selected), dtype=np.uint8) == 0] = 0
        gw = np.frombuffer(reg.gateway_of, dtype=np.int32) if len(reg) else np.zeros(0, np.int32)
        return Absence(spec, b, absent_ms=absent, gateway_of=gw if spec.group_by_gateway else None)


register(AbsenceType())
