"""End to end: `cityops replay` of six years of real Chengdu data against a hand calculation.

Data: the Chengdu file of "PM2.5 Data of Five Chinese Cities" (Liang, X. et al., UCI Machine
Learning Repository, CC BY 4.0), bundled as
``pipeline/fixtures/chengdu/uci_chengdu_pm25_weather_2010_2015.csv``: one row per hour,
2010-01-01 00:00 to 2015-12-31 23:00 Beijing time, ``NA`` where a value is missing.
``precipitation`` (mm in that hour) feeds rain gauge rain-510104-000001 and ``PM_US Post``
(µg/m³, from 2012-05) feeds air-quality station aq-510104-000001 (``uci_chengdu.map.yaml``).

The test runs the CLI in a subprocess (twice, and once more in small batches: the output must be
byte-identical), keeps the distinct state changes that matter -- an incident firing, going up a
level, resolving -- and compares them, hour by hour, with a calculation written here from the
signal definitions alone, in plain Python over the csv module, sharing no code with
``pipeline/`` or ``rules/``:

Rainstorm (暴雨预警信号; rule weather.rainstorm). After every hour that has a precipitation value,
sum the values of the trailing 3, 6 and 12 clock hours (the 3 h window ending at hour h is
h-2, h-1, h; a missing hour adds nothing). The level is the highest that holds: red if the 3 h
sum >= 100 mm, orange if the 3 h sum >= 50 mm, yellow if the 6 h sum >= 50 mm, blue if the
12 h sum >= 50 mm. No incident open and a level holds: an incident fires at that hour. Open and a
higher level holds: it goes up (never down). Open and no level holds: it resolves at that hour.

PM2.5 (rule weather.pm25). After every hour that has a PM2.5 value, average the values of the
trailing 24 clock hours (h-23 .. h) that exist. Levels, strictly above: red 250, orange 150,
yellow 115, blue 75 (HJ 633-2012 IAQI breakpoints). Fire and go up as above. The incident clears
only when the average is <= 65 (hysteresis: 65..75 changes nothing) and has stayed so at every
reading for 3 hours: the first clear reading starts the clock; a reading that is not clear
stops it; a reading at or after start + 3 h resolves the incident *at* start + 3 h, before that
reading is looked at (it may start a new incident). When the data ends, an incident whose clock
ran out by the last hour resolves at start + 3 h.

Sums and averages are exact (Decimal, Fraction), so there is no rounding to argue about.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "pipeline" / "fixtures" / "chengdu"
CSV = FIXTURES / "uci_chengdu_pm25_weather_2010_2015.csv"
MAP = FIXTURES / "uci_chengdu.map.yaml"

RAIN, PM25 = "weather.rainstorm", "weather.pm25"
SEVERITIES = ("blue", "yellow", "orange", "red")          # low to high

# The signal definitions (rules/packs/weather.yaml, `source:`), written out rather than read
# back from the rule file: 暴雨预警信号 blue >= 50 mm in 12 h, yellow >= 50 mm in 6 h,
# orange >= 50 mm in 3 h, red >= 100 mm in 3 h.
RAIN_SIGNAL_MM = Decimal(50)
RAIN_RED_MM = Decimal(100)
# PM2.5 24-hour mean, HJ 633-2012 IAQI breakpoints (strictly above): 75 轻度 (blue),
# 115 中度 (yellow), 150 重度 (orange), 250 严重 (red); clear at <= 65 held for 3 hours.
PM25_LEVELS = ((250, "red"), (150, "orange"), (115, "yellow"), (75, "blue"))
PM25_CLEAR = 65
PM25_CLEAR_FOR = timedelta(hours=3)

# (local hour 'YYYY-MM-DDTHH', kind, severity); kind is fire / upgrade / resolve
Signal = tuple[str, str, str]


# ---- the hand calculation ----------------------------------------------------------------
def read_columns() -> tuple[dict[datetime, Decimal], dict[datetime, Decimal], datetime]:
    """Precipitation and PM2.5 by local hour (missing cells left out), and the last hour."""
    rain: dict[datetime, Decimal] = {}
    pm: dict[datetime, Decimal] = {}
    last = None
    with CSV.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            hour = datetime(int(row["year"]), int(row["month"]), int(row["day"]), int(row["hour"]))
            if row["precipitation"] not in ("NA", ""):
                rain[hour] = Decimal(row["precipitation"])
                last = hour
            if row["PM_US Post"] not in ("NA", ""):
                pm[hour] = Decimal(row["PM_US Post"])
                last = hour
    assert last is not None
    return rain, pm, last


HOURS_BACK = [timedelta(hours=k) for k in range(24)]


def trailing(values: dict, hour: datetime, hours: int) -> list:
    """The values of the `hours` clock hours ending at `hour` (inclusive) that exist."""
    return [values[h] for back in HOURS_BACK[:hours] if (h := hour - back) in values]


def label(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%dT%H")


def expected_rainstorm(rain: dict[datetime, Decimal]) -> list[Signal]:
    out: list[Signal] = []
    open_rank = None                               # severity rank of the open incident
    for hour in sorted(rain):
        sum3, sum6, sum12 = (sum(trailing(rain, hour, n), Decimal(0)) for n in (3, 6, 12))
        rank = (3 if sum3 >= RAIN_RED_MM else 2 if sum3 >= RAIN_SIGNAL_MM
                else 1 if sum6 >= RAIN_SIGNAL_MM else 0 if sum12 >= RAIN_SIGNAL_MM else None)
        if open_rank is None:
            if rank is not None:
                out.append((label(hour), "fire", SEVERITIES[rank]))
                open_rank = rank
        elif rank is None:
            out.append((label(hour), "resolve", SEVERITIES[open_rank]))
            open_rank = None
        elif rank > open_rank:
            out.append((label(hour), "upgrade", SEVERITIES[rank]))
            open_rank = rank
    return out


def expected_pm25(pm: dict[datetime, Decimal], last: datetime) -> list[Signal]:
    out: list[Signal] = []
    open_rank = None
    clearing_since = None                          # first hour of the current clear run
    for hour in sorted(pm):
        window = trailing(pm, hour, 24)
        avg = Fraction(sum(window, Decimal(0))) / len(window)
        rank = next((SEVERITIES.index(sev) for limit, sev in PM25_LEVELS if avg > limit), None)
        if clearing_since is not None and hour >= clearing_since + PM25_CLEAR_FOR:
            out.append((label(clearing_since + PM25_CLEAR_FOR), "resolve", SEVERITIES[open_rank]))
            open_rank = clearing_since = None
        if open_rank is None:
            if rank is not None:
                out.append((label(hour), "fire", SEVERITIES[rank]))
                open_rank = rank
        elif avg <= PM25_CLEAR:
            if clearing_since is None:
                clearing_since = hour
        else:
            clearing_since = None                  # back to firing, nobody is told
            if rank is not None and rank > open_rank:
                out.append((label(hour), "upgrade", SEVERITIES[rank]))
                open_rank = rank
    # end of data: the engine's watermark moves to the last reading + 1 ms
    if clearing_since is not None and clearing_since + PM25_CLEAR_FOR <= last:
        out.append((label(clearing_since + PM25_CLEAR_FOR), "resolve", SEVERITIES[open_rank]))
    return out


@pytest.fixture(scope="module")
def hand() -> dict[str, list[Signal]]:
    rain, pm, last = read_columns()
    return {RAIN: expected_rainstorm(rain), PM25: expected_pm25(pm, last)}


# ---- the replay --------------------------------------------------------------------------
def run_replay(out: Path, *extra: str) -> bytes:
    cmd = [sys.executable, "-m", "pipeline.cli", "replay", str(CSV), "--csv-map", str(MAP),
           "--rules", "weather.*", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"replay failed ({done.returncode}):\n{done.stderr}"
    return out.read_bytes()


@pytest.fixture(scope="module")
def replay_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    d = tmp_path_factory.mktemp("replay")
    return run_replay(d / "a.jsonl"), run_replay(d / "b.jsonl")


@pytest.fixture(scope="module")
def notices(replay_runs: tuple[bytes, bytes]) -> list[dict]:
    return [json.loads(line) for line in replay_runs[0].splitlines()]


def engine_signals(notices: list[dict]) -> dict[str, list[Signal]]:
    """Distinct (alert_id, seq) firing / upgrade / resolve changes per rule, in output order."""
    out: dict[str, list[Signal]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for n in notices:
        if n["state"] not in ("firing", "resolved") or (n["alert_id"], n["seq"]) in seen:
            continue
        seen.add((n["alert_id"], n["seq"]))
        ts = datetime.fromisoformat(n["ts"])
        on_the_hour = ts.minute == ts.second == ts.microsecond == 0
        assert ts.utcoffset() == timedelta(hours=8) and on_the_hour, n["ts"]
        if n["state"] == "resolved":
            kind = "resolve"
        else:
            kind = {None: "fire", "firing": "upgrade"}[n["previous_state"]]
        out[n["rule_id"]].append((ts.strftime("%Y-%m-%dT%H"), kind, n["severity"]))
    return dict(out)


@pytest.fixture(scope="module")
def engine(notices: list[dict]) -> dict[str, list[Signal]]:
    return engine_signals(notices)


def mismatches(expected: list[Signal], got: list[Signal], show: int = 8) -> str:
    """The first hours where the two lists differ, as (hour, expected, got) lines."""
    by_hour: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for side, signals in enumerate((expected, got)):
        for hour, kind, sev in signals:
            by_hour[hour][side].append((kind, sev))
    lines = [f"{len(expected)} signals expected, {len(got)} from the engine; first differences "
             "(hour: expected / got):"]
    differ = [h for h in sorted(by_hour) if by_hour[h][0] != by_hour[h][1]]
    lines += [f"  {h}: {by_hour[h][0] or '-'} / {by_hour[h][1] or '-'}" for h in differ[:show]]
    if not differ:
        lines.append("  (the same signals, in a different order)")
    return "\n".join(lines)


# ---- the tests ---------------------------------------------------------------------------
def test_replay_is_byte_identical(replay_runs: tuple[bytes, bytes]) -> None:
    a, b = replay_runs
    assert a, "the replay wrote no notices"
    assert a == b


def test_replay_does_not_depend_on_batching(replay_runs: tuple[bytes, bytes],
                                            tmp_path: Path) -> None:
    # 37 readings a batch instead of 1000: timers (escalation, reminders) and clear_for that
    # fall due between readings must act at the same event time either way.
    assert run_replay(tmp_path / "batch37.jsonl", "--batch", "37") == replay_runs[0]


def test_every_notice_is_a_valid_chinese_alert(notices: list[dict]) -> None:
    from pipeline.core.models import AlertNotice

    assert {n["rule_id"] for n in notices} == {RAIN, PM25}
    for n in notices:
        AlertNotice.model_validate(n)
        assert re.search(r"[\u4e00-\u9fff]", n["title"]), n["title"]
        assert "锦江区" in n["title"], n["title"]
        assert ("暴雨" if n["rule_id"] == RAIN else "PM2.5污染") in n["title"], n["title"]


@pytest.mark.parametrize("rule", [RAIN, PM25])
def test_signals_match_the_hand_calculation(rule: str, hand: dict, engine: dict) -> None:
    expected, got = hand[rule], engine.get(rule, [])
    assert expected, f"the hand calculation found no {rule} signals"
    assert got == expected, mismatches(expected, got)


def signal_days(signals: list[Signal]) -> dict[str, list[str]]:
    """Local dates on which a signal of each severity was issued (fired or raised to)."""
    days: dict[str, set[str]] = {s: set() for s in SEVERITIES}
    for hour, kind, sev in signals:
        if kind != "resolve":
            days[sev].add(hour[:10])
    return {s: sorted(d) for s, d in days.items()}


# The rainstorm signal days of 2010-2015 as the hand calculation gives them, written out so that
# a reader can check them against the CSV (or a weather archive) without running anything.
RAIN_SIGNAL_DAYS = {
    "blue": ["2010-07-25", "2010-08-18", "2010-08-19", "2011-07-04", "2011-07-29", "2013-07-09",
             "2014-06-04", "2015-08-17"],
    "yellow": ["2011-09-06", "2013-07-04"],
    "orange": ["2010-03-10", "2010-09-18", "2011-05-09", "2011-07-23", "2013-06-20", "2013-07-10",
               "2013-08-07", "2013-09-19", "2014-07-31", "2014-08-04"],
    "red": [],
}


def test_rainstorm_signal_days(hand: dict, engine: dict) -> None:
    days = signal_days(engine.get(RAIN, []))
    counts = Counter((kind, sev) for _, kind, sev in engine.get(RAIN, []) if kind != "resolve")
    print("\nrainstorm signals (engine), Chengdu 2010-2015:")
    for sev in SEVERITIES:
        print(f"  {sev:6} fired {counts['fire', sev]:2}, raised to {counts['upgrade', sev]:2}: "
              f"{', '.join(days[sev]) or '-'}")
    assert days == signal_days(hand[RAIN]) == RAIN_SIGNAL_DAYS


def test_well_known_facts(engine: dict) -> None:
    # Checked by hand in the CSV: the wettest hour of 2010-2015 is 57 mm on 2010-03-10 at 10:00
    # (row No 1643); 57 >= 50 mm in 3 h and < 100 mm, so an orange signal starts that hour.
    rain, pm, _ = read_columns()
    wettest = max(rain, key=rain.get)
    assert (wettest, rain[wettest]) == (datetime(2010, 3, 10, 10), Decimal(57))
    assert ("2010-03-10T10", "fire", "orange") in engine[RAIN]
    # The only other hour over 50 mm: 51.7 mm on 2013-08-07 at 03:00, again orange.
    assert sorted(h for h, v in rain.items() if v >= 50) == [wettest, datetime(2013, 8, 7, 3)]
    assert any(h.startswith("2013-08-07") and sev == "orange" and kind != "resolve"
               for h, kind, sev in engine[RAIN])
    # The wettest 3 hours add up to 80.3 mm (2013-09-19 04:00-06:00), short of 100 mm: never a
    # red rainstorm signal.
    assert max(sum(trailing(rain, h, 3), Decimal(0)) for h in rain) == Decimal("80.3")
    assert all(sev != "red" for _, _, sev in engine[RAIN])
    # The worst 24 h PM2.5 mean, 413.7 µg/m³ at 2014-01-31 17:00, follows the Spring Festival
    # fireworks (hourly peak 688 µg/m³ at 2014-01-31 00:00): a red incident is open then.
    assert (max(pm, key=pm.get), max(pm.values())) == (datetime(2014, 1, 31, 0), 688)
    before = [s for s in engine[PM25] if s[0] <= "2014-01-31T17"][-1]
    assert before[1:] in {("fire", "red"), ("upgrade", "red")}, before
    # PM2.5 readings begin at 2012-05-14 14:00; nothing can fire before that.
    assert min(pm) == datetime(2012, 5, 14, 14)
    assert min(h for h, _, _ in engine[PM25]) >= "2012-05-14T14"
