# Two commands on a fresh machine with Python >= 3.11:
#   make demo   - venv + install + plant a backdoor in a small GTSRB model + defend it
#   make test   - venv + install + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Absolute: the notebook tests run their kernels from pytest's temporary folders.
DATA := $(abspath $(or $(BDJAX_DATA_DIR),../shared/data))

$(BIN)/bdjax: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/bdjax

demo: install
	BDJAX_DATA_DIR=$(DATA) $(BIN)/bdjax demo

test: install
	BDJAX_DATA_DIR=$(DATA) $(BIN)/python -m pytest -q --durations=15 -m "not heavy"

# Real-data defense tests that take several CPU minutes each (NC, I-BAU): ~15 min on 2 cores.
test-heavy: install
	BDJAX_DATA_DIR=$(DATA) $(BIN)/python -m pytest -q --durations=15 -m heavy

.PHONY: install demo test test-heavy
