"""An in-process MQTT broker, so that `cityops run` works out of the box with no broker set up.

When no broker URL is configured, the runtime starts one of these on 127.0.0.1:1883 and talks
to it like to any other broker; gateways on the same machine (or `cityops run --simulate`)
publish to it. It is PyPI `amqtt` running its asyncio loop in a daemon thread.

It is a convenience default, **not a production broker**:

- MQTT 3.1.1 only. amqtt answers an MQTT 5 CONNECT with CONNACK "unacceptable protocol version"
  (return code 1) and drops the connection: clients must connect with MQTTv311 (paho:
  ``mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)``).
- Anonymous and plain TCP, bound to one address (default localhost only): no TLS, no users,
  no ACLs. Do not bind it to a public interface.
- Sessions live in memory: a persistent session (``clean_session=False``) keeps its
  subscriptions and its queued QoS 1/2 messages across reconnects, but not across a restart of
  the broker (that is, of cityops), and a session unused for ``SESSION_EXPIRY_S`` is dropped.
- amqtt delivers a message at the subscriber's granted QoS, not at min(publish, granted): a
  QoS 0 publish reaches a QoS 1 subscriber as QoS 1. Harmless here; a difference from mosquitto.
- One Python thread: about 1,200 QoS 1 messages a second end to end (measured on a 2-core
  machine, paho publisher and subscriber in the same process). A city deployment uses a real
  broker (mosquitto, EMQX, VerneMQ) and sets the broker URL.

Configured as amqtt ≥ 0.11 wants it (a ``BrokerConfig``-shaped dict, plugins named by dotted
path with their own config): one TCP listener, no $SYS topics, no packet/event logging, and an
auth plugin of ours that lets everyone in. (amqtt's own ``AnonymousAuthPlugin`` marks every
session it admits "anonymous", and amqtt then neither keeps an anonymous session after its
client disconnects nor queues messages for it: ``clean_session=False`` would silently mean
nothing.) amqtt's loggers are set to WARNING unless the application has set them already.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Self

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

__all__ = ["SESSION_EXPIRY_S", "EmbeddedBroker"]

SESSION_EXPIRY_S = 24 * 3600   # a persistent session nobody has used for a day is dropped
_QUIET_LOGGERS = ("amqtt", "transitions")   # amqtt logs every connection at INFO; its state
                                            # machine library (transitions) likewise


class AllowAll(BaseAuthPlugin):
    """Admit every client, with or without a username, as a normal (not anonymous) session."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def _config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "session_expiry_interval": SESSION_EXPIRY_S,
        # the whole plugin set (replaces amqtt's defaults: event/packet loggers, $SYS every 20 s)
        "plugins": {f"{AllowAll.__module__}.{AllowAll.__qualname__}": {}},
    }


class EmbeddedBroker:
    """amqtt in a daemon thread: ``start()``, use ``url``, ``stop()`` (or ``with``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- start ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start the broker; return once its port accepts connections.

        Raises RuntimeError, saying what to do, if the port is taken or amqtt fails to start.
        """
        if self.running:
            raise RuntimeError(f"the embedded MQTT broker is already running at {self.url}")
        _quiet_logging()
        self._check_port_free()
        ready = threading.Event()
        outcome: dict[str, BaseException | None] = {"error": None}
        self._thread = threading.Thread(target=self._serve, args=(ready, outcome),
                                        name=f"cityops-mqtt-broker-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self._abandon(timeout)
            raise RuntimeError(f"the embedded MQTT broker did not start within {timeout:g} s on "
                               f"{self.host}:{self.port}")
        error = outcome["error"]
        if error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(self._explain(error)) from error

    def _check_port_free(self) -> None:
        """Bind the address ourselves first (as amqtt will: SO_REUSEADDR), so a taken port is a
        clear error and not a traceback in amqtt's log."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise RuntimeError(f"cannot start the embedded MQTT broker: host {self.host!r} does "
                               f"not resolve ({exc.strerror})") from exc
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(addr)
                except OSError as exc:
                    raise RuntimeError(self._explain(exc)) from exc

    def _explain(self, exc: BaseException) -> str:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        where = f"{self.host}:{self.port}"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return (f"cannot start the embedded MQTT broker: {where} is already in use (another "
                    f"MQTT broker such as mosquitto, or another cityops?). Stop it, pick another "
                    f"port, or configure that broker's URL so cityops uses it instead")
        if isinstance(cause, OSError) and cause.errno == errno.EACCES:
            return (f"cannot start the embedded MQTT broker: no permission to listen on {where} "
                    f"(ports under 1024 need privileges); pick a port >= 1024")
        if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
            return (f"cannot start the embedded MQTT broker: {self.host} is not an address of "
                    f"this machine")
        return f"cannot start the embedded MQTT broker on {where}: {exc}"

    def _serve(self, ready: threading.Event, outcome: dict[str, BaseException | None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(ready, outcome))
        except BaseException as exc:   # reported to start() or logged, never lost
            if not ready.is_set():
                outcome["error"] = exc
                ready.set()
            else:
                logging.getLogger(__name__).exception("the embedded MQTT broker stopped")
        finally:
            with contextlib.suppress(Exception):
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    async def _main(self, ready: threading.Event, outcome: dict[str, BaseException | None]) -> None:
        self._stopped = asyncio.Event()
        broker = Broker(_config(self.host, self.port))
        await broker.start()           # raises BrokerError if a listener cannot bind
        if self.port == 0:             # the OS picked one: report the real port
            with contextlib.suppress(Exception):
                server = broker._servers["default"].instance
                self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopped.wait()
        await broker.shutdown()

    # ---- stop -------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, close the listener and end the thread. Safe to call twice."""
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None:
            return
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):     # the loop closed in between
                loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout)
        if thread.is_alive():
            self._abandon(timeout)
            raise RuntimeError(f"the embedded MQTT broker at {self.url} did not stop within "
                               f"{timeout:g} s")
        self._thread = self._loop = self._stopped = None

    def _abandon(self, timeout: float) -> None:
        """Last resort: stop the loop where it is (the thread is a daemon either way)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(min(timeout, 2.0))


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _quiet_logging() -> None:
    for name in _QUIET_LOGGERS:
        log = logging.getLogger(name)
        if log.level == logging.NOTSET:        # the application did not choose: keep it quiet
            log.setLevel(logging.WARNING)
