"""Time to close (快速处置): how long each step of an incident took, per incident and aggregated.

The `closed` notice carries the incident's timeline (fired, acknowledged, dispatched, on_site,
handled, resolved, closed: those that happened; pipeline/core/handling.py). From it:

    per incident   seconds from firing to acknowledged, on site, handled and closed (``steps``);
                   the history sink writes them as fields of the closed notice's points
                   (connectors/lineproto.py), for the Grafana panels
    aggregated     count, mean and longest of each step, per tier (the one that closed it),
                   street, district, category and day of firing (in the city's time):
                   ``CloseFigures`` — the /metrics of `cityops run` and `cityops worker`
                   (cityops_time_to_close_seconds) and replay's summary
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import SummaryMetricFamily

STEPS = ("acknowledged", "on_site", "handled", "closed")
# the history sink's field per step (acknowledgement has its own, ack_seconds, on `acknowledged`)
FIELDS = {"on_site": "on_site_seconds", "handled": "handled_seconds", "closed": "close_seconds"}
DIMENSIONS = ("tier", "district", "street", "category", "day")


def steps(n: dict) -> dict[str, float]:
    """Seconds from firing to each step a closed notice's timeline has."""
    t = n.get("timeline") or {}
    if "fired" not in t:
        return {}
    fired = datetime.fromisoformat(str(t["fired"]))
    return {s: (datetime.fromisoformat(str(t[s])) - fired).total_seconds() for s in STEPS if s in t}


def closed_fields(n: dict) -> dict[str, float]:
    """A closed notice's seconds to each step, by the history's field names (FIELDS): what the
    history sink adds to its point (connectors/lineproto.py)."""
    return {FIELDS[s]: v for s, v in steps(n).items() if s in FIELDS}


class CloseFigures:
    """Closed incidents, aggregated. ``observe`` takes notices as they are emitted (every copy
    of one closed notice is counted once)."""

    def __init__(self) -> None:
        self.last: tuple | None = None
        # Prometheus: (tier, district, street, category, step) -> [count, sum]
        self.series: dict[tuple[str, ...], list[float]] = {}
        # the summary: (dimension, value) -> step -> [count, sum, max]
        self.rollup: dict[tuple[str, str], dict[str, list[float]]] = {}

    def observe(self, notices: list[dict]) -> None:
        for n in notices:
            if n.get("state") != "closed":
                continue
            key = (n["alert_id"], n["seq"])
            if key == self.last:              # the next copy of the same closed notice
                continue
            self.last = key
            took = steps(n)
            where = {"tier": n.get("state_tier") or "", "district": n["district"],
                     "street": n["street"], "category": n["category"],
                     "day": str((n.get("timeline") or {}).get("fired", n["started_at"]))[:10]}
            for step, secs in took.items():
                s = self.series.setdefault((where["tier"], where["district"], where["street"],
                                            where["category"], step), [0, 0.0])
                s[0] += 1
                s[1] += secs
                for dim in DIMENSIONS:
                    r = self.rollup.setdefault((dim, where[dim]), {}).setdefault(step, [0, 0.0, 0.0])
                    r[0] += 1
                    r[1] += secs
                    r[2] = max(r[2], secs)

    def collect(self) -> Iterator[SummaryMetricFamily]:
        """For /metrics (pipeline/shared/metrics.py)."""
        f = SummaryMetricFamily("cityops_time_to_close_seconds", "Closed incidents: seconds from "
                                "firing to each step (acknowledged, on_site, handled, closed), by "
                                "the tier that closed, district, street and category.",
                                labels=["step", "tier", "district", "street", "category"])
        for (tier, district, street, category, step), (count, total) in sorted(self.series.items()):
            f.add_metric([step, tier, district, street, category], int(count), round(total, 3))
        yield f

    def summary(self) -> list[str]:
        """Replay's summary: per dimension and value, closed incidents and each step's mean and
        longest, in minutes."""
        if not self.rollup:
            return []
        out = ["time to close (minutes from firing: mean / longest):"]
        for dim in DIMENSIONS:
            for (d, value), by_step in sorted(self.rollup.items()):
                if d != dim:
                    continue
                closed = int(by_step.get("closed", [0])[0])
                cells = "  ".join(f"{s} {r[1] / r[0] / 60:.1f}/{r[2] / 60:.1f}"
                                  for s in STEPS if (r := by_step.get(s)))
                out.append(f"  {dim:<8} {value or '-':<12} {closed:>5} closed  {cells}")
        return out
