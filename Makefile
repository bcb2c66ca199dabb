# The two set-up commands on a fresh clone (README "Quick start"):
#   make tiny    install atlasgen into a virtual environment (.venv) and build the tiny atlas, offline
#   make test    install what the tests need (Debian's Chromium included) into .venv and run the suite
# Both are safe to rerun: installs are skipped when nothing changed. VENV=... picks another environment.
PYTHON ?= python3
VENV ?= .venv
OUT ?= build
# torch, passed to pip as one quoted argument: one requirement, no pip options (no --index-url). It gives
# the CPU build only where pip's config points at CPU wheels, as ours does; from PyPI on Linux it is the CUDA
# build. For the CPU build elsewhere, or the CUDA build on a GPU machine, install torch 2.13.0 into $(VENV)
# first (README, "Quick start"): the pin is then met and pip keeps it.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: tiny test chromium duckdb-wasm

tiny: $(VENV)/.installed
	$(BIN)/atlasgen build --preset tiny --out $(OUT)
	@echo
	@echo "The tiny atlas is in $(OUT)/site. Open it with:"
	@echo "  $(BIN)/atlasgen serve --out $(OUT)     then visit http://127.0.0.1:8000"

test: $(VENV)/.installed-test chromium duckdb-wasm
	ATLASGEN_DUCKDB_WASM=$(CURDIR)/vendor/duckdb-wasm/node_modules $(BIN)/python -m pytest -q tests

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Playwright cannot download its own browser on our machines: the browser tests use Debian's Chromium.
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -n "$$ATLASGEN_CHROMIUM" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	  echo "chromium is missing and this user cannot install it: the browser tests will be skipped" \
	       "(apt-get install -y chromium as root, or set ATLASGEN_CHROMIUM=/path/to/chromium)"; exit 0; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null

# DuckDB-WASM for the site's Query page, from the npm registry, pinned by vendor/duckdb-wasm/package-lock.json
# (node_modules stays out of git). Without npm the Query page and its browser test are left out.
duckdb-wasm:
	@if ! command -v npm >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; \
	  else echo "npm is missing: the site's Query page and its test are left out (apt-get install -y npm)"; exit 0; fi; fi; \
	npm ci --prefix vendor/duckdb-wasm --ignore-scripts --no-audit --no-fund --loglevel=error
