"""The Grafana dashboard (deploy/grafana/dashboards/cityops.json) asks only for what the history
sink writes: every measurement, field and tag its Flux queries name, and every state, tier and
severity they compare with, is checked against connectors/lineproto.py, pipeline/core/models.py and
the time-to-close fields of pipeline/core/close_figures.py, so a rename on either side fails here
instead of leaving an empty panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from connectors.lineproto import ALERT_FIELDS, ALERT_TAGS, ALERTS, READING_FIELDS, READING_TAGS
from pipeline.core.close_figures import FIELDS as CLOSE_FIELDS
from pipeline.core.models import Severity, State, Tier

DASHBOARD = (Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
             / "cityops.json")
SYSTEM = {"_time", "_value", "_field", "_measurement", "_start", "_stop"}
KNOWN_VALUES = {"state": {s.value for s in State}, "tier": {t.value for t in Tier},
                "acked_tier": {t.value for t in Tier}, "severity": {s.value for s in Severity}}
SCHEMA = {"alerts": (set(ALERT_TAGS), set(ALERT_FIELDS) | set(CLOSE_FIELDS.values())),
          "readings": (set(READING_TAGS), set(READING_FIELDS))}


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])          # panels folded into a row
    return out


def queries(dash: dict) -> list[tuple[str, str]]:
    """(where, Flux text) of every panel target and every query variable."""
    out = [(f"panel {p['title']!r}", t["query"])
           for p in panels(dash) for t in p.get("targets", [])]
    out += [(f"variable {v['name']!r}", v["query"]) for v in dash["templating"]["list"]
            if v["type"] == "query"]
    return out


def subject(flux: str) -> str | None:
    """Which of the sink's series a query reads: notices, readings, or (schema calls) none."""
    if re.search(rf'r\._measurement == "{ALERTS}"', flux):
        return "alerts"
    if re.search(rf'r\._measurement (!= "{ALERTS}"|== "\$\{{kind\}}")', flux):
        return "readings"
    return None


QUERIES = queries(load())


def test_the_dashboard_has_the_panels_an_operations_centre_needs() -> None:
    dash = load()
    titles = {p["title"] for p in panels(dash)}
    for wanted in ("Readings by district", "Alerts by tier and severity", "Time to acknowledge",
                   "Open alerts", "Silent sensors"):
        assert wanted in titles, titles
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert dash["uid"] and dash["title"]


def test_every_panel_reads_the_influxdb_datasource_and_the_configured_bucket() -> None:
    dash = load()
    ds = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert ds["type"] == "datasource" and ds["query"] == "influxdb"
    for p in panels(dash):
        assert p["datasource"] == {"type": "influxdb", "uid": "${datasource}"}, p["title"]
    for where, flux in QUERIES:
        for bucket in re.findall(r'bucket: "([^"]*)"', flux):
            assert bucket == "${bucket}", where
    bucket = next(v for v in dash["templating"]["list"] if v["name"] == "bucket")
    assert bucket["query"] == "cityops"


@pytest.mark.parametrize("where,flux", QUERIES, ids=[w for w, _ in QUERIES])
def test_queries_name_only_what_the_sink_writes(where: str, flux: str) -> None:
    for m in re.findall(r'r\._measurement [!=]= "([^"]+)"', flux):
        assert m in (ALERTS, "${kind}"), f"{where}: measurement {m!r}"
    kind = subject(flux)
    if kind is None:              # schema calls: a tag of both, or the measurements themselves
        for tag in re.findall(r'tag: "([^"]+)"', flux):
            assert tag in READING_TAGS and tag in ALERT_TAGS, f"{where}: tag {tag!r}"
        return
    tags, fields = SCHEMA[kind]
    for f in re.findall(r'r\._field == "([^"]+)"', flux):
        assert f in fields, f"{where}: {kind} have no field {f!r} (they have {sorted(fields)})"
    named = set(re.findall(r"\br\.([a-z]\w*)", flux))
    named |= set(re.findall(r'\br\["([^"]+)"\]', flux))
    for listed in re.findall(r"columns: \[([^\]]*)\]", flux):
        named |= set(re.findall(r'"([^"]+)"', listed))
    named |= set(re.findall(r'column: "([^"]+)"', flux))
    # after a pivot on _field, the fields are columns too
    allowed = tags | SYSTEM | (fields if "pivot(" in flux else set())
    for name in named - SYSTEM:
        assert name in allowed, f"{where}: {kind} have no tag {name!r} (tags: {sorted(tags)})"
    for tag, value in re.findall(r'\br\.([a-z_]+) [!=]= "([^"$]+)"', flux):
        if tag in KNOWN_VALUES:
            assert value in KNOWN_VALUES[tag], f"{where}: no {tag} is ever {value!r}"


def test_every_query_is_checked() -> None:
    """The checks above must not pass by reading nothing: each panel query names its series."""
    for where, flux in QUERIES:
        if where.startswith("panel"):
            assert subject(flux) is not None, where
