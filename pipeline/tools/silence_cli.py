"""`cityops silence add|list|end`: make, list and end silences of a running pipeline over its
HTTP port (pipeline/shared/silence_http.py), with the user's bearer token."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from rules.schema import parse_duration

EXAMPLES = """\
examples:
  cityops silence add --match street=510104020 --for 2h --reason "燃气管网检修"
  cityops silence add --match district=510104 --match category=waterlogging \\
      --from 2026-07-01T22:00:00+08:00 --until 2026-07-02T06:00:00+08:00 --reason "泵站检修"
  cityops silence add --match grid=510104020001001 --window "tue 01:00-05:00 Asia/Shanghai" \\
      --reason "每周二夜间管道维护"
  cityops silence list
  cityops silence end s-3f9a0c21d4

The token is --token or CITYOPS_TOKEN (a user of acks.users with a token_sha256); the pipeline
is --url, else http.host/http.port of --config (default http://127.0.0.1:9464).
"""
_WINDOW = re.compile(r"^\s*([a-z,]+)\s+(\d\d:\d\d)-(\d\d:\d\d)(?:\s+(\S+))?\s*$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("silence", help="make, list and end silences and maintenance windows of a "
                       "running pipeline", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="While a silence is in force the incidents it matches are "
                       "still detected and kept, but their notices and pushes are held (a resolve "
                       "still reaches every tier that was told) and escalation pauses; when it "
                       "ends, the tiers are told how the incidents stand.")
    ssub = p.add_subparsers(dest="silence_command", metavar="SUBCOMMAND")
    a = ssub.add_parser("add", help="silence alerts that match, for a time or every week",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--match", action="append", default=[], metavar="LABEL=VALUE[,VALUE]",
                   help="district, street, community, grid, category, rule_id, kind, sensor_id, "
                   "severity or sensor.<attr>; globs and lists as in routing (repeatable, all must "
                   "match)")
    when = a.add_mutually_exclusive_group(required=True)
    when.add_argument("--for", dest="duration", metavar="DURATION", help="from now (or --from), "
                      "e.g. 30m, 2h, 1d")
    when.add_argument("--until", metavar="TIME", help="RFC 3339 with offset, e.g. "
                      "2026-07-02T06:00:00+08:00")
    when.add_argument("--window", metavar='"DAYS HH:MM-HH:MM [ZONE]"', help="every week, e.g. "
                      '"tue 01:00-05:00 Asia/Shanghai" or "sat,sun 23:00-02:00" (crosses midnight; '
                      "zone default Asia/Shanghai)")
    a.add_argument("--from", dest="start", metavar="TIME", help="RFC 3339 start (default now; "
                   "with --window: from when the window applies)")
    a.add_argument("--reason", required=True, help="why, for whoever reads the list")
    _connection(a)
    ls = ssub.add_parser("list", help="the silences in force or to come, and what they mute")
    ls.add_argument("--json", action="store_true", help="print the JSON the pipeline answers")
    _connection(ls)
    e = ssub.add_parser("end", help="end a silence now: what it held is told")
    e.add_argument("id", help="the silence's id (silence add prints it; silence list shows it)")
    _connection(e)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the pipeline's HTTP port, e.g. http://127.0.0.1:9464")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration (its http: "
                   "section names the port)")
    p.add_argument("--token", help="your bearer token (default: CITYOPS_TOKEN)")


def run(args: argparse.Namespace) -> int:
    from rules.yamlfile import ConfigError
    cmd = args.silence_command
    if cmd is None:
        raise ConfigError("silence", None, "say add, list or end (cityops silence --help)")
    if cmd == "add":
        spec = _spec(args)
        got = _call(args, "POST", "/silences", spec)
        print(f"{got['id']}  queued: {_describe(spec)}")
        return 0
    if cmd == "end":
        got = _call(args, "DELETE", f"/silences/{args.id}")
        print(f"{got['id']}  ending: what it held is told now")
        return 0
    got = _call(args, "GET", "/silences")
    if args.json:
        print(json.dumps(got, ensure_ascii=False, indent=2))
        return 0
    if not got["silences"]:
        print("no silences")
    for s in got["silences"]:
        print(f"{s['id']}  {_describe(s)}  by {s['by']}: {s['reason']}")
        for inc in s["muting"]:
            print(f"    muting {inc['alert_id']} {inc['severity']:<6} {inc['title']}"
                  + ("  (notices held)" if inc["held"] else ""))
    return 0


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    from rules.yamlfile import ConfigError
    if not args.match:
        raise ConfigError("--match", None, "say what to silence, e.g. --match street=510104020")
    matchers: dict[str, Any] = {}
    for m in args.match:
        label, sep, value = m.partition("=")
        if not sep or not label or not value:
            raise ConfigError("--match", None, f"{m!r}: write LABEL=VALUE, e.g. street=510104020")
        values: list[Any] = [_typed(label, v) for v in value.split(",")]
        matchers[label] = values[0] if len(values) == 1 else values
    spec: dict[str, Any] = {"matchers": matchers, "reason": args.reason}
    start = _time("--from", args.start) if args.start else None
    if args.window:
        m = _WINDOW.match(args.window)
        if not m:
            raise ConfigError("--window", None, f"{args.window!r}: write e.g. \"tue 01:00-05:00 "
                              "Asia/Shanghai\" (days mon..sun, comma-separated)")
        spec["schedule"] = {"days": m[1].split(","), "from": m[2], "to": m[3],
                            "tz": m[4] or "Asia/Shanghai"}
        if start is not None:
            spec["starts_at"] = start
        return spec
    spec["starts_at"] = start if start is not None else _now()
    if args.until:
        spec["ends_at"] = _time("--until", args.until)
    else:
        try:
            spec["ends_at"] = spec["starts_at"] + parse_duration(args.duration)
        except ValueError as exc:
            raise ConfigError("--for", None, str(exc)) from None
    return spec


def _typed(label: str, v: str) -> Any:
    if label.startswith("sensor.") and v in ("true", "false"):
        return v == "true"
    return v


def _now() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def _time(flag: str, text: str) -> int:
    from rules.yamlfile import ConfigError
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise ConfigError(flag, None, f"{text!r}: write RFC 3339 with an offset, e.g. "
                          "2026-07-02T06:00:00+08:00")
    return int(t.timestamp() * 1000)


def _describe(s: dict[str, Any]) -> str:
    what = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in s["matchers"].items())
    if "schedule" in s:
        w = s["schedule"]
        when = f"every {','.join(w['days'])} {w['from']}-{w['to']} {w['tz']}"
    else:
        when = f"{_local(s['starts_at'])} → {_local(s['ends_at'])}"
    return f"{what}  {when}"


def _local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M %z")


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> dict:
    from rules.yamlfile import ConfigError
    token = args.token or os.environ.get("CITYOPS_TOKEN")
    if not token:
        raise ConfigError("--token", None, "give your bearer token with --token or CITYOPS_TOKEN "
                          "(a user of acks.users with a token_sha256)")
    url = args.url
    if not url:
        from pipeline.shared.config import load_settings
        h = load_settings(args.config).http
        url = f"http://{h.host}:{h.port}"
    req = urllib.request.Request(url.rstrip("/") + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            why = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            why = exc.reason
        print(f"cityops: error: {method} {path}: {exc.code} {why}", file=sys.stderr)
        raise SystemExit(1) from None
    except urllib.error.URLError as exc:
        raise ConnectionError(f"cannot reach the pipeline at {url}: {exc.reason} (is `cityops "
                              "run` up? --url or http.port)") from None
