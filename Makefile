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

# Short versions, under ~3 minutes in all (benchmarks/README.md, "Step 6 scenarios").
bench: $(STAMP)
	$(PY) benchmarks/codec.py --seconds 1
	$(PY) benchmarks/fleet.py --devices 200 --duration 10 --label bench
	$(PY) benchmarks/fleet.py --devices 50 --rate 0 --batch 10 --duration 10 --fleet-procs 2 --label bench-throughput --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	$(PY) benchmarks/fleet.py --scenario connect-storm --devices 1000 --rate 0.2 --duration 60 --label bench-connect-storm
	$(PY) benchmarks/fleet.py --scenario reconnect-storm --devices 300 --duration 3 --label bench-reconnect-storm --hub-env EMS_GOAWAY_SPREAD_MS=2000
	$(PY) benchmarks/fleet.py --scenario slow-dashboard --devices 500 --duration 10 --label bench-slow-dashboard --hub-env EMS_DASHBOARD_QUEUE=1000
	# scale-out: one hub process against --workers 2, both on PostgreSQL + Redis, same fleet
	$(PY) benchmarks/fleet.py --scale-out --workers 1 --devices 50 --rate 0 --batch 10 --duration 10 --fleet-procs 2 --label bench-scale-out-w1 --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	$(PY) benchmarks/fleet.py --scale-out --workers 2 --devices 50 --rate 0 --batch 10 --duration 10 --fleet-procs 2 --label bench-scale-out-w2 --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	# the same steady workload against the FastAPI and python-socketio reference hubs
	$(PY) benchmarks/compare.py --devices 300 --duration 10

bench-full: $(STAMP)
	$(PY) benchmarks/codec.py
	$(PY) benchmarks/fleet.py --devices 500 1000 2000 5000 --duration 30 --fleet-procs 2 --label steady
	$(PY) benchmarks/fleet.py --devices 10000 --rate 0.2 --duration 30 --fleet-procs 2 --label steady
	# the collector's effect: Python's defaults against the hub's tuning, same fleet
	$(PY) benchmarks/fleet.py --devices 2000 --duration 30 --label gc-default --hub-env EMS_GC_GEN0_THRESHOLD=0 EMS_GC_FREEZE_S=0
	$(PY) benchmarks/fleet.py --devices 2000 --duration 30 --label gc-tuned
	$(PY) benchmarks/fleet.py --devices 50 --rate 0 --batch 10 --duration 15 --fleet-procs 2 --label throughput --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	$(PY) benchmarks/fleet.py --scenario connect-storm --devices 10000 --rate 0.2 --duration 180 --fleet-procs 2
	$(PY) benchmarks/fleet.py --scenario reconnect-storm --devices 5000 --rate 0.2 --duration 10 --fleet-procs 2
	$(PY) benchmarks/fleet.py --scenario slow-dashboard --devices 1000 --duration 20
	$(PY) benchmarks/fleet.py --scale-out --workers 1 --devices 2000 --duration 30 --fleet-procs 2 --label scale-out-w1
	$(PY) benchmarks/fleet.py --scale-out --workers 2 --devices 2000 --duration 30 --fleet-procs 2 --label scale-out-w2
	$(PY) benchmarks/fleet.py --scale-out --workers 1 --devices 50 --rate 0 --batch 10 --duration 15 --fleet-procs 2 --label scale-out-throughput-w1 --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	$(PY) benchmarks/fleet.py --scale-out --workers 2 --devices 50 --rate 0 --batch 10 --duration 15 --fleet-procs 2 --label scale-out-throughput-w2 --hub-env EMS_RATE_LIMIT_PER_S=5000 EMS_RATE_LIMIT_BURST=5000
	$(PY) benchmarks/compare.py --devices 2000 --duration 30
	$(PY) benchmarks/plot.py

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
