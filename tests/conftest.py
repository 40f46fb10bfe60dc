"""Fixtures for integration tests against a real Mosquitto (see tests/brokers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.brokers import Mosquitto, MosquittoMissing


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
