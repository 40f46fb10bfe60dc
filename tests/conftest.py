"""The fixtures the tests share: a real Mosquitto (see bench/harness/brokers.py), a real
VictoriaMetrics for the history sink (bench/harness/tsdb.py), tansu for Kafka, `cityops run`
processes (``runtime``), local push endpoints, a headless Chromium, and the built-in rules with
the Chengdu fixture registry. Plain helpers are in tests/support.py."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.harness.brokers import Mosquitto, MosquittoMissing, Subscriber
from bench.harness.console_browser import CHROMIUM, CHROMIUM_ARGS, Console
from bench.harness.kafka_broker import Tansu, TansuMissing
from bench.harness.tsdb import VictoriaMetrics, VictoriaMetricsMissing
from pipeline.core import registry
from rules.compiler import load_rules
from tests.push_endpoints import Endpoints
from tests.support import DUTY_TOKENS, Runtime, console_city_files, sha256

# compiled registries (pipeline/core/registry_cache.py) of this run, and of the processes it starts,
# go to a folder of its own, not the user's cache
os.environ.setdefault("CITYOPS_CACHE", tempfile.mkdtemp(prefix="cityops-test-cache-"))


def _new_broker(tmp_path_factory: pytest.TempPathFactory, **kw) -> Mosquitto:
    try:
        return Mosquitto(tmp_path_factory.mktemp("mosquitto"), **kw)
    except MosquittoMissing as e:       # never a skip: `make test` installs it
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A started broker shared by the test module (anonymous, persistence on, free port)."""
    broker = _new_broker(tmp_path_factory).start()
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Mosquitto]]:
    """``make(config=None, port=None, start=True)``: a broker of this test's own (to restart or
    kill, or with another config); all are stopped at the end of the test."""
    made: list[Mosquitto] = []

    def make(config: str | None = None, port: int | None = None, start: bool = True) -> Mosquitto:
        broker = _new_broker(tmp_path_factory, config=config, port=port)
        made.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def sub(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    """Subscribed on the module's Mosquitto to every notice, push, dead letter and receipt."""
    with Subscriber(mosquitto.url, "cityops/alerts/#", "cityops/push/+", "cityops/deadletter",
                    "cityops/receipts") as s:
        yield s


# ---- a real time-series database for the history sink (see bench/harness/tsdb.py) ----------------

def _new_vm(tmp_path_factory: pytest.TempPathFactory, **kw) -> VictoriaMetrics:
    try:
        return VictoriaMetrics(tmp_path_factory.mktemp("victoria-metrics"), **kw)
    except VictoriaMetricsMissing as e:     # never a skip: `make test` installs it
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """A started VictoriaMetrics of this test's own (empty, free port), stopped at the end."""
    vm = _new_vm(tmp_path_factory).start()
    yield vm
    vm.stop()


@pytest.fixture
def victoria_metrics_factory(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., VictoriaMetrics]]:
    """``make(port=None, start=True)``: more of them (or one not started yet, for a sink that
    starts before its database); all are stopped at the end of the test."""
    made: list[VictoriaMetrics] = []

    def make(port: int | None = None, start: bool = True) -> VictoriaMetrics:
        vm = _new_vm(tmp_path_factory, port=port)
        made.append(vm)
        return vm.start() if start else vm

    yield make
    for vm in made:
        vm.stop()


# ---- Kafka (tansu) -----------------------------------------------------------------------------

@pytest.fixture
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A started Kafka-protocol broker of this test's own (tansu, in memory, free port)."""
    try:
        broker = Tansu(tmp_path_factory.mktemp("tansu")).start()
    except TansuMissing as e:             # never a skip: `make test` installs it
        pytest.fail(str(e), pytrace=False)
    yield broker
    broker.stop()


# the built-in packs and the Chengdu fixture registry: what engine tests run against
@pytest.fixture(scope="module")
def rules():
    return load_rules()


@pytest.fixture(scope="module")
def chengdu(rules):
    return registry.load(None, rules.kinds)


# ---- `cityops run` as a subprocess (tests/support.py's Runtime) ----------------------------------

@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Callable[..., Runtime]]:
    """``runtime(url, name="rt", args=[...], env={...}, start=True)``: a `cityops run` process;
    every one is stopped (SIGTERM, SIGKILL on timeout) when the test ends, and one that does not
    exit 0 on SIGTERM within 15 s fails the test (stacks of all its threads in the output)."""
    made: list[Runtime] = []

    def make(url: str, name: str = "rt", args: list[str] | None = None,
             env: dict[str, str] | None = None, start: bool = True,
             module: str = "pipeline.cli") -> Runtime:
        rt = Runtime(tmp_path, url, name, list(args or []), dict(env or {}), module)
        made.append(rt)
        return rt.start() if start else rt

    yield make
    problems = [p for p in (rt.close() for rt in made) if p]
    if problems:      # SIGTERM is how operators stop it (and Ctrl-C): it must work every time
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def duty_users(tmp_path: Path) -> Path:
    """acks.users with the district duty officers of 锦江区 and 青羊区, by their DUTY_TOKENS."""
    path = tmp_path / "users.yaml"
    path.write_text(json.dumps({"users": {
        user: {"scope": "district", "code": user.removeprefix("duty-"), "token_sha256": sha256(token)}
        for user, token in DUTY_TOKENS.items()}}))         # JSON is YAML
    return path


# ---- the local push endpoints (webhook, WeCom, DingTalk, SMS) -----------------------------------

@pytest.fixture
def endpoints() -> Iterator[Endpoints]:
    with Endpoints() as ep:
        yield ep


# ---- the console: a headless Chromium, and a city to look at -------------------------------------

@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright     # only the browser tests need it
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def console_city(tmp_path: Path, mosquitto: Mosquitto, runtime):
    """`cityops run` and `cityops console` on the module's Mosquitto."""
    registry, users, routing, config = console_city_files(tmp_path)
    common = ["--config", str(config), "--registry", str(registry), "--routing", str(routing)]
    rt = runtime(mosquitto.url, "console-city", args=common, env={"CITYOPS_TICK": "200ms"})
    console = Console(tmp_path, ["--broker", mosquitto.url, *common], {}).start()
    yield rt, console
    assert console.stop() == 0, console.log()
