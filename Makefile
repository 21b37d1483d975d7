# Everyday tasks. A fresh clone needs only Python 3.11+: `make test` creates .venv first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PGBOUNCER := $(VENV)/.pgbouncer

.DEFAULT_GOAL := help
.PHONY: help install test lint format demo bench chaos clean

help:
	@echo "make install  create .venv and install the project with its dev extras"
	@echo "make test     run the test suite (finds or starts PostgreSQL and Redis)"
	@echo "make lint     ruff check, ruff format --check, mypy"
	@echo "make format   ruff format, then ruff check --fix"
	@echo "make demo     run the example workflows end to end"
	@echo "make bench    run the benchmarks (BENCH_ARGS='--part timers' runs one part)"
	@echo "make chaos    chaos soak of workers, beats, Redis and PostgreSQL (CHAOS_SECONDS=300)"
	@echo "make clean    delete caches and build output (keeps .venv)"

install: $(STAMP) $(PGBOUNCER)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11 or newer is needed; run: make PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Reinstalls only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $@

# PgBouncer is not on PyPI: Debian's package is unpacked into .venv/pgbouncer while the
# network is there (tried again by the next make until it succeeds). Without it the tests
# that need PgBouncer skip, naming it.
$(PGBOUNCER): | $(STAMP)
	@$(BIN)/python -m durable.dev.pgbouncer fetch && touch $@ \
		|| echo "pgbouncer could not be fetched; the tests that need it will skip"

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install
	$(BIN)/python -m workflows.demo

# DBOS, measured against local steps, is the optional extra 'bench'; the bench runs without it.
bench: install
	@$(BIN)/python -c 'import dbos' 2>/dev/null || $(BIN)/pip install -q -e '.[bench]' \
		|| echo "DBOS could not be installed; the bench runs without it"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

chaos: install
	$(BIN)/python -m chaos

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name '*.egg-info' \) \
		-prune -exec rm -rf {} +
