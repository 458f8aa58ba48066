# Two commands for a fresh clone: `make quickstart` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DS_ACCELERATOR ?= cpu

.PHONY: venv quickstart test test-quick clean

$(BIN)/bigllm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: on a CPU machine this picks the local CPU wheel, not a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/bigllm

venv: $(BIN)/bigllm

quickstart: venv
	$(BIN)/python tools/quickstart.py --workdir quickstart

test: venv
	$(BIN)/python -m pytest -q --durations=15 tests

# The development loop's tier: the unit tests and one parity run (golden losses), a few minutes.
# CI and the README's command run the whole suite (`make test`).
test-quick: venv
	$(BIN)/python -m pytest -q -m "not slow or quick" tests

clean:
	rm -rf $(VENV) quickstart runs
