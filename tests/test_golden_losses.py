"""No behaviour change by refactoring: the tiny Transfusion and autoencoder runs reproduce, bit
for bit, the losses of their first 20 steps recorded before the layout change (commit 9d5072b,
tests/data/golden_losses.json), run as users run them (the CLIs, one CPU device).

A deliberate change of numerics (a new default, a fixed bug) re-records the file with the
commands below and says so in its commit."""
import json
import os
import subprocess
import sys

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden_losses.json")
RUNS = {
    "transfusion_tiny": ["transfusion_jax.train", "--config", "experiments/transfusion.py:tiny",
                         "--config.stop_at_step=20", "--config.log_every=5"],
    "autoencoder_tiny_vae": ["transfusion_jax.train_autoencoder", "--config",
                             "experiments/autoencoder.py:tiny,kind=vae", "--config.total_steps=20",
                             "--config.log_every=1", "--config.evals.heldout.every=20",
                             "--config.checkpoint_every=20"],
}


def run_losses(module_and_args, workdir) -> list:
    module, *args = module_and_args
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device, as recorded
    out = subprocess.run([sys.executable, "-m", module, "--workdir", str(workdir), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        return [[r["step"], r["loss"]] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_20_losses_are_bit_identical_to_the_recording(tmp_path, name):
    with open(GOLDEN) as f:
        expected = json.load(f)[name]
    assert len(expected) == 20
    assert run_losses(RUNS[name], tmp_path) == expected
