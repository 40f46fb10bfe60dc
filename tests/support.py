"""Helpers the tests share (plain functions and classes, no fixtures: tests/conftest.py has those).

`cityops run` as a subprocess (``Runtime``, made by conftest's ``runtime`` fixture); readings,
notices and dead letters as the runtime takes and sends them; and the waits: ``wait_until``
polls a condition and fails saying what did not happen, ``settle``/``settle_count`` wait for a
quiet spell (so that a message that should NOT come has had its chance). Then, by subject: the
console's city, HTTP, hot reload, Kafka workers, pushes, the production Mosquitto config,
history points, small registries. The real servers the tests talk to are in bench/harness/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from bench.harness.brokers import Mosquitto, MosquittoMissing, Subscriber, free_port, mosquitto_passwd, publish
from bench.harness.console_browser import users_file
from bench.harness.kafka_broker import CityopsProcess
from bench.harness.tsdb import Point
from connectors.kafka import topic_names
from pipeline.core.models import AlertNotice, DeadLetter
from pipeline.core.registry import Registry
from pipeline.runtimes.live import LiveRuntime
from pipeline.shared.config import HttpSettings, MqttSettings, PushSettings, Settings, StateSettings

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "pipeline" / "fixtures" / "chengdu"
TZ = ZoneInfo("Asia/Shanghai")
NOTICE_FILTERS = ("cityops/alerts/#", "cityops/push/#")
DEAD_TOPIC = "cityops/deadletter"
ACK_TOPIC = "cityops/acks"          # + /{user}: the sender
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
GAS_ALONE = "gas-510104-000001"     # lives alone; building 510104020001-b01, gw-510104-0001


DUTY_TOKENS = {"duty-510104": "jinjiang-duty-token-0123456789", "duty-510105": "qingyang-duty-token-0123"}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rt_users(tmp_path: Path, users: dict) -> Path:
    """An acks.users file (README: Who may acknowledge what)."""
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump({"users": users}))
    return path


START_TIMEOUT = 30.0          # process start until /healthz says 200
STOP_TIMEOUT = 15.0           # SIGTERM until exit


# ---- the runtime as a subprocess ---------------------------------------------------------------

class Runtime:
    """One `cityops run` (restartable: same state file, same client id, same HTTP port)."""

    def __init__(self, tmp_path: Path, url: str, name: str, args: list[str], env: dict[str, str],
                 module: str = "pipeline.cli"):
        self.module = module        # tests/poison_seam.py: the same CLI with a failing engine
        self.tmp = tmp_path
        self.url = url
        self.name = name
        self.state = tmp_path / f"{name}-state.sqlite"
        self.client_id = f"cityops-test-{name}-{uuid.uuid4().hex[:8]}"
        self.http_port = free_port()
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.err_path = self.out_path = tmp_path / "none"
        self.preexec: Callable[[], None] | None = None     # run in the child before cityops

    def start(self, timeout: float = START_TIMEOUT) -> Runtime:
        assert not self.running, "already running"
        self.starts += 1
        self.out_path = self.tmp / f"{self.name}-{self.starts}.stdout"
        self.err_path = self.tmp / f"{self.name}-{self.starts}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
        env.update({"PYTHONFAULTHANDLER": "1", "CITYOPS_HTTP__PORT": str(self.http_port),
                    "CITYOPS_MQTT__CLIENT_ID": self.client_id, **self.env})
        cmd = [sys.executable, "-m", self.module, "run", "--broker", self.url,
               "--state", str(self.state), *self.args]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err, \
                open(os.devnull, "rb") as devnull:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=devnull, stdout=out,
                                         stderr=err, preexec_fn=self.preexec)
        self.wait_healthy(timeout)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL (and a failure) if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._abort()
                raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM\n"
                                     + self.logs(80)) from None
        return self.proc.returncode

    def _abort(self) -> None:
        """A process that ignored SIGTERM: SIGABRT first, so that faulthandler (on through
        PYTHONFAULTHANDLER) writes every thread's stack to its stderr; then SIGKILL."""
        assert self.proc is not None
        try:   # Linux: is a SIGTERM still pending, blocked, caught? (per thread)
            task = Path(f"/proc/{self.proc.pid}/task")
            for tid in sorted(os.listdir(task)):
                status = (task / tid / "status").read_text().splitlines()
                print(f"{self.name} thread {tid}: " + " ".join(
                    line.replace("\t", "") for line in status
                    if line.split(":")[0] in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))
        except OSError:
            pass                    # no /proc details here: go on to the abort
        self.proc.send_signal(signal.SIGABRT)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> str | None:
        """The finalizer: stop whatever runs (SIGTERM; SIGABRT/SIGKILL if it will not), then
        drop the broker session it left behind. Returns what went wrong, if anything."""
        problem = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            t = time.monotonic()
            try:
                self.proc.wait(STOP_TIMEOUT)
                print(f"{self.name}: exited {self.proc.returncode} "
                      f"{time.monotonic() - t:.2f} s after SIGTERM")
                if self.proc.returncode != 0:
                    problem = f"{self.name} exited {self.proc.returncode} on SIGTERM"
            except subprocess.TimeoutExpired:
                print(f"{self.name}: STILL RUNNING {STOP_TIMEOUT} s after SIGTERM: SIGABRT")
                self._abort()
                problem = f"{self.name} did not exit within {STOP_TIMEOUT} s of SIGTERM"
        print(f"--- {self.name} ({self.client_id}) ---\n{self.logs(80)}")
        try:     # a clean start discards the persistent session (its queue would only grow)
            Subscriber(self.url, "cityops/test/purge", client_id=self.client_id).start(3).close()
        except Exception:
            pass  # the broker is gone already (its own finalizer stopped it)
        return problem and f"{problem}\n{self.logs(80)}"

    # -- HTTP ------------------------------------------------------------------------------------
    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def health(self) -> tuple[int, dict]:
        code, body = self._get("/healthz")
        return code, json.loads(body)

    def metrics(self) -> dict[str, float]:
        try:
            code, body = self._get("/metrics")
        except OSError as exc:      # includes http.client.RemoteDisconnected
            raise AssertionError(f"GET /metrics failed: {exc!r}\n{self.logs(60)}") from None
        assert code == 200, body
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def post_ack(self, body: bytes, token: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return post_json(f"http://127.0.0.1:{self.http_port}/acks", body, headers, timeout=5)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc and self.proc.returncode}) "
                                     f"before it was healthy\n{self.logs()}")
            try:
                last = self.health()
                if last[0] == 200:
                    return
            except (OSError, ValueError) as exc:       # not listening yet
                last = exc
            time.sleep(0.05)        # polls /healthz (a wait on it, with the last answer kept)
        raise AssertionError(f"{self.name}: /healthz not 200 within {timeout} s (last: {last})\n"
                             + self.logs())

    def stderr(self) -> str:
        """The JSON log of every start so far."""
        return "".join((self.tmp / f"{self.name}-{i}.stderr").read_text(errors="replace")
                       for i in range(1, self.starts + 1)
                       if (self.tmp / f"{self.name}-{i}.stderr").exists())

    def logs(self, lines: int = 30) -> str:
        parts = []
        for p in (self.out_path, self.err_path):
            try:
                text = p.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                text = ["(none)"]
            parts.append(f"[{p.name}]\n" + "\n".join(text))
        return "\n".join(parts)



