"""`cityops backtest`: every count equals what two separate `cityops replay` runs send.

Differential: the backtest runs once (history read once, two rule sets); `cityops replay` runs
once per rule set; the counts are worked out from the replays' notices here, by code that shares
nothing with pipeline/core/backtest.py, and every count is compared: incidents and notices per rule,
district, tier and day, pushes per grid worker per night, dead letters. On the real Chengdu data
(UCI, 2010-2015, every built-in pack) and on generated histories at two batch sizes, with and
without acknowledgements; the recorded history of a VictoriaMetrics the sink wrote to gives what
the same readings from a file give. In one process and in two (--jobs). Then what the Chengdu
report says about a lower rainstorm threshold, and the errors for bad input.
"""

from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bench.harness.tsdb import VictoriaMetrics

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "pipeline" / "fixtures" / "chengdu"
CSV = FIXTURES / "uci_chengdu_pm25_weather_2010_2015.csv"
MAP = FIXTURES / "uci_chengdu.map.yaml"
RAIN = "weather.rainstorm"
CITY_TZ = ZoneInfo("Asia/Shanghai")


def cityops(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, f"cityops {' '.join(args)} failed:\n{done.stderr}"
    return done


# ---- counting the replays' notices (independent of pipeline/core/backtest.py) ------------------
def counted(notices: list[dict], dead_letters: int) -> dict:
    """Incidents (distinct alert_id) and notices per rule, district, tier (incidents: those
    that told the tier) and day (incidents: by the local date they started; notices: sent);
    grid-worker pushes per night (22:00-07:00 city time, named by its evening)."""
    inc: dict[str, dict[str, set]] = {d: defaultdict(set) for d in ("rule", "district", "tier", "day")}
    num: dict[str, dict[str, int]] = {d: defaultdict(int) for d in inc}
    pushes: dict[str, int] = defaultdict(int)
    for n in notices:
        district = n["district"] or "-"
        keys = {"rule": n["rule_id"], "district": district, "tier": n["tier"], "day": n["ts"][:10]}
        for dim, key in keys.items():
            num[dim][key] += 1
        for dim in ("rule", "district", "tier"):
            inc[dim][keys[dim]].add(n["alert_id"])
        inc["day"][n["started_at"][:10]].add(n["alert_id"])
        at = datetime.fromisoformat(n["ts"])
        if n["tier"] == "grid" and (at.hour >= 22 or at.hour < 7):
            pushes[f"{n['target']} {(at - timedelta(hours=7)).date().isoformat()}"] += 1
    out = {f"by_{dim}": {k: {"incidents": len(inc[dim].get(k, ())), "notices": num[dim].get(k, 0)}
                         for k in sorted(num[dim].keys() | inc[dim].keys())} for dim in inc}
    out["pushes"] = dict(sorted(pushes.items()))
    out["notices"] = len(notices)
    out["incidents"] = len({n["alert_id"] for n in notices})
    out["dead_letters"] = dead_letters
    return out


def replayed(tmp: Path, name: str, history: Path, *flags: str) -> dict:
    out, dead = tmp / f"{name}.jsonl", tmp / f"{name}.dead.jsonl"
    extra = ["--csv-map", str(MAP)] if history.suffix == ".csv" else []
    cityops("replay", str(history), *extra, "--out", str(out), "--dead-letters", str(dead), *flags)
    notices = [json.loads(line) for line in out.read_text().splitlines()]
    assert notices, f"the {name} replay sent nothing: a comparison of nothing proves nothing"
    return counted(notices, len(dead.read_text().splitlines()))


def backtest_json(tmp: Path, name: str, *args: str) -> dict:
    out = tmp / f"{name}.json"
    cityops("backtest", *args, "--json", str(out))
    return json.loads(out.read_text())


def side(report: dict, which: str) -> dict:
    s = report["sides"][which]
    return {k: s[k] for k in ("by_rule", "by_district", "by_tier", "by_day", "pushes", "notices",
                              "incidents", "dead_letters")}


def assert_same(got: dict, want: dict, what: str) -> None:
    for key in want:
        assert got[key] == want[key], f"{what}: {key} differs from the replay's"


# ---- the Chengdu data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chengdu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """The rainstorm signal at 30 mm instead of 50 mm, every built-in pack, 2010-2015."""
    tmp = tmp_path_factory.mktemp("backtest-chengdu")
    params = tmp / "rain30.yaml"
    params.write_text("weather:\n  params: {rain_signal_mm: 30}\n")
    html = tmp / "report.html"
    done = cityops("backtest", "--rules", "builtin", "--params", str(params), "--against",
                   "builtin", "--history", str(CSV), "--csv-map", str(MAP), "--html", str(html),
                   "--json", str(tmp / "report.json"))
    return tmp, json.loads((tmp / "report.json").read_text()), done.stdout


def test_chengdu_counts_equal_two_replays(chengdu_run) -> None:
    tmp, report, _ = chengdu_run
    assert_same(side(report, "current"), replayed(tmp, "current", CSV), "current rules")
    assert_same(side(report, "new"), replayed(tmp, "new", CSV, "--params", str(tmp / "rain30.yaml")),
                "new rules")


def test_chengdu_two_rainstorm_thresholds(chengdu_run) -> None:
    """30 mm fires on everything 50 mm fires on, earlier or at once, and on rain 50 mm misses."""
    tmp, report, stdout = chengdu_run
    assert report["differing_rules"] == [RAIN]          # nothing else changed
    cur, new = report["sides"]["current"], report["sides"]["new"]
    rain_cur, rain_new = cur["by_rule"][RAIN]["incidents"], new["by_rule"][RAIN]["incidents"]
    # the 50 mm signal's incidents: the 20 signal days of tests/core/test_replay_chengdu.py's hand
    # calculation, two of them with two separate incidents
    assert rain_cur == 22 and rain_new > rain_cur
    for rule in cur["by_rule"]:
        if rule != RAIN:
            assert cur["by_rule"][rule] == new["by_rule"][rule], rule
    assert report["only_current"] == []
    only_new = report["only_new"]
    fires = report["time_to_fire"]
    # every 30 mm incident either runs alongside a 50 mm one (paired: the time to fire) or is
    # one the 50 mm rules never had, fired by 30-50 mm of rain in its window (first reading)
    assert len(only_new) + len(fires) == rain_new
    for inc in only_new:
        assert inc["rule"] == RAIN and inc["threshold"] == 30.0 and 30 <= inc["value"] < 50, inc
    assert all(f["delta_s"] <= 0 for f in fires) and any(f["delta_s"] < 0 for f in fires)
    assert new["pushes_per_night"]["pushes"] > cur["pushes_per_night"]["pushes"]
    # what the text says
    assert f"{RAIN} *" in stdout and "incidents only the new rules have: 13" in stdout
    assert "incidents only the current rules have: 0" in stdout


def test_html_report_opens_offline(chengdu_run) -> None:
    tmp, _, _ = chengdu_run
    page = (tmp / "report.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 4 and "锦江区" in page and "weather.rainstorm *" in page
    # nothing to fetch, nothing to run: no script, no stylesheet or image from elsewhere
    for needle in ("<script", "src=", "href=", "@import", "url("):
        assert needle not in page, needle


# ---- generated histories ------------------------------------------------------------------
def generated(path: Path, seed: int) -> None:
    """Six hours of a few dozen sensors of the fixture registry: gas alarms rising through the
    thresholds, waterlogging, site cameras, gateway arrays, the odd bad line."""
    from pipeline.core.registry import load as load_registry
    from rules.compiler import load_rules
    reg = load_registry(None, load_rules().kinds)
    rnd = random.Random(seed)
    pick = {kind: [reg.sensor_ids[i] for i in reg.sensors_of_kinds([kind])]
            for kind in ("gas_household", "gas_commercial", "waterlogging", "site_camera")}
    gas = rnd.sample(pick["gas_household"], 12) + rnd.sample(pick["gas_commercial"], 3)
    water = rnd.sample(pick["waterlogging"], 6)
    cams = rnd.sample(pick["site_camera"], 4)
    t0 = int(datetime(2026, 7, 1, 20, 0, tzinfo=CITY_TZ).timestamp() * 1000)   # evening into night
    level = {s: rnd.uniform(0, 8) for s in gas + water}
    lines = []
    for step in range(900):
        ts = t0 + step * 24_000 + rnd.randrange(0, 20_000)
        batch = []
        for s in rnd.sample(gas + water, rnd.randint(1, 3)):
            top = 60 if s in gas else 45
            level[s] = min(top, max(0.0, level[s] + rnd.gauss(0.4 if rnd.random() < 0.55 else -0.6, 4)))
            batch.append({"sensor_id": s, "ts": ts + rnd.randrange(0, 3000), "value": round(level[s], 1)})
        if rnd.random() < 0.08:
            batch.append({"sensor_id": rnd.choice(cams), "ts": ts,
                          "event": rnd.choice(["no_helmet", "smoke_fire", "intrusion"])})
        if len(batch) > 1 and rnd.random() < 0.5:
            lines.append(json.dumps(batch))                  # a gateway's array
        else:
            lines += [json.dumps(r) for r in batch]
        if rnd.random() < 0.01:
            lines.append(rnd.choice([f'{{"sensor_id": "gas-999999-000001", "ts": {ts}, "value": 1}}',
                                     '{"sensor_id": ', f'{{"sensor_id": "{gas[0]}", "ts": 1, "value": 1}}']))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def changed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """New rules two ways: a params file (gas and waterlogging thresholds), and a pack folder
    whose gas pack replaces the built-in one (a different clear level and clear_for)."""
    tmp = tmp_path_factory.mktemp("backtest-rules")
    params = tmp / "params.yaml"
    params.write_text("gas:\n  params: {level1_lel: 12}\nwaterlogging:\n  params: {watch_cm: 10}\n")
    packs = tmp / "packs"
    packs.mkdir()
    gas = (ROOT / "rules" / "packs" / "gas.yaml").read_text(encoding="utf-8")
    assert "clear_lel: 10" in gas and "clear_for: 2m" in gas
    (packs / "gas.yaml").write_text(gas.replace("clear_lel: 10", "clear_lel: 4")
                                    .replace("clear_for: 2m", "clear_for: 5m"), encoding="utf-8")
    return {"params": params, "packs": packs}


@pytest.mark.parametrize("seed,how,acks", [(1, "params", None), (2, "packs", None),
                                           (3, "params", "5m")])
def test_generated_history_counts_equal_two_replays(tmp_path: Path, changed, seed: int,
                                                    how: str, acks: str | None) -> None:
    history = tmp_path / "history.jsonl"
    generated(history, seed)
    if how == "params":
        new_rules = ["--rules", "builtin", "--params", str(changed["params"])]
        new_replay = ["--params", str(changed["params"])]
    else:
        new_rules = ["--rules", str(changed["packs"])]
        new_replay = ["--packs", str(changed["packs"])]
    ack = ["--ack-after", acks] if acks else []
    want_cur = replayed(tmp_path, "current", history, *ack)
    want_new = replayed(tmp_path, "new", history, *new_replay, *ack)
    assert want_cur != want_new, "the change should change something"
    # one process (one decode, two engines) and two (the new rules in a second process)
    for batch, jobs in (("7", "1"), ("1000", "1"), ("1000", "2")):
        report = backtest_json(tmp_path, f"b{batch}-j{jobs}", *new_rules, "--against", "builtin",
                               "--history", str(history), "--batch", batch, "--jobs", jobs, *ack)
        assert report["differing_rules"], report["differing_rules"]
        what = f"--batch {batch} --jobs {jobs}"
        assert_same(side(report, "current"), want_cur, f"current rules, {what}")
        assert_same(side(report, "new"), want_new, f"new rules, {what}")


def test_the_same_rules_on_both_sides_give_the_same_counts(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    generated(history, 4)
    report = backtest_json(tmp_path, "same", "--rules", "builtin", "--against", str(ROOT / "rules" / "packs"),
                           "--history", str(history))
    assert report["differing_rules"] == []
    assert side(report, "current") == side(report, "new")
    assert_same(side(report, "current"), replayed(tmp_path, "replay", history), "both sides")


# ---- recorded history (the sink's, in VictoriaMetrics) -------------------------------------
@pytest.mark.broker
def test_recorded_history_gives_what_the_same_readings_from_a_file_give(
        victoria_metrics: VictoriaMetrics, tmp_path: Path, changed) -> None:
    """Readings written by the real sink and read back through VictoriaMetrics' export API,
    against the same readings as a JSONL file in event-time order."""
    from connectors.influx import InfluxSink
    from pipeline.shared.config import InfluxSettings
    from pipeline.core.engine import Engine
    from pipeline.core.registry import load as load_registry
    from rules.compiler import load_rules
    history = tmp_path / "history.jsonl"
    generated(history, 5)
    rs = load_rules()
    reg = load_registry(None, rs.kinds)
    engine = Engine(reg, rs)
    engine.keep_accepted = True
    sink = InfluxSink(InfluxSettings(url=victoria_metrics.url, token="t", org="cityops",
                                     bucket="cityops", flush_interval="100ms"), reg)
    taken = []
    for line in history.read_text().splitlines():
        out = engine.ingest([line.encode()])
        sink.add(out)
        for idx, ts, val in out.accepted:
            taken += zip(idx.tolist(), ts.tolist(), val.tolist(), strict=True)
    assert sink.close(20.0)
    # the same readings, one a line, in the order the export gives them back: time, then sensor
    rows = sorted((ts, reg.sensor_ids[i], v) for i, ts, v in taken)
    ordered = tmp_path / "ordered.jsonl"
    ordered.write_text("".join(
        json.dumps({"sensor_id": s, "ts": ts, **({"event": "recorded"} if v != v else {"value": v})}) + "\n"
        for ts, s, v in rows))
    victoria_metrics.wait_points(lambda pts: sum(1 for p in pts if p[0] != "alerts_alert_id"
                                                 and not p[0].startswith("alerts_")) >= len(rows))
    args = ["--rules", "builtin", "--params", str(changed["params"]), "--against", "builtin",
            "--time-quorum", "1"]
    url = victoria_metrics.url.replace("http://", "influx://")
    recorded = backtest_json(tmp_path, "recorded", *args, "--history", url)
    from_file = backtest_json(tmp_path, "file", *args, "--history", str(ordered))
    assert recorded["readings"] == from_file["readings"] == len(rows)
    for which in ("current", "new"):
        assert side(recorded, which) == side(from_file, which), which
    assert recorded["sides"]["new"]["notices"] != recorded["sides"]["current"]["notices"]
    # a time range: only what is inside it
    first_hour = datetime.fromtimestamp(rows[0][0] / 1000, CITY_TZ).replace(minute=59, second=59)
    part = backtest_json(tmp_path, "part", *args, "--history", url, "--to", first_hour.isoformat())
    assert 0 < part["readings"] < len(rows)


# ---- progress and bad input ---------------------------------------------------------------
def test_progress_is_shown_on_a_terminal(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    generated(history, 6)
    main, child = pty.openpty()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "backtest", "--rules", "builtin",
                           "--against", "builtin", "--history", str(history), "--batch", "1"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=child, timeout=300)
    os.close(child)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:                   # the child's end is closed: all read
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert done.returncode == 0
    assert b"inputs; incidents: current" in seen and b"2026-07-01" in seen, seen[-300:]


BAD_PACK = """pack: gas
title: 燃气安全
kinds:
  gas_household: {name: 户用燃气报警器, unit: "%LEL", category: gas}
  gas_commercial: {name: 商用燃气探测器, unit: "%LEL", category: gas}
params: {level1_lel: 20}
rules:
  - id: gas.leak
    name: 燃气浓度超限
    type: threshold
    sensors: [gas_household]
    levels:
      - {severity: yellow, when: "value >= params.level9_lel"}
"""


@pytest.mark.parametrize("case", ["no history", "no rules", "bad pack", "bad params",
                                  "csv without map", "bad url", "nobody there", "no rule matches",
                                  "range on a file"])
def test_bad_input_is_a_clear_error(tmp_path: Path, case: str) -> None:
    history = tmp_path / "h.jsonl"
    history.write_text('{"sensor_id": "gas-510104-000001", "ts": 1782885780000, "value": 1}\n')
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "gas.yaml").write_text(BAD_PACK, encoding="utf-8")
    params = tmp_path / "p.yaml"
    params.write_text("gas:\n  params: {level1_lel: 20}\nweather:\n  params: {no_such: 1}\n")
    base = ["--rules", "builtin", "--against", "builtin", "--history", str(history)]
    args, want = {
        "no history": (["--rules", "builtin", "--against", "builtin", "--history",
                        str(tmp_path / "missing.jsonl")], f"{tmp_path / 'missing.jsonl'}: no such file"),
        "no rules": (["--rules", str(tmp_path / "nope"), "--against", "builtin", "--history",
                      str(history)], f"{tmp_path / 'nope'}: no such rule file or folder"),
        "bad pack": (["--rules", str(bad), "--against", "builtin", "--history", str(history)],
                     f"{bad / 'gas.yaml'}:13: "),
        "bad params": ([*base, "--against-params", str(params)], f"{params}:4: "),
        "csv without map": (["--rules", "builtin", "--against", "builtin", "--history", str(CSV)],
                            "a CSV needs --csv-map"),
        "bad url": ([*base[:4], "--history", "influx://"], "write the history store as influx://HOST:PORT"),
        "nobody there": ([*base[:4], "--history", "influx://127.0.0.1:9"], "cannot read http://127.0.0.1:9/api/v1/export"),
        "no rule matches": ([*base, "--only", "nothing.*"], "--only: no rule id matches nothing.*"),
        "range on a file": ([*base, "--from", "2026-07-01"], "--from: a time range selects"),
    }[case]
    done = cityops("backtest", *args, ok=False)
    assert done.returncode == 1, done
    assert done.stderr.startswith("cityops: error: ") and want in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# ---- what "only one side" and "time to fire" mean -----------------------------------------
def notice(aid: str, state: str, ts: str, started: str, subject: str = "gas-510104-000001",
           previous: str | None = None, severity: str = "yellow", tier: str = "street") -> dict:
    return {"alert_id": aid, "rule_id": "gas.leak", "sensor_id": subject, "group": None,
            "tier": tier, "target": "510104020", "state": state, "previous_state": previous,
            "severity": severity, "ts": ts, "started_at": started, "district": "510104",
            "district_name": "锦江区", "street_name": "春熙路街道", "value": 25.0,
            "threshold": 20.0, "unit": "%LEL"}


def test_incidents_pair_by_rule_subject_and_overlap() -> None:
    from pipeline.core.backtest import Result, Side, Tally, compare
    from rules.compiler import load_rules
    rs = load_rules()
    t = "2026-07-01T{}:00+08:00".format
    cur, new = Tally(), Tally()
    cur.add([notice("c1", "firing", t("10:00"), t("10:00")), notice("c1", "resolved", t("10:30"), t("10:00")),
             # flapping: fires again after it resolved, and is open at the end
             notice("c2", "firing", t("12:00"), t("12:00")), notice("c2", "resolved", t("12:10"), t("12:00")),
             notice("c2", "firing", t("12:20"), t("12:00"), previous="resolved"),
             notice("c3", "firing", t("15:00"), t("15:00"), subject="gas-510104-000002")])
    new.add([notice("n1", "firing", t("09:40"), t("09:40"), severity="red"),
             notice("n1", "resolved", t("11:00"), t("09:40")),
             notice("n2", "firing", t("13:00"), t("13:00")),          # inside c2, open again
             notice("n3", "firing", t("16:00"), t("16:00")),          # c2 is still open then
             notice("n4", "firing", t("15:00"), t("15:00"), subject="gas-510104-000003")])
    result = Result(Side("c", rs, cur), Side("n", rs, new), {"gas.leak"})
    only_cur, only_new, pairs = compare(result)
    assert [(p.current.alert_id, p.new.alert_id, p.delta_ms // 60_000) for p in pairs] == [
        ("c1", "n1", -20), ("c2", "n2", 60)]
    assert [i.alert_id for i in only_cur] == ["c3"]                  # another sensor
    # n3 runs alongside c2 (open to the end), which pairs with n2: neither paired nor alone
    assert [i.alert_id for i in only_new] == ["n4"]
    assert new.incidents["n1"].severity == "red" and cur.incidents["c2"].ended_ms is None
    assert cur.counts["tier"]["street"] == [3, 6] and new.counts["rule"]["gas.leak"] == [4, 5]
