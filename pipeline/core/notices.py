"""Where a notice is written: the AlertNotice fields, and the Chinese title and summary.

Templates in rule files name fields in braces (``{street_name}{community_name}燃气浓度超限``);
they are filled by plain substitution from a fixed set of names (rules.compiler.TEMPLATE_FIELDS),
never by ``str.format``, so a rule file cannot reach into Python objects.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pipeline.core.models import Category, Severity, State
from pipeline.core.registry import Place, Registry
from rules.types.base import TYPES

_FIELD = re.compile(r"\{([a-z_]+)\}")
_STATE_MARK = {State.firing: "", State.escalated: "·升级", State.acknowledged: "·已确认",
               State.resolved: "·已解除", State.reminder: "·提醒", State.dispatched: "·已派遣",
               State.on_site: "·已到场", State.handled: "·已处置", State.closed: "·已结案"}
_TIER_CN = {"street": "街镇", "district": "区级", "city": "市级", "dept": "部门", "grid": "网格员",
           "owner": "责任方", "community": "社区"}

# a summary the rule does not give, and what an owner is told happened, are its type's
# (rules/types/*.py: `summary`, `owner_what`)
OWNER_WHAT_DEFAULT = "{rule_name}：{kind_name}读数{value}{unit}，达到{threshold}{unit}"
DEFAULT_INSTRUCTION = "请立即核查处置，处置完毕后点击链接确认。"


def fmt_time(ms: int, tz: ZoneInfo) -> str:
    """RFC 3339 in the city's time zone; milliseconds only when there are any."""
    return _rfc3339(datetime.fromtimestamp(ms / 1000, tz), ms)


def _rfc3339(dt: datetime, ms: int) -> str:
    return dt.isoformat(timespec="milliseconds" if ms % 1000 else "seconds")


def fmt_number(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.6g}"


_PRIVATE = ("_owner_summary", "_title", "_summary")     # base_notice's keys no notice shows
_PARTS: dict[str, tuple[str, ...]] = {}     # template -> text, field, text, field ..., text


def render(template: str, fields: dict[str, Any]) -> str:
    parts = _PARTS.get(template)
    if parts is None:               # split once per template (rule files hold a few hundred)
        if len(_PARTS) > 4096:
            _PARTS.clear()
        parts = _PARTS[template] = tuple(_FIELD.split(template))
    out = [parts[0]]
    get = fields.get
    for k in range(1, len(parts), 2):
        out.append(str(get(parts[k], "")))
        out.append(parts[k + 1])
    return "".join(out)


def place_text(p: Place) -> str:
    return f"{p.district_name}{p.street_name}{p.community_name}"


def base_notice(*, alert_id: str, rule_id: str, rule_name: str, rule_type: str, sensor_id: str,
                kind: str, kind_name: str, unit: str, category: Category, severity: Severity,
                place: Place, registry: Registry, idx: int | None, value: float | None,
                threshold: float | None, event: str | None, event_name: str | None,
                started_ms: int, title_t: str | None, summary_t: str | None, notes: list[str],
                group: str | None, members: list[str] | None, extra: dict[str, Any],
                instruction_t: str | None = None) -> dict:
    """The fields every copy of one state change shares, with title and summary rendered (and
    the owner's summary, when the registry names the sensor's owner)."""
    tz = registry.tz
    # addresses in the registry are full (成都市锦江区…); a sensor without one is named by place
    own_address = registry.address[idx] if idx is not None else ""
    address = own_address or place_text(place)
    owner = registry.owner[idx] if idx is not None else ""
    started = datetime.fromtimestamp(started_ms / 1000, tz)
    fields = {
        "place": place_text(place), "district_name": place.district_name,
        "street_name": place.street_name, "community_name": place.community_name,
        "grid_name": place.grid_name, "address": address, "owner": owner,
        "owner_contact": registry.owner_contact[idx] if idx is not None else "",
        "sensor_id": sensor_id, "kind_name": kind_name, "rule_name": rule_name,
        "value": fmt_number(value), "threshold": fmt_number(threshold), "unit": unit,
        "severity_cn": severity.chinese, "level": severity.level, "event": event or "",
        "event_name": event_name or event or "", "notes": "，".join(notes) + ("。" if notes else ""),
        "members_count": len(members or ()), "group": group or "",
        "time": started.strftime("%H:%M"),
        "category_cn": category.chinese, **extra,
    }
    title = render(title_t or "{place}{rule_name}", fields)
    summary = render(summary_t or TYPES[rule_type].summary, fields).replace("（）", "")
    o = registry.owner_named.get(owner) if owner else None     # registry.owner_of, read once
    private = {"_owner_summary": owner_summary(o, fields, started, rule_type,
                                               instruction_t)} if o is not None else {}
    return {**private,
        "alert_id": alert_id, "rule_id": rule_id, "sensor_id": sensor_id, "kind": kind,
        "category": category.value, "district": place.district, "district_name": place.district_name,
        "street": place.street, "street_name": place.street_name, "community": place.community,
        "community_name": place.community_name, "grid": place.grid, "grid_name": place.grid_name,
        "address": own_address or None if idx is not None else None,
        "lat": round(float(registry.lat[idx]), 6) if idx is not None else None,
        "lon": round(float(registry.lon[idx]), 6) if idx is not None else None,
        "value": value, "threshold": threshold, "unit": unit or None, "event": event,
        "started_at": _rfc3339(started, started_ms), "_title": title, "_summary": summary,
        "group": group, "members": members,
    }