# ---- readings, notices, dead letters -----------------------------------------------------------

def now_ms() -> int:
    return int(time.time() * 1000)


def reading(sensor_id: str, value: float | None = None, *, ts: int, event: str | None = None,
            battery: float | None = None) -> dict:
    r: dict[str, Any] = {"sensor_id": sensor_id, "ts": ts}
    if event is not None:
        r["event"] = event
    else:
        r["value"] = value
    if battery is not None:
        r["battery"] = battery
    return r


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def topic_for(n: dict) -> str:
    """README, Topics: where a notice for this tier and target belongs."""
    if n["tier"] == "city":
        return "cityops/alerts/city"
    if n["tier"] == "grid":
        return f"cityops/push/{n['target']}"
    return f"cityops/alerts/{n['tier']}/{n['target']}"


def notices(msgs: list[tuple[str, bytes]]) -> list[dict]:
    """The alert notices among ``msgs``, each validated against the public contract and checked
    to have come on its own tier topic."""
    out = []
    for topic, payload in msgs:
        if not topic.startswith(("cityops/alerts/", "cityops/push/")):
            continue
        AlertNotice.model_validate_json(payload)
        n = json.loads(payload)
        assert topic == topic_for(n), f"{n['tier']}/{n['target']} notice on {topic}"
        out.append(n)
    return out


def dead_letters(msgs: list[tuple[str, bytes]]) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(p) for t, p in msgs if t == DEAD_TOPIC]



