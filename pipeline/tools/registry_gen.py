"""Synthetic city registries at Chengdu scale, for benchmarks.

The hand-made fixture in fixtures/chengdu has a few hundred sensors: enough for tests, useless for
measuring how loading, lookups and per-sensor state behave when the registry is the size of a real
city (成华区 alone has 194,000 devices; the city IoT platform about 22 million). This module writes
a registry folder in the format of docs/registry.md with the 20 real county-level units of
Chengdu, synthetic streets, communities and micro-grids (about 100 sensors per grid), on-call
workers and a realistic mix of sensor kinds. The output depends only on (sensors, seed), so
benchmark runs compare; sensors.csv is streamed, so millions of rows need little memory.

    python -m pipeline.tools.registry_gen OUT_DIR --sensors 1000000 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SENSORS_PER_GRID = 100
GRIDS_PER_COMMUNITY = 4
GATEWAY_SIZE = 8             # sensors behind one building, site or street gateway
LIVES_ALONE_SHARE = 0.10     # of gas_household
STREETS_TOTAL = 261          # Chengdu's township-level units: 161 streets + 100 towns
PROGRESS_EVERY = 100_000
# Sensor ids end in six digits per prefix and district; the largest district holds ~5.4 % of the
# sensors and the shared `gas` prefix ~60 % of those, so 20 M keeps every counter below 10**6.
MAX_SENSORS = 20_000_000
# docs/registry.md: Chengdu is about 30.1-31.0 N, 103.5-104.5 E. Outer counties reach a little
# beyond; positions are kept inside so generated rows pass the same sanity checks as real ones.
LAT_BOUNDS = (30.1, 31.0)
LON_BOUNDS = (103.5, 104.5)

HEADER = ("sensor_id", "kind", "grid", "gateway_id", "lat", "lon", "address", "building", "owner",
          "owner_contact", "attrs")

# (GB/T 2260 code, name, centre lat, centre lon, central district). Centres of the outer units are
# nudged inside the bounds above.
DISTRICTS: tuple[tuple[str, str, float, float, bool], ...] = (
    ("510104", "锦江区", 30.657, 104.083, True),
    ("510105", "青羊区", 30.674, 104.062, True),
    ("510106", "金牛区", 30.692, 104.052, True),
    ("510107", "武侯区", 30.642, 104.043, True),
    ("510108", "成华区", 30.660, 104.101, True),
    ("510112", "龙泉驿区", 30.557, 104.275, False),
    ("510113", "青白江区", 30.879, 104.251, False),
    ("510114", "新都区", 30.823, 104.158, False),
    ("510115", "温江区", 30.682, 103.856, False),
    ("510116", "双流区", 30.574, 103.923, False),
    ("510117", "郫都区", 30.795, 103.901, False),
    ("510118", "新津区", 30.410, 103.811, False),
    ("510121", "金堂县", 30.862, 104.412, False),
    ("510129", "大邑县", 30.590, 103.560, False),
    ("510131", "蒲江县", 30.220, 103.550, False),
    ("510181", "都江堰市", 30.950, 103.620, False),
    ("510182", "彭州市", 30.950, 103.960, False),
    ("510183", "邛崃市", 30.420, 103.550, False),
    ("510184", "崇州市", 30.630, 103.673, False),
    ("510185", "简阳市", 30.400, 104.450, False),
)

DEPARTMENTS: tuple[tuple[str, str, str], ...] = (
    ("gas", "市燃气安全监管分中心", "gas"),
    ("water", "市水务局分中心", "waterlogging, flood, weather"),
    ("construction", "市住建局智慧工地分中心", "construction"),
    ("ecology", "市生态环境局分中心", "environment"),
    ("urban", "市城管委分中心", "facility"),
    ("public_security", "市公安局分中心", "security"),
    ("iot", "市物联感知运维中心", "device"),
)


@dataclass(frozen=True, slots=True)
class SensorKind:
    name: str
    prefix: str
    share: float               # of all sensors; gas_household takes whatever the others leave
    gateway_group: str | None  # "building", "site" or "street": shares a gateway; None: own uplink
    label: str                 # what the address calls the device


# Ordered so that, once a grid's kinds are sorted, each gateway group is one contiguous run.
KINDS: tuple[SensorKind, ...] = (
    SensorKind("gas_household", "gas", 0.55, "building", "燃气报警器"),
    SensorKind("door_magnet", "door", 0.05, "building", "门磁"),
    SensorKind("dust_monitor", "dust", 0.04, "site", "扬尘监测仪"),
    SensorKind("site_camera", "cam", 0.10, "site", "AI摄像头"),
    SensorKind("tower_crane", "crane", 0.02, "site", "塔吊监测仪"),
    SensorKind("billboard_tilt", "bb", 0.05, "street", "广告牌倾斜监测"),
    SensorKind("manhole_cover", "mh", 0.08, "street", "井盖监测"),
    SensorKind("gas_commercial", "gas", 0.05, None, "燃气探测器"),
    SensorKind("waterlogging", "wl", 0.05, None, "积水监测点"),
    SensorKind("river_gauge", "river", 0.001, None, "水位站"),
    SensorKind("rain_gauge", "rain", 0.005, None, "雨量站"),
    SensorKind("air_quality", "aq", 0.004, None, "空气质量监测点"),
)
_KIND_NO = {k.name: i for i, k in enumerate(KINDS)}
_HOUSEHOLD, _COMMERCIAL = _KIND_NO["gas_household"], _KIND_NO["gas_commercial"]
_RIVER, _BILLBOARD = _KIND_NO["river_gauge"], _KIND_NO["billboard_tilt"]
_PREFIXES = sorted({k.prefix for k in KINDS})
_PREFIX_SLOT = [_PREFIXES.index(k.prefix) for k in KINDS]   # gas_household/commercial share "gas"

SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐"
            "韩曹许邓冯彭曾肖田董袁潘蒋蔡余杜叶程魏苏吕丁任沈姚卢钟谭廖邹熊")
GIVEN = ("敏", "伟", "芳", "娜", "秀英", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟",
         "涛", "明", "超", "秀兰", "霞", "平", "刚", "桂英", "建华", "建国", "志强", "海燕", "晓燕",
         "红梅", "文斌", "俊杰", "雪梅", "德华", "玉兰", "淑珍", "国强", "春燕", "永红", "家豪",
         "思远", "晓东", "丽华", "婷婷", "宇航", "雨欣", "浩然", "子涵", "建平", "蓉", "川")
COMMUNITY_STEMS = ("和平", "新华", "建设", "光明", "文化", "长顺", "金沙", "锦华", "桂溪", "芙蓉",
                   "青龙", "白果", "红星", "东风", "前进", "幸福", "民主", "团结", "友谊", "胜利",
                   "新民", "永安", "太平", "兴隆", "复兴", "东升", "西园", "南苑", "北湖", "滨河",
                   "锦城", "蜀都", "天府", "文翁", "草堂", "浣花", "望江", "合江", "双林", "八里",
                   "五桂", "三圣", "龙潭", "青杠", "金桥", "银杏", "桃源", "荷塘", "柳荫", "梧桐",
                   "紫荆", "丹桂", "翠竹", "石羊", "红牌", "黄田", "白鹭", "清水", "双凤", "玉带")
RESTAURANTS = ("蓉城老灶火锅", "巴蜀串串香", "锦里担担面", "老码头冒菜", "川味小炒馆", "好吃嘴钵钵鸡",
               "巷子深兔头", "蜀香干锅", "椒麻鸡饭庄", "跷脚牛肉", "甜水面馆", "家常菜馆")
AD_FIRMS = ("蓉城广告传媒有限公司", "天府视觉广告有限公司", "锦城户外传媒有限公司", "川西标识工程有限公司")
MANHOLE_OWNERS = ("成都市排水有限责任公司", "区市政设施管理所", "通信管线运维单位", "燃气管网运维单位")


@dataclass(slots=True)
class _Community:
    code: str
    name: str
    lat: float
    lon: float
    grids: int


@dataclass(slots=True)
class _Street:
    code: str
    name: str
    lat: float
    lon: float
    communities: list[_Community]


@dataclass(slots=True)
class _District:
    code: str
    name: str
    streets: list[_Street]


def kind_counts(sensors: int) -> list[int]:
    """Exact number of sensors of each kind in KINDS order."""
    counts = [round(sensors * k.share) for k in KINDS]
    counts[_HOUSEHOLD] = 0
    counts[_HOUSEHOLD] = sensors - sum(counts)
    if counts[_HOUSEHOLD] < 0:   # only for a handful of sensors, where rounding overshoots
        counts = [0] * len(KINDS)
        counts[_HOUSEHOLD] = sensors
    return counts


def _spread(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _plan(sensors: int, rng: random.Random) -> list[_District]:
    """The hierarchy: 261 streets/towns over 20 districts, communities and grids scaled to sensors."""
    n_grids = max(STREETS_TOTAL, math.ceil(sensors / SENSORS_PER_GRID))
    n_communities = max(STREETS_TOTAL, math.ceil(n_grids / GRIDS_PER_COMMUNITY))
    communities_per_street = _spread(n_communities, STREETS_TOTAL)
    grids_per_community = iter(_spread(n_grids, n_communities))
    streets_per_district = _spread(STREETS_TOTAL, len(DISTRICTS))
    plan: list[_District] = []
    street_no = 0
    for (code, name, lat, lon, central), n_streets in zip(DISTRICTS, streets_per_district, strict=True):
        radius = 0.03 if central else 0.12
        # Statistical codes: 0xx for streets (街道), 1xx for towns (镇); outer units are half towns.
        n_towns = 0 if central else n_streets // 2
        streets: list[_Street] = []
        for s in range(n_streets):
            town = s >= n_streets - n_towns
            k = s - (n_streets - n_towns) + 1 if town else s + 1
            scode = f"{code}{100 + k if town else 20 + k:03d}"
            sname = f"{name}第{k}{'镇' if town else '街道'}"
            slat, slon = lat + rng.uniform(-radius, radius), lon + rng.uniform(-radius, radius)
            comms = []
            for c in range(communities_per_street[street_no]):
                stem = COMMUNITY_STEMS[(street_no * 7 + c) % len(COMMUNITY_STEMS)]
                cycle = c // len(COMMUNITY_STEMS)
                comms.append(_Community(
                    code=f"{scode}{c + 1:03d}", name=f"{stem}{cycle + 1 if cycle else ''}社区",
                    lat=slat + rng.uniform(-0.006, 0.006), lon=slon + rng.uniform(-0.006, 0.006),
                    grids=next(grids_per_community)))
            streets.append(_Street(scode, sname, slat, slon, comms))
            street_no += 1
        plan.append(_District(code, name, streets))
    return plan


def _person(rng: random.Random) -> str:
    return rng.choice(SURNAMES) + rng.choice(GIVEN)


def _write_yaml(path: Path, plan: list[_District], rng: random.Random) -> None:
    with path.open("w", encoding="utf-8") as f:
        w = f.write
        w("# Synthetic Chengdu-scale registry written by pipeline.tools.registry_gen (benchmarks only).\n"
          'city: {code: "510100", name: 成都市}\ntimezone: Asia/Shanghai\n\ndepartments:\n')
        for did, dname, cats in DEPARTMENTS:
            w(f"  - id: {did}\n    name: {dname}\n    categories: [{cats}]\n")
        w("\ndistricts:\n")
        for d in plan:
            w(f'  - code: "{d.code}"\n    name: {d.name}\n    streets:\n')
            for s in d.streets:
                w(f'      - code: "{s.code}"\n        name: {s.name}\n'
                  f"        duty_officer: w-{s.code}-duty\n        communities:\n")
                for c in s.communities:
                    w(f'          - code: "{c.code}"\n            name: {c.name}\n            grids:\n')
                    for g in range(1, c.grids + 1):
                        w(f'              - code: "{c.code}{g:03d}"\n'
                          f"                name: {c.name}第{g}微网格\n"
                          f"                households: {rng.randint(30, 100)}\n")
        w("\nworkers:\n")
        phone = 0
        for d in plan:
            for s in d.streets:
                for c in s.communities:
                    grids = ", ".join(f'"{c.code}{g:03d}"' for g in range(1, c.grids + 1))
                    day, night = f"w-{c.code}-01", f"w-{c.code}-02"
                    for wid, shift, backup in ((day, "08:00-20:00", night), (night, "20:00-08:00", day)):
                        phone += 1
                        w(f"  - id: {wid}\n    name: {_person(rng)}\n    phone: \"138{phone:08d}\"\n"
                          f'    grids: [{grids}]\n    shift: "{shift}"\n    backup: {backup}\n')
                phone += 1
                w(f"  - id: w-{s.code}-duty\n    name: {_person(rng)}\n    phone: \"138{phone:08d}\"\n"
                  '    grids: []\n    shift: "00:00-24:00"\n')
        w("\nsensors: sensors.csv\n")


def _clamp(v: float, bounds: tuple[float, float]) -> float:
    return bounds[0] if v < bounds[0] else bounds[1] if v > bounds[1] else v


class _SensorRows:
    """Makes the rows of one grid at a time; keeps the numbering that runs across grids
    (sensor ids and gateways per district, projects per street, buildings per community)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.contacts = 0
        self.district: _District | None = None
        self.street: _Street | None = None
        self.community: _Community | None = None
        self.counters: list[int] = []
        self.gateways = self.projects = self.buildings = 0
        self.sites: list[tuple[str, str, str, str]] = []    # owners: id, name, contact, phone

    def enter(self, district: _District, street: _Street, community: _Community) -> None:
        if district is not self.district:
            self.district = district
            self.counters = [0] * len(_PREFIXES)
            self.gateways = 0
        if street is not self.street:
            self.street = street
            self.projects = 0
        self.community = community
        self.buildings = 0

    def _contact(self) -> int:
        self.contacts += 1
        return self.contacts

    def grid(self, grid: str, kinds: list[int]) -> list[tuple[str, ...]]:
        """Rows for `kinds` (sorted KINDS indices) in `grid`; gateway groups of GATEWAY_SIZE."""
        d, s, c = self.district, self.street, self.community
        assert d is not None and s is not None and c is not None
        rng = self.rng
        rand, uniform = rng.random, rng.uniform
        glat, glon = c.lat + uniform(-0.002, 0.002), c.lon + uniform(-0.002, 0.002)
        rows: list[tuple[str, ...]] = []
        group: str | None = None
        left = 0
        gw = building = owner = contact = base = lat = lon = ""
        for k in kinds:
            kind = KINDS[k]
            slot = _PREFIX_SLOT[k]
            self.counters[slot] += 1
            sid = f"{kind.prefix}-{d.code}-{self.counters[slot]:06d}"
            if kind.gateway_group is None:  # own uplink (4G / NB-IoT)
                group = None
                row_lat = f"{_clamp(glat + uniform(-0.001, 0.001), LAT_BOUNDS):.6f}"
                row_lon = f"{_clamp(glon + uniform(-0.001, 0.001), LON_BOUNDS):.6f}"
                address = f"成都市{s.name}{c.name}{rand() * 300 + 1:.0f}号 {kind.label}"
                row_owner = row_contact = attrs = ""
                if k == _COMMERCIAL:
                    row_owner = f"{rng.choice(RESTAURANTS)}({c.name}店)"
                    row_contact = f"店长 {_person(rng)} 136{self._contact():08d}"
                elif k == _RIVER:
                    warning = uniform(3.0, 6.0)
                    attrs = (f"warning_level={warning:.1f};"
                             f"guarantee_level={warning + uniform(0.5, 1.2):.1f}")
                rows.append((sid, kind.name, grid, "", row_lat, row_lon, address, "", row_owner,
                             row_contact, attrs))
                continue
            if kind.gateway_group != group or left == 0:
                # a new gateway: one building, one construction site or one run of street furniture
                group, left = kind.gateway_group, GATEWAY_SIZE
                self.gateways += 1
                gw = f"gw-{d.code}-{self.gateways:06d}"
                lat = f"{_clamp(glat + uniform(-0.001, 0.001), LAT_BOUNDS):.6f}"
                lon = f"{_clamp(glon + uniform(-0.001, 0.001), LON_BOUNDS):.6f}"
                building = owner = contact = ""
                if group == "building":
                    self.buildings += 1
                    building = f"{c.code}-b{self.buildings:02d}"
                    base = f"成都市{s.name}{c.name}{self.buildings}栋"
                elif group == "site":
                    self.projects += 1
                    owner = f"{s.name}{self.projects}号地块项目"
                    contact = f"{rng.choice(SURNAMES)}工 139{self._contact():08d}"
                    self.sites.append((f"site-{s.code}-{self.projects:03d}", owner,
                                       *contact.split(" ")))
                    base = f"成都市{owner}工地 "
                else:
                    base = f"成都市{s.name}{c.name}{rand() * 300 + 1:.0f}号 "
            i = GATEWAY_SIZE - left
            left -= 1
            row_owner, attrs = owner, ""
            if group == "building":
                address = f"{base}{i % 3 + 1}单元{i // 3 * 5 + 2}0{i % 4 + 1}室"
                if k == _HOUSEHOLD and rand() < LIVES_ALONE_SHARE:
                    attrs = "lives_alone=true"
                    row_owner = f"独居老人 {_person(rng)}"
            else:
                address = f"{base}{i + 1}号{kind.label}"
                if group == "street":  # billboards and manholes on one gateway have their own owners
                    row_owner = rng.choice(AD_FIRMS if k == _BILLBOARD else MANHOLE_OWNERS)
            rows.append((sid, kind.name, grid, gw, lat, lon, address, building, row_owner, contact,
                         attrs))
        return rows


