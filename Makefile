# Two entry points for a newcomer: `make demo` and `make test` (both set up first).
PYTHON ?= python3

.PHONY: setup demo test test-slow lint bench-reproduce bench-memory

setup:
	bash scripts/setup.sh

demo: setup
	edge-trady demo --overwrite

test: setup
	$(PYTHON) -m pytest

test-slow: setup
	$(PYTHON) -m pytest -m slow

lint:
	ruff check . && ruff format --check .
