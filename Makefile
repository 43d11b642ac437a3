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

# The demo on the shapes world, on CPU: train the demo VAE (once: skipped when DEMO_DIR/autoencoder
# has its latent statistics), then the Transfusion model on its latents (re-running resumes, or
# ends at once), then generate for held-out scenes and score it (DEMO_DIR/report/report.md).
DEMO_DIR ?= workdir/demo
demo: $(BIN)/.installed
	test -f $(DEMO_DIR)/autoencoder/latent_stats.json || JAX_PLATFORMS=cpu \
		$(BIN)/python -m transfusion_jax.train_autoencoder \
		--config experiments/autoencoder.py:demo,kind=vae --workdir $(DEMO_DIR)/autoencoder
	JAX_PLATFORMS=cpu $(BIN)/transfusion-train --config experiments/transfusion.py:demo \
		--workdir $(DEMO_DIR) --config.autoencoder.checkpoint=$(DEMO_DIR)/autoencoder
	JAX_PLATFORMS=cpu $(BIN)/python -m transfusion_jax.demo_report --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) *.egg-info
