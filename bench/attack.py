"""Attack suite: hostile input, crashes and abuse against `cityops run` on a real Mosquitto.

    .venv/bin/python bench/attack.py          # make attack: about 2 minutes, localhost only

One broker (deploy/mosquitto's tuning, anonymous, a free port of 127.0.0.1) and one
`python -m pipeline.cli run` (the gas pack's clear_for cut to 5 s, allowed_lateness 1 s, tick
200 ms, so that outages longer than clear_for take seconds). Every scenario is bounded in count
and time, and each also sends real gas alarms; an in-process engine fed the same payloads and
acks with the same clock is the replay the runtime's notices are compared with (firing and
resolved notices: alert_id, state, seq, tier, target). Scenarios:

  fuzz          malformed, invalid, oversize, non-UTF-8, deeply nested, out-of-range payloads
  poison-array  gateway arrays of `1`s of growing size (1 KB to 64 KB): RSS before and after
  kill-9-outage leaks dip under the clear level, kill -9, the gas comes back while it is down
                behind a backlog, the outage outlasts clear_for, restart: nothing resolves
  broker-kill   kill -9 of Mosquitto, restart on the same port; alarms that were in flight are
                resent after it, behind newer readings: late, and they fire
  forged-acks   acks under other identities and tiers, for unknown alerts, stamped 1e17/1e20,
                not JSON, each on its login's own topic (cityops/acks/{user}): refused as
                `forbidden` or `bad_ack`, the same as the replay refuses them
  idle-http     1,100 idle TCP connections to the HTTP port: does /healthz still answer?

It prints one row per scenario: inputs tried, dead letters (the runtime's and the replay's),
notices compared with replay, crashes (an exit nobody asked for: must be 0), RSS before/after.
JSON in bench/out/attack.json. Exit status 1 if the runtime crashed or a notice differed.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_bench import ROOT, Runtime, _client, bench_config  # noqa: E402

from bench.harness.brokers import Mosquitto  # noqa: E402
from pipeline.core.engine import Engine, EngineSettings  # noqa: E402
from pipeline.core.identity import AckUsers  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

GAS = [f"gas-510104-{i:06d}" for i in range(1, 6)] + [f"gas-510105-{i:06d}" for i in range(1, 6)]
DEAD, ACKS = "cityops/deadletter", "cityops/acks"
COMPARED = ("firing", "resolved")


def now_ms() -> int:
    return int(time.time() * 1000)


def reading(sensor: str, value: float, ts: int) -> bytes:
    return json.dumps({"sensor_id": sensor, "ts": ts, "value": value}).encode()


class Wire:
    """One MQTT client: publishes (QoS 1, each confirmed) and keeps what the runtime sends.

    A broker killed with -9 comes back with what its last autosave (60 s) wrote, and
    redelivers to this persistent session what it had delivered since (at least once): a dead
    letter byte-identical to one of an earlier scenario is counted as such a redelivery, not as
    a dead letter of this one."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.notices: list[dict] = []
        self.dead: list[dict] = []
        self._bodies: list[bytes] = []      # this scenario's dead letters
        self._earlier: set[bytes] = set()   # ... and the earlier scenarios'
        self.redelivered = 0
        self.lock = threading.Lock()
        self.sub = _client("attack-sub")
        self.sub.on_message = self._on_message
        self.sub.on_connect = lambda c, *_: c.subscribe(
            [("cityops/alerts/#", 1), ("cityops/push/#", 1), (DEAD, 1)])
        self.sub.connect(host, int(port))
        self.sub.loop_start()
        self.pub = _client("attack-pub")
        self.pub.connect(host, int(port))
        self.pub.loop_start()
        time.sleep(0.5)

    def _on_message(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            if msg.topic != DEAD:
                self.notices.append(body)
            elif msg.payload in self._earlier:
                self.redelivered += 1
            else:
                self._bodies.append(bytes(msg.payload))
                self.dead.append(body)

    def next_scenario(self) -> None:
        with self.lock:
            self._earlier.update(self._bodies)
            self._bodies.clear()

    def send(self, messages: list[tuple[str, bytes]]) -> None:
        infos = [self.pub.publish(t, p, qos=1) for t, p in messages]
        deadline = time.monotonic() + 60
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not all(info.is_published() for info in infos):
            raise TimeoutError("the broker did not take every message in 60 s")

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.notices), len(self.dead)

    def close(self) -> None:
        for c in (self.sub, self.pub):
            c.loop_stop()
            c.disconnect()


