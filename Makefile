# Two commands do everything on a fresh machine: `make demo` and `make test`.
# `make test` runs in one process tree with an in-process Ray: every unit, one run of each path
# (Ray Data, Train, Tune, evaluation, prediction, a federated simulation) and the entrypoints'
# error paths. `make test-slow` holds the long in-process runs (resumes, injected faults, every
# federated failure mode); `make test-cluster` starts multi-process clusters (Ray heads and
# nodes, the autoscaler, a Flower deployment, an MLflow server). `make test-all` runs the three
# in one pytest session, so that one summary lists every failure of every tier (what CI runs:
# .ci/run).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1
# Ray's dashboard gets 60 s to start (30 s per module) by default: too short on a busy 2-core box.
export RAY_DASHBOARD_STARTUP_TIMEOUT_S ?= 300
export RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT ?= 240

.PHONY: install demo test test-slow test-cluster test-all lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ray_jobs.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow and not cluster" --durations=25

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not cluster" --durations=25

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster --durations=25

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs
