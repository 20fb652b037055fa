# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make demo   creates .venv, installs, and runs the pipeline flow on the embedded tiny default
#   make test   creates .venv, installs, checks the code with ruff and runs the test suite
#   make ui     opens the Prefect and MLflow UIs on the demo's stores
#   make stack  the server stack without docker (Prefect, MLflow, S3 on moto, a worker); Ctrl-C stops it
PYTHON ?= python3.11
VENV   ?= .venv
OUT    ?= outputs/demo
BIN    := $(VENV)/bin

.PHONY: demo ui workflow lint test bench stack install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The lora-moe-pipeline flow on the embedded default: Prefect's local API (its database under
# $(OUT)/prefect), a local artifact store and MLflow on SQLite under $(OUT), no server to start.
demo: install
	HF_HUB_OFFLINE=1 PREFECT_HOME=$(abspath $(OUT))/prefect $(BIN)/python -m flows run --preset tiny --artifact_root $(OUT)

# The Prefect and MLflow UIs on what `make demo` wrote (free loopback ports; Ctrl-C stops both).
ui: install
	$(BIN)/python deploy/stack.py ui --dir $(abspath $(OUT))

# The same stages in one process, without an orchestrator.
workflow: install
	HF_HUB_OFFLINE=1 $(BIN)/lora-moe workflow run --preset tiny --output_dir $(OUT)/workflow --overwrite

# Prefect server, MLflow server (SQLite, S3 artifacts) and moto's S3 as processes on free loopback
# ports, the work pools, the deployments of deploy/prefect.yaml and a process worker
# (deploy/stack.py; it prints the UIs' addresses and the exports for another shell).
stack: install
	HF_HUB_OFFLINE=1 $(BIN)/python deploy/stack.py up --dir $(abspath outputs/stack)

# ruff's linter and formatter (settings in pyproject.toml): `ruff format .` fixes what the second complains of.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest-xdist workers, one per core of the CI machine; tests/xdist_groups.py groups the tests so
# each whole-run fixture is built once. `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 2
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

bench: install
	$(BIN)/python bench/merge_bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/pipeline_bench.py

clean:
	rm -rf $(VENV) outputs
