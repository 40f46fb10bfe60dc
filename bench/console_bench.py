"""The operations-centre console (`cityops console`) under load, in a real browser.

    .venv/bin/python bench/console_bench.py            # 10,000 open incidents, 200 notices/s for 60 s
    .venv/bin/python bench/console_bench.py --quick    # a smoke test (1,000 incidents, 10 s)

A real Mosquitto (bench/harness/brokers.py, a free port of 127.0.0.1), `cityops console` as a
subprocess, Debian's Chromium driven by Playwright. Inputs: notices as the pipeline writes them
(pipeline.core.models.AlertNotice), for incidents spread over every grid of the fixture registry.

  (1) load: --incidents open incidents published on their street topics; the console's view
      holds them all before anything is measured.
  (2) first render of a street page (the busiest street, 100 rows shown of its incidents, with
      its counts and filters): a fresh login each time, navigation start → load event, from
      the browser's Navigation Timing; --renders samples.
  (3) notice → screen: the street page open (its event stream live); --rate notices/s for
      --seconds over the whole city (new incidents and state changes), one in ten a new
      incident of that street; a MutationObserver in the page stamps when each new row shows,
      compared with the time it was published (one clock: the same machine).
  (4) the console's CPU over (3), from /proc/<pid>/stat: CPU seconds per second, and per
      1,000 notices/s; then the same load for half as long with no page open (what taking
      the notices in costs) and with the city's big screen open (all 10,000 incidents: its
      figures and map re-rendered at every change).

Writes bench/out/console.json (--quick: console-quick.json) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from bench.harness.brokers import Mosquitto, host_port, publish_many  # noqa: E402
from bench.harness.console_browser import CHROMIUM, CHROMIUM_ARGS, Console, login, users_file  # noqa: E402
from pipeline.core.registry import load as load_registry  # noqa: E402
from rules.compiler import load_rules  # noqa: E402

SEVERITIES = ("blue", "yellow", "orange", "red")
LEVELS = {"blue": "IV", "yellow": "III", "orange": "II", "red": "I"}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


class Notices:
    """Notices for made-up incidents at the registry's places (the fields the pipeline sets)."""

    def __init__(self, seed: int = 1) -> None:
        self.reg = load_registry(None, load_rules().kinds)
        self.rng = random.Random(seed)
        self.n = 0

    def make(self, place, *, seq: int = 1, state: str = "firing", alert_id: str | None = None,
             severity: str | None = None) -> dict:
        self.n += 1
        now = int(time.time() * 1000)
        sev = severity or self.rng.choice(SEVERITIES)
        return {"alert_id": alert_id or f"bench{self.n:011d}", "seq": seq, "rule_id": "gas.leak",
                "sensor_id": f"gas-{place.district}-{self.n:06d}", "kind": "gas_household",
                "category": "gas", "severity": sev, "level": LEVELS[sev], "fiware_severity": "high",
                "state": state, "tier": "street", "target": place.street,
                "district": place.district, "district_name": place.district_name,
                "street": place.street, "street_name": place.street_name,
                "community": place.community, "community_name": place.community_name,
                "grid": place.grid, "grid_name": place.grid_name, "address": f"测试地址{self.n}号",
                "lat": 30.6 + self.rng.random() * 0.1, "lon": 104.0 + self.rng.random() * 0.1,
                "value": 25.0, "threshold": 20.0, "unit": "%LEL", "started_at": iso(now),
                "ts": iso(now), "title": f"【{sev}】{place.district_name}{place.street_name}燃气泄漏报警",
                "summary": "户用燃气报警器读数25%LEL，超过20%LEL", "escalation": 0}


