"""What a runtime is to its ops HTTP face (pipeline/shared/http_api.py) and to the command line.

`cityops run` (LiveRuntime), the bridge (Bridge) and the worker (CityWorker) each implement
``OpsRuntime``; the two with a journal of their own also ``Reloading`` (POST /reload) and
``Silencing`` (/silences). ``serve_until_signalled`` is the start-run-stop the command line
gives `run` and `bridge` (the worker runs under Faust's own loop); ``health_of`` the shape
of every /healthz.
"""

from __future__ import annotations

import queue
import signal
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prometheus_client.core import Metric

if TYPE_CHECKING:
    from pipeline.shared.delivery import PushDispatcher
    from pipeline.core.identity import AckUsers
    from pipeline.core.registry import Registry
    from pipeline.shared.reload_runtime import Requests


@runtime_checkable
class OpsRuntime(Protocol):
    """GET /healthz, GET /metrics, POST /acks and, with push on, the acknowledge links."""

    users: AckUsers                       # who may acknowledge (a reload may replace them)
    http_acks: queue.SimpleQueue[bytes]   # acks made over HTTP, for the runtime's own loop
    push: PushDispatcher | None           # with push on: /ack, /alerts/{alert_id}/timeline

    def health(self) -> dict[str, Any]:
        """JSON for /healthz; ``status`` "ok" answers 200, anything else 503."""
        ...

    def collect(self) -> Iterable[Metric]:
        """/metrics: the families, computed when scraped (a prometheus-client Collector;
        pipeline/shared/metrics.py)."""
        ...


@runtime_checkable
class Reloading(OpsRuntime, Protocol):
    """POST /reload (pipeline/shared/reload_runtime.py)."""

    reloads: Requests


@runtime_checkable
class Silencing(OpsRuntime, Protocol):
    """/silences (pipeline/shared/silence_http.py)."""

    registry: Registry
    http_silences: queue.SimpleQueue[bytes]

    def silences_in_force(self) -> list: ...


def health_of(status: str, started: float, **facts: Any) -> dict[str, Any]:
    """/healthz's JSON in every runtime: the status ("ok": 200), the runtime's own facts, and
    how long it has run (``started``: its time.time() at start)."""
    return {"status": status, **facts, "uptime_s": round(time.time() - started, 1)}


def link_facts(link: Any) -> dict[str, Any]:
    """What /healthz says of an MQTT link (connectors/mqtt.py), None before it starts."""
    return {"broker_connected": link is not None and link.connected.is_set(),
            "inbox": link.depth() if link else 0}


class Served(Protocol):
    def start(self) -> None: ...

    def run(self) -> None: ...

    def stop(self, *_: Any) -> None: ...


def serve_until_signalled(rt: Served) -> int:
    """Start, run until SIGTERM or SIGINT asks ``rt`` to stop; the exit status."""
    signal.signal(signal.SIGTERM, rt.stop)
    signal.signal(signal.SIGINT, rt.stop)
    rt.start()
    rt.run()
    return 0