def owner_summary(owner: Any, fields: dict[str, Any], started: datetime,
                  rule_type: str, instruction_t: str | None) -> str:
    """To the responsible party: who it is for, when and where, what, and what to do."""
    who = f"{owner.name}负责人{owner.contact}" if owner.contact else owner.name
    when = started.strftime("%m月%d日%H:%M")
    what = render(TYPES[rule_type].owner_what or OWNER_WHAT_DEFAULT, fields)
    return (f"{who}：{when}，{fields['address']}，{what}。"
            + render(instruction_t or DEFAULT_INSTRUCTION, fields))


def finish(base: dict, *, seq: int, severity: Severity, state: State, previous: State | None,
           ts_ms: int, tz: ZoneInfo, flapping: bool, escalation: int, acked_by: str | None,
           acked_tier: str | None, extra_summary: str = "", lowered: bool = False,
           cleared: tuple[float | None, float] | None = None, handling: dict | None = None) -> dict:
    """One state change's notice, less tier and target (``for_target`` adds them).
    ``handling``: a handling notice's own fields (pipeline/core/handling.py)."""
    n = dict(base)                  # less the private keys, the rest in their order
    for k in _PRIVATE:
        n.pop(k, None)
    n.update(seq=seq, severity=severity.value, level=severity.level,
             fiware_severity=severity.fiware, state=state.value,
             previous_state=previous.value if previous else None, ts=fmt_time(ts_ms, tz),
             flapping=flapping, escalation=escalation, acked_by=acked_by, acked_tier=acked_tier)
    mark = _STATE_MARK[state]
    if state == State.firing and previous == State.resolved:
        mark = "·再次触发"
    elif state == State.firing and previous == State.firing:
        mark = "·级别下调" if lowered else "·级别上调"
    n["title"] = f"【{severity.chinese}{mark}】{base['_title']}"
    tail = extra_summary
    if cleared is not None:
        # a clear level held (a resolve, or a step-down): the notice says which, and the reading
        value, level = cleared
        if value is not None:
            n["value"] = value
        n["threshold"] = level
        unit = base["unit"] or ""
        tail += (f"当前{fmt_number(value)}{unit}，已达解除值{fmt_number(level)}{unit}"
                 + ("，降级。" if lowered else "。"))
    n["summary"] = base["_summary"] + tail
    if handling:
        n.update(handling)
    if "_owner_summary" in base:
        n["_owner_summary"] = base["_owner_summary"] + tail     # for_target picks, then drops it
    return n


def for_target(notice: dict, tier: str, target: str, worker: Any | None) -> dict:
    n = dict(notice)
    owner_text = n.pop("_owner_summary", None)
    if tier == "owner" and owner_text is not None:
        n["summary"] = owner_text
    n["tier"] = tier
    n["target"] = target
    n["worker_id"] = worker.id if worker else None
    n["worker_name"] = worker.name if worker else None
    return n


def tier_cn(tier: str) -> str:
    return _TIER_CN.get(tier, tier)
