"""A new user's first hour, through the real `cityops` command (subprocesses): the console of
`cityops run --simulate`, a second instance, `cityops tail`, and every error a newcomer meets
as one line without a traceback."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import free_port, publish
from pipeline.shared.config import Settings, session_named
from pipeline.shared.console import pad, width
from tests.support import wait_until

CITYOPS = str(Path(sys.executable).parent / "cityops")   # the script `pip install` made
TIERS = ("街镇", "区级", "市级", "部门", "网格员")
HEADING = "── "


def cityops(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CITYOPS, *args], cwd=cwd, env=_env(env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    return {**env, **(extra or {})}


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; fails unless it is exactly that."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cityops: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


class Live:
    """`cityops run [--simulate]` in a folder of its own, on free ports."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.mqtt_port, self.http_port = free_port(), free_port()
        self.env = {"CITYOPS_EMBEDDED__PORT": str(self.mqtt_port),
                    "CITYOPS_HTTP__PORT": str(self.http_port)}
        self.out, self.err = cwd / "stdout.txt", cwd / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([CITYOPS, "run", *args], cwd=cwd, env=_env(self.env),
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.wait_for(lambda text: "cityops is running" in text, 60)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8")

    def wait_for(self, done, timeout: float) -> str:
        def seen() -> list[str]:
            text = self.stdout()
            if done(text):
                return [text]
            assert self.proc.poll() is None, f"exited {self.proc.returncode}\n{text}\n" \
                                             f"{self.err.read_text()}"
            return []
        return wait_until(seen, timeout, "seen on the console", interval=0.2,
                          detail=lambda: f"{self.stdout()}\n{self.err.read_text()}")[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        return self.proc.returncode


def notices_by_heading(text: str) -> list[tuple[str, str]]:
    """(the heading a line stands under, the line) for every notice and dead-letter line."""
    out, heading = [], ""
    for line in text.splitlines():
        if line.startswith(HEADING):
            heading = line[len(HEADING):].split(" ", 1)[0]
        elif line.startswith("   ") and heading:
            out.append((heading, line))
    return out


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One simulated city for the module (it takes ~30 s to tell its story)."""
    live = Live(tmp_path_factory.mktemp("city"), "--simulate")
    yield live
    assert live.stop() == 0, live.err.read_text()


# ---- the console (item 7) and a fresh story on every start (item 1) ----------------------------

def test_the_console_shows_every_tier_under_its_own_story_and_the_dead_letter(city: Live) -> None:
    text = city.wait_for(lambda t: "死信" in t, 90)
    lines = notices_by_heading(text)
    assert {tier for tier in TIERS if any(f" {tier} " in line for _, line in lines)} == set(TIERS)
    for heading, line in lines:
        if "燃气泄漏报警" in line:                       # the leak's notices, wherever they came
            assert heading in ("燃气泄漏", "同楼栋多户报警", "燃气处置"), (heading, line)
        if "暴雨" in line:
            assert heading == "暴雨", (heading, line)
    dead = [line for h, line in lines if "unknown_sensor" in line]
    assert dead and "gas-510104-999999" in dead[0]
    # the title column starts at one display column, Chinese names or not
    columns = {width(line[:line.index("【")]) for _, line in lines if "【" in line}
    assert len(columns) == 1, columns
    assert not any(line.startswith("{") for line in text.splitlines())   # no JSON logs here
    log = (city.cwd / ".run" / "cityops-state.log").read_text().splitlines()
    assert log and all(json.loads(entry)["level"] for entry in log)
    assert "a fresh simulated city" in text


def test_a_restart_tells_the_story_again_or_says_what_is_still_open(tmp_path: Path) -> None:
    first = Live(tmp_path, "--simulate")
    first.wait_for(lambda t: " 市级 " in t, 30)
    assert first.stop() == 0
    again = Live(tmp_path, "--simulate")           # fresh: every tier again, soon after the banner
    banner = time.monotonic()
    text = again.wait_for(lambda t: all(f" {tier} " in t for tier in TIERS), 30)
    assert time.monotonic() - banner < 10 and "a fresh simulated city" in text
    assert again.stop() == 0
    resumed = Live(tmp_path, "--simulate", "--resume")
    text = resumed.wait_for(lambda t: "story" in t, 5)
    assert re.search(r"resumed: \d+ incidents? still open from the last run", text), text
    assert resumed.stop() == 0


# ---- a second instance (item 4) ---------------------------------------------------------------

def test_a_second_instance_on_the_same_state_is_refused_naming_the_holder(city: Live) -> None:
    r = cityops("run", "--simulate", cwd=city.cwd, env=city.env)
    line = one_line_error(r)
    assert f"in use by another cityops (pid {city.proc.pid})" in line
    assert ".run/cityops-state.sqlite" in line


def test_a_busy_http_port_is_one_line(city: Live, tmp_path: Path) -> None:
    r = cityops("run", "--broker", city.url, cwd=tmp_path,
                env={"CITYOPS_HTTP__PORT": str(city.http_port), "CITYOPS_MQTT__PROTOCOL": "311"})
    assert f"cannot listen on 127.0.0.1:{city.http_port}" in one_line_error(r)


def test_mqtt5_against_the_embedded_broker_says_to_use_311(city: Live, tmp_path: Path) -> None:
    r = cityops("run", "--broker", city.url, cwd=tmp_path,
                env={"CITYOPS_HTTP__PORT": str(free_port())})
    assert "mqtt.protocol: 311" in one_line_error(r)


def test_the_default_client_id_comes_from_the_state_file(tmp_path: Path) -> None:
    a = session_named(Settings(state={"path": tmp_path / "a" / "state.sqlite"}))
    b = session_named(Settings(state={"path": tmp_path / "b" / "state.sqlite"}))
    assert a.mqtt.client_id != b.mqtt.client_id and a.mqtt.client_id.startswith("cityops-")
    assert session_named(Settings(state={"path": tmp_path / "a" / "state.sqlite"})) == a
    mine = Settings(mqtt={"client_id": "mine"}, state={"path": tmp_path / "a" / "state.sqlite"})
    assert session_named(mine).mqtt.client_id == "mine"


def test_a_bad_content_length_is_a_400_not_a_traceback(city: Live) -> None:
    log = city.cwd / ".run" / "cityops-state.log"
    before = city.err.read_text() + log.read_text()
    conn = http.client.HTTPConnection("127.0.0.1", city.http_port, timeout=10)
    conn.putrequest("POST", "/acks")
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 400 and r.read()         # uvicorn's h11 says the request is invalid
    conn.close()
    after = city.err.read_text() + log.read_text()
    assert after.count("Traceback") == before.count("Traceback"), after[len(before):]


# ---- cityops tail (item 3) --------------------------------------------------------------------

def test_tail_shows_the_dead_letters_of_the_running_city(city: Live, tmp_path: Path) -> None:
    """A gateway's bad payload, through the runtime, to tail's screen."""
    tail = subprocess.Popen([CITYOPS, "tail", "--broker", city.url, "--tier", "dead", "--count",
                             "1"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = _feed_until_done(tail, lambda: publish(
        city.url, "cityops/gateways/gw-510104-0001", b"{not json", protocol=311))
    assert tail.returncode == 0, err
    assert "死信" in out and "malformed" in out


def _feed_until_done(proc: subprocess.Popen[str], feed, timeout: float = 30) -> tuple[str, str]:
    """Call ``feed`` until ``proc`` (a `cityops tail --count`) has seen enough and exits:
    whatever is published before it has subscribed is not for it."""
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            feed()
            time.sleep(0.5)     # paces the publisher: each feed is a fresh chance once it subscribed
        return proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tail_against_mosquitto_filters_by_tier_and_street(mosquitto, tmp_path: Path) -> None:
    notice = {"tier": "street", "target": "510104020", "street": "510104020",
              "street_name": "春熙路街道", "district": "510104", "district_name": "锦江区",
              "state": "firing", "severity": "red", "ts": "2026-07-01T14:03:00+08:00",
              "title": "【红色预警】锦江区春熙路街道和平社区燃气泄漏报警"}
    other = {**notice, "street": "510108001", "street_name": "双桥子街道", "title": "other"}
    dist = {**notice, "tier": "district", "target": "510104", "title": "district copy"}
    tail = subprocess.Popen([CITYOPS, "tail", "--broker", mosquitto.url, "--prefix", "chengdu",
                             "--tier", "street", "--street", "春熙路街道", "--count", "1"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def feed() -> None:
        for n, topic in ((other, "street/510108001"), (dist, "district/510104"),
                         (notice, "street/510104020")):
            publish(mosquitto.url, f"chengdu/alerts/{topic}", json.dumps(n).encode())
    out, err = _feed_until_done(tail, feed)
    assert tail.returncode == 0, err
    assert out.splitlines() == [f"14:03:00  {pad('街镇', 6)} {pad('春熙路街道', 14)} "
                                f"{pad('firing', 12)} {pad('红', 2)}  {notice['title']}"]


def test_display_width_counts_chinese_as_two_columns() -> None:
    assert width("春熙路街道") == 10 and width("gas") == 3 and width("网格员 罗川") == 11
    assert pad("锦江区", 8) == "锦江区  " and width(pad("成华区万年场安置房项目", 12)) == 12


# ---- errors as one line (items 5 and 6) -------------------------------------------------------

UNCLOSED = """pack: mine
title: x
kinds: {}
rules:
  - id: mine.a
    type: threshold
    sensors: [gas_household]
    name: "unclosed
    levels:
      - value >= 20: blue
    title: t
"""
PARAMS = 'gas:\n  districts:\n    "510108": {level1_lel: 15}\n    "519999": {level1_lel: 15}\n'


@pytest.mark.parametrize("args, says", [
    (["run", "--broker", "127.0.0.1:1999"], "--broker: write the broker as mqtt://host:port"),
    (["run", "--broker", "mqtt://no-such-host.invalid:1883"], "cannot resolve the MQTT broker's host"),
    (["run", "--broker", "mqtt://127.0.0.1:{free}"], "nothing answers there"),
    (["tail", "--broker", "mqtt://127.0.0.1:{free}"], "no MQTT broker answered"),
    (["route", "--rule", "gas.leak", "--sensor", "gas-510104-000001", "--at", "23:3o"],
     "--at: '23:3o': write a local time as 2026-07-01T23:30, or 23:30 for today"),
    (["route", "--rule", "gas.leak", "--sensor", "wl-510104-000001"],
     "wl-510104-000001 is a waterlogging sensor; gas.leak watches gas_household"),
    (["rules", "check", "--packs", "unclosed.yaml"],
     "unclosed.yaml:8: YAML syntax: while scanning a quoted scalar"),
    (["rules", "check", "--params", "params.yaml"], "params.yaml:4: no district 519999"),
    (["replay", "data.csv"], "a CSV needs --csv-map MAP.yaml"),
    (["replay", "missing.jsonl"], "missing.jsonl: no such file"),
    (["replay", "readings.jsonl", "--ack-after", "soon"], "--ack-after"),
])
def test_errors_a_newcomer_meets_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    (tmp_path / "unclosed.yaml").write_text(UNCLOSED)
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "readings.jsonl").write_text("")
    free = str(free_port())
    r = cityops(*[a.replace("{free}", free) for a in args], cwd=tmp_path,
                env={"CITYOPS_HTTP__PORT": str(free_port()),
                     "CITYOPS_EMBEDDED__PORT": str(free_port())})
    assert says in one_line_error(r)


def test_route_says_how_many_reminders(tmp_path: Path) -> None:
    r = cityops("route", "--rule", "gas.leak", "--sensor", "gas-510104-000001", "--at",
                "2026-07-01T12:00", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reminders every 2m until acknowledged, 10 at most" in r.stdout
    assert "2026-07-01 12:00" in r.stdout
