# One Makefile for humans, the README and CI.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo up test lint clean loadtest bench

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job: a demo flash sale on embedded Redis + PostgreSQL.
demo: $(STAMP)
	$(BIN)/flashgate demo

## The same stack in the foreground, for manual use.
up: $(STAMP)
	$(BIN)/flashgate up

## The whole test suite (starts its own Redis and PostgreSQL on free ports).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## A flash sale under Locust, gated by loadtest/sla.toml and audited (not part of `test`).
## Reports under loadtest/results/. ARGS="--url http://127.0.0.1:8000" for a running gateway.
loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run $(ARGS)

## Throughput and latency beside the baselines; writes docs/PERFORMANCE.md (not part of `test`).
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "bench: installing wrk (Debian package)"; \
	  (apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)) \
	  >/dev/null 2>&1 || sudo -n apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { echo "bench: wrk is missing and could not be installed; run: apt-get install wrk"; exit 2; }; }
	@command -v redis-benchmark >/dev/null || { echo "bench: installing redis-tools (redis-benchmark)"; \
	  apt-get install -y -qq redis-tools >/dev/null 2>&1 || sudo -n apt-get install -y -qq \
	  redis-tools >/dev/null 2>&1 || echo "bench: no redis-benchmark; the Redis rows are skipped"; }
	$(BIN)/python -m bench.run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy core gateway workers risk cli

clean:
	rm -rf $(VENV) .run .pytest_cache
