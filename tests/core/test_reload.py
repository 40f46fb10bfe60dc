"""Hot reload in the engine's terms (pipeline/core/reload.py): state carried into an engine built from
the new set; what cannot go on resolves with its reason to every tier told; an identical set
changes nothing; `rules diff` says what a reload would change."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main
from pipeline.core.engine import Engine, EngineSettings
from pipeline.core.registry import FIXTURE
from pipeline.shared.config import load_settings
from pipeline.core.reload import (RULE_CHANGED, RULE_GONE, SENSOR_GONE, carry, diff, load_set,
                             watched_files, files_digest)
from rules.yamlfile import ConfigError
from tests.support import HOT, retire

T0 = 1_782_885_780_000            # 2026-07-01 in event time
LEAK = "gas-510104-000001"        # 独居老人: orange at 20 %LEL (a modifier raises yellow)
OTHER = "gas-510104-000002"


def reading_bytes(sid: str, ts: int, value: float) -> bytes:
    return orjson.dumps({"sensor_id": sid, "ts": ts, "value": value})


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config(tmp: Path, name: str, **keys: str) -> Path:
    return write(tmp / name, "".join(f"{k}: {v}\n" for k, v in keys.items()) or "{}\n")


def city(cfg: Path):
    return load_set(load_settings(cfg))


def engine_of(cs) -> Engine:
    return cs.engine(EngineSettings())


def told(notices: list[dict], state: str, aid: str) -> set[tuple[str, str]]:
    return {(n["tier"], n["target"]) for n in notices if n["alert_id"] == aid and n["state"] == state}


def test_a_changed_threshold_keeps_the_open_incident_and_applies_from_the_next_reading(tmp_path):
    old = city(config(tmp_path, "old.yaml"))
    params = write(tmp_path / "params.yaml", "gas:\n  params: {level1_lel: 30}\n")
    new = city(config(tmp_path, "new.yaml", params=str(params)))
    e = engine_of(old)
    fired = e.ingest([reading_bytes(LEAK, T0, 27.5)]).notices
    aid = fired[0]["alert_id"]
    assert {n["state"] for n in fired} == {"firing"}

    e2 = engine_of(new)
    out = carry(e, e2, T0 + 30_000)
    assert out.notices == []                                  # nothing ends, nothing is said
    assert list(e2.book.open) == [aid]                        # the same incident goes on
    # the new threshold applies from the next reading: 27.5 no longer opens one elsewhere ...
    assert e2.ingest([reading_bytes(OTHER, T0 + 60_000, 27.5)]).notices == []
    assert engine_of(old).ingest([reading_bytes(OTHER, T0 + 60_000, 27.5)]).notices  # (old: it did)
    # ... and the open one ends as it would have, under its own id, to every tier told
    e2.ingest([reading_bytes(LEAK, T0 + 90_000, 2.0)])
    end = e2.advance(T0 + 90_000 + 3 * 60_000).notices
    assert told(end, "resolved", aid) == told(fired, "firing", aid)
    assert e2.counters["reload_resolved"] == 0


def test_a_removed_rule_resolves_its_incidents_with_the_reason_to_every_tier_told(tmp_path):
    pack = write(tmp_path / "hot.yaml", HOT)
    old = city(config(tmp_path, "old.yaml", packs=f"[{pack}]"))
    new = city(config(tmp_path, "new.yaml"))
    e = engine_of(old)
    fired = e.ingest([reading_bytes(OTHER, T0, 8.0)]).notices
    aid = next(n["alert_id"] for n in fired if n["rule_id"] == "hot.gas")
    e2 = engine_of(new)
    out = carry(e, e2, T0 + 60_000)
    assert told(out.notices, "resolved", aid) == told(fired, "firing", aid)
    assert len(told(fired, "firing", aid)) >= 3               # street, grid, district, dept
    assert all(RULE_GONE in n["summary"] and n["ts"].startswith("2026-07-01") for n in out.notices)
    assert aid not in e2.book.open and e2.counters["reload_resolved"] == 1


def test_a_rule_whose_state_changes_shape_starts_afresh(tmp_path):
    """A threshold rule made a window rule under the same id: its saved tracks mean nothing
    to the new type, so its incidents end (规则已更改) and the new rule judges from scratch."""
    old_pack = HOT
    new_pack = old_pack.replace("type: threshold", "type: window\n    windows: {avg5: {fn: avg, size: 5m}}") \
        .replace("value >= 5", "avg5 >= 5")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write(tmp_path / "a" / "hot.yaml", old_pack)
    b = write(tmp_path / "b" / "hot.yaml", new_pack)
    e = engine_of(city(config(tmp_path, "old.yaml", packs=f"[{a}]")))
    fired = e.ingest([reading_bytes(OTHER, T0, 8.0)]).notices
    aid = next(n["alert_id"] for n in fired if n["rule_id"] == "hot.gas")
    e2 = engine_of(city(config(tmp_path, "new.yaml", packs=f"[{b}]")))
    out = carry(e, e2, T0 + 1)
    assert told(out.notices, "resolved", aid) == told(fired, "firing", aid)
    assert all(RULE_CHANGED in n["summary"] for n in out.notices)
    assert not e2.by_id["hot.gas"].tracks and aid not in e2.book.open


def move(folder: Path, sensor: str, grid: str) -> None:
    csv = folder / "sensors.csv"
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    for k, line in enumerate(lines):
        if line.startswith(sensor + ","):
            cells = line.split(",")
            cells[2] = grid
            lines[k] = ",".join(cells)
    csv.write_text("".join(lines), encoding="utf-8")


def test_a_retired_sensor_resolves_its_incidents_and_the_others_go_on(tmp_path):
    old = city(config(tmp_path, "old.yaml"))
    new = city(config(tmp_path, "new.yaml", registry=str(retire(tmp_path, OTHER))))
    e = engine_of(old)
    fired = e.ingest([reading_bytes(LEAK, T0, 27.5), reading_bytes(OTHER, T0 + 1000, 27.5)]).notices
    leak, other = (next(n["alert_id"] for n in fired if n["sensor_id"] == s) for s in (LEAK, OTHER))
    e2 = engine_of(new)
    out = carry(e, e2, T0 + 60_000)
    assert {n["alert_id"] for n in out.notices} == {other}
    assert told(out.notices, "resolved", other) == told(fired, "firing", other)
    assert all(SENSOR_GONE in n["summary"] for n in out.notices)
    assert list(e2.book.open) == [leak]


def story(seed: int, n: int = 1500) -> list[bytes]:
    """Gas and waterlogging readings crossing every level, with gaps and a few acks' worth of
    time: enough to fire, step up, clear, flap and escalate."""
    rng = random.Random(seed)
    gas = [f"gas-510104-{i:06d}" for i in range(1, 9)]
    water = ["wl-510104-000001", "wl-510104-000002", "wl-510105-000001"]
    ts = T0
    out = []
    for _ in range(n):
        ts += rng.choice((5_000, 20_000, 60_000, 240_000))
        if rng.random() < 0.7:
            out.append(reading_bytes(rng.choice(gas), ts, rng.choice((0.5, 3.0, 12.0, 22.0, 35.0, 60.0))))
        else:
            out.append(reading_bytes(rng.choice(water), ts, rng.choice((2.0, 8.0, 16.0, 30.0, 45.0))))
    return out


def run(cs, payloads: list[bytes], batch: int, reload_at: set[int] = frozenset(),
        new=None) -> list[bytes]:
    e = engine_of(cs)
    lines: list[bytes] = []
    for k in range(0, len(payloads), batch):
        if k in reload_at:
            e2 = engine_of(new or cs)
            lines += [orjson.dumps(n, option=orjson.OPT_SORT_KEYS)
                      for n in carry(e, e2, e.max_ts).notices]
            e = e2
        o = e.ingest(payloads[k:k + batch])
        lines += [orjson.dumps(n, option=orjson.OPT_SORT_KEYS) for n in o.notices]
        lines += [d.model_dump_json().encode() for d in o.dead_letters]
    lines += [orjson.dumps(n, option=orjson.OPT_SORT_KEYS) for n in e.advance(e.max_ts + 1).notices]
    return lines


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_a_reload_to_an_identical_set_changes_nothing(tmp_path, batch):
    cs = city(config(tmp_path, "same.yaml"))
    again = city(config(tmp_path, "same.yaml"))
    payloads = story(batch)
    plain = run(cs, payloads, batch)
    assert sum(b'"state":"resolved"' in x for x in plain) >= 5       # the story has ends ...
    assert sum(b'"escalated"' in x for x in plain) >= 1              # ... and escalations
    points = {len(payloads) * i // 5 // batch * batch for i in (1, 2, 3, 4)}  # batch boundaries
    assert len(points) == 4
    assert run(cs, payloads, batch, points, again) == plain


def test_a_bad_set_is_refused_with_file_and_line(tmp_path):
    params = write(tmp_path / "params.yaml", "gas:\n  params:\n    level_one_lel: 30\n")
    with pytest.raises(ConfigError) as exc:
        city(config(tmp_path, "bad.yaml", params=str(params)))
    assert f"{params}:" in str(exc.value) and "level_one_lel" in str(exc.value)


def test_the_digest_covers_every_file_a_set_is_read_from(tmp_path):
    params = write(tmp_path / "params.yaml", "gas:\n  params: {level1_lel: 30}\n")
    s = load_settings(config(tmp_path, "c.yaml", params=str(params)))
    files = watched_files(s)
    assert params in files and FIXTURE in files and any(f.name == "sensors.csv" for f in files)
    before = files_digest(files)
    write(params, "gas:\n  params: {level1_lel: 31}\n")
    assert files_digest(files) != before


# ---- cityops rules diff -------------------------------------------------------------------------

def test_rules_diff_names_thresholds_per_district_routes_and_sensors(tmp_path, capsys):
    params = write(tmp_path / "params.yaml",
                   'gas:\n  params: {level1_lel: 25}\n  districts: {"510108": {level1_lel: 15}}\n')
    routing = write(tmp_path / "routing.yaml", (Path(__file__).parents[2] / "rules" / "routing.yaml")
                    .read_text(encoding="utf-8").replace("max_reminders: 10", "max_reminders: 5"))
    old = config(tmp_path, "old.yaml")
    folder = retire(tmp_path, OTHER)
    move(folder, "gas-510104-000011", "510104020001001")
    new = config(tmp_path, "new.yaml", params=str(params), routing=str(routing), registry=str(folder))
    assert main(["rules", "diff", str(old), str(new)]) == 0
    text = capsys.readouterr().out
    assert "gas.leak  yellow  default: value >= 20 → 25" in text
    assert "gas.leak  yellow  510108 成华区: value >= 20 → 15" in text
    assert "~ route gas-at-vulnerable-residents: max_reminders 10 → 5" in text
    assert "sensors retired (their open incidents resolve: 设备已注销) (1):" in text and OTHER in text
    assert "gas-510104-000011  grid 510104020001002 → 510104020001001" in text
    assert main(["rules", "diff", str(old), str(old)]) == 0
    assert "no change" in capsys.readouterr().out


def test_rules_diff_of_a_bad_set_says_where(tmp_path, capsys):
    params = write(tmp_path / "params.yaml", "gas:\n  params:\n    level_one_lel: 30\n")
    assert main(["rules", "diff", str(config(tmp_path, "old.yaml")),
                 str(config(tmp_path, "new.yaml", params=str(params)))]) == 1
    assert f"{params}:2: pack gas has no parameter level_one_lel" in capsys.readouterr().err


def test_diff_lists_added_removed_and_changed_rules(tmp_path):
    pack = """\
