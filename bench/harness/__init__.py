"""The real servers and processes that tests and benchmarks start, on 127.0.0.1: Mosquitto
(brokers), tansu, a Kafka-protocol broker, and `cityops worker`/`bridge` processes
(kafka_broker), VictoriaMetrics (tsdb), and `cityops console` with the Chromium that drives it
(console_browser). Plain modules, no pytest in them: tests/conftest.py turns them into fixtures."""
