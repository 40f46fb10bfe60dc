"""A real Mosquitto for integration tests, and small MQTT clients to talk to it.

Plain module (no pytest in it): tests/conftest.py turns it into fixtures.

    broker = Mosquitto(tmp_dir)          # own config, 127.0.0.1, a free port, persistence on
    broker.start()                       # ready when it accepts TCP; raises with the log tail
    broker.url                           # "mqtt://127.0.0.1:PORT"
    with Subscriber(broker.url, "cityops/alerts/#") as sub:       # paho 2.x, MQTT 5, QoS 1
        publish(broker.url, "cityops/readings/gas-1", b"{...}")   # waits for the PUBACK
        sub.wait_for(lambda msgs: len(msgs) >= 1, timeout=10)
    broker.restart()                     # SIGTERM (the DB is written), start again, same port
    broker.stop()

``ServerProcess`` is the process handling it shares with tsdb.py's VictoriaMetrics and
kafka_broker.py's Tansu (start until ready, SIGTERM or SIGKILL, restart, killed at exit).

The command-line clients: ``mosquitto_pub(url, topic, payload)``, ``mosquitto_sub(url, filter,
count, timeout)`` (blocking) and ``CliSubscriber`` (subscribed before the test publishes).

Mosquitto 2.0.11 as root drops to the ``mosquitto`` user *before* it opens its log file and
writes its persistence DB, and pytest's tmp dirs are 0700 root: it would run with no log and, worse,
keep running while every save fails. So as root the config says ``user root``; ``stop()`` checks
the log and raises if a save failed.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

INSTALL_HINT = ("run `make test` (it installs the Debian packages mosquitto and "
                "mosquitto-clients), or: apt-get install -y mosquitto mosquitto-clients")
READY_TIMEOUT = 10.0
RESERVED_PORTS = {1883, 8883}       # a system mosquitto may own these; tests never use them

# The test broker's settings (a custom ``config=`` replaces this block; the managed lines below
# are always added by Mosquitto itself).
TEST_CONFIG = """\
allow_anonymous true
persistence true
autosave_interval 1
# The default (1000 in 2.0, 100 in 1.x) drops QoS 1 messages queued for an offline persistent
# client beyond it: a runtime that restarts would lose readings.
max_queued_messages 1000000
max_inflight_messages 1000
# persistent_client_expiration: not set, so persistent sessions never expire.
log_type error
log_type warning
log_type notice
log_type information
log_type subscribe
log_type unsubscribe
connection_messages true
"""

# Directives Mosquitto writes itself (where it listens, where its files go, which user it runs
# as); removed from a custom config so a production file can be started as is. TLS settings go
# too: they would apply to the test listener.
MANAGED = frozenset([
    "listener", "port", "bind_address", "bind_interface", "socket_domain", "protocol",
    "persistence_location", "log_dest", "user", "pid_file", "log_timestamp_format",
    "cafile", "capath", "certfile", "keyfile", "crlfile", "dhparamfile", "ciphers",
    "ciphers_tls1.3", "tls_version", "tls_engine", "tls_engine_kpass_sha1", "tls_keyform",
    "require_certificate", "use_identity_as_username", "use_subject_as_username", "psk_hint",
    "psk_file", "http_dir",
])


class MosquittoMissing(RuntimeError):
    """The mosquitto binaries are not installed."""


class MqttRefused(ConnectionError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, reason: str, code: int):
        super().__init__(f"connection refused by the broker: {reason} (code {code})")
        self.reason = reason
        self.code = code


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in the sbin folders (Debian puts the broker in /usr/sbin, which is
    not on a normal user's PATH)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=path)


def require_binary(name: str) -> str:
    found = find_binary(name)
    if not found:
        raise MosquittoMissing(f"`{name}` is not installed: {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (never 1883/8883)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "tcp") or not u.hostname or not u.port:
        raise ValueError(f"expected mqtt://host:port, got {url!r}")
    return u.hostname, u.port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


_running: set[ServerProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        server.kill()


class ServerProcess(abc.ABC):
    """A server of the tests as a background process on ``host:port``, its stdout and stderr
    appended to ``output_path``; killed at exit if a test left it running.

    A subclass sets ``name``, ``scheme`` and writes ``command()``; ``ready()`` (accepts TCP by
    default, ``ready_means`` says so in errors), ``check_log()``, ``_diagnostics()`` and
    ``log_path`` (what ``log()`` reads, for a server that keeps a log file of its own) may be
    replaced.
    """

    name = "server"
    scheme = "tcp"
    ready_means = "accept connections"
    ready_timeout = READY_TIMEOUT
    stop_timeout = 10.0

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.output_path = self.workdir / f"{self.name}.log"
        self.log_path = self.output_path
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line of the next start (it may first write the files that start needs)."""

    def ready(self) -> bool:
        """Serving yet? An OSError means not yet."""
        with socket.create_connection((self.host, self.port), timeout=0.5):
            return True

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float | None = None) -> Self:
        """Start and wait until ``ready()`` (at most ``timeout``, default ``ready_timeout``
        seconds); raises with the log tail if it exits or is not ready in time."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self.port} is already running")
        timeout = self.ready_timeout if timeout is None else timeout
        args = self.command()
        with open(self.output_path, "ab") as out, open(os.devnull, "rb") as devnull:
            self._proc = subprocess.Popen(args, stdin=devnull, stdout=out,
                                          stderr=subprocess.STDOUT)
        _running.add(self)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                _running.discard(self)
                raise RuntimeError(f"{self.name} exited with code {code} at start\n"
                                   + self._diagnostics())
            with contextlib.suppress(OSError):      # not listening yet: try until the deadline
                if self.ready():
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not {self.ready_means} on {self.url} within "
                                   f"{timeout:.0f} s\n" + self._diagnostics())
            time.sleep(0.02)        # polls ready() (a wait on it; the process checked each time)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM and wait (at most ``timeout``, default ``stop_timeout`` seconds): servers
        write what they hold on a clean shutdown. Raises if it did not stop in time (then it is
        killed) or if ``check_log()`` finds a failure."""
        proc = self._proc
        if proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM\n"
                                   + self._diagnostics()) from None
        self._proc = None
        _running.discard(self)
        self.check_log()

    def kill(self) -> None:
        """SIGKILL: a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        _running.discard(self)

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (SIGTERM; SIGKILL if ``hard``) and start again on the same port, with the same
        files in ``workdir``."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_log(self) -> None:  # noqa: B027 (a hook: most servers have nothing to check)
        """Raise if the log shows a failure the server kept running through (after each clean
        stop); none is known by default."""

    def _diagnostics(self) -> str:
        paths = dict.fromkeys([self.output_path, self.log_path])
        return "\n".join(f"--- {path} ---\n{_tail(path)}" for path in paths)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.url}, pid={self.pid}, "
                f"workdir={str(self.workdir)!r})")


class Mosquitto(ServerProcess):
    """One mosquitto process with its own config, log and persistence in ``workdir``.

    ``config`` replaces TEST_CONFIG (e.g. the production file with test paths for
    password_file/acl_file); the listener (127.0.0.1:``port``), persistence_location, log file
    and, as root, ``user root`` are always written by this class.

    ``stop()`` and ``restart()`` let it write its persistence DB: QoS 1 messages queued for
    persistent sessions survive. ``kill()`` is a crash: only what the last autosave wrote does.
    """

    name = "mosquitto"
    scheme = "mqtt"

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None, *,
                 config: str | None = None, binary: str | None = None):
        self.binary = binary or require_binary("mosquitto")
        super().__init__(workdir, port)
        self.data_dir = self.workdir / "data"
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"        # the broker's own log
        self.output_path = self.workdir / "mosquitto.out"     # stdout/stderr (startup errors)
        self.body = TEST_CONFIG if config is None else config

    # -- config ------------------------------------------------------------------------------
    def render_config(self) -> str:
        kept = []
        for line in self.body.splitlines():
            words = line.split()
            if words and not words[0].startswith("#") and words[0] in MANAGED:
                kept.append(f"# (set by bench/harness/brokers.py) {line}")
            else:
                kept.append(line)
        managed = [
            "# written by bench/harness/brokers.py",
            f"listener {self.port} {self.host}",
            f"persistence_location {self.data_dir}/",
            f"log_dest file {self.log_path}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, 2.0.11 switches to `mosquitto` before opening the log and saving the DB;
            # in a 0700 tmp dir both fail (and the broker keeps running regardless).
            managed.append("user root")
        return "\n".join(managed + ["", *kept, ""])

    def command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.render_config())
        return [self.binary, "-c", str(self.conf_path)]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mosquitto.db"

    # -- logs --------------------------------------------------------------------------------
    def check_log(self) -> None:
        """The persistence DB is written on a clean stop; a save that failed only shows here."""
        text = self.log()
        for bad in ("Error saving in-memory database", "Unable to open log file",
                    "Error: Permission denied"):
            if bad in text:
                raise RuntimeError(f"mosquitto logged {bad!r}\n" + self._diagnostics())

    def _diagnostics(self) -> str:
        return (super()._diagnostics()
                + f"\n--- {self.conf_path} ---\n{_tail(self.conf_path, 200)}")


# -- paho clients -----------------------------------------------------------------------------

def _client(cid: str, protocol: int, clean_session: bool | None,
            username: str | None, password: str | None) -> mqtt.Client:
    if protocol == 5:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    elif protocol == 311:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                        clean_session=True if clean_session is None else clean_session)
    else:
        raise ValueError("protocol is 5 or 311")
    if username is not None:
        c.username_pw_set(username, password)
    return c


def _connect_props(session_expiry: int | None) -> Properties | None:
    if session_expiry is None:
        return None
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = session_expiry
    return p


class Subscriber:
    """A paho 2.x subscriber (MQTT 5 by default) collecting ``(topic, payload bytes)``.

    MQTT 5 persistent session: ``clean_start=False, session_expiry=3600`` (mosquitto ends an
    MQTT 5 session at disconnect when the expiry is 0, the default). MQTT 3.1.1 persistent
    session: ``protocol=311, clean_start=False`` (clean_session=False). Subscribes (again) on
    every connect; ``start()`` returns once the SUBACK is in and raises MqttRefused if the
    broker refuses the connection.
    """

    def __init__(self, url: str, *topic_filters: str, qos: int = 1, client_id: str | None = None,
                 protocol: int = 5, clean_start: bool = True, session_expiry: int | None = None,
                 username: str | None = None, password: str | None = None,
                 keepalive: int = 30):
        self.host, self.port = host_port(url)
        self.filters = list(topic_filters)
        self.qos = qos
        self.protocol = protocol
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.client_id = client_id or f"test-{uuid.uuid4().hex[:12]}"
        self.client = _client(self.client_id, protocol,
                              clean_start if protocol == 311 else None, username, password)
        self._cond = threading.Condition()
        self._messages: list[tuple[str, bytes]] = []
        self.granted: list[int] = []          # SUBACK reason codes of the last subscribe
        self.session_present: bool | None = None
        self._connack: tuple[int, str] | None = None
        self._subacked = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connack = (reason_code.value, str(reason_code))
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()
        if reason_code.is_failure:
            return
        if self.filters:
            if self.protocol == 5:
                client.subscribe([(f, SubscribeOptions(qos=self.qos)) for f in self.filters])
            else:
                client.subscribe([(f, self.qos) for f in self.filters])
        else:
            self._subacked.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = [rc.value for rc in reason_codes]
        self._subacked.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self._messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def start(self, timeout: float = 10.0) -> Subscriber:
        self._subacked.clear()
        self._connack = None
        kw = {}
        if self.protocol == 5:
            kw = {"clean_start": self.clean_start,
                  "properties": _connect_props(self.session_expiry)}
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(self.host, self.port, self.keepalive, **kw)
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None, timeout)
            connack = self._connack
        if connack is None or connack[0] >= 0x80:
            self.client.loop_stop()
            self.client.disconnect()
            if connack is None:
                raise TimeoutError(f"no CONNACK from {self.host}:{self.port} in {timeout} s")
            raise MqttRefused(connack[1], connack[0])
        if not self._subacked.wait(timeout):
            self.close()
            raise TimeoutError(f"no SUBACK for {self.filters} in {timeout} s")
        return self

    def close(self) -> None:
        """Disconnect cleanly (a persistent session stays on the broker)."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool],
                 timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Wait until ``predicate(messages)`` holds; return the messages. AssertionError (with
        what did arrive) on timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self._messages), timeout)
            got = list(self._messages)
        if not ok:
            shown = "\n  ".join(f"{t} {p[:120]!r}" for t, p in got[:20])
            raise AssertionError(f"{self.client_id}: condition not met in {timeout} s; "
                                 f"{len(got)} message(s):\n  {shown}")
        return got

    def wait_count(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        return self.wait_for(lambda m: len(m) >= n, timeout)


def publish(url: str, topic: str, payload: bytes | str, qos: int = 1, *, retain: bool = False,
            username: str | None = None, password: str | None = None, protocol: int = 5,
            client_id: str | None = None, timeout: float = 10.0) -> int:
    """Connect, publish one message, wait for the PUBACK, disconnect. Returns the PUBACK reason
    code (MQTT 5: 0 success, 16 no matching subscribers, 135 not authorized; 3.1.1: always 0).
    Raises MqttRefused if the connection is refused, ConnectionError if the broker drops the
    connection first (e.g. a packet over max_packet_size), TimeoutError if no PUBACK comes."""
    return publish_many(url, [(topic, payload)], qos, retain=retain, username=username,
                        password=password, protocol=protocol, client_id=client_id,
                        timeout=timeout)[0]


def publish_many(url: str, messages: Iterable[tuple[str, bytes | str]], qos: int = 1, *,
                 retain: bool = False, username: str | None = None, password: str | None = None,
                 protocol: int = 5, client_id: str | None = None,
                 timeout: float = 30.0) -> list[int]:
    """``publish`` for many messages over one connection; one reason code per message."""
    host, port = host_port(url)
    c = _client(client_id or f"pub-{uuid.uuid4().hex[:12]}", protocol, None, username, password)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    cond = threading.Condition()
    connack: list[tuple[int, str]] = []
    acks: dict[int, int] = {}

    def on_connect(client, userdata, flags, rc, props):
        with cond:
            connack.append((rc.value, str(rc)))
            cond.notify_all()

    def on_publish(client, userdata, mid, rc, props):
        with cond:
            acks[mid] = rc.value
            cond.notify_all()

    def on_disconnect(client, userdata, flags, rc, props):
        with cond:
            dropped.append(str(rc))
            cond.notify_all()

    dropped: list[str] = []
    c.on_connect, c.on_publish, c.on_disconnect = on_connect, on_publish, on_disconnect
    c.reconnect_delay_set(0.1, 1)
    c.connect(host, port, 30)
    c.loop_start()
    try:
        with cond:
            if not cond.wait_for(lambda: connack, timeout):
                raise TimeoutError(f"no CONNACK from {host}:{port} in {timeout} s")
            if connack[0][0] >= 0x80:
                raise MqttRefused(connack[0][1], connack[0][0])
        mids = [c.publish(t, p, qos=qos, retain=retain).mid for t, p in messages]
        if qos == 0:
            return [0] * len(mids)
        with cond:
            if not cond.wait_for(lambda: dropped or all(m in acks for m in mids), timeout):
                raise TimeoutError(f"{sum(m in acks for m in mids)} of {len(mids)} "
                                   f"publishes acknowledged in {timeout} s")
            if not all(m in acks for m in mids):
                raise ConnectionError(f"the broker closed the connection ({dropped[0]}) with "
                                      f"{sum(m in acks for m in mids)} of {len(mids)} "
                                      f"publishes acknowledged (too large? see its log)")
            return [acks[m] for m in mids]
    finally:
        c.disconnect()
        c.loop_stop()


# -- command-line clients ---------------------------------------------------------------------

def _run(args: list[str], timeout: float, data: bytes | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, check=False, capture_output=True, timeout=timeout,
                          input=data if data is not None else b"")


def _auth_args(username: str | None, password: str | None) -> list[str]:
    args = []
    if username is not None:
        args += ["-u", username]
    if password is not None:
        args += ["-P", password]
    return args


def mosquitto_pub(url: str, topic: str, payload: bytes | str, qos: int = 1, *,
                  retain: bool = False, username: str | None = None,
                  password: str | None = None, protocol: int | None = None,
                  extra: Sequence[str] = (), check: bool = True,
                  timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run ``mosquitto_pub -h HOST -p PORT -t TOPIC -q QOS -s`` with ``payload`` on stdin."""
    host, port = host_port(url)
    args = [require_binary("mosquitto_pub"), "-h", host, "-p", str(port), "-t", topic,
            "-q", str(qos), "-s", *_auth_args(username, password)]
    if retain:
        args.append("-r")
    if protocol is not None:
        args += ["-V", {5: "mqttv5", 311: "mqttv311"}[protocol]]
    args += list(extra)
    data = payload.encode() if isinstance(payload, str) else payload
    proc = _run(args, timeout, data)
    result = subprocess.CompletedProcess(args, proc.returncode,
                                         proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    if check and proc.returncode != 0:
        raise RuntimeError(f"mosquitto_pub failed ({proc.returncode}): {result.stderr.strip()}")
    return result


def _sub_args(url: str, topic_filters: str | Sequence[str], qos: int, client_id: str | None,
              persistent: bool, username: str | None, password: str | None,
              protocol: int | None) -> list[str]:
    host, port = host_port(url)
    filters = [topic_filters] if isinstance(topic_filters, str) else list(topic_filters)
    args = [require_binary("mosquitto_sub"), "-h", host, "-p", str(port), "-q", str(qos),
            *_auth_args(username, password)]
    for f in filters:
        args += ["-t", f]
    if client_id is not None:
        args += ["-i", client_id]
    if persistent:
        args.append("-c")
    if protocol is not None:
        args += ["-V", {5: "mqttv5", 311: "mqttv311"}[protocol]]
        if protocol == 5 and persistent:
            args += ["-x", "3600"]
    return args


def mosquitto_sub(url: str, topic_filters: str | Sequence[str], count: int, timeout: int = 10,
                  *, qos: int = 1, client_id: str | None = None, persistent: bool = False,
                  username: str | None = None, password: str | None = None,
                  protocol: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Run ``mosquitto_sub -h HOST -p PORT -t FILTER -v -C COUNT -W TIMEOUT`` and return its
    output lines ("topic payload"). Fewer than ``count`` lines means it timed out (the caller
    asserts). Raises RuntimeError if it failed otherwise (refused, unreachable).

    It blocks: for messages published *after* it subscribed, use CliSubscriber."""
    args = _sub_args(url, topic_filters, qos, client_id, persistent, username, password,
                     protocol)
    args += ["-v", "-C", str(count), "-W", str(int(timeout)), *extra]
    proc = _run(args, timeout + 15)
    return _sub_lines(args, proc.returncode, proc.stdout, proc.stderr)


def _sub_lines(args: list[str], code: int, out: bytes, err: bytes) -> list[str]:
    text = err.decode(errors="replace").strip()
    # 27 is mosquitto_sub's exit code when -W runs out; other failures say why on stderr
    if code not in (0, 27):
        raise RuntimeError(f"{' '.join(args)} failed ({code}): {text}")
    return out.decode(errors="replace").splitlines()


class CliSubscriber:
    """``mosquitto_sub`` in the background, subscribed before ``start()`` returns.

    No output parsing: ``start()`` first creates a persistent session holding the subscription
    (``mosquitto_sub -c -i ID -t FILTER -E``: exits at the SUBACK), then starts the collecting
    ``mosquitto_sub -c -i ID ... -v -C COUNT -W TIMEOUT``; whatever is published in between is
    queued for the session. ``lines()`` waits for it to end, returns its lines and removes the
    session.

        with CliSubscriber(broker.url, "cityops/alerts/#", count=2, timeout=20) as sub:
            mosquitto_pub(broker.url, "cityops/readings/x", payload)
        assert len(sub.lines()) == 2
    """

    def __init__(self, url: str, topic_filters: str | Sequence[str], count: int,
                 timeout: int = 10, *, qos: int = 1, username: str | None = None,
                 password: str | None = None, client_id: str | None = None):
        self.url, self.filters, self.count, self.timeout = url, topic_filters, count, timeout
        self.qos = qos
        self.auth = (username, password)
        self.client_id = client_id or f"cli-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_args: list[str] = []
        self._lines: list[str] | None = None

    def _args(self, persistent: bool) -> list[str]:
        return _sub_args(self.url, self.filters, self.qos, self.client_id, persistent,
                         *self.auth, None)

    def start(self) -> CliSubscriber:
        args = self._args(True) + ["-E"]
        proc = _run(args, 15)
        _sub_lines(args, proc.returncode, proc.stdout, proc.stderr)
        args = self._args(True) + ["-v", "-C", str(self.count), "-W", str(int(self.timeout))]
        self._run_args = args
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        return self

    def lines(self) -> list[str]:
        if self._lines is None:
            assert self._proc is not None, "start() first"
            out, err = self._proc.communicate(timeout=self.timeout + 15)
            self._lines = _sub_lines(self._run_args, self._proc.returncode, out, err)
            # end the persistent session (a clean connect discards it)
            args = self._args(False) + ["-E"]
            _run(args, 15)
        return self._lines

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.close()


def mosquitto_passwd(password_file: str | os.PathLike[str], username: str, password: str) -> None:
    """Add or update a user with ``mosquitto_passwd -b`` (``-c`` creates the file)."""
    path = Path(password_file)
    args = [require_binary("mosquitto_passwd")]
    if not path.exists():
        args.append("-c")
    args += ["-b", str(path), username, password]
    proc = _run(args, 30)
    if proc.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).decode(errors='replace').strip()}")