pack: hot
title: 测试
rules:
  - id: hot.a
    name: A
    type: threshold
    sensors: [gas_household]
    levels: [{severity: orange, when: "value >= 5"}]
    title: "{place}A"
    summary: "A"
  - id: hot.b
    name: B
    type: threshold
    sensors: [gas_household]
    levels: [{severity: orange, when: "value >= 5"}]
    title: "{place}B"
    summary: "B"
"""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a" / "hot.yaml", pack)
    write(tmp_path / "b" / "hot.yaml", pack.replace("hot.b", "hot.c").replace(
        "title: \"{place}A\"", "title: \"{place}甲\""))
    d = diff(city(config(tmp_path, "a.yaml", packs=f"[{tmp_path / 'a'}]")),
             city(config(tmp_path, "b.yaml", packs=f"[{tmp_path / 'b'}]")))
    assert [x.split()[0] for x in d.rules_added] == ["hot.c"]
    assert [x.split()[0] for x in d.rules_removed] == ["hot.b"]
    assert d.rules_changed == ["hot.a: title"]


# ---- the sets a state was judged by, kept beside it (pipeline/shared/kept_sets.py) ---------------------

def test_a_kept_set_loads_as_the_files_did_after_they_change_and_only_a_true_copy_is_kept(tmp_path):
    from pipeline.shared.kept_sets import KeptSets
    packs = tmp_path / "packs"
    packs.mkdir()
    write(packs / "hot.yaml", HOT)
    params = write(tmp_path / "params.yaml", "gas:\n  params: {level1_lel: 30}\n")
    folder = retire(tmp_path, OTHER)
    s = load_settings(config(tmp_path, "c.yaml", params=str(params), packs=f"[{packs}]",
                             registry=str(folder)))
    before = load_set(s)
    kept = KeptSets.beside(tmp_path / "state.sqlite")
    assert not kept.keep(s, "0" * 16)                # files that are not that set: no copy of it
    assert kept.keep(s, before.digest) and kept.has(before.digest)

    (packs / "hot.yaml").unlink()                    # every part of the set changes ...
    write(params, "gas:\n  params: {level1_lel: 40}\n")
    (folder / "sensors.csv").write_text("", encoding="utf-8")
    again = kept.load(before.digest)                 # ... the copy is the set as it was
    assert again.digest == before.digest and diff(before, again).empty()
    assert "hot.gas" in {r.spec.id for r in again.rules.rules}
    assert len(again.registry) == len(before.registry)
    kept.prune(set())
    assert not kept.has(before.digest)