def topic(n: dict) -> str:
    return f"cityops/alerts/street/{n['target']}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--incidents", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=200, help="notices/s in (3)")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--renders", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.incidents, a.seconds, a.renders = 1000, 10, 3
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    gen = Notices()
    places = gen.reg.grid_places
    users = users_file(tmp / "users.yaml", {"city-duty": {"scope": "city"}})
    broker = Mosquitto(tmp / "mosquitto").start()
    console = None
    out: dict = {"incidents": a.incidents, "rate": a.rate, "seconds": a.seconds,
                 "load_average_at_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    try:
        # the busiest street gets its share and a few more, as a busy 街道 would
        busiest = places[0].street
        users_file(users, {"city-duty": {"scope": "city"},
                           "street": {"scope": "street", "code": busiest}})
        console = Console(tmp, ["--broker", broker.url], {"CITYOPS_ACKS__USERS": str(users)}).start()

        # (1) load
        t = time.perf_counter()
        batch = [gen.make(gen.rng.choice(places)) for _ in range(a.incidents)]
        for i in range(0, len(batch), 2000):
            publish_many(broker.url, [(topic(n), json.dumps(n, ensure_ascii=False))
                                      for n in batch[i:i + 2000]], timeout=120)

        def open_count() -> int:
            req = urllib.request.Request(f"{console.url}/api/overview")
            req.add_header("Cookie", cookie)
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["open"]

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = login(browser, console, "city-duty")
            cookie = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
            while open_count() < a.incidents:
                time.sleep(0.2)
            out["load_s"] = round(time.perf_counter() - t, 2)
            page.context.close()      # its big screen would refresh itself all through (3)
            in_street = sum(1 for n in batch if n["street"] == busiest)
            out["street_incidents"] = in_street
            print(f"(1) {a.incidents:,} open incidents in the console in {out['load_s']} s "
                  f"({in_street} in the street measured)")

            # (2) first render of the street page
            renders, html_ms = [], []
            for _ in range(a.renders):
                sp = login(browser, console, "street")
                got = sp.goto(f"{console.url}/incidents")
                assert got.status == 200 and sp.locator("tr.row").count() == min(100, in_street)
                timing = sp.evaluate("() => { const n = performance.getEntriesByType("
                                     "'navigation')[0]; return [n.loadEventEnd - n.startTime, "
                                     "n.responseEnd - n.startTime]; }")
                renders.append(timing[0])
                html_ms.append(timing[1])
                sp.context.close()
            out["first_render_ms"] = {"median": round(pct(renders, 50), 1),
                                      "p99": round(pct(renders, 99), 1), "max": round(max(renders), 1),
                                      "html_received_median": round(pct(html_ms, 50), 1)}
            print(f"(2) street page first render: median {out['first_render_ms']['median']} ms, "
                  f"p99 {out['first_render_ms']['p99']} ms over {len(renders)} loads (the HTML "
                  f"received after {out['first_render_ms']['html_received_median']} ms, median)")

            # (3) notice -> screen, (4) CPU
            sp = login(browser, console, "street")
            sp.goto(f"{console.url}/incidents")
            sp.wait_for_function("document.getElementById('live').dataset.connected === '1'")
            sp.evaluate("""() => { window.seen = {};
              new MutationObserver(() => { for (const r of document.querySelectorAll('tr.row'))
                if (!(r.dataset.alert in window.seen)) window.seen[r.dataset.alert] = Date.now(); })
              .observe(document.getElementById('live'), {childList: true, subtree: true}); }""")
            street_places = [pl for pl in places if pl.street == busiest]
            published: dict[str, float] = {}
            # one connection for the whole run, as a pipeline publishes (QoS 1)
            pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="console-bench-publisher")
            pub.max_inflight_messages_set(1000)
            pub.connect(*host_port(broker.url))
            pub.loop_start()

            def load(seconds: float) -> tuple[float, float]:
                """--rate notices/s for ``seconds``: (notices/s sent, console CPU s/s)."""
                stop = threading.Event()
                sent = [0]

                def pace() -> None:
                    tick = 0.05
                    nxt = time.monotonic()
                    while not stop.is_set():
                        for _ in range(int(a.rate * tick)):
                            if gen.rng.random() < 0.1:
                                n = gen.make(gen.rng.choice(street_places), severity="red")
                                published[n["alert_id"]] = time.time() * 1000
                            elif gen.rng.random() < 0.5:
                                old = gen.rng.choice(batch)
                                n = dict(old, seq=old["seq"] + 1, state="escalated", escalation=1)
                                old["seq"] += 1
                            else:
                                n = gen.make(gen.rng.choice(places))
                            pub.publish(topic(n), json.dumps(n, ensure_ascii=False), qos=1)
                            sent[0] += 1
                        nxt += tick
                        time.sleep(max(0.0, nxt - time.monotonic()))

                cpu0, wall0 = cpu_seconds(console.proc.pid), time.monotonic()
                pacer = threading.Thread(target=pace, daemon=True)
                pacer.start()
                time.sleep(seconds)
                stop.set()
                pacer.join()
                wall = time.monotonic() - wall0
                return sent[0] / wall, (cpu_seconds(console.proc.pid) - cpu0) / wall

            rate, cpu = load(a.seconds)
            time.sleep(2)                  # the last rows reach the page
            seen = sp.evaluate("window.seen")
            lat = [seen[k] - v for k, v in published.items() if k in seen]
            out["notice_to_screen_ms"] = {"samples": len(lat), "of": len(published),
                                          "median": round(pct(lat, 50)), "p99": round(pct(lat, 99)),
                                          "max": round(max(lat))}
            print(f"(3) notice -> street page: median {out['notice_to_screen_ms']['median']} ms, "
                  f"p99 {out['notice_to_screen_ms']['p99']} ms ({len(lat)} of {len(published)} "
                  f"new rows seen) at {rate:.0f} notices/s")
            sp.context.close()                 # (4b) the same load with nobody watching
            quiet_rate, quiet_cpu = load(a.seconds / 2)
            big = login(browser, console, "city-duty")           # (4c) the big screen open
            big.wait_for_function("document.getElementById('live').dataset.connected === '1'")
            big_rate, big_cpu = load(a.seconds / 2)
            big.context.close()
            pub.loop_stop()
            pub.disconnect()
            out["cpu"] = {}
            for what, r, c in (("street page open", rate, cpu), ("nobody watching", quiet_rate, quiet_cpu),
                               ("the city big screen open", big_rate, big_cpu)):
                out["cpu"][what] = {"notices_per_s": round(r), "cpu_s_per_s": round(c, 3),
                                    "per_1000_notices_s": round(c / r * 1000, 3)}
                print(f"(4) console CPU, {what}: {c:.3f} s/s at {r:.0f} notices/s = "
                      f"{c / r * 1000:.3f} CPU s/s per 1,000 notices/s")
            browser.close()
        (ROOT / "bench" / "out").mkdir(exist_ok=True)
        name = "console-quick.json" if a.quick else "console.json"
        (ROOT / "bench" / "out" / name).write_text(json.dumps(out, indent=2))
        print(f"command: {' '.join(sys.argv)}\nwrote bench/out/{name}")
    finally:
        if console is not None:
            console.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
