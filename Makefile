# Two entry points: `make demo` and `make test`. Both create .venv on first use; the demo installs
# only the package, the tests add their extras (pytest, the PyTorch parity references).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install install-test clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed setup.py
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed
install-test: $(BIN)/.installed-test

# Everything (what CI runs: .ci/run), under 15 minutes on 2 cores: two pytest workers
# (pytest-xdist), since most of a test's time is XLA compiling on one thread.
test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q -n 2 tests

# Everyday work: the tests not marked slow (subprocess CLIs, multi-process, long sampling), under
# 2 minutes on 2 cores.
test-fast: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

# The demo on the shapes world, on CPU: train the demo VAE (once: skipped when DEMO_DIR/autoencoder
# has its latent statistics), then the Transfusion model on its latents (re-running resumes, or
# ends at once). Its evaluators (config.evals) draw sample grids every 500 steps and, at the last
# step, score held-out scenes both ways: DEMO_DIR/evals/1000/shapes/report.md.
DEMO_DIR ?= workdir/demo
demo: $(BIN)/.installed
	test -f $(DEMO_DIR)/autoencoder/latent_stats.json || JAX_PLATFORMS=cpu \
		$(BIN)/python -m transfusion_jax.train_autoencoder \
		--config experiments/autoencoder.py:demo,kind=vae --workdir $(DEMO_DIR)/autoencoder
	JAX_PLATFORMS=cpu $(BIN)/transfusion-train --config experiments/transfusion.py:demo \
		--workdir $(DEMO_DIR) --config.autoencoder.checkpoint=$(DEMO_DIR)/autoencoder
	test -f $(DEMO_DIR)/evals/1000/shapes/report.md || JAX_PLATFORMS=cpu \
		$(BIN)/python -m transfusion_jax.evaluate --workdir $(DEMO_DIR) --only shapes
	cat $(DEMO_DIR)/evals/1000/shapes/report.md

clean:
	rm -rf $(VENV) *.egg-info
