# quota-gw — `make dev` runs the product, `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: dev test lint test-long bench venv system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,test]'
	touch $(STAMP)

dev: $(STAMP)
	$(VENV)/bin/quota-gw dev --config examples/quota-gw.yaml --authorize-port 8081

test: lint system-deps
	$(PY) -m pytest -q

# ruff and mypy, configured in pyproject.toml; `make test` runs them before pytest.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts loadtests
	$(VENV)/bin/mypy

system-deps:  # nginx (tests/test_nginx.py), chromium + chromedriver (tests/test_pages.py); skipped unless root with apt-get, never fatal
	@VENV=$(VENV) sh scripts/system-deps.sh

test-long: $(STAMP)
	QUOTA_GW_SOAK=1 $(PY) -m pytest -q -m soak

# Locust, headless, long: req/s and p50/p95/p99, then the invariants against Postgres and Redis.
loadtest: $(STAMP)
	$(PY) loadtests/run.py --users 100 --duration 120

# Side-by-side benchmarks (needs wrk); appends to docs/benchmarks.md.
bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/bench.py --write
	$(PY) bench/drain.py
