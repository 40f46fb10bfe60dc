"""Simulated IoT gateways for the fixture registry: what `cityops run --simulate` publishes.

A newcomer without sensors should see the whole pipeline work within a minute: readings in,
alerts raised, notices reaching the street, district, department and city operations centres
and a push to the grid worker on call. ``Simulator`` plays the city's gateways:

- **Background**: every sensor of the registry reports a quiet, plausible reading every 30-60 s
  (gas 0-3 %LEL, waterlogging 0-4 cm, rain mostly 0 and at most 0.5 mm, PM2.5 20-60, dust
  PM10 40-120, billboard tilt 0-1°, river gauges about 1 m under their 警戒水位; cameras, tower
  cranes, manhole covers and door magnets send a ``heartbeat`` event). Each gateway uploads its
  sensors as one JSON array at its own cadence and phase, so uploads are spread over time; a
  sensor without a gateway reports on its own.
- **Scenario**: a short story on top, from the table ``SCENARIO`` below (seconds after the
  first ``step()``, divided by ``speed``): a gas leak at a resident living alone and then the
  neighbours (red: the city is told), a rainstorm with road waterlogging, construction-site
  violations, a dust monitor that goes silent, a river rising fast, a reading for a sensor
  the registry does not hold (a dead letter). An alarm is uploaded at
  once (gateways forward alarms without waiting for their cadence); between the scenario's
  points a sensor keeps reporting its last scenario value. ``speed`` compresses the story
  only: gateways keep their 30-60 s cadence, and as readings carry the clock's time, rule
  timers (``for: 2m``, ``clear_for``, absence) take their real time.

Readings follow the public contract (README, "Reading"): ``{"sensor_id", "ts", "value"}`` or
``"event"``, plus ``"battery"`` for battery-powered kinds, ``ts`` in epoch ms from ``clock``.
Topics: ``{prefix}/gateways/{gateway_id}`` (a JSON array) for sensors behind a gateway,
``{prefix}/readings/{sensor_id}`` (one object) for the others.

Kinds it does not know (a city's own packs) are not simulated; scenario sensors missing from
the registry are left out of the story. Deterministic: the same registry, seed, speed and
sequence of clock values give the same payloads byte for byte (values are drawn in scheduled
order, not in step order). Each ``step()`` reads the clock once; the first ``step()`` is the
scenario's time zero.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.registry import Registry

__all__ = ["HEARTBEAT_KINDS", "QUIET", "SCENARIO", "Scenario", "Simulator", "Track"]

log = logging.getLogger("cityops.simulate")

PERIOD_S = (30.0, 60.0)        # background cadence of a gateway (or a sensor without one)
HEARTBEAT = "heartbeat"        # the event an event sensor sends when nothing happens


@dataclass(frozen=True)
class Quiet:
    """How a value sensor of a kind reports when nothing is happening."""

    lo: float
    hi: float
    digits: int = 1
    wet: float = 1.0          # chance that a report is not zero (rain: mostly dry)
    noise: float = 0.0        # jitter on a held scenario value between the scenario's points
    battery: bool = False     # battery-powered: the reading carries "battery"


QUIET: dict[str, Quiet] = {
    "gas_household": Quiet(0.0, 3.0, noise=0.8, battery=True),        # %LEL
    "gas_commercial": Quiet(0.0, 3.0, noise=0.8),
    "waterlogging": Quiet(0.0, 4.0, noise=0.6, battery=True),         # cm
    "river_gauge": Quiet(-0.03, 0.03, digits=2, noise=0.01),          # m, around _level()
    "rain_gauge": Quiet(0.0, 0.5, wet=0.1, noise=1.5),                # mm since the last report
    "air_quality": Quiet(20.0, 60.0, digits=0, noise=4.0),            # PM2.5 µg/m³
    "dust_monitor": Quiet(40.0, 120.0, digits=0, noise=8.0),          # PM10 µg/m³
    "billboard_tilt": Quiet(0.0, 1.0, digits=2, noise=0.1, battery=True),   # degrees
}
# event sensors: a heartbeat when nothing happens; True = battery-powered
HEARTBEAT_KINDS: dict[str, bool] = {"site_camera": False, "tower_crane": False,
                                    "manhole_cover": True, "door_magnet": True}
RIVER_QUIET_BELOW_WARNING_M = 1.0   # a quiet river gauge reads this far under its 警戒水位
RIVER_QUIET_DEFAULT_M = 3.2         # ... or this, for a gauge without a warning_level


@dataclass(frozen=True)
class Track:
    """What one sensor reports during a scenario: (seconds, value or event) points. A point is
    uploaded at its time; a value is then held (with the kind's noise) at the sensor's regular
    reports until the next point; ``None`` hands the sensor back to its quiet background.
    ``relative``: values are metres above the gauge's quiet level (a river rising)."""

    sensor: str
    points: tuple[tuple[float, float | str | None], ...]
    relative: bool = False


@dataclass(frozen=True)
class Scenario:
    """One event of the story: at ``at`` seconds ``line`` is returned by ``step()`` (fields:
    sensor, owner, address, place, district, street, warning_level of the first sensor)."""

    at: float
    line: str
    tracks: tuple[Track, ...] = ()
    silence: tuple[str, ...] = ()     # sensors that stop reporting at ``at``, for good
    strangers: tuple[str, ...] = ()   # ids the registry does not hold: one reading each at ``at``


# The story, in seconds after start (divided by ``speed``). What the built-in packs make of it:
# gas.leak 20/50 %LEL, one level up at a resident living alone; gas.building_cluster: 3 sensors
# of one building within 10 min -> red; weather.rainstorm 50 mm in 3 h orange, 100 red;
# waterlogging.depth 15/27/40 cm held for 2 min; construction events (no_helmet blue,
# smoke_fire orange, wind_speed_alarm yellow); device.silent 30 min for a dust monitor;
# river.level within 0.5 m of 警戒水位 blue, river.rapid_rise 0.4 m in 1 h yellow.
SCENARIO: tuple[Scenario, ...] = (
    Scenario(1, "燃气泄漏 gas leak at {owner} ({sensor}), {address}: 28 → 35 → 55 %LEL; "
                "a resident living alone: one level up, and the grid worker is pushed",
             tracks=(Track("gas-510104-000001", ((1, 28.0), (3, 35.0), (5, 55.0))),)),
    Scenario(7, "暴雨 rainstorm over {district}{street}: {sensor} reports 20-30 mm at a time; "
                "road waterlogging rising at wl-510104-000001 (8 → 18 → 30 → 42 cm), "
                "wl-510104-000002 and wl-510104-000003 (waterlogging.depth needs 2 min above 15 cm)",
             tracks=(Track("rain-510104-000001", ((7, 22.4), (22, 27.1), (37, 24.6), (52, 29.3),
                                                  (67, 21.8), (87, 6.5), (107, None))),
                     Track("wl-510104-000001", ((9, 8.0), (27, 18.0), (47, 30.0), (67, 42.0),
                                                (417, 24.0), (597, 6.0), (657, None))),
                     # 春熙路街道 has only one gauge in the fixture: the other two 锦江区 ones
                     Track("wl-510104-000002", ((17, 6.0), (42, 12.0), (67, 17.5), (92, 19.0),
                                                (417, 9.0), (597, 3.0), (657, None))),
                     Track("wl-510104-000003", ((22, 5.0), (47, 11.0), (72, 16.0), (97, 21.5),
                                                (417, 8.0), (597, 2.5), (657, None))))),
    Scenario(10, "同楼栋多户报警 neighbours in the same building alarm too: {sensor} ({owner}) "
                 "and gas-510104-000003 → same-building correlation (red)",
             tracks=(Track("gas-510104-000002", ((10, 26.0),)),
                     Track("gas-510104-000003", ((12, 31.0),)))),
    Scenario(15, "工地违规 construction site {owner}: {sensor} sees no helmet, then smoke/fire; "
                 "crane-510108-000001 wind-speed alarm",
             tracks=(Track("cam-510108-000001", ((15, "no_helmet"), (19, "smoke_fire"))),
                     Track("crane-510108-000001", ((17, "wind_speed_alarm"),)))),
    Scenario(22, "设备失联 {sensor} ({owner}, {address}) stops reporting: device.silent fires "
                 "after its absent_for (30 min for a dust monitor)",
             silence=("dust-510108-000001",)),
    Scenario(25, "河道涨水 {address} ({sensor}) rising fast: +0.55 m in 2.5 min, to 0.45 m "
                 "under its {warning_level} m 警戒水位 (river.rapid_rise, river.level); "
                 "it recedes from ~15 min",
             tracks=(Track("river-510104-000001", ((25, 0.05), (55, 0.15), (85, 0.25), (115, 0.35),
                                                   (145, 0.45), (175, 0.55), (895, 0.4), (1195, 0.25),
                                                   (1495, 0.1), (1795, None)), relative=True),)),
    Scenario(30, "坏数据 a gateway sends a reading for {sensor}, which the registry does not hold: "
                 "a dead letter (unknown_sensor) with the reason and the original bytes",
             strangers=("gas-510104-999999",)),
    Scenario(120, "燃气处置 the leak at gas-510104-000001..000003 is shut off: back to 2 %LEL; "
                  "the incidents resolve after clear_for (2 min)",
             tracks=(Track("gas-510104-000001", ((120, 2.0),)),
                     Track("gas-510104-000002", ((120, 2.0),)),
                     Track("gas-510104-000003", ((120, 2.0),)))),
)

_POINT = -1                    # queue entry of a scenario point (units are numbered >= 0)


class Simulator:
    """Publishes the readings due at each ``step()`` through ``publish(topic, payload)``."""

    def __init__(self, registry: Registry, publish: Callable[[str, bytes], None],
                 prefix: str = "cityops", clock: Callable[[], float] = time.time,
                 speed: float = 1.0, seed: int = 7) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        _check_topic(prefix, "prefix", slash_ok=True)
        self.registry = registry
        self.publish = publish
        self.prefix = prefix.rstrip("/")
        self.clock = clock
        self.speed = float(speed)
        self.rng = random.Random(seed)
        self.started: float | None = None           # clock at the first step()
        reg = registry
        n = len(reg)
        for g in reg.gateways:
            _check_topic(g, "gateway id")
        # per sensor: quiet model (None: a kind we cannot simulate), level, battery
        self._quiet: list[Quiet | None] = []
        self._event: list[bool] = []
        self._level = [0.0] * n
        self._battery: list[int | None] = [None] * n
        for i in range(n):
            kind = reg.kinds[reg.kind_of[i]]
            q = QUIET.get(kind)
            self._quiet.append(q)
            self._event.append(kind in HEARTBEAT_KINDS)
            if kind == "river_gauge":
                warn = reg.attrs.get(i, {}).get("warning_level")
                self._level[i] = (float(warn) - RIVER_QUIET_BELOW_WARNING_M
                                  if isinstance(warn, (int, float)) else RIVER_QUIET_DEFAULT_M)
            if (q is not None and q.battery) or HEARTBEAT_KINDS.get(kind):
                self._battery[i] = self.rng.randint(45, 100)
        # upload units: each gateway (its sensors, in registry order), then each lone sensor
        members: list[list[int]] = [[] for _ in reg.gateways]
        for i in range(n):
            if reg.gateway_of[i] >= 0:
                members[reg.gateway_of[i]].append(i)
        self._units: list[list[int]] = members + [[i] for i in range(n) if reg.gateway_of[i] < 0]
        self._period = []
        self._phase = []
        for _ in self._units:
            p = self.rng.uniform(*PERIOD_S)
            self._period.append(p)
            self._phase.append(self.rng.uniform(0.0, p))
        # the scenario, resolved against this registry (sensors it does not have are left out)
        # (at, line, the sensors it names, strangers)
        self._scenes: list[tuple[float, str, frozenset[str], tuple[str, ...]]] = []
        self._points: list[tuple[float, int, float | str | None, bool]] = []
        self._silence: list[tuple[float, int]] = []
        for sc in SCENARIO:
            ids = [t.sensor for t in sc.tracks] + list(sc.silence)
            present = [reg.index[s] for s in ids if s in reg.index]
            strangers = tuple(s for s in sc.strangers if s not in reg.index)
            if not present and not strangers:
                continue
            facts = self._facts(present[0]) if present else {"sensor": strangers[0]}
            self._scenes.append((sc.at, sc.line.format(**facts),
                                 frozenset(ids) | frozenset(strangers), strangers))
            for tr in sc.tracks:
                i = reg.index.get(tr.sensor)
                if i is None or self._quiet[i] is None and not self._event[i]:
                    continue
                for at, v in tr.points:
                    self._points.append((at, i, v, tr.relative))
            for s in sc.silence:
                if s in reg.index:
                    self._silence.append((sc.at, reg.index[s]))
        self._points.sort(key=lambda p: (p[0], p[1]))
        self._scenes.sort(key=lambda s: s[0])
        # state
        # (due, order, what): what = a unit number (background upload) or _POINT (scenario
        # point number order - number of units); order breaks ties and never repeats
        self._queue: list[tuple[float, int, int]] = []
        self._held: dict[int, tuple[float | str, bool]] = {}  # sensor -> scenario value, relative
        self._silent: set[int] = set()
        self._last_ts = [0] * n
        self._next_scene = 0
        self._next_silence = 0

    # ---- the loop ---------------------------------------------------------------------
    def step(self) -> list[str]:
        """Publish everything due now; return the scenario events that just started."""
        now = self.clock()
        if self.started is None:
            self._begin(now)
        start = self.started
        lines = []
        strangers: list[str] = []
        while self._next_scene < len(self._scenes) and \
                start + self._scenes[self._next_scene][0] / self.speed <= now:
            lines.append(self._scenes[self._next_scene][1])
            strangers += self._scenes[self._next_scene][3]
            self._next_scene += 1
        while self._next_silence < len(self._silence) and \
                start + self._silence[self._next_silence][0] / self.speed <= now:
            self._silent.add(self._silence[self._next_silence][1])
            self._next_silence += 1
        now_ms = int(now * 1000)
        batch: dict[int, list[dict[str, Any]]] = {}   # sensor or gateway -> readings (see _key)
        reported: set[int] = set()
        q = self._queue
        n_units = len(self._units)
        while q and q[0][0] <= now:
            due, order, what = heapq.heappop(q)
            if what == _POINT:
                _, i, v, relative = self._points[order - n_units]
                if v is None:
                    self._held.pop(i, None)
                    continue
                if not self._event[i]:
                    self._held[i] = (v, relative)
                if i not in self._silent:
                    self._emit(batch, i, now_ms, self._exact(i, v, relative))
                    reported.add(i)
                continue
            for i in self._units[what]:
                if i not in reported and i not in self._silent and self._can(i):
                    self._emit(batch, i, now_ms, self._background(i))
                    reported.add(i)
            period = self._period[what]
            nxt = due + period
            if nxt <= now:                            # late (a stalled loop): skip, keep phase
                nxt = due + period * (math.floor((now - due) / period) + 1)
            heapq.heappush(q, (nxt, order, what))
        gateways, sensor_ids = self.registry.gateways, self.registry.sensor_ids
        for key, readings in batch.items():
            if key < 0:                                 # a gateway's upload: one JSON array
                self.publish(f"{self.prefix}/gateways/{gateways[-1 - key]}", _encode(readings))
            else:                                       # a sensor on its own: one object each
                for r in readings:
                    self.publish(f"{self.prefix}/readings/{sensor_ids[key]}", _encode(r))
        for sid in strangers:
            self.publish(f"{self.prefix}/readings/{sid}",
                         _encode({"sensor_id": sid, "ts": now_ms, "value": 1.0}))
        return lines

    def story_of(self, sensor_id: str) -> str | None:
        """The story event a sensor's notice belongs to: the latest one started so far that
        names it, by its first word (燃气泄漏, 暴雨, …); None if the story does not name it."""
        for _at, line, ids, _ in reversed(self._scenes[:self._next_scene]):
            if sensor_id in ids:
                return line.split(" ", 1)[0]
        return None

    def run(self, stop: threading.Event, interval: float = 1.0,
            report: Callable[[str], None] | None = None) -> None:
        """Call ``step()`` about every ``interval`` seconds until ``stop`` is set; each scenario
        line goes to ``report`` (default: logged at INFO on ``cityops.simulate``). A failing
        publish is logged and the loop goes on (a gateway does not die of a broker hiccup)."""
        report = report or log.info
        while not stop.is_set():
            try:
                for line in self.step():
                    report(line)
            except Exception:
                log.exception("simulator step failed; continuing")
            stop.wait(interval)

    # ---- internals ------------------------------------------------------------------------
    def _begin(self, now: float) -> None:
        self.started = now
        q = [(now + phase, u, u) for u, phase in enumerate(self._phase)]
        n = len(q)
        q += [(now + at / self.speed, n + k, _POINT) for k, (at, _, _, _) in enumerate(self._points)]
        self._queue = q
        heapq.heapify(q)

    def _can(self, i: int) -> bool:
        return self._quiet[i] is not None or self._event[i]

    def _emit(self, batch: dict, i: int, now_ms: int, reading: dict[str, Any]) -> None:
        """Add a reading to this step's uploads: keyed -1 - gateway number, or the sensor."""
        ts = max(now_ms, self._last_ts[i] + 1)     # one sensor never repeats a ts: no duplicates
        self._last_ts[i] = ts
        r: dict[str, Any] = {"sensor_id": self.registry.sensor_ids[i], "ts": ts}
        r.update(reading)
        if self._battery[i] is not None:
            r["battery"] = self._battery[i]
        g = self.registry.gateway_of[i]
        batch.setdefault(-1 - g if g >= 0 else i, []).append(r)

    def _exact(self, i: int, v: float | str, relative: bool) -> dict[str, Any]:
        if self._event[i]:
            return {"event": str(v)}
        value = float(v) + (self._level[i] if relative else 0.0)
        return {"value": round(value, self._quiet[i].digits)}

    def _background(self, i: int) -> dict[str, Any]:
        if self._event[i]:
            return {"event": HEARTBEAT}
        q = self._quiet[i]
        rng = self.rng
        held = self._held.get(i)
        if held is not None:
            v, relative = held
            value = float(v) + (self._level[i] if relative else 0.0) + rng.uniform(-q.noise, q.noise)
            value = max(value, 0.0)
        elif q.wet < 1.0 and rng.random() >= q.wet:
            value = 0.0
        else:
            value = self._level[i] + rng.uniform(q.lo, q.hi)
        return {"value": round(value, q.digits)}

    def _facts(self, i: int) -> dict[str, Any]:
        reg = self.registry
        p = reg.place_of(i)
        return {"sensor": reg.sensor_ids[i], "owner": reg.owner[i] or reg.sensor_ids[i],
                "address": reg.address[i], "place": p.district_name + p.street_name + p.community_name,
                "district": p.district_name, "street": p.street_name,
                "warning_level": reg.attrs.get(i, {}).get("warning_level", "?")}


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _check_topic(text: str, what: str, slash_ok: bool = False) -> None:
    bad = "+#\0" if slash_ok else "+#\0/"
    if not text or any(c in text for c in bad):
        raise ValueError(f"{what} {text!r} cannot be used in an MQTT topic (not empty, "
                         f"no {' '.join(repr(c) for c in bad if c != chr(0))})")