def _write_sensors(path: Path, plan: list[_District], sensors: int, rng: random.Random,
                   progress: Callable[[int], None] | None) -> list[tuple[str, str, str, str]]:
    """Write the rows; return the construction sites made (their owners)."""
    # One byte per sensor: exact kind totals for the seed, shuffled, then dealt out grid by grid.
    # Rows are never held beyond one grid.
    kinds = bytearray()
    for i, n in enumerate(kind_counts(sensors)):
        kinds += bytes([i]) * n
    rng.shuffle(kinds)
    n_grids = sum(c.grids for d in plan for s in d.streets for c in s.communities)
    per_grid = iter(_spread(sensors, n_grids))
    maker = _SensorRows(rng)
    written, next_mark = 0, PROGRESS_EVERY
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(HEADER)
        for d in plan:
            for s in d.streets:
                for c in s.communities:
                    maker.enter(d, s, c)
                    for g in range(1, c.grids + 1):
                        n = next(per_grid)
                        out.writerows(maker.grid(f"{c.code}{g:03d}", sorted(kinds[written:written + n])))
                        written += n
                        while progress is not None and written >= next_mark:
                            progress(next_mark)
                            next_mark += PROGRESS_EVERY
    return maker.sites


def generate(out_dir: Path, sensors: int, seed: int = 1,
             progress: Callable[[int], None] | None = None) -> Path:
    """Write registry.yaml and sensors.csv with `sensors` rows into out_dir; return registry.yaml.

    Deterministic for (sensors, seed). `progress(n)` is called each time another 100,000 sensor
    rows have been written.
    """
    if not 0 < sensors <= MAX_SENSORS:
        raise ValueError(f"sensors must be between 1 and {MAX_SENSORS:,}, got {sensors:,}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    plan = _plan(sensors, rng)
    registry = out_dir / "registry.yaml"
    _write_yaml(registry, plan, rng)
    sites = _write_sensors(out_dir / "sensors.csv", plan, sensors, rng, progress)
    with registry.open("a", encoding="utf-8") as f:      # known once the sites are made
        f.write("\n# construction sites' responsible parties: notify: [owner] reaches them\n"
                "owners:" + ("" if sites else " []") + "\n")
        for oid, name, contact, phone in sites:
            f.write(f'  - {{id: {oid}, name: {name}, contact: {contact}, phone: "{phone}"}}\n')
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.registry_gen",
        description="Write a synthetic Chengdu-scale registry (registry.yaml + sensors.csv).")
    parser.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--sensors", type=int, default=1_000_000,
                        help="number of sensors (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        path = generate(args.out_dir, args.sensors, args.seed,
                        progress=lambda n: print(f"{n:,} sensors written", file=sys.stderr))
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{path} ({args.sensors:,} sensors, {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
