# `make run` and `make test` work from a fresh clone: the first use creates .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m ems.run

lint: $(STAMP)
	$(PY) -m ruff check ems tests benchmarks
	$(PY) -m ruff format --check ems tests benchmarks

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/codec.py --seconds 1
	$(PY) benchmarks/fleet.py --devices 200 --duration 10 --label bench

bench-full: $(STAMP)
	$(PY) benchmarks/codec.py
	$(PY) benchmarks/fleet.py --devices 500 1000 2000 --duration 30 --label steady
	# the collector's effect: Python's defaults against the hub's tuning, same fleet
	$(PY) benchmarks/fleet.py --devices 2000 --duration 30 --label gc-default --hub-env EMS_GC_GEN0_THRESHOLD=0
	$(PY) benchmarks/fleet.py --devices 2000 --duration 30 --label gc-tuned

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
