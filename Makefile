# The two commands of the README: `make quickstart` and `make test`.
# Exact pins live here (pyproject keeps lower bounds only, so other machines keep their own torch).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.sobre-installed

.PHONY: install quickstart test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/sobre fit --config recipes/quickstart.yaml

test: install
	$(BIN)/python -m pytest -n 2 -q

test-all: install
	$(BIN)/python -m pytest -n 2 -q -m ""

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/measure_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
