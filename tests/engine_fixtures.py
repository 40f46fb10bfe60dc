"""Small registries written on the fly, for engine tests and the differential fuzzer: a district
with two streets, a community and two micro-grids each, a worker per grid, every department,
sensors of the kinds asked for spread over grids, gateways and buildings, and owners for half
of them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.core import registry
from pipeline.core.models import Category

STREETS = ("510104020", "510104021")


def small_registry(folder: Path, rs, kinds: Mapping[str, int], gateways: int = 2,
                   attrs: Mapping[str, str] | None = None, buildings: int = 1) -> registry.Registry:
    """``kinds``: sensors per kind; sensor n of a kind sits in grid n % 4, behind gateway
    n % gateways (0: none), in building n % buildings; ``attrs`` by sensor id."""
    folder.mkdir(parents=True, exist_ok=True)
    grids = [f"{s}001{g:03d}" for s in STREETS for g in (1, 2)]
    lines = ['city: {code: "510100", name: 成都市}', "timezone: Asia/Shanghai", "departments:"]
    for c in Category:
        lines += [f"  - {{id: d{c.value}, name: {c.value}分中心, categories: [{c.value}]}}"]
    lines += ["districts:", '  - code: "510104"', "    name: 锦江区", "    streets:"]
    for i, s in enumerate(STREETS):
        lines += [f'      - code: "{s}"', f"        name: 第{i + 1}街道",
                  f"        duty_officer: w-{s}-duty", "        communities:",
                  f'          - code: "{s}001"', f"            name: 第{i + 1}社区", "            grids:"]
        for g in (1, 2):
            lines += [f'              - {{code: "{s}001{g:03d}", name: 第{g}微网格, households: 50}}']
    lines += ["workers:"]
    for s in STREETS:
        lines += [f'  - {{id: w-{s}-duty, name: 值班员{s[-1]}, phone: "1390000000{s[-1]}", '
                  f'grids: [], shift: "00:00-24:00"}}']
    for n, g in enumerate(grids):
        lines += [f'  - {{id: w-{g}, name: 网格员{n}, phone: "1380000000{n}", grids: ["{g}"], '
                  f'shift: "00:00-24:00"}}']
    # every other owner cell has an `owners:` entry: `notify: [owner]` reaches some sensors only
    lines += ["owners: []"] if not any(kinds.values()) else ["owners:"] + [
        f'  - {{id: o-{n}, name: 户主{n}, contact: 联系人{n}, phone: "1370000{n:04d}"}}'
        for n in range(0, max(kinds.values()), 2)]
    lines += ["sensors: sensors.csv"]
    (folder / "registry.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["sensor_id,kind,grid,gateway_id,lat,lon,address,building,owner,owner_contact,attrs"]
    attrs = attrs or {}
    for kind, count in kinds.items():
        prefix = kind.replace("_", "")[:6]
        for n in range(count):
            sid = f"{prefix}-510104-{n + 1:06d}"
            gw = f"gw-510104-{n % gateways:04d}" if gateways and n % (gateways + 1) else ""
            bld = f"510104020001-b{n % buildings:02d}" if buildings else ""
            rows.append(f"{sid},{kind},{grids[n % 4]},{gw},30.65,104.08,锦江区测试路{n}号,{bld},"
                        f"户主{n},,{attrs.get(sid, '')}")
    (folder / "sensors.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return registry.load(folder, rs.kinds)


def as_version_1(state: dict, incident_fields: int = 30) -> dict:
    """A decoded snapshot of today's format written as version 1 was: a track or an incident a
    list (an incident's first ``incident_fields`` values: older snapshots had fewer)."""
    book = state["book"]
    for bucket in ("open", "resolved", "closable"):
        if bucket in book:
            book[bucket] = [list(row.values())[:incident_fields] for row in book[bucket]]
    for rule in state["rules"].values():
        rule["tracks"] = [[key, list(track.values())] for key, track in rule.get("tracks", [])]
    state["version"] = 1
    return state
