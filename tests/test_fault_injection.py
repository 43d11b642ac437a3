"""Fault injection (issue 13): the CLI trainers as users run them, hit by kill -9 during a save
and at a random moment (the Transfusion trainer; the autoencoder's loop saves the same way), a
full disk, and a save that hangs until SIGTERM. Each run after a
fault resumes; the run that finally completes has the weights, bit for bit, and the metrics
lines of a run that never saw a fault; the autoencoder trainer then falls back past a damaged
checkpoint. The faults are patched in from outside the library (tests/fault_runner.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from transfusion_jax.core import checkpoint
from transfusion_jax.core.metrics import TIMING_KEYS

pytestmark = pytest.mark.slow

RUNNER = os.path.join(os.path.dirname(__file__), "fault_runner.py")
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
TRANSFUSION = ("transfusion_jax.train", "--config", "experiments/transfusion.py:tiny",
               "--config.stop_at_step=4", "--config.checkpoint_every=2",
               "--config.preemption_grace_s=2", "--config.evals.shapes.every=0")
AUTOENCODER = ("transfusion_jax.train_autoencoder", "--config",
               "experiments/autoencoder.py:tiny,kind=vae", "--config.evals.heldout.every=4")


def start(fault, command, workdir, **env):
    module, *args = command
    return subprocess.Popen([sys.executable, RUNNER, fault, module, *args, "--workdir",
                             str(workdir)], env=dict(ENV, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(fault, command, workdir):
    process = start(fault, command, workdir)
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def kill_at_random(command, workdir, seed):
    """kill -9 at a moment drawn from [1, 7) s after the start (import, compile, a step or a
    save: wherever it lands; a tiny run resumes and ends in about 7 s)."""
    process = start("none", command, workdir)
    try:
        process.wait(timeout=random.Random(seed).uniform(1, 7))
    except subprocess.TimeoutExpired:
        process.kill()
    process.communicate()


def params(workdir, step):
    return checkpoint.restore_subtrees(str(workdir), ("params",), step)["params"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if k not in TIMING_KEYS and k != "wall_s"} for line in f]


def assert_same_run(faulted, straight, step):
    jax.tree.map(np.testing.assert_array_equal, params(faulted, step), params(straight, step))
    assert metrics(faulted) == metrics(straight)


def test_transfusion_trainer_survives_every_fault(tmp_path):
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    rc, err = run("none", TRANSFUSION, straight)
    assert rc == 0, err[-3000:]

    # A full disk at the first checkpoint: the run stops at once naming the folder and the OS's
    # words, in a few lines (no screen of Orbax tracebacks), keeping nothing half-written.
    rc, err = run("file_size@200000", TRANSFUSION, faulted)
    assert rc == 1, err[-3000:]
    assert "writing checkpoint 2 failed (File too large [errno 27]" in err, err[-3000:]
    assert "no checkpoint was completed" in err and len(err.splitlines()) < 15, err[-3000:]

    # kill -9 while checkpoint 2's files are being written.
    rc, err = run("kill_in_save@2", TRANSFUSION, faulted)
    assert rc == -signal.SIGKILL, err[-3000:]

    # Checkpoint 4's save hangs (storage that stops answering); SIGTERM then ends the process
    # within preemption_grace_s (2 s), though the save never returns.
    mark = tmp_path / "hung"
    process = start("hang_in_save@4", TRANSFUSION, faulted, FAULT_MARK=str(mark))
    deadline = time.time() + 300
    while not mark.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert mark.exists(), process.communicate(timeout=60)[1][-3000:]
    process.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.time() - sent < 10 and "still running 2s after SIGTERM" in err, err[-3000:]

    kill_at_random(TRANSFUSION, faulted, seed=0)
    rc, err = run("none", TRANSFUSION, faulted)  # the resume that completes
    assert rc == 0, err[-3000:]
    assert_same_run(faulted, straight, 4)
    assert not [f for f in os.listdir(faulted / "checkpoints") if "tmp" in f]


def test_autoencoder_trainer_survives_kill_9_and_a_damaged_checkpoint(tmp_path):
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    rc, err = run("none", AUTOENCODER, straight)
    assert rc == 0, err[-3000:]
    rc, err = run("kill_in_save@2", AUTOENCODER, faulted)
    assert rc == -signal.SIGKILL, err[-3000:]
    rc, err = run("none", AUTOENCODER, faulted)
    assert rc == 0, err[-3000:]
    assert_same_run(faulted, straight, 4)
    with open(faulted / "latent_stats.json") as a, open(straight / "latent_stats.json") as b:
        assert json.load(a) == json.load(b)

    # Then its last checkpoint is damaged (torn metadata): the rerun sets it aside, resumes
    # from step 2 and trains steps 3-4 to the same weights again.
    with open(faulted / "checkpoints" / "4" / "state" / "_METADATA", "w") as f:
        f.write("{torn")
    os.remove(faulted / "latent_stats.json")
    rc, err = run("none", AUTOENCODER, faulted)
    assert rc == 0 and "cannot be restored" in err, err[-3000:]
    assert os.listdir(faulted / "checkpoints_damaged") == ["4"]
    assert_same_run(faulted, straight, 4)
