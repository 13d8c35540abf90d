# The README's commands live here: `make run`, `make test` and `make bench`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test servers lint typecheck bench clean chaos-soak

run: $(VENV)/.installed
	$(BIN)/singleton run config.example.yaml

test: servers $(VENV)/.dev
	$(BIN)/ruff check singleton tests jobs bench
	$(BIN)/mypy singleton
	$(BIN)/pytest -n 2 --dist loadfile --durations=15

# The chaos suite's soak size (tests/chaos/soak.py): minutes of random faults per backend,
# one backend at a time; rewrites the generated part of docs/reliability.md. Replay a run
# with its seed: make chaos-soak SEED=N BACKENDS=redis
MINUTES ?= 4.5
SEED ?= 0
BACKENDS ?= sqlite,redis,redis-volatile,redlock,zookeeper,etcd,postgres
chaos-soak: servers $(VENV)/.dev
	$(BIN)/python -m tests.chaos.soak --minutes $(MINUTES) --seed $(SEED) --backends $(BACKENDS)

servers:
	scripts/install-servers

# Starts its own servers, prints the tables and writes docs/benchmarks.md (about 11 minutes).
bench: servers $(VENV)/.bench
	$(BIN)/python -m bench

$(VENV)/.bench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[all,bench]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
