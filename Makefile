# Quick start: `make run` (train the default experiment), `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changed since the last install, so repeated calls are cheap.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: install
	$(BIN)/python -m kd_experiments $(ARGS)

# Two pytest workers with one thread each: most tests are short CLI runs dominated by start-up, and one
# thread per process keeps two of them from fighting over the cores.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m kd_experiments.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
