"""Helpers the tests share (plain functions and classes, no fixtures: tests/conftest.py has those).

`cityops run` as a subprocess (``Runtime``, made by conftest's ``runtime`` fixture); readings,
notices and dead letters as the runtime takes and sends them; and the waits: ``wait_until``
polls a condition and fails saying what did not happen, ``settle``/``settle_count`` wait for a
quiet spell (so that a message that should NOT come has had its chance). The real servers the
tests talk to are in bench/harness/.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from bench.harness.brokers import Subscriber, free_port
from bench.harness.console_browser import users_file
from pipeline.models import AlertNotice, DeadLetter

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
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/acks", data=body,
                                     method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

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
