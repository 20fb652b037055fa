# Two commands do all the set-up on a fresh machine (Python 3.11):
#   make demo   creates .venv, installs, and runs the main job on the embedded tiny default
#   make test   creates .venv, installs, and runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
OUT    ?= outputs/demo
BIN    := $(VENV)/bin

.PHONY: demo test bench install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/lora-moe workflow run --preset tiny --output_dir $(OUT)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/merge_bench.py

clean:
	rm -rf $(VENV) outputs