# ---- waits -------------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               rt: Runtime | None = None, interval: float = 0.05,
               detail: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; fail after
    ``timeout`` seconds saying ``what`` did not happen, with ``rt``'s logs and ``detail()``
    (say, a process's log) if given. A predicate may assert, to fail at once (a process that
    exited will not get there)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n" + (rt.logs() if rt else "")
                                 + (detail() if detail else ""))
        time.sleep(interval)    # the poll interval


def settle_count(count: Callable[[], int], quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until ``count()`` has not moved for ``quiet`` seconds (at most ``timeout``): what
    should NOT come has had its chance."""
    deadline = time.monotonic() + timeout
    n = count()
    last_change = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)        # the quiet spell is the thing waited for: time must pass
        m = count()
        if m != n:
            n, last_change = m, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            break


def settle(sub: Subscriber, quiet: float = 0.6, timeout: float = 10.0) -> list[tuple[str, bytes]]:
    """Wait until nothing new has arrived for ``quiet`` seconds (so a message that should NOT
    come has had its chance); returns everything received."""
    settle_count(lambda: len(sub.messages), quiet, timeout)
    return sub.messages


# ---- time and shifts ---------------------------------------------------------------------------

def _shift_minutes(shift: str) -> tuple[int, int]:
    a, b = shift.split("-")
    return tuple(int(x[:2]) * 60 + int(x[3:]) for x in (a, b))  # type: ignore[return-value]


def on_shift(grid: str, at_ms: int, slack_ms: int = 3000) -> set[str]:
    """Worker ids of ``grid`` on shift at ``at_ms`` (Asia/Shanghai), read straight from the
    fixture's registry.yaml; both sides of a shift change within ``slack_ms``."""
    workers = yaml.safe_load((FIXTURE / "registry.yaml").read_text())["workers"]
    found = set()
    for t in (at_ms - slack_ms, at_ms, at_ms + slack_ms):
        local = datetime.fromtimestamp(t / 1000, TZ)
        minute = local.hour * 60 + local.minute
        for w in workers:
            if grid not in w["grids"]:
                continue
            start, end = _shift_minutes(w["shift"])
            if (start <= minute < end) if start < end else (minute >= start or minute < end):
                found.add(w["id"])
    return found


def iso_ms(ts: str) -> int:
    """Epoch ms of an ISO 8601 time with its offset (exact: no float on the way)."""
    return (datetime.fromisoformat(ts) - EPOCH) // timedelta(milliseconds=1)


# ---- the console's city (tests/test_console_*.py; conftest's console_city runs it) ---------------

CONSOLE_GAS = "gas-510104-000002"    # 春熙路街道 (510104020), grid 510104020001001, gw-510104-0001
CONSOLE_GAS_GRID = "510104020001001"
HOSTILE = '<img src=x id=pwned-address onerror="window.pwned=1">红星路<script>window.pwned=2</script>'
CONSOLE_ESCALATE_S = 12              # street -> district, district -> city (the test's routing)
CONSOLE_LATENESS_S = 1


def console_city_files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """The fixture registry with HTML in CONSOLE_GAS's address, the users, a routing with short
    deadlines, and a config: (registry, users, routing, config)."""
    registry = tmp_path / "registry"
    shutil.copytree(FIXTURE, registry)
    rows = list(csv.DictReader((registry / "sensors.csv").open(encoding="utf-8")))
    for r in rows:
        if r["sensor_id"] == CONSOLE_GAS:
            r["address"] = HOSTILE
    with (registry / "sensors.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    roster = yaml.safe_load((FIXTURE / "registry.yaml").read_text())["workers"]
    users = users_file(tmp_path / "users.yaml", {
        "chunxi": {"scope": "street", "code": "510104020"},
        "neighbour": {"scope": "street", "code": "510104021"},
        "jinjiang": {"scope": "district", "code": "510104"},
        "city-duty": {"scope": "city"},
        **{w["id"]: {} for w in roster if CONSOLE_GAS_GRID in w["grids"] or w["id"].endswith("-duty")}})
    routing = yaml.safe_load((ROOT / "rules" / "routing.yaml").read_text())
    routing.update(escalate_after={"street": f"{CONSOLE_ESCALATE_S}s", "district": f"{CONSOLE_ESCALATE_S}s"},
                   remind_every="1h")
    (tmp_path / "routing.yaml").write_text(yaml.safe_dump(routing, allow_unicode=True))
    config = tmp_path / "cityops.yaml"
    config.write_text(f"engine:\n  allowed_lateness: {CONSOLE_LATENESS_S * 1000}ms\n"
                      f"acks:\n  users: {users}\n")
    return registry, users, tmp_path / "routing.yaml", config


# ---- HTTP ----------------------------------------------------------------------------------------

def post_json(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, dict]:
    """POST ``body``; the status and the JSON answer (of an error status too)."""
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http(url: str, data: bytes | None = None) -> tuple[int, Message, str]:
    """Status, headers (names in any case, as HTTP has them) and body."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


# ---- hot reload (tests/test_reload*.py) ----------------------------------------------------------

NEIGHBOURS = [f"gas-510104-{i:06d}" for i in (2, 3, 4)]     # same street as GAS_ALONE
CITY_DUTY, CITY_TOKEN = "city-duty", "city-duty-token-for-the-reload-tests"
HOT = """\
pack: hot
title: 测试
rules:
  - id: hot.gas
    name: 燃气高读数
    type: threshold
    sensors: [gas_household]
    levels: [{severity: orange, when: "value >= 5"}]
    title: "{place}燃气读数高"
    summary: "{address}读数{value}{unit}"
"""


def params(path: Path, level1: float, key: str = "level1_lel") -> Path:
    path.write_text(f"gas:\n  params:\n    {key}: {level1}\n", encoding="utf-8")
    return path


def retire(tmp_path: Path, sensor: str) -> Path:
    folder = tmp_path / "registry"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("uci_*"))
    csv = folder / "sensors.csv"
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    csv.write_text("".join(x for x in lines if not x.startswith(sensor + ",")), encoding="utf-8")
    return folder


def send(url: str, sid: str, value: float) -> None:
    publish(url, f"cityops/readings/{sid}", dumps(reading(sid, value, ts=now_ms())))


def firing_of(sub: Subscriber, sid: str, n: int = 1) -> list[dict]:
    """Wait for ``n`` firing street notices of sensor ``sid``'s gas.leak."""
    def got() -> list[dict]:
        return [x for x in notices(sub.messages) if x["sensor_id"] == sid and x["rule_id"] ==
                "gas.leak" and x["state"] == "firing" and x["tier"] == "street"]
    wait_until(lambda: len(got()) >= n, 15, f"{n} firing notice(s) of {sid}")
    return got()


def reloads(rt: Runtime, result: str) -> float:
    return rt.metrics().get(f'cityops_reloads_total{{result="{result}"}}', 0)


def post_reload(rt: Runtime | Any, token: str | None) -> tuple[int, dict]:
    """POST /reload to a `cityops run` or `cityops worker` (anything with an http_port)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return post_json(f"http://127.0.0.1:{rt.http_port}/reload", b"", headers, timeout=60)


# ---- Kafka: `cityops worker` processes on tansu (tests/test_*_kafka.py) --------------------------

T = topic_names("cityops")
OUT_TOPICS = [T["alerts.city"], T["alerts.district"], T["alerts.street"], T["alerts.dept"], T["push"]]
PARTITIONS = 4                  # of every topic the tests' workers make


def worker(kafka, tmp_path: Path, name: str = "worker", module: str = "pipeline.cli",
           **env: str) -> CityopsProcess:
    base = {"CITYOPS_KAFKA__BOOTSTRAP": kafka.bootstrap, "CITYOPS_KAFKA__PARTITIONS": str(PARTITIONS),
            "CITYOPS_KAFKA__REPLICATION": "1", "CITYOPS_WORKER__CHECKPOINT_EVERY": "2s",
            # the replay it is compared with waits 60 s for stragglers: the same here
            "CITYOPS_ENGINE__ALLOWED_LATENESS": "60s"}
    base.update(env)
    return CityopsProcess("worker", tmp_path, base, name, module).start()


# ---- pushes: `cityops run` on a thread or as a process (tests/test_push_*.py) --------------------

PUSH_SECRET = "ack-secret-for-the-e2e-tests-0123456789"


def of(msgs: list[tuple[str, bytes]], topic_part: str) -> list[dict]:
    return [json.loads(p) for t, p in msgs if topic_part in t]


class Running:
    """LiveRuntime on its own thread, as `cityops run` runs it."""

    def __init__(self, broker: Mosquitto, tmp: Path, **push: object) -> None:
        """``push``: more push settings (channels, tiers)."""
        self.broker = broker
        self.port = free_port()
        self.client_id = f"cityops-push-{uuid.uuid4().hex[:8]}"
        self.settings = Settings(
            mqtt=MqttSettings(url=broker.url, client_id=self.client_id),
            http=HttpSettings(port=self.port), state=StateSettings(path=tmp / "state.sqlite"),
            push=PushSettings(enabled=True, secret=PUSH_SECRET, backoff="20ms", backoff_cap="100ms",
                              **push))
        self.rt = LiveRuntime(self.settings)
        self.rt.start()
        self.thread = threading.Thread(target=self.rt.run, name="runtime", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics(self) -> str:
        return http(self.url("/metrics"))[2]

    def close(self) -> None:
        self.rt.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the runtime did not stop"
        Subscriber(self.broker.url, "cityops/test/purge", client_id=self.client_id).start(3).close()


def start_run(tmp: Path, broker: Mosquitto, env: dict[str, str], n: int) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CITYOPS_")}
    full.update(env)
    with open(tmp / f"run-{n}.stderr", "wb") as err:      # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--broker",
                                 broker.url, "--state", str(tmp / "state.sqlite")], cwd=ROOT,
                                env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)

    def healthy() -> bool:
        assert proc.poll() is None, (tmp / f"run-{n}.stderr").read_text()
        try:
            return http(f"http://127.0.0.1:{env['CITYOPS_HTTP__PORT']}/healthz")[0] == 200
        except OSError:
            return False              # not listening yet
    wait_until(healthy, 30, "cityops run healthy")
    return proc


def stop_run(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(20)


# ---- the production Mosquitto config (deploy/mosquitto) ------------------------------------------

DEPLOY = ROOT / "deploy" / "mosquitto"
NOT_AUTHORIZED = 135          # MQTT 5 reason codes


def production_config(tmp: Path) -> str:
    """deploy/mosquitto/mosquitto.conf with the password and ACL files in ``tmp``."""
    text = (DEPLOY / "mosquitto.conf").read_text()
    text, n1 = re.subn(r"(?m)^password_file .*$", f"password_file {tmp / 'passwd'}", text)
    text, n2 = re.subn(r"(?m)^acl_file .*$", f"acl_file {tmp / 'acl'}", text)
    assert n1 == n2 == 1, "mosquitto.conf should set password_file and acl_file once each"
    return text


def deploy_broker(tmp: Path, passwords: dict[str, str], acl: str) -> Mosquitto:
    """Mosquitto with the production config, these accounts (mosquitto_passwd) and this ACL."""
    (tmp / "acl").write_text(acl)
    try:
        for user, password in passwords.items():
            mosquitto_passwd(tmp / "passwd", user, password)
        return Mosquitto(tmp / "broker", config=production_config(tmp)).start()
    except MosquittoMissing as e:       # never a skip: `make test` installs it
        pytest.fail(str(e), pytrace=False)


# ---- history points (VictoriaMetrics) ------------------------------------------------------------

def reading_point(reg: Registry, sensor: str, ts: int, value: float | None) -> Point:
    """What a reading must look like in VictoriaMetrics: ``{kind}_value`` (or ``_event``, 1),
    the place's codes and the sensor as labels."""
    idx = reg.index[sensor]
    p = reg.place_of(idx)
    kind = reg.kinds[reg.kind_of[idx]]
    labels = (("community", p.community), ("district", p.district), ("grid", p.grid),
              ("sensor", sensor), ("street", p.street))
    if value is None:
        return f"{kind}_event", labels, ts, 1.0
    return f"{kind}_value", labels, ts, value


# ---- small registries and rule files written for a test -----------------------------------------

SMALL_REGISTRY = ROOT / "tests" / "data" / "small_registry"       # two streets, five workers
REGISTRY_YAML = (SMALL_REGISTRY / "registry.yaml").read_text(encoding="utf-8")
SENSORS_CSV = (SMALL_REGISTRY / "sensors.csv").read_text(encoding="utf-8")


def write_registry(folder: Path, yaml_text: str = REGISTRY_YAML, csv_text: str = SENSORS_CSV) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "registry.yaml").write_text(yaml_text, encoding="utf-8")
    (folder / "sensors.csv").write_text(csv_text, encoding="utf-8")
    return folder / "registry.yaml"


def line_of(text: str, marker: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing ``marker`` (-1: the last)."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if marker in line]
    assert len(hits) >= abs(occurrence), f"{marker!r} not in the test text"
    return hits[occurrence - 1] if occurrence > 0 else hits[occurrence]
