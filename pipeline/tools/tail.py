"""`cityops tail`: watch what the pipeline tells people, as readable lines.

Subscribes to the tier topics, the grid workers' pushes, the dead letters and the acks of a
running pipeline and prints one line each (pipeline/shared/console.py), filtered by tier, district or
street. MQTT 3.1.1 on a clean session: the embedded broker speaks nothing else, every other
broker speaks it too, and a watcher needs no messages kept for it while it is away.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from connectors.mqtt import resolve
from pipeline.core.ack_tokens import claimed_tier
from pipeline.shared.console import SHOWN, ack_line, dead_letter_line, notice_line


class Filter:
    """What to show: tiers (plus dead letters and acks), and places by code or name."""

    def __init__(self, tiers: list[str], districts: list[str], streets: list[str]) -> None:
        self.tiers = set(tiers or SHOWN)
        self.districts = set(districts)
        self.streets = set(streets)

    def notice(self, n: dict[str, Any]) -> bool:
        return (n.get("tier") in self.tiers
                and (not self.districts or bool({n.get("district"), n.get("district_name")}
                                                & self.districts))
                and (not self.streets or bool({n.get("street"), n.get("street_name")} & self.streets)))

    def other(self, what: str) -> bool:
        """Dead letters and acks name no place: shown unless a place or other tiers were asked."""
        return what in self.tiers and not self.districts and not self.streets


def line_for(topic: str, payload: bytes, prefix: str, keep: Filter) -> str | None:
    """The line to print for one message, or None when the filter leaves it out."""
    if topic.startswith(f"{prefix}/push/") and topic.endswith("/ack"):    # a person's reply
        who = topic[len(f"{prefix}/push/"):-len("/ack")]
        tier = claimed_tier(payload.decode("ascii", "replace")) or "grid"
        return ack_line({"by": who, "tier": tier, "alert_id": "(reply to a push)"}) \
            if keep.other("acks") else None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        what = "acks" if topic == f"{prefix}/acks" else "dead"
        return (f"{'':8}  ?      {topic}: {payload[:120].decode('utf-8', 'replace')}"
                if keep.other(what) else None)
    if topic == f"{prefix}/deadletter":
        return dead_letter_line(doc) if keep.other("dead") else None
    if topic == f"{prefix}/acks":
        return ack_line(doc) if keep.other("acks") else None
    return notice_line(doc) if keep.notice(doc) else None


def tail(host: str, port: int, prefix: str, keep: Filter, *, username: str | None = None,
         password: str | None = None, count: int | None = None,
         write: Callable[[str], None] | None = None, answer_within: float = 15.0) -> int:
    """Print lines until Ctrl-C (or ``count`` lines). ConnectionError, in one line, when no
    broker can be reached."""
    write = write or (lambda line: print(line, flush=True))
    resolve(host, port)
    inbox: queue.Queue[tuple[str, bytes] | str] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cityops-tail-{os.getpid()}",
                         protocol=MQTTProtocolVersion.MQTTv311, clean_session=True)
    if username:
        client.username_pw_set(username, password)
    topics = [f"{prefix}/alerts/#", f"{prefix}/push/#", f"{prefix}/deadletter", f"{prefix}/acks"]

    answered = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            inbox.put(f"the broker at {host}:{port} refused the connection: {reason_code}")
            return
        answered.set()
        c.subscribe([(t, 1) for t in topics])

    def on_disconnect(c, userdata, flags, reason_code, properties) -> None:
        if not answered.is_set():
            inbox.put(f"{host}:{port} closed the connection before answering; is it an MQTT "
                      "broker?")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = lambda c, u, msg: inbox.put((msg.topic, msg.payload))
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"no MQTT broker answered at {host}:{port} ({exc.strerror or exc}); "
                              "is `cityops run` running? Give its broker with --broker") from None
    client.loop_start()
    shown = 0
    announced = False
    deadline = time.monotonic() + answer_within
    # Ctrl-C sets a flag the loop looks at, not a KeyboardInterrupt raised wherever the main
    # thread happens to be: raised inside the queue's lock (between acquiring it and the `with`
    # body) it would leave the lock held, and paho's thread, putting the next message, would
    # wait for it forever, and loop_stop() for paho's thread
    stop = threading.Event()
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    except ValueError:                  # not the main thread (a test calling this): no handler
        previous = None
    try:
        while (count is None or shown < count) and not stop.is_set():
            if answered.is_set() and not announced:     # said once the broker has answered
                announced = True
                print(f"cityops tail: mqtt://{host}:{port} {', '.join(topics)} (Ctrl-C stops)",
                      file=sys.stderr, flush=True)
            try:
                got = inbox.get(timeout=0.5)
            except queue.Empty:
                if not answered.is_set() and time.monotonic() > deadline:
                    raise ConnectionError(f"{host}:{port} took the connection but did not answer "
                                          f"MQTT within {answer_within:.0f}s") from None
                continue
            if isinstance(got, str):
                raise ConnectionError(got)
            line = line_for(got[0], got[1], prefix, keep)
            if line is not None:
                write(line)
                shown += 1
    except KeyboardInterrupt:       # Ctrl-C is how a person stops watching: not an error
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        client.disconnect()
        client.loop_stop()
    return 0
