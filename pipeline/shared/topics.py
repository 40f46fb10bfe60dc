"""MQTT topic names the runtimes share (Kafka's are in connectors/kafka.py)."""

from __future__ import annotations


def notice_topic(prefix: str, n: dict) -> str:
    tier, target = n["tier"], n["target"]
    if tier == "city":
        return f"{prefix}/alerts/city"
    if tier in ("grid", "owner"):           # pushes to a person: the worker's, the owner's
        return f"{prefix}/push/{target}"
    return f"{prefix}/alerts/{tier}/{target}"
