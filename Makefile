# minipacs: `make run` (native stack), `make test`, `make lint`, `make bench`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m scripts.native run

test: setup
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check shared services scripts tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf .data .pytest_cache
