"""`cityops`: the command line. Each command loads and checks its configuration once, then runs."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.shared.console import SHOWN, pad
from rules.yamlfile import ConfigError

EPILOG = """\
examples:
  cityops run --simulate                      the live pipeline on an embedded MQTT broker, fed by
                                              simulated gateways; watch notices reach every tier
  cityops run --config cityops.yaml           against your broker (Mosquitto, EMQX)
  cityops replay --demo                       replay 2010-2015 Chengdu rain and PM2.5 through the
                                              built-in packs; print the notices per tier
  cityops replay readings.jsonl > notices.jsonl
  cityops backtest --rules new/ --against builtin --history readings.jsonl --html report.html
                                              what new rules would have done on history, side
                                              by side with the current ones
  cityops rules check                         lint the rule packs, routing and registry
  cityops rules test tests/rules/             run rule unit tests written as data
  cityops route --rule gas.leak --sensor gas-510104-000001
                                              who would be told, and when it would escalate
  cityops tail --tier street --district 锦江区
                                              watch a running pipeline's notices
  cityops bridge --broker mqtt://10.0.0.5:1883 --kafka 10.0.0.7:9092
                                              gateways' MQTT readings into Kafka
  cityops worker --kafka 10.0.0.7:9092        the engine on Kafka; start one per machine, they
                                              split the partitions
  cityops console --config cityops.yaml       the operations centres' web pages (incidents per
                                              scope, live; acknowledge)
  cityops silence add --match street=510104020 --for 2h --reason 管网检修
                                              hold a street's alerts back for two hours
  cityops rules diff cityops.yaml new.yaml    what a reload to new.yaml would change (rules,
                                              thresholds per district, routes, sensors)
  kill -HUP $(pgrep -f 'cityops run')         reload rules, params, routing and registry; a bad
                                              set is refused and the running one goes on
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", metavar="PATH", help="registry folder or registry.yaml "
                   "(default: the bundled Chengdu fixture)")
    p.add_argument("--packs", metavar="DIR", action="append", default=[],
                   help="extra rule pack folder or file; a pack of the same name replaces the "
                   "built-in one (repeatable)")
    p.add_argument("--routing", metavar="FILE", help="routing tree (default: rules/routing.yaml)")
    p.add_argument("--params", metavar="FILE", help="the city's own values for pack parameters, "
                   "per pack and per district (docs/rules.md)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cityops", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="City operations event pipeline: IoT readings in, tiered alerts out "
                    "(city / district / street operations centres, department sub-centres, "
                    "the on-call grid worker).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="the live pipeline: MQTT in, alerts out to the tiers",
                         description="Run the live pipeline. With no broker configured it starts "
                         "an embedded MQTT broker on localhost. Configuration: --config FILE, then "
                         "CITYOPS_* environment variables (e.g. CITYOPS_MQTT__URL), then flags.")
    run.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    run.add_argument("--broker", metavar="URL", help="mqtt://host:port of your broker (default: "
                     "embedded broker on 127.0.0.1:1883)")
    run.add_argument("--state", type=Path, metavar="PATH", help="state file (SQLite; default "
                     ".run/cityops-state.sqlite)")
    run.add_argument("--simulate", action="store_true", help="feed the pipeline from simulated "
                     "gateways of the Chengdu fixture (gas leak, rainstorm, site violation, silence)")
    run.add_argument("--resume", action="store_true", help="with --simulate: continue the "
                     "simulated city from its saved state (default: a fresh city, so the story's "
                     "notices show again); a run without --simulate always resumes")
    run.add_argument("--console", action="store_true", help="print every notice")
    _common(run)

    kafka_help = ("Configuration: --config FILE, then CITYOPS_* environment variables (e.g. "
                  "CITYOPS_KAFKA__BOOTSTRAP), then flags. Topics are created if missing, with "
                  "kafka.partitions partitions.")
    b = sub.add_parser("bridge", help="MQTT readings and acks into Kafka (distributed runtime)",
                       description="Bridge MQTT to Kafka: readings from a shared subscription "
                       "become one record per reading on {prefix}.readings (key: sensor id, "
                       "partition: its street), acknowledged to MQTT only once Kafka has them. "
                       + kafka_help)
    b.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    b.add_argument("--broker", metavar="URL", help="mqtt://host:port of the MQTT broker")
    b.add_argument("--kafka", metavar="HOST:PORT[,...]", help="Kafka bootstrap servers")
    _common(b)
    w = sub.add_parser("worker", help="the engine on Kafka as a Faust worker (distributed runtime)",
                       description="Run a Faust worker: readings and acks from Kafka, notices to "
                       "the Kafka tier topics (optionally mirrored onto MQTT). Workers with the "
                       "same worker.app_id split the partitions; state moves with them. "
                       + kafka_help)
    w.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    w.add_argument("--kafka", metavar="HOST:PORT[,...]", help="Kafka bootstrap servers")
    _common(w)

    r = sub.add_parser("replay", help="run history (JSONL or CSV) through the engine; notices as JSONL",
                       description="Replay readings through the engine. Output: one notice per "
                       "line (JSON, sorted keys), byte-identical on every run.")
    r.add_argument("file", nargs="?", type=Path, help="JSONL of readings, or CSV with --csv-map")
    r.add_argument("--demo", action="store_true", help="the bundled UCI Chengdu 2010-2015 data "
                   "through the rainstorm and PM2.5 rules, printed per tier")
    r.add_argument("--csv-map", type=Path, metavar="MAP.yaml", help="column mapping for a CSV file")
    r.add_argument("--rules", action="append", default=[], metavar="GLOB",
                   help="only these rule ids, e.g. 'weather.*' (repeatable; default: all)")
    r.add_argument("--out", type=Path, help="write notices here instead of standard output")
    r.add_argument("--dead-letters", type=Path, metavar="FILE", help="write dead letters here")
    r.add_argument("--batch", type=int, default=1000, help="readings per engine batch (default 1000)")
    r.add_argument("--ack-after", metavar="DURATION", help="acknowledge every incident this long "
                   "after it fires (e.g. 5m), as an operations centre would: no reminders or "
                   "escalations past it (docs/replay.md)")
    r.add_argument("--handling", type=Path, metavar="FILE", help="a handling log (JSONL: ts, "
                   "state dispatched|on_site|handled|closed, by, tier, and alert_id or rule_id + "
                   "sensor_id) replayed with the readings; the summary adds time to close "
                   "(docs/replay.md)")
    r.add_argument("--time-quorum", type=int, metavar="N",
                   help="event time moves only as far as N of the sources (gateways; a sensor "
                   "without one is its own) heard in the last --quorum-window payloads have "
                   "reached, so one gateway's wrong clock moves no one else's timers (default: "
                   "2 for JSONL; 1 for a CSV, whose rows share one time column; docs/replay.md)")
    r.add_argument("--quorum-window", type=int, default=100, metavar="P",
                   help="with --time-quorum: the sources heard in this many last payloads count "
                   "(default 100)")
    _common(r)

    _backtest_parser(sub)

    rules = sub.add_parser("rules", help="check rule packs, run rule tests")
    rsub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    c = rsub.add_parser("check", help="lint packs, routing and registry; exit 1 on the first error")
    _common(c)
    t = rsub.add_parser("test", help="run rule unit tests written as data (YAML)")
    t.add_argument("files", nargs="+", type=Path, help="test files or folders")
    _rules_diff_parser(rsub)

    rt = sub.add_parser("route", help="show which tiers and people an alert would reach")
    rt.add_argument("--rule", required=True, help="rule id, e.g. gas.leak")
    rt.add_argument("--sensor", required=True, help="sensor id, e.g. gas-510104-000001")
    rt.add_argument("--severity", choices=["blue", "yellow", "orange", "red"],
                    help="severity (default: the rule's lowest level, raised by modifiers)")
    rt.add_argument("--at", help="local time, e.g. 2026-07-01T23:30 (default: now)")
    _common(rt)

    tl = sub.add_parser("tail", help="watch notices, pushes, dead letters and acks as they go out",
                        description="Print what a running pipeline tells people, one line each: "
                        "tier notices, grid workers' and owners' pushes, dead letters and acks. "
                        "MQTT 3.1.1, so it works with the embedded broker and with Mosquitto.")
    tl.add_argument("--broker", metavar="URL", help="mqtt://host:port (default: mqtt.url of "
                    "--config or CITYOPS_MQTT__URL, else the embedded broker's address)")
    tl.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file (its "
                    "mqtt: section: url, username, password, prefix)")
    tl.add_argument("--tier", action="append", default=[], choices=SHOWN,
                    help="only these (repeatable): city, district, street, dept, grid, owner, dead "
                    "(dead letters), acks")
    tl.add_argument("--district", action="append", default=[], metavar="CODE|NAME",
                    help="only notices of this district, e.g. 510104 or 锦江区 (repeatable)")
    tl.add_argument("--street", action="append", default=[], metavar="CODE|NAME",
                    help="only notices of this street, e.g. 510104020 or 春熙路街道 (repeatable)")
    tl.add_argument("--prefix", help="topic prefix (default: mqtt.prefix, cityops)")
    tl.add_argument("--count", type=int, metavar="N", help="stop after N lines")

    con = sub.add_parser("console", help="the operations centres' web console (city, district, "
                         "street, community, department, grid worker)",
                         description="Serve the web console: it subscribes to the tier topics, "
                         "keeps the incidents in SQLite (opscentre.db) and shows each user those "
                         "of their scope; acknowledgements go to the acks topic. Users: acks.users "
                         "with a `password:`. Configuration: --config FILE, then CITYOPS_* "
                         "environment variables, then flags.")
    con.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    con.add_argument("--broker", metavar="URL", help="mqtt://host:port (default: mqtt.url, else "
                     "the embedded broker's address)")
    con.add_argument("--kafka", metavar="HOST:PORT[,...]", help="read the Kafka tier topics "
                     "instead of MQTT (the distributed runtime)")
    con.add_argument("--port", type=int, help="HTTP port (default 8080, on 127.0.0.1)")
    con.add_argument("--db", type=Path, metavar="PATH", help="its SQLite database (default "
                     ".run/console.sqlite)")
    con.add_argument("--demo", action="store_true", help="the simulated city's demo logins "
                     "(make run); waits for the embedded broker to come up")
    con.add_argument("--hash-password", action="store_true", help="read a password and print "
                     "its hash for a user's `password:` in acks.users, then exit")
    _common(con)

    g = sub.add_parser("registry", help="registry tools")
    gsub = g.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    gen = gsub.add_parser("generate", help="write a synthetic Chengdu-scale registry (benchmarks)")
    gen.add_argument("out", type=Path)
    gen.add_argument("--sensors", type=int, default=1_000_000)
    gen.add_argument("--seed", type=int, default=1)
    acl = gsub.add_parser("acl", help="the Mosquitto ACL blocks of the registry's gateways "
                          "(deploy/mosquitto/acl): each may publish to its own topic only")
    acl.add_argument("--prefix", default="cityops", help="the pipeline's mqtt.prefix")
    _common(acl)

    from pipeline.tools import silence_cli          # cityops silence add|list|end
    silence_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "backtest":
            return _backtest(args)
        if args.command in ("bridge", "worker"):
            return _distributed(args)
        if args.command == "rules" and args.rules_command == "check":
            return _check(args)
        if args.command == "rules" and args.rules_command == "test":
            return _test(args)
        if args.command == "rules" and args.rules_command == "diff":
            return _rules_diff(args)
        if args.command == "route":
            return _route(args)
        if args.command == "tail":
            return _tail(args)
        if args.command == "console":
            return _console(args)
        if args.command == "registry" and args.registry_command == "generate":
            return _generate(args)
        if args.command == "registry" and args.registry_command == "acl":
            return _gateway_acl(args)
        if args.command == "silence":
            from pipeline.tools import silence_cli
            return silence_cli.run(args)
    except ConfigError as exc:
        print(f"cityops: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:          # a ConnectionError too: output piped into `head`
        return 0
    except ConnectionError as exc:
        print(f"cityops: error: {exc}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


def _run(args: argparse.Namespace) -> int:
    from pipeline.shared.config import load_settings, session_named
    from pipeline.runtimes.live import serve
    s = load_settings(args.config, registry=args.registry and Path(args.registry),
                      packs=[Path(p) for p in args.packs], params=args.params and Path(args.params),
                      routing=args.routing and Path(args.routing), console=args.console or None)
    # Only the flag's own value is validated; re-validating dumped settings would read their
    # milliseconds as seconds.
    update = {}
    if args.broker:
        update["mqtt"] = s.mqtt.model_copy(update={"url": _broker_url(args.broker)})
    if args.state:
        update["state"] = s.state.model_copy(update={"path": args.state})
    s = session_named(s.model_copy(update=update) if update else s)
    return serve(s, simulate=args.simulate, resume=args.resume)


def _broker_url(text: str) -> str:
    from pipeline.shared.config import MqttSettings
    try:
        return MqttSettings.model_validate({"url": text}).url
    except ValidationError as exc:     # its message, not pydantic's whole report
        raise ConfigError("--broker", None,
                          exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _distributed(args: argparse.Namespace) -> int:
    from pipeline.shared.config import KafkaSettings, load_settings
    s = load_settings(args.config, registry=args.registry and Path(args.registry),
                      packs=[Path(p) for p in args.packs], params=args.params and Path(args.params),
                      routing=args.routing and Path(args.routing))
    update = {}
    if args.kafka:
        try:
            KafkaSettings.model_validate({"bootstrap": args.kafka})
        except Exception as exc:
            raise ConfigError("--kafka", None, "write the brokers as host:port[,host:port]") from exc
        update["kafka"] = s.kafka.model_copy(update={"bootstrap": args.kafka})
    if getattr(args, "broker", None):
        update["mqtt"] = s.mqtt.model_copy(update={"url": _broker_url(args.broker)})
    s = s.model_copy(update=update) if update else s
    if args.command == "bridge":
        if s.mqtt.url is None:
            raise ConfigError("mqtt.url", None, "the bridge reads from your MQTT broker: give "
                              "--broker mqtt://host:port or CITYOPS_MQTT__URL")
        from pipeline.runtimes.bridge import serve as serve_bridge
        return serve_bridge(s)
    if s.worker.mirror_mqtt and s.mqtt.url is None:
        raise ConfigError("worker.mirror_mqtt", None, "mirroring notices onto MQTT needs mqtt.url")
    if s.push.enabled and s.mqtt.url is None:
        raise ConfigError("push.enabled", None, "a worker pushes and records receipts over MQTT: "
                          "set mqtt.url (CITYOPS_MQTT__URL) to your broker")
    from pipeline.runtimes.worker import serve as serve_worker
    return serve_worker(s)


def _load(args: argparse.Namespace, select: list[str] | None = None):
    from pipeline.core.registry import check_districts
    from pipeline.core.registry import load as load_registry
    from rules.compiler import load_rules
    rs = load_rules(args.packs, args.routing, params=args.params)
    reg = load_registry(args.registry, rs.kinds)
    check_districts(rs.packs, rs.sources, reg, args.params)
    return rs.select(select), reg


def _replay(args: argparse.Namespace) -> int:
    from pipeline.core.engine import Engine, EngineSettings
    from pipeline.core.replay import DEMO_CSV, DEMO_MAP, load_mapping, replay
    from pipeline.tools.replay_args import replay_knobs
    if args.demo:
        args.file = args.file or DEMO_CSV
        args.csv_map = args.csv_map or DEMO_MAP
        args.rules = args.rules or ["weather.*"]
    if args.file is None:
        print("cityops replay: give a FILE, or --demo", file=sys.stderr)
        return 2
    if not args.file.exists():
        raise ConfigError(args.file, None, "no such file")
    mapping = load_mapping(args.csv_map) if args.csv_map else None
    if mapping is None and args.file.suffix.lower() == ".csv":
        raise ConfigError(args.file, None, "a CSV needs --csv-map MAP.yaml (which columns are "
                          "time and which feed which sensor); see docs/replay.md")
    if args.handling is not None and not args.handling.exists():
        raise ConfigError(args.handling, None, "no such file (the handling log, --handling)")
    ack_after, quorum = replay_knobs(args, 1 if mapping else 2)
    rs, reg = _load(args, args.rules)
    engine = Engine(reg, rs, EngineSettings(time_quorum=quorum, quorum_window=args.quorum_window))
    started = time.perf_counter()
    tty = sys.stderr.isatty()

    def progress(st) -> None:
        if tty:
            print(f"\r  {st.lines:,} lines, {st.notices:,} notices, {st.dead_letters:,} dead letters",
                  end="", file=sys.stderr, flush=True)

    collected: list[dict] = []
    if args.demo and args.out is None:
        args.out = Path("cityops-demo-notices.jsonl")
    out = args.out.open("wb") if args.out else sys.stdout.buffer
    dead = args.dead_letters.open("wb") if args.dead_letters else None
    try:
        stats = replay(engine, args.file, out, mapping=mapping, batch=args.batch, dead=dead,
                       progress=progress, ack_after=ack_after, handling=args.handling,
                       on_output=(lambda o: collected.extend(o.notices)) if args.demo else None)
    finally:
        if args.out:
            out.close()
        if dead:
            dead.close()
    took = time.perf_counter() - started
    if tty:
        print("\r", end="", file=sys.stderr)
    if args.demo:
        _print_per_tier(collected)
    tiers = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_tier.items())) or "none"
    print(f"replayed {stats.lines:,} lines ({stats.readings:,} readings, {stats.missing:,} missing "
          f"cells skipped) in {took:.1f}s: {stats.notices:,} notices ({tiers}), "
          f"{stats.dead_letters:,} dead letters", file=sys.stderr)
    for line in stats.close.summary():
        print(line, file=sys.stderr)
    if args.out:
        print(f"notices written to {args.out}", file=sys.stderr)
    return 0


def _backtest_parser(sub) -> None:
    b = sub.add_parser(
        "backtest", help="one history through two rule sets: what would the new rules have done?",
        description="Replay history through the NEW and the CURRENT rules at once (the history "
        "is read and decoded once) and report side by side: incidents and notices per rule, "
        "district, tier and day; pushes per grid worker per night; incidents only one side has; "
        "time-to-fire differences. Counts are those two `cityops replay` runs would give.")
    b.add_argument("--rules", action="append", required=True, metavar="NEW",
                   help="the new rules: a pack file or folder (a pack replaces the built-in one "
                   "of its name), or `builtin` (repeatable)")
    b.add_argument("--params", metavar="FILE", help="the new side's parameter values (docs/rules.md)")
    b.add_argument("--routing", metavar="FILE", help="the new side's routing tree (default: "
                   "rules/routing.yaml)")
    b.add_argument("--against", action="append", required=True, metavar="CURRENT",
                   help="the rules in use: a pack file or folder, or `builtin` (repeatable)")
    b.add_argument("--against-params", metavar="FILE", help="the current side's parameter values")
    b.add_argument("--against-routing", metavar="FILE", help="the current side's routing tree "
                   "(default: --routing)")
    b.add_argument("--history", required=True, metavar="FILE|influx://HOST:PORT",
                   help="JSONL of readings, a CSV with --csv-map, or the history store the sink "
                   "wrote (VictoriaMetrics' export API)")
    b.add_argument("--csv-map", type=Path, metavar="MAP.yaml", help="column mapping for a CSV file")
    b.add_argument("--from", dest="since", metavar="TIME", help="influx:// only: the first "
                   "reading's time (RFC 3339, or a date in the city's time zone)")
    b.add_argument("--to", dest="until", metavar="TIME", help="influx:// only: the last "
                   "reading's time (as --from)")
    b.add_argument("--only", action="append", default=[], metavar="GLOB",
                   help="only these rule ids on both sides, e.g. 'weather.*' (repeatable)")
    b.add_argument("--html", type=Path, metavar="FILE", help="also write the report as one HTML "
                   "file with charts (opens offline)")
    b.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    b.add_argument("--batch", type=int, default=1000, help="inputs per engine batch (default 1000)")
    b.add_argument("--ack-after", metavar="DURATION", help="acknowledge every incident this long "
                   "after it fires, on both sides (as replay does)")
    b.add_argument("--time-quorum", type=int, metavar="N", help="as replay's (default 2 for "
                   "JSONL, 1 for CSV and influx://)")
    b.add_argument("--quorum-window", type=int, default=100, metavar="P", help="as replay's")
    b.add_argument("--jobs", type=int, choices=[1, 2], default=1, help="2: the new rules in a "
                   "second process, beside the current ones; faster only with a second CPU free "
                   "(default 1)")
    b.add_argument("--registry", metavar="PATH", help="registry folder or registry.yaml "
                   "(default: the bundled Chengdu fixture)")


def _backtest(args: argparse.Namespace) -> int:
    from pipeline.tools.backtest_cli import run
    return run(args)


def _print_per_tier(notices: list[dict]) -> None:
    """Per tier: how many notices of each state, then the incidents (fired, resolved)."""
    order = ["city", "district", "street", "dept", "grid", "owner"]
    names = {"city": "市城运中心 (city)", "district": "区级运行中心 (district)",
             "street": "街镇运行中心 (street)", "dept": "部门分中心 (department)",
             "grid": "网格员推送 (grid worker push)", "owner": "责任方推送 (owner push)"}
    states = ["firing", "escalated", "reminder", "acknowledged", "resolved"]
    for tier in order:
        mine = [n for n in notices if n["tier"] == tier]
        counts = ", ".join(f"{st} {sum(n['state'] == st for n in mine)}" for st in states
                           if any(n["state"] == st for n in mine))
        print(f"\n== {names[tier]}: {len(mine)} notices ({counts or 'none'}) ==")
        shown = [n for n in mine if n["state"] in ("firing", "resolved")]
        for n in shown[:10]:
            who = f" → {n['worker_name']}" if n.get("worker_name") else f" → {n['target']}"
            print(f"  {n['ts'][:16]}  {n['title']}{who}")
            if n["state"] == "firing":
                print(f"                    {n['summary']}")
        if len(shown) > 10:
            print(f"  … {len(shown) - 10} more fired or resolved")
    print()


def _check(args: argparse.Namespace) -> int:
    from pipeline.core.engine import Engine
    rs, reg = _load(args)
    engine = Engine(reg, rs)   # compiling binds every rule to the registry: per-sensor thresholds etc.
    print(f"ok: {len(rs.rules)} rules in {len(rs.packs)} packs, {len(rs.kinds)} sensor kinds, "
          f"{len(rs.routing.routes)} routes; registry {reg.source}: {len(reg.districts)} districts, "
          f"{len(reg.streets)} streets, {len(reg.grid_places)} grids, {len(reg):,} sensors, "
          f"{len(reg.workers)} workers")
    for r in rs.rules:
        print(f"  {r.spec.id:34} {r.spec.type:12} {r.spec.name}")
    from pipeline.core.routing import unreachable_owners
    for line in unreachable_owners(rs, reg, {e.id: e.selected for e in engine.evaluators}):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _test(args: argparse.Namespace) -> int:
    from pipeline.tools.rule_tests import run
    passed, failed, lines = run(args.files)
    print("\n".join(lines))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _rules_diff_parser(rsub: Any) -> None:
    d = rsub.add_parser("diff", help="what a reload from OLD to NEW would change: rules, "
                        "thresholds per district, routes, sensors",
                        description="Compare two configurations (cityops.yaml files: their "
                        "packs, params, routing and registry; CITYOPS_* variables apply to "
                        "both) as a reload would: rules added, removed and changed, thresholds "
                        "per district after params, routes, sensors added, retired and moved. "
                        "Each is checked whole first, as a reload checks it. Exit 0 either way; "
                        "1 if one does not load.")
    d.add_argument("old", type=Path, metavar="OLD", help="the configuration running now")
    d.add_argument("new", type=Path, metavar="NEW", help="the configuration to reload to")
    d.add_argument("--limit", type=int, default=50, help="lines per section (default 50)")


def _rules_diff(args: argparse.Namespace) -> int:
    from pipeline.shared.config import load_settings
    from pipeline.core.reload import diff, load_set
    old, new = (load_set(load_settings(p)) for p in (args.old, args.new))
    print(diff(old, new).text(args.limit))
    return 0


def _route(args: argparse.Namespace) -> int:
    from pipeline.core.models import Severity
    from pipeline.core.notices import tier_cn
    from pipeline.core.routing import Router
    from rules.schema import format_duration
    rs, reg = _load(args)
    rule = next((r for r in rs.rules if r.spec.id == args.rule), None)
    if rule is None:
        raise ConfigError("--rule", None, f"no rule {args.rule}; `cityops rules check` lists them")
    idx = reg.index.get(args.sensor)
    if idx is None:
        raise ConfigError("--sensor", None, f"no sensor {args.sensor} in {reg.source}")
    kind = reg.kinds[reg.kind_of[idx]]
    if kind not in rule.spec.sensors:
        raise ConfigError("--sensor", None, f"{args.sensor} is a {kind} sensor; {args.rule} "
                          f"watches {', '.join(rule.spec.sensors)} sensors")
    at = _local_time(args.at, reg.tz)
    from pipeline.core.engine import Engine
    engine = Engine(reg, rs.select([args.rule]))
    e = engine.by_id[args.rule]
    if args.severity:
        sev = Severity(args.severity)
    else:
        base = min((lv.severity.rank for lv in getattr(rule.spec, "levels", [])), default=None)
        if base is None:
            base = getattr(rule.spec, "severity", Severity.blue).rank if hasattr(rule.spec, "severity") \
                else min(s.rank for s in getattr(rule.spec, "events", {Severity.blue: 0}).values())
        sev = Severity.of_rank(base + e.bump.get(idx, 0))
    at_ms = int(at.timestamp() * 1000)
    router = Router(rs.routing, reg)
    from pipeline.core.lifecycle import Incident
    inc = Incident()
    inc.rule, inc.idx, inc.rank = args.rule, idx, sev.rank
    labels = engine.book._labels(inc)
    opts = router.route(labels)
    place = reg.place_of(idx)
    category = engine.book._category(inc).value
    print(f"{args.rule} at {args.sensor} ({place.district_name}{place.street_name}"
          f"{place.community_name} {place.grid_name}), {sev.value} {sev.chinese}, {at:%Y-%m-%d %H:%M}")
    print(f"route: {opts.name}")
    for t in router.targets(opts, sev, place, category, at_ms, idx):
        if t.tier.value == "owner":
            o = reg.owners[t.target]
            print(f"  {pad(tier_cn(t.tier.value), 6)} push {o.id} {o.name} "
                  f"{o.contact or ''} {o.phone or ''}".rstrip())
        elif t.worker:
            print(f"  {pad(tier_cn(t.tier.value), 6)} push {t.worker.id} {t.worker.name} (shift "
                  f"{t.worker.start_min // 60:02}:{t.worker.start_min % 60:02}-"
                  f"{t.worker.end_min // 60:02}:{t.worker.end_min % 60:02})")
        else:
            name = {"district": reg.districts.get(t.target), "street": reg.streets.get(t.target, ("",))[0],
                    "dept": reg.departments.get(t.target), "city": reg.city_name,
                    "community": reg.communities.get(t.target, ("",))[0]}[t.tier.value]
            print(f"  {pad(tier_cn(t.tier.value), 6)} {t.tier.value}/{t.target} {name}")
    _route_community_chain(opts)
    if opts.escalate_street:
        print(f"{'nobody on site' if opts.escalate_until == 'on_site' else 'unacknowledged'}: "
              f"to the next tier after {format_duration(opts.escalate_street)}"
              + (f", then to the city after {format_duration(opts.escalate_district)} more"
                 if opts.escalate_district else ""))
    if opts.remind_every and opts.max_reminders:
        until = "someone is on site" if opts.escalate_until == "on_site" else "acknowledged"
        print(f"reminders every {format_duration(opts.remind_every)} until {until}, "
              f"{opts.max_reminders} at most")
    return 0


def _route_community_chain(opts) -> None:
    """`cityops route`: the community chain's rungs (网格 → 社区 → 街道), where the route has one."""
    from rules.schema import format_duration
    rungs = [(opts.escalate_grid, "the community (社区)"), (opts.escalate_community, "the street")]
    said = [f"to {who} after {format_duration(d)}" for d, who in rungs if d]
    if said:
        print("nobody " + ("on site" if opts.escalate_until == "on_site" else "answered")
              + ": " + ", then ".join(said) + " (the community chain)")


def _gateway_acl(args: argparse.Namespace) -> int:
    """A `pattern` would grant every account a gateway topic of its own name; a block per
    gateway grants it to gateways only."""
    _, reg = _load(args)
    print(f"# --- Gateways (cityops registry acl, {len(reg.gateways)} in the registry): each "
          f"publishes its batches on {args.prefix}/gateways/<its gateway_id>, nothing else.")
    for gw in sorted(reg.gateways):
        print(f"user {gw}\ntopic write {args.prefix}/gateways/{gw}\n")
    return 0


def _local_time(text: str | None, tz) -> datetime:
    """--at: a local date and time, or a time of today; now when not given."""
    now = datetime.now(tz)
    if not text:
        return now
    try:
        if len(text) <= 5 and ":" in text:
            h, m = (int(x) for x in text.split(":"))
            return now.replace(hour=h, minute=m, second=0, microsecond=0)
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("--at", None, f"{text!r}: write a local time as 2026-07-01T23:30, "
                          "or 23:30 for today") from None
    return at.astimezone(tz) if at.tzinfo else at.replace(tzinfo=tz)


def _tail(args: argparse.Namespace) -> int:
    from pipeline.shared.config import load_settings
    from pipeline.tools.tail import Filter, tail
    s = load_settings(args.config)
    m = s.mqtt.model_copy(update={"url": _broker_url(args.broker)}) if args.broker else s.mqtt
    host, port = (m.host, m.port) if m.url else (s.embedded.host, s.embedded.port)
    return tail(host, port, args.prefix or m.prefix, Filter(args.tier, args.district, args.street),
                username=m.username, password=m.password.get_secret_value() if m.password else None,
                count=args.count)


def _console(args: argparse.Namespace) -> int:
    if args.hash_password:
        import getpass

        from pipeline.runtimes.opscentre.auth import hash_password
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline()
        password = password.rstrip("\n")
        if len(password) < 8:
            raise ConfigError("--hash-password", None, "give a password of 8 characters or more "
                              "(typed, or one line on standard input)")
        print(hash_password(password))
        return 0
    from pipeline.shared.config import KafkaSettings
    from pipeline.runtimes.opscentre.server import serve
    s = _settings_of(args)
    part = {"db": args.db, "port": args.port}
    update = {"opscentre": s.opscentre.model_copy(update={k: v for k, v in part.items() if v})}
    if args.broker:
        update["mqtt"] = s.mqtt.model_copy(update={"url": _broker_url(args.broker)})
    if args.kafka:
        try:
            KafkaSettings.model_validate({"bootstrap": args.kafka})
        except ValidationError:
            raise ConfigError("--kafka", None, "write the brokers as host:port[,host:port]") from None
        update["kafka"] = s.kafka.model_copy(update={"bootstrap": args.kafka})
    return serve(s.model_copy(update=update), kafka=bool(args.kafka), demo=args.demo)


def _settings_of(args: argparse.Namespace):
    from pipeline.shared.config import load_settings
    return load_settings(args.config, registry=args.registry and Path(args.registry),
                         packs=[Path(p) for p in args.packs], params=args.params and Path(args.params),
                         routing=args.routing and Path(args.routing))


def _generate(args: argparse.Namespace) -> int:
    from pipeline.tools.registry_gen import generate
    start = time.perf_counter()

    def progress(n: int) -> None:
        print(f"\r  {n:,} / {args.sensors:,} sensors", end="", file=sys.stderr, flush=True)

    path = generate(args.out, args.sensors, args.seed, progress)
    print(f"\rwrote {path} ({args.sensors:,} sensors) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
