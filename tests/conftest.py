"""Tests run on CPU, in float32, with 8 fake devices (set before jax is imported)."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, "conftest must run before anything imports jax"
