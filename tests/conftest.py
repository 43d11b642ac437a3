"""Tests run on CPU, in float32, with 8 fake devices (set before jax is imported).

`TRANSFUSION_TEST_BACKEND=gpu pytest tests/test_attention_gpu.py` leaves JAX on the machine's
accelerator instead, for the tests that need one (they are skipped on CPU); the rest of the
suite assumes the 8 CPU devices and is not meant to run that way."""
import os
import shutil
import tempfile
import uuid

ON_ACCELERATOR = os.environ.get("TRANSFUSION_TEST_BACKEND", "cpu") != "cpu"
# XLA's persistent compilation cache, fresh for each test run (shared by its xdist workers and
# the subprocesses they start): tests compile the same tiny programs many times over (a resumed
# run, the CLI runs), and a cache hit is the same executable, so results do not change.
# (The xdist controller loads this file first; its workers inherit its environment.)
_RUN = os.environ.setdefault("TRANSFUSION_TEST_RUN", uuid.uuid4().hex)
XLA_CACHE = os.path.join(tempfile.gettempdir(), "transfusion_jax_test_xla_cache", _RUN)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
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
    """A tiny VQ-VAE workdir (experiments/autoencoder.py:tiny,kind=vq), the frozen image
    tokenizer of the tiny Chameleon tests: its config.json and a step-1 checkpoint of
    {params, vq} as the autoencoder trainer saves them, with random weights (training even two
    steps takes 40-70 s on 2 cores). Read by the real loader; written once per session."""
    import json

    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np

    from transfusion_jax.core import checkpoint
    from transfusion_jax.core.config import load_config
    from transfusion_jax.models.autoencoder.model import Autoencoder
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    model = Autoencoder(config.model)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (rng.normal(0, 0.3, s.shape) if jnp.issubdtype(
        s.dtype, jnp.floating) else np.zeros(s.shape)).astype(s.dtype), shapes)
    workdir = str(tmp_path_factory.mktemp("tiny_vq"))
    checkpoint.write_config(workdir, config)
    state = {"step": np.ones((), np.int32), "params": variables["params"],
             "vq": {"vq": variables["vq"]}}
    manager = checkpoint.make_manager(workdir, every=1, keep=1)
    checkpoint.save(manager, 1, state, json.dumps({"step": 1}).encode(), force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


# The modules that take longest (pytest --durations, 2 cores), run first: pytest-xdist hands out
# tests in collection order, and a long test left for the end keeps one worker busy while the
# other idles. A module stays whole (its module-scoped fixtures are built once per worker).
LONGEST_FIRST = ("test_fault_injection", "test_train", "test_multihost", "test_evaluate_processes",
                 "test_generate", "test_model", "test_autoencoder_train", "test_golden_losses",
                 "test_chameleon_generation", "test_step_speed_options", "test_faults",
                 "test_precompute", "test_inference_tasks", "test_image_budget")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2],
                                         len(LONGEST_FIRST)))


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker ended
        shutil.rmtree(XLA_CACHE, ignore_errors=True)
