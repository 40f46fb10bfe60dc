"""Prometheus text format, for the /metrics of `run`, `bridge` and `worker`."""

from __future__ import annotations

from collections.abc import Mapping


def family(name: str, kind: str, help_: str, value: float | Mapping[str, float],
           label: str = "") -> list[str]:
    """One metric family: a single value, or one sample per ``label`` value."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    if isinstance(value, Mapping):
        lines += [f'{name}{{{label}="{k}"}} {v}' for k, v in value.items()]
    else:
        lines.append(f"{name} {value}")
    return lines


TIERS = ("city", "district", "street", "dept", "grid", "owner", "community")


def notices_by_tier(counters: Mapping[str, int], what: str = "published") -> list[str]:
    """From counters keyed `notices.{tier}`: the same family in every runtime."""
    return family("cityops_notices_total", "counter", f"Notices {what}, by tier.",
                  {t: counters.get("notices." + t, 0) for t in TIERS}, "tier")


def dead_letters(counters: Mapping[str, int]) -> list[str]:
    """From counters keyed `dead.{reason}`."""
    return family("cityops_dead_letters_total", "counter", "Input refused, by reason.",
                  {k[5:]: counters[k] for k in sorted(counters) if k.startswith("dead.")},
                  "reason")
