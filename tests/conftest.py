"""Fixtures for integration tests against a real Mosquitto (see bench/harness/brokers.py) and a real
VictoriaMetrics for the history sink (bench/harness/tsdb.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

import pytest

from pipeline import registry
from rules.compiler import load_rules
from bench.harness.brokers import Mosquitto, MosquittoMissing
from bench.harness.kafka_broker import Tansu, TansuMissing
from bench.harness.tsdb import VictoriaMetrics, VictoriaMetricsMissing

# compiled registries (pipeline/registry_cache.py) of this run, and of the processes it starts,
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


# ---- a real time-series database for the history sink (see bench/harness/tsdb.py) -------------------

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
