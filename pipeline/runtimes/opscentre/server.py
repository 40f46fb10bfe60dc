"""`cityops console`: load and check everything once, then serve until SIGTERM / Ctrl-C."""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from pipeline.core.identity import AckUsers
from pipeline.runtimes.opscentre.app import console_app
from pipeline.runtimes.opscentre.auth import session_secret
from pipeline.runtimes.opscentre.geo import CityMap
from pipeline.runtimes.opscentre.store import Store
from pipeline.shared.config import Settings
from pipeline.shared.http_api import guarded_protocol
from rules.yamlfile import ConfigError

DEMO_USERS = Path(__file__).with_name("demo_users.yaml")
DEMO_LOGINS = ("chunxi (春熙路街道), jinjiang (锦江区), city-duty (市), gas-centre (燃气), "
               "w-510104020001-01 (网格员 张敏, 08-20) or w-510104020001-02 (罗川, 20-08: the push "
               "goes to whoever is on shift); password cityops-demo")
log = logging.getLogger("cityops.console")


def client_id(s: Settings) -> str:
    """The console's persistent session (MQTT) or consumer group (Kafka): its own, named after
    its database, so it never takes over the pipeline's and keeps its own across restarts."""
    if s.opscentre.client_id:
        return s.opscentre.client_id
    digest = hashlib.sha256(str(s.opscentre.db.resolve()).encode()).hexdigest()[:10]
    return f"cityops-console-{digest}"


def serve(s: Settings, *, kafka: bool, demo: bool) -> int:
    from pipeline.core.registry import check_districts
    from pipeline.core.registry import load as load_registry
    from rules.compiler import load_rules

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if demo:
        # beside `cityops run --simulate` in one terminal: its story is what people read there;
        # the console's log goes to a file, warnings also to the terminal. And like the
        # simulated city, the console starts afresh (the last run's incidents never resolve).
        for old in (s.opscentre.db, *(s.opscentre.db.with_name(s.opscentre.db.name + x)
                                      for x in ("-wal", "-shm"))):
            old.unlink(missing_ok=True)
        s.opscentre.db.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, filename=s.opscentre.db.with_suffix(".log"),
                            format=fmt)
        warnings = logging.StreamHandler(sys.stderr)
        warnings.setLevel(logging.WARNING)
        logging.getLogger().addHandler(warnings)
    else:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt)
    rules = load_rules(s.packs, s.routing, params=s.params)
    registry = load_registry(s.registry, rules.kinds)
    check_districts(rules.packs, rules.sources, registry, s.params)
    users_file = DEMO_USERS if demo else s.acks.users
    if users_file is None:
        raise ConfigError("acks.users", None, "the console's logins are the users of acks.users "
                          "with a `password:` (README: The operations-centre console); set "
                          "acks.users in --config or CITYOPS_ACKS__USERS, or try --demo")
    users = AckUsers(registry, users_file)
    if not users.passwords:
        raise ConfigError(str(users_file), None, "no user has a `password:`, so nobody can log "
                          "in; add one made by `cityops console --hash-password`")
    depts: dict[str, set[str]] = {}
    for category, dept in registry.dept_of_category.items():
        depts.setdefault(dept, set()).add(category)
    store = Store(s.opscentre.db, depts)
    city_map = CityMap(registry)

    def changed(changes) -> None:
        hub.changed(changes)

    if kafka:
        from pipeline.runtimes.opscentre.feeds import KafkaFeed
        feed = KafkaFeed(store, changed, s.kafka, group=client_id(s))
        where = f"kafka {s.kafka.bootstrap}"
    else:
        from pipeline.runtimes.opscentre.feeds import MqttFeed
        m = s.mqtt
        host, port = (m.host, m.port) if m.url else (s.embedded.host, s.embedded.port)
        feed = MqttFeed(store, changed, host=host, port=port, prefix=m.prefix,
                        client_id=client_id(s), username=m.username,
                        password=m.password.get_secret_value() if m.password else None)
        where = f"mqtt://{host}:{port}"
    app, hub = console_app(store, users, feed, secret=session_secret(s.opscentre.db),
                           secure_cookie=s.opscentre.secure_cookie,
                           session_hours=s.opscentre.session_hours, city_map=city_map)

    host, port = s.opscentre.host, s.opscentre.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"cannot listen on {host}:{port}: {exc.strerror} (another console? "
                              "set opscentre.port or --port)") from None
    feed.start(wait_s=60.0 if demo else 15.0)
    config = uvicorn.Config(app, http=guarded_protocol(200, 10.0), timeout_keep_alive=5,
                            timeout_graceful_shutdown=3, lifespan="off", access_log=False,
                            log_config=None, server_header=False)
    server = uvicorn.Server(config)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/"
    print(f"cityops console: {url}  (incidents from {where}; database {s.opscentre.db})",
          file=sys.stderr, flush=True)
    if demo:
        print(f"cityops console: demo logins {DEMO_LOGINS}", file=sys.stderr, flush=True)
    # uvicorn on a thread of its own: on the main thread it would re-raise SIGTERM after its
    # shutdown, and the console would not exit 0 when an operator stops it
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
    web.start()
    try:
        while not stop.wait(0.5) and web.is_alive():
            pass                        # the main thread only waits: a signal sets `stop`
    finally:
        hub.close()
        server.should_exit = True
        web.join(10)
        feed.stop()
    return 0
