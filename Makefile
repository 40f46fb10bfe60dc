# cityops: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run demo test test-deps typecheck check fuzz bench bench-quick bench-silent bench-peer bench-backtest bench-registry bench-runtime bench-kafka bench-sink bench-history bench-console soak attack clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## run: the live pipeline on an embedded MQTT broker, fed by simulated Chengdu gateways, and
## the operations-centre console beside it (http://127.0.0.1:8080, demo logins printed)
# The console is a second process: stopped with the pipeline (Ctrl-C), whatever way it ends.
# Both take the demo users, so an acknowledgement made in the console is accepted.
DEMO_USERS := pipeline/runtimes/opscentre/demo_users.yaml
run: $(STAMP)
	@CITYOPS_ACKS__USERS=$(DEMO_USERS) $(VENV)/bin/cityops console --demo --db .run/console.sqlite & \
	console=$$!; trap 'kill $$console 2>/dev/null; wait $$console' EXIT INT TERM; \
	CITYOPS_ACKS__USERS=$(DEMO_USERS) $(VENV)/bin/cityops run --simulate

## demo: replay 2010-2015 Chengdu rain and PM2.5 through the built-in packs, notices per tier
demo: $(STAMP)
	$(VENV)/bin/cityops replay --demo

## test: install what the tests need, then run them all
test: $(STAMP) test-deps
	$(VENV)/bin/cityops rules check > /dev/null
	$(VENV)/bin/ruff check pipeline rules connectors tests bench
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest -q --durations=15

## typecheck: mypy on the core (its modules and settings: [tool.mypy] in pyproject.toml)
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# What the integration tests start themselves (bench/harness/brokers.py: their own mosquitto on a free
# port of 127.0.0.1 with their own config; never the system service, never port 1883;
# bench/harness/tsdb.py: VictoriaMetrics, which takes InfluxDB line protocol, for the history sink).
# Debian puts the broker in /usr/sbin, which is not on a normal user's PATH: look there too.
# Debian's Chromium: the console's browser tests drive it with Playwright (no browser download),
# and a Chinese font, without which its screenshots show boxes for every character.
TEST_TOOLS   := mosquitto mosquitto_sub mosquitto_pub mosquitto_passwd victoria-metrics chromium
APT_PACKAGES := mosquitto mosquitto-clients victoria-metrics chromium fonts-wqy-microhei
CJK_FONT     := /usr/share/fonts/truetype/wqy/wqy-microhei.ttc

## test-deps: install the Debian packages the integration tests need, if missing
test-deps:
	@PATH="$$PATH:/usr/sbin:/usr/local/sbin:/sbin"; missing=; \
	for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	[ -f $(CJK_FONT) ] || missing="$$missing $(CJK_FONT)"; \
	[ -z "$$missing" ] && exit 0; \
	echo "make test: missing$$missing; installing $(APT_PACKAGES)"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make test: no apt-get here. Install Mosquitto 2.x, its clients, VictoriaMetrics and Chromium ($(TEST_TOOLS)) with this system's package manager, then run make test again." >&2; exit 1; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	else echo "make test: installing $(APT_PACKAGES) needs root and there is no sudo. As root run: apt-get update && apt-get install -y $(APT_PACKAGES)" >&2; exit 1; \
	fi; \
	$$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y $(APT_PACKAGES) || exit 1; \
	for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || { \
	    echo "make test: $$t is still missing after installing $(APT_PACKAGES)" >&2; exit 1; }; done

## fuzz: the engine against its reference model on generated cities, for FUZZ_MINUTES (10)
FUZZ_MINUTES ?= 10
fuzz: $(STAMP)
	$(PY) -m tests.fuzz_engine --minutes $(FUZZ_MINUTES)

## check: lint the rule packs, routing and registry
check: $(STAMP)
	$(VENV)/bin/cityops rules check

## bench: engine throughput and state size on a 1,000,000-sensor registry (README figures)
bench: $(STAMP)
	$(PY) bench/engine_bench.py

bench-quick: $(STAMP)
	$(PY) bench/engine_bench.py --sensors 20000 --readings 200000

## bench-silent: replay a 1,000,000-sensor city, 99 % never heard, at --batch 20 and 1000
bench-silent: $(STAMP)
	$(PY) bench/silent_bench.py

## bench-peer: the engine beside a bare orjson + dict loop on the same gas readings and rule
bench-peer: $(STAMP)
	$(PY) bench/peer_bench.py

## bench-backtest: cityops backtest against plain replay on the same histories (ratio, decode share)
bench-backtest: $(STAMP)
	$(PY) bench/backtest_bench.py

## bench-registry: compiled registry load time and memory, and a worker's share of 8 partitions
bench-registry: $(STAMP)
	$(PY) bench/registry_bench.py

## bench-sink: the InfluxDB history sink: points/s written, pipeline readings/s with it on/off
bench-sink: $(STAMP) test-deps
	$(PY) bench/sink_bench.py

## bench-history: cityops run with the history sink on and off: what the sink costs the pipeline
bench-history: $(STAMP) test-deps
	$(PY) bench/runtime_bench.py --history

## bench-runtime: cityops run against a real Mosquitto: readings/s and notice latency
bench-runtime: $(STAMP) test-deps
	$(PY) bench/runtime_bench.py

## bench-kafka: cityops worker on tansu vs a raw kafka-python loop and a naive Faust agent
bench-kafka: $(STAMP)
	$(PY) bench/kafka_bench.py

## bench-console: the web console with 10,000 open incidents and 200 notices/s, in Chromium
bench-console: $(STAMP) test-deps
	$(PY) bench/console_bench.py

## attack: hostile input, kill -9 in an outage, broker kill, forged acks, idle HTTP: a table
attack: $(STAMP) test-deps
	$(PY) bench/attack.py

## soak: cityops run at 2,000 readings/s for 20 minutes: RSS and state files, slopes per hour
soak: $(STAMP) test-deps
	$(PY) bench/soak.py --minutes 20

clean:
	rm -rf $(VENV) .run bench/out .pytest_cache .mypy_cache cityops-demo-notices.jsonl
