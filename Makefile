# Quick start: `make run` (train the default experiment), `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench bench-methods bench-cache bench-gpu clean

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

# Each method's time per step, extra parameters and memory on resnet56 -> resnet20 (docs/benchmarks.md).
bench-methods: install
	$(BIN)/python -m kd_experiments.bench_methods $(ARGS)

# What the teacher-output cache saves: images/s cached vs uncached, and its disk cost (docs/benchmarks.md).
bench-cache: install
	$(BIN)/python -m kd_experiments.bench_cache $(ARGS)

# On a GPU: the framework vs a plain PyTorch loop, bf16 + channels_last (docs/benchmarks.md).
bench-gpu: install
	$(BIN)/python -m kd_experiments.bench_gpu $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
