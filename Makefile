# cityops: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test check bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## demo: replay 2010-2015 Chengdu rain and PM2.5 through the built-in packs, notices per tier
demo: $(STAMP)
	$(VENV)/bin/cityops replay --demo

## test: install what the tests need, then run them all
test: $(STAMP)
	$(VENV)/bin/cityops rules check > /dev/null
	$(PY) -m pytest -q

## check: lint the rule packs, routing and registry
check: $(STAMP)
	$(VENV)/bin/cityops rules check

## bench: engine throughput and state size on a 1,000,000-sensor registry (README figures)
bench: $(STAMP)
	$(PY) bench/engine_bench.py

bench-quick: $(STAMP)
	$(PY) bench/engine_bench.py --sensors 20000 --readings 200000

clean:
	rm -rf $(VENV) bench/out .pytest_cache cityops-demo-notices.jsonl
