# One Makefile for humans, the README and CI.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

## Installs exactly what the lock files pin (every version with its sha256), then the project
## itself without dependencies: what `make up`/`make demo` run and what `make test` tests is what
## ships. requirements-embedded.lock: runtime + the embedded servers; requirements.lock adds the dev
## tools (pytest, locust, mypy, ruff, schemathesis, ...), which only `make test`/`lint` need.
$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUN_STAMP): requirements-embedded.lock pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q --require-hashes -r requirements-embedded.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(DEV_STAMP): requirements.lock $(RUN_STAMP)
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	touch $@

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

## The main job: a demo flash sale on embedded Redis + PostgreSQL.
demo: $(RUN_STAMP)
	$(BIN)/flashgate demo

## The same stack in the foreground, for manual use.
up: $(RUN_STAMP)
	$(BIN)/flashgate up

## Tools the ops tests need beside the Python dev extras (kubectl comes from a wheel):
## promtool, from Debian's `prometheus` package, unpacked into the venv (no daemon, no service).
PROMTOOL := $(BIN)/promtool
$(PROMTOOL): | $(DEV_STAMP)
	@if command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $@; else \
	  echo "installing promtool (Debian package prometheus, unpacked into $(BIN))"; \
	  d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && cd "$$d" && \
	  { apt-get download prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; }; } && \
	  dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool "$(CURDIR)/$@"; fi
	@$@ --version | head -1

tools: $(PROMTOOL)

## The whole test suite (starts its own Redis and PostgreSQL on free ports).
## FLASHGATE_REQUIRE_TOOLS: the ops tests fail, instead of skipping, when promtool is missing,
## and the generated-client test when node/npm are (Node.js 20+; it runs npm ci itself).
test: $(DEV_STAMP) $(PROMTOOL)
	FLASHGATE_REQUIRE_TOOLS=1 $(BIN)/python -m pytest -q

## The long fault runs (tests/faults, marker `chaos`; a short version of each is in `test`).
## FLASHGATE_CHAOS_S sets the length of a run (default 60 s).
chaos: $(DEV_STAMP)
	FLASHGATE_CHAOS=1 $(BIN)/python -m pytest -q -s -m chaos tests/faults

## A flash sale under Locust, gated by loadtest/sla.toml and audited (not part of `test`).
## Reports under loadtest/results/. ARGS="--url http://127.0.0.1:8000" for a running gateway.
loadtest: $(DEV_STAMP)
	$(BIN)/python -m loadtest.run $(ARGS)

## Throughput and latency beside the baselines; writes docs/PERFORMANCE.md (not part of `test`).
bench: $(DEV_STAMP)
	@command -v wrk >/dev/null || { echo "bench: installing wrk (Debian package)"; \
	  (apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)) \
	  >/dev/null 2>&1 || sudo -n apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { echo "bench: wrk is missing and could not be installed; run: apt-get install wrk"; exit 2; }; }
	@command -v redis-benchmark >/dev/null || { echo "bench: installing redis-tools (redis-benchmark)"; \
	  apt-get install -y -qq redis-tools >/dev/null 2>&1 || sudo -n apt-get install -y -qq \
	  redis-tools >/dev/null 2>&1 || echo "bench: no redis-benchmark; the Redis rows are skipped"; }
	$(BIN)/python -m bench.run $(ARGS)

## One hot sale over gateway processes x Redis masters (bench/scale.py; not part of `test`):
## throughput, p50/p99, Redis CPU per master, scaling efficiency. Small by default (2 cores);
## ARGS="--gateways 1,2,4,8 --masters 1,2,3,4" on a big machine. Prints; --out FILE to keep it.
bench-scale: $(DEV_STAMP)
	@command -v wrk >/dev/null || { echo "bench-scale: installing wrk (Debian package)"; \
	  (apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)) \
	  >/dev/null 2>&1 || sudo -n apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  { echo "bench-scale: wrk is missing and could not be installed; run: apt-get install wrk"; exit 2; }; }
	$(BIN)/python -m bench.scale $(ARGS)

## Pinned dependencies, every version with its sha256 hashes, all platforms, Python 3.11,
## compiled from pyproject.toml by uv: requirements.lock (runtime + embedded + dev extras: make
## test, lint, CI) and, at the same versions, requirements-embedded.lock (make up, demo). The
## tools live in their own venv, never in the one they audit.
## The image (Dockerfile) installs only the runtime part: requirements-runtime.lock, the same
## versions as requirements.lock (-c) without the extras, and requirements-build.lock, the build
## backend of pyproject.toml's [build-system] (hatchling), both with hashes.
LOCK := requirements.lock
RUNTIME_LOCK := requirements-runtime.lock
BUILD_LOCK := requirements-build.lock
EMBEDDED_LOCK := requirements-embedded.lock
UV_COMPILE = $(TOOLS)/bin/uv pip compile --generate-hashes --universal --python-version 3.11 \
  --custom-compile-command "make lock"
TOOLS := .venv-tools
$(TOOLS)/.installed:
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q 'uv>=0.5' 'pip-audit>=2.7'
	touch $@

lock: $(TOOLS)/.installed
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --universal \
	  --python-version 3.11 -o $(LOCK)
	$(UV_COMPILE) pyproject.toml -c $(LOCK) -o $(RUNTIME_LOCK)
	$(UV_COMPILE) pyproject.toml --extra embedded -c $(LOCK) -o $(EMBEDDED_LOCK)
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(UV_COMPILE) - -o $(BUILD_LOCK)

## Known vulnerabilities of the pins in requirements.lock (pip-audit, PyPI's vulnerability data;
## needs the network). Fails, never passes silently, when the service can't be reached or a pin
## could not be checked (--strict).
audit: $(TOOLS)/.installed
	@$(TOOLS)/bin/pip-audit --strict --require-hashes --disable-pip --progress-spinner off \
	  -r $(LOCK) >$(TOOLS)/audit.log 2>&1; rc=$$?; cat $(TOOLS)/audit.log; \
	if [ $$rc -ne 0 ] && grep -qE 'could not be audited|ConnectionError|Max retries|timed out' \
	  $(TOOLS)/audit.log; then echo "audit: FAILED: the vulnerability service was unreachable or \
	did not know some pins; the lock file was NOT audited"; exit 2; fi; exit $$rc

## ruff (lint and format) and mypy --strict (pyproject's [tool.mypy]) on every package; CI runs it.
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy core gateway workers risk cli loadtest bench ops

clean:
	rm -rf $(VENV) $(TOOLS) .run .pytest_cache
