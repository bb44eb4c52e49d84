# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: demo test bench ui install mlproject clean-results

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

# The main job: a whole tuning session on the embedded synthetic dataset (generated on first use).
demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/mlflow run . -e tune --env-manager local \
		--experiment-name deepfake -P config=demo -P no_progress=true

test: $(STAMP)
	$(PY) -m pytest -q

# Throughput, accuracy parity, hardware ceiling, inference and pruning figures (see README).
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pipeline bench $(BENCH_ARGS)

# MLproject is generated from the command table (pipeline/cli/commands.py); a test checks it is current.
mlproject: $(STAMP)
	$(PY) -m pipeline.cli.mlproject > MLproject

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

clean-results:
	rm -rf mlflow.db mlruns mlartifacts optuna.db optuna.db.*.lock submission.csv