@dataclass
class Row:
    scenario: str
    inputs: int = 0
    dead: int = 0
    dead_replay: int = 0
    missing: int = 0
    extra: int = 0
    crashes: int = 0
    rss_before: float = 0.0
    rss_after: float = 0.0
    note: str = ""
    notices: int = 0
    details: dict = field(default_factory=dict)


class Attack:
    def __init__(self, workdir: Path, quick: bool = False) -> None:
        self.workdir = workdir
        self.quick = quick
        packs = workdir / "packs"
        packs.mkdir()
        gas = (ROOT / "rules" / "packs" / "gas.yaml").read_text()
        (packs / "gas.yaml").write_text(gas.replace("clear_for: 2m", "clear_for: 5s"))
        self.broker = Mosquitto(workdir / "broker", config=bench_config()).start()
        self.rt = Runtime(self.broker.url, workdir, "attack", {
            "CITYOPS_PACKS": json.dumps([str(packs)]), "CITYOPS_TICK": "200ms",
            "CITYOPS_ENGINE__ALLOWED_LATENESS": "1s",
            **({"CITYOPS_STATE__SNAPSHOT_EVERY": "2s"} if quick else {})}).start()
        rules = load_rules([packs])
        self.replay = Engine(load_registry(None, rules.kinds), rules,
                             EngineSettings(allowed_lateness="1s"))
        self.replay.clock_bound = True
        self.users = AckUsers(self.replay.registry)      # roster workers, as the runtime's
        self.replay_notices: list[dict] = []
        self.replay_dead = 0
        self.wire = Wire(self.broker.url)
        self.expected_exits = 0
        self.rows: list[Row] = []
        self.rnd = random.Random(12)
        self.array_kb = (1, 4, 16, 32, 64)

    # ---- helpers ---------------------------------------------------------------------------
    def rss(self) -> float:
        pid = self.rt.proc.pid if self.rt.proc else None
        if pid is None:
            return float("nan")
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def crashed(self) -> int:
        return int(self.rt.proc is None or self.rt.proc.poll() is not None)

    def readings(self, messages: list[tuple[str, bytes]]) -> None:
        """To the runtime, and the same to the replay engine with the clock of sending."""
        self.wire.send(messages)
        now = now_ms()
        for topic, payload in messages:
            out = self.replay.ingest([payload], source=[topic], now_ms=now,
                                     senders=[_sender(topic)])
            self._replayed(out)

    def acks(self, sent: list[tuple[str, bytes]]) -> None:
        """Acks as (login, payload), each on that login's topic; the replay makes them the
        runtime's way: the sender's identity, then its scope (pipeline/core/identity.py)."""
        self.wire.send([(f"{ACKS}/{user}", p) for user, p in sent])
        made = []
        for user, p in sent:
            got = self.users.from_topic(user, p, f"{ACKS}/{user}")
            if isinstance(got, bytes):
                made.append(got)
            else:
                self.replay_dead += 1
        self._replayed(self.replay.ack(made, now_ms=now_ms(), may_ack=self.users.may_ack))

    def _replayed(self, out) -> None:
        self.replay_notices += out.notices
        self.replay_dead += len(out.dead_letters)

    def settle(self, quiet: float = 1.5, timeout: float = 120.0, dead: int = 0) -> None:
        """Until at least ``dead`` dead letters are in, the runtime's inbox is empty and nothing
        new came for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline and not self.crashed():
            counts = self.wire.counts()
            if counts[1] < dead:
                time.sleep(0.2)
                continue
            try:
                inbox = self.rt.metrics().get("cityops_inbox_depth", 0)
            except OSError:
                inbox = 1
            if counts != last or inbox:
                last, since = counts, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def scenario(self, name: str, run) -> Row:
        row = Row(name, rss_before=self.rss())
        self.wire.next_scenario()
        again = self.wire.redelivered
        n0, d0 = self.wire.counts()
        r0, rd0 = len(self.replay_notices), self.replay_dead
        t = time.monotonic()
        try:
            run(row)
            self.settle(dead=d0 + self.replay_dead - rd0)
        except Exception as exc:             # a bench failure, not the runtime's: say so
            row.note = f"bench error: {type(exc).__name__}: {exc}"[:120]
        row.crashes += self.crashed()
        if row.crashes and self.rt.proc is not None and self.rt.proc.poll() is not None:
            self.rt.proc = None
            self.rt.start()                  # so that the next scenario has a runtime
        row.rss_after = self.rss()
        with self.wire.lock:
            got, dead = self.wire.notices[n0:], len(self.wire.dead) - d0
        want = self.replay_notices[r0:]
        row.dead, row.dead_replay, row.notices = dead + row.dead, self.replay_dead - rd0, len(got)
        keys = {_key(n) for n in got if n["state"] in COMPARED}
        expected = {_key(n) for n in want if n["state"] in COMPARED}
        row.missing, row.extra = len(expected - keys), len(keys - expected)
        if self.wire.redelivered > again:
            row.note += (f"; {self.wire.redelivered - again} earlier dead letters redelivered by "
                         "the broker restored from its autosave")
        row.details["seconds"] = round(time.monotonic() - t, 1)
        self.rows.append(row)
        print(_line(row), flush=True)
        return row

    # ---- scenarios ---------------------------------------------------------------------------
    def fuzz(self, row: Row) -> None:
        n = 100 if self.quick else 1500
        rnd, ts = self.rnd, now_ms()
        msgs: list[tuple[str, bytes]] = []
        good = json.dumps({"sensor_id": GAS[1], "ts": ts, "value": 1.0}).encode()
        makers = [
            lambda: good[: rnd.randrange(1, len(good))],                           # truncated
            lambda: bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 64))),  # noise
            lambda: b"[" * 20_000 + b"]" * 20_000,                                 # nesting
            lambda: b'{"sensor_id": "gas-510104-000002", "ts": %d, "value": "%s"}' % (
                ts, rnd.choice([b"NaN", b"high", b"1e999"])),
            lambda: b'{"sensor_id": "gas-510104-000002", "ts": %s, "value": 1}' % rnd.choice(
                [b"1e20", b"-5", b"1e17", b'"yesterday"', b"null", str(ts + 86_400_000).encode()]),
            lambda: json.dumps({"sensor_id": f"gas-999999-{rnd.randrange(10**6):06d}",
                                "ts": ts, "value": 1}).encode(),                  # unknown
            lambda: json.dumps({"sensor_id": GAS[2], "ts": ts, "value": 1,
                                "event": "opened"}).encode(),                     # both
            lambda: json.dumps([{"sensor_id": GAS[3], "ts": ts, "value": 1}, 7, "x",
                                {"sensor_id": GAS[4]}]).encode(),                 # mixed array
            # oversize for the pipeline (256 KiB), under deploy/mosquitto's max_packet_size
            lambda: good + b" " * (262_144 + 100 - len(good)),
            lambda: "{\"sensor_id\": \"燃气\udcff\"}".encode("utf-8", "surrogatepass"),  # bad UTF-8
        ]
        for _ in range(n):
            msgs.append((f"cityops/readings/{GAS[1]}", rnd.choice(makers)()))
        self.readings(msgs[: n // 2])
        self.readings([(f"cityops/readings/{s}", reading(s, 55.0, ts + 1)) for s in GAS[5:]])
        self.readings(msgs[n // 2:])
        row.inputs = n + 5

    def poison_arrays(self, row: Row) -> None:
        sizes = {}
        for kb in self.array_kb:
            before = self.rss()
            ones = b"[" + b",".join([b"1"] * (kb * 512)) + b"]"
            d0 = self.wire.counts()[1]
            self.readings([("cityops/gateways/gw-510104-0001", ones)])
            self.settle(dead=d0 + kb * 512, timeout=60 + kb * 2)
            sizes[f"{kb} KB"] = {"elements": kb * 512, "dead": self.wire.counts()[1] - d0,
                                 "rss_mb": [round(before, 1), round(self.rss(), 1)]}
            row.inputs += kb * 512
        row.details["arrays"] = sizes
        row.note = "; ".join(f"{k}: RSS {v['rss_mb'][0]:.0f}->{v['rss_mb'][1]:.0f} MB"
                             for k, v in sizes.items())

    def kill_during_outage(self, row: Row) -> None:
        # after a snapshot, so that the replay after the kill is only this scenario's journal
        deadline = time.monotonic() + 60
        while self.rt.metrics().get("cityops_journal_entries", 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        ts = now_ms()
        leaks = GAS[:5]
        self.readings([(f"cityops/readings/{s}", reading(s, 55.0, ts)) for s in leaks])
        self.settle(quiet=0.5)
        self.readings([(f"cityops/readings/{s}", reading(s, 5.0, ts + 100)) for s in leaks])
        self.settle(quiet=0.3)
        self.rt.proc.kill()                  # kill -9, while the leaks wait out clear_for
        self.rt.proc.wait()
        self.rt.proc = None
        filler = "gas-510104-000006"
        self.readings([(f"cityops/readings/{filler}", reading(filler, 1.0, ts + 200 + i))
                       for i in range(2000)]
                      + [(f"cityops/readings/{s}", reading(s, 55.0, ts + 1500)) for s in leaks])
        while now_ms() < ts + 100 + 5000 + 2000:      # the outage outlasts clear_for
            time.sleep(0.1)
        self.rt.start()
        row.inputs = 2000 + 15
        row.note = "kill -9 after the dip; 2,000-message backlog; outage 7 s > clear_for 5 s"

    def broker_kill(self, row: Row) -> None:
        ts = now_ms()
        sensors = ["gas-510105-000006", "gas-510105-000007"]
        # the gateways' newer, normal readings got through; their alarms were in flight when
        # the broker died and are resent after it is back: late (within allowed_lateness, 1 s
        # here), not stale, and they fire
        taken = self.rt.metrics().get("cityops_payloads_total", 0)
        self.readings([(f"cityops/readings/{s}", reading(s, 1.0, ts + 800)) for s in sensors])
        deadline = time.monotonic() + 10
        while self.rt.metrics().get("cityops_payloads_total", 0) < taken + len(sensors) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        self.broker.kill()
        time.sleep(1.0)
        self.broker.start()
        deadline = time.monotonic() + 30     # the runtime and our clients reconnect (1-10 s)
        while time.monotonic() < deadline:
            if self.rt.metrics().get("cityops_broker_connected") == 1 and self.wire.sub.is_connected() \
                    and self.wire.pub.is_connected():
                break
            time.sleep(0.2)
        time.sleep(1.0)                      # our subscriber's SUBACK
        self.readings([(f"cityops/readings/{s}", reading(s, 55.0, ts)) for s in sensors])
        row.inputs = 2 * len(sensors)
        row.note = "kill -9 of Mosquitto, restarted; alarms resent behind newer readings fire"

    def forged_acks(self, row: Row) -> None:
        open_ids = sorted({n["alert_id"] for n in self.replay_notices if n["state"] == "firing"})
        ts = now_ms()
        sent = []
        for i, alert in enumerate(open_ids[:10]):
            # a 金牛区 worker, a login nobody knows, a 锦江区 worker claiming another's name
            who, claim = [("w-510106020001-01", {}), ("mallory", {}),
                          ("w-510104020001-02", {"by": "w-510104020001-01"})][i % 3]
            sent.append((who, json.dumps({"alert_id": alert, "ts": ts, **claim}).encode()))
        worker = "w-510104020001-01"
        sent += [(worker, json.dumps({"alert_id": "no-such-alert", "ts": ts}).encode()),
                 (worker, b'{"alert_id": "%s", "ts": 1e17}' % (
                     open_ids[0].encode() if open_ids else b"a")),
                 (worker, b'{"alert_id": "a", "ts": 1e20}'),
                 (worker, b"acknowledged!"), (worker, b'{"alert_id": "a"}')]
        self.acks(sent)
        row.inputs = len(sent)
        row.note = (f"{min(10, len(open_ids))} acks out of scope, by unknown logins or in "
                    "another's name; 5 malformed")

    def idle_http(self, row: Row) -> None:
        n = 50 if self.quick else 1100
        socks = []
        port = self.rt.port
        try:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                socks.append(s)
        except OSError as exc:
            row.note = f"connection {len(socks) + 1} refused ({exc.__class__.__name__}); "
        t = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                answered = f"/healthz {r.status} in {time.monotonic() - t:.2f} s"
        except OSError as exc:
            answered = f"/healthz did not answer in 5 s ({exc.__class__.__name__})"
        for s in socks:
            s.close()
        t = time.monotonic()                 # and once they are gone: how soon is it back?
        back = None
        while back is None and time.monotonic() - t < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    back = time.monotonic() - t
            except OSError:
                time.sleep(0.5)
        after = f"/metrics again {back:.1f} s after they closed" if back is not None else \
            "/metrics not back within 120 s after they closed"
        row.inputs = len(socks)
        row.note += f"{len(socks)} idle connections: {answered}; {after}"
        row.details["healthz"] = answered
        row.details["after"] = after

    def close(self) -> None:
        self.wire.close()
        self.rt.stop()
        self.broker.stop()


def _sender(topic: str):
    head, _, name = topic.rpartition("/")
    return {"cityops/gateways": ("gateway", name), "cityops/readings": ("sensor", name)}.get(head)


def _key(n: dict) -> tuple:
    return n["alert_id"], n["state"], n["seq"], n["tier"], n["target"]


HEADER = (f"{'scenario':14}{'inputs':>8}{'dead letters':>14}{'(replay)':>9}{'notices':>8}"
          f"{'vs replay':>12}{'crashes':>8}{'RSS MB before/after':>21}  note")


def _line(r: Row) -> str:
    cmp = "same" if not (r.missing or r.extra) else f"-{r.missing}/+{r.extra}"
    return (f"{r.scenario:14}{r.inputs:>8,}{r.dead:>14,}{r.dead_replay:>9,}{r.notices:>8}"
            f"{cmp:>12}{r.crashes:>8}{r.rss_before:>11.0f} / {r.rss_after:<7.0f}  {r.note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "attack.json")
    # each bad element is a dead letter of its own, published at the broker's pace (~1,000/s
    # here): up to 64 KB (32,768 elements) keeps the suite to minutes; 255 is the largest
    # array under the payload limit
    ap.add_argument("--array-kb", default="1,4,16,32,64",
                    help="sizes of the poison arrays, KB, comma-separated")
    ap.add_argument("--quick", action="store_true", help="a smoke run (about a minute): few "
                    "inputs, one 1 KB array, 50 idle connections, snapshots every 2 s")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cityops-attack-") as tmp:
        attack = Attack(Path(tmp), quick=args.quick)
        attack.array_kb = (1,) if args.quick else tuple(int(k) for k in args.array_kb.split(","))
        print(HEADER, flush=True)
        try:
            attack.scenario("fuzz", attack.fuzz)
            attack.scenario("poison-array", attack.poison_arrays)
            attack.scenario("kill-9-outage", attack.kill_during_outage)
            attack.scenario("broker-kill", attack.broker_kill)
            attack.scenario("forged-acks", attack.forged_acks)
            attack.scenario("idle-http", attack.idle_http)
        finally:
            attack.close()
    rows = attack.rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    crashes = sum(r.crashes for r in rows)
    differ = sum(r.missing + r.extra for r in rows)
    print(f"\n{sum(r.inputs for r in rows):,} inputs, {sum(r.dead for r in rows):,} dead letters, "
          f"{crashes} crashes, {differ} notices differing from replay (JSON: "
          f"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out})")
    return 1 if crashes or differ else 0


if __name__ == "__main__":
    sys.exit(main())
