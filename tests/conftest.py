"""Tests run on CPU, in float32, with 8 fake devices (set before jax is imported).

`TRANSFUSION_TEST_BACKEND=gpu pytest tests/test_attention_gpu.py` leaves JAX on the machine's
accelerator instead, for the tests that need one (they are skipped on CPU); the rest of the
suite assumes the 8 CPU devices and is not meant to run that way."""
import os

ON_ACCELERATOR = os.environ.get("TRANSFUSION_TEST_BACKEND", "cpu") != "cpu"
if not ON_ACCELERATOR:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert ON_ACCELERATOR or jax.device_count() == 8, "conftest must run before anything imports jax"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vq_workdir(tmp_path_factory):
    """A tiny VQ-VAE workdir (two steps of experiments/autoencoder.py:tiny,kind=vq, no evals):
    the frozen image tokenizer of the tiny Chameleon tests, trained once per session."""
    from transfusion_jax.core.config import load_config
    from transfusion_jax.trainers import autoencoder as train_autoencoder
    workdir = str(tmp_path_factory.mktemp("tiny_vq"))
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    config.total_steps = 2
    config.evals = {}
    train_autoencoder.train(config, workdir)
    return workdir
