# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# The tiny Transfusion model on the shapes world, on CPU. Re-running resumes (or ends at once).
DEMO_DIR ?= workdir/demo
demo: $(BIN)/.installed
	JAX_PLATFORMS=cpu $(BIN)/transfusion-train --config experiments/transfusion.py:demo \
		--workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) *.egg-info
