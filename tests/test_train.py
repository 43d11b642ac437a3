"""The trainer: sharded steps, gradient accumulation, exact resume, preemption, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from transfusion_jax.core import sharding, train_state
from transfusion_jax.core.config import load_config
from transfusion_jax.core.metrics import TIMING_KEYS
from transfusion_jax.models import example_inputs, patches_per_image
from transfusion_jax.trainers import transfusion as trainer
from rows import build_rows

TINY = "experiments/transfusion.py:tiny"
DOCS = [[[5, "image", 3], [4]], [["image", 6]], [[9], [2, "image"]], [[3, "image", "image"]]]


def synthetic_batch(cfg, rows=8, length=128, slots=4):
    docs = [DOCS[i % len(DOCS)] for i in range(rows)]
    batch, _ = build_rows(docs, length, slots, patches_per_image(cfg.model))
    size = cfg.data.image_size
    rng = np.random.default_rng(0)
    batch["images"] = rng.uniform(-1, 1, (rows, slots, size, size, 3)).astype(np.float32)
    batch["max_timestep"][:, 1] = 500
    return batch


def run_steps(cfg, mesh_config, steps=3, devices=None):
    """(losses, params) after `steps` jitted steps on a mesh, as the trainer builds them."""
    mesh = sharding.make_mesh(mesh_config, devices)
    model, tx = trainer.model_and_optimizer(cfg)
    init_fn = trainer.make_init_fn(cfg, model, tx, example_inputs(cfg.model, 128, 4))
    state = train_state.create_state(init_fn, mesh, cfg.sharding_rules, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    data = sharding.batch_sharding(mesh)
    step = jax.jit(trainer.make_train_step(cfg, model, tx), in_shardings=(shardings, data),
                   out_shardings=(shardings, None))
    batch = jax.device_put(synthetic_batch(cfg), data)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(cfg.sharding_rules)):
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device_run():
    cfg = load_config(TINY)
    return run_steps(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data", "fsdp", "fsdp+tensor"])
def test_sharded_steps_equal_single_device(mesh, single_device_run):
    losses, params, state = run_steps(load_config(TINY), mesh)
    ref_losses, ref_params, _ = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 params, ref_params)
    if "fsdp" in mesh:  # parameters and Adam moments are really split
        assert state.params["embed"].sharding.spec[1] == "fsdp"  # [vocab, embed]
        mu = state.opt_state[1][0].mu["embed"]
        assert mu.sharding.spec == state.params["embed"].sharding.spec


@pytest.mark.slow
def test_gradient_accumulation_equals_whole_batch(single_device_run):
    cfg = load_config(TINY)
    cfg.grad_accum = 4
    losses, params, _ = run_steps(cfg, {"data": 1, "fsdp": 1, "tensor": 1},
                                  devices=jax.devices()[:1])
    ref_losses, ref_params, _ = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 params, ref_params)


@pytest.mark.slow
def test_a_non_finite_update_leaves_the_state_unchanged():
    """A NaN learning rate (check_config refuses it; the step must hold anyway) keeps loss and
    gradient finite but poisons the update: the step keeps the old params and says so."""
    cfg = load_config(TINY)
    cfg.optimizer.lr = float("nan")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, tx = trainer.model_and_optimizer(cfg)
    init_fn = trainer.make_init_fn(cfg, model, tx, example_inputs(cfg.model, 128, 4))
    state = train_state.create_state(init_fn, mesh, cfg.sharding_rules, seed=0)
    before = jax.device_get(state.params)
    step = jax.jit(trainer.make_train_step(cfg, model, tx))
    batch = synthetic_batch(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(cfg.sharding_rules)):
        for _ in range(2):  # the warmup's first lr is 0 * nan
            state, metrics = step(state, batch)
            assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    assert int(state.step) == 2 and train_state.all_finite(state.opt_state)


@pytest.mark.parametrize("override,message", [
    (dict(mesh={"data": 3}), "mesh"),
    (dict(data={"batch_size": 6}), "data.batch_size=6 must be divisible by mesh data*fsdp=8"),
    (dict(grad_accum=3), "grad_accum=3"),
    (dict(model={"heads": 3}, mesh={"data": 4, "tensor": 2}), "model.heads=3"),
    (dict(data={"seq_len": 12}), "data.seq_len"),  # 16 patches + BOI + EOI > 12
    (dict(data={"image_size": 32}), "data.image_size=32 must equal model.latent_size=16"),
    (dict(autoencoder={"kind": "vq"}), "autoencoder.kind='vq'"),
    (dict(optimizer={"warmup_steps": 500}), "optimizer.warmup_steps=500"),
    (dict(model={"patch_size": 8}), "192-dim patches, wider than model.dim=64"),
    # Each field's range (core/validation.py), before anything is written.
    (dict(data={"batch_size": 0}), "data.batch_size"),
    (dict(checkpoint_every=0), "checkpoint_every=0: expected an integer >= 1"),
    (dict(log_every=0), "log_every=0: expected an integer >= 1"),
    (dict(keep_checkpoints=0), "keep_checkpoints=0: expected an integer >= 1"),
    (dict(keep_checkpoints=-1), "keep_checkpoints=-1"),
    (dict(stop_at_step=-1), "stop_at_step=-1: expected an integer >= 0"),
    (dict(preemption_grace_s=-1.0), "preemption_grace_s=-1.0: expected a finite number >= 0"),
    (dict(model={"depth": 0}), "model.depth=0: expected an integer >= 1"),
    (dict(model={"dtype": "float8"}), "model.dtype='float8': expected one of"),
    (dict(model={"attention": "blockwsie"}), "model.attention='blockwsie'"),
    (dict(optimizer={"lr": 0.0}), "optimizer.lr=0.0: expected a finite number > 0"),
    (dict(optimizer={"lr": float("nan")}), "optimizer.lr=nan"),
    (dict(optimizer={"lr": -1e-3}), "optimizer.lr=-0.001"),
    (dict(ema_decay=1.0), "ema_decay=1.0: expected a number in"),
    (dict(total_steps=0), "total_steps=0"),
])
def test_impossible_configs_name_the_fields(override, message):
    cfg = load_config(TINY)
    for key, value in override.items():
        if isinstance(value, dict) and key != "mesh":
            cfg[key].update(value)
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        trainer.check_config(cfg, 8)


# ---------------------------------------------------------------- the CLI, as users run it

def cli(workdir, *overrides, wait=True):
    args = [sys.executable, "-m", "transfusion_jax.train", "--config", TINY, "--workdir",
            str(workdir), "--config.optimizer.warmup_steps=10", "--config.checkpoint_every=25",
            *overrides]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def metrics_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


@pytest.mark.slow
def test_tiny_run_lowers_loss_and_its_checkpoints_evaluate_and_generate(tmp_path):
    """100 steps: the loss falls, the shapes evaluator runs at its interval, the evaluate and
    generate entry points read the workdir. (Exact resume, after stops and after faults:
    tests/test_fault_injection.py, tests/test_chameleon.py.)"""
    straight = tmp_path / "straight"
    out = cli(straight, "--config.evals.shapes.every=50", "--config.keep_checkpoints=4")
    assert out.returncode == 0, out.stderr[-3000:]
    for step in (50, 100):  # the tiny preset's shapes evaluator, at its interval
        assert (straight / "evals" / str(step) / "shapes" / "report.md").exists()
        scores = json.loads((straight / "evals" / f"{step}.json").read_text())
        assert 0 <= scores["shapes/text_to_image/object"] <= 1, scores
        assert scores["shapes/answer/items"] == scores["shapes/image_to_text/items"] == 2, scores
    # The evaluate entry point on the step-50 checkpoint gives the numbers training gave there.
    during_training = json.loads((straight / "evals" / "50.json").read_text())
    (straight / "evals" / "50.json").unlink()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    again = subprocess.run([sys.executable, "-m", "transfusion_jax.evaluate", "--workdir",
                            str(straight), "--step", "50"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((straight / "evals" / "50.json").read_text()) == during_training
    assert json.loads(again.stdout) == during_training
    # The generate entry point on the same workdir (latest checkpoint).
    png = tmp_path / "scene.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(png)
    made = subprocess.run([sys.executable, "-m", "transfusion_jax.generate", "--workdir",
                           str(straight), "--prompt", "a red circle", "--image", str(png),
                           "--num-samples", "1", "--sampler", "ddim", "--steps", "2",
                           "--max-new-tokens", "4"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    records = [json.loads(line) for line in
               (straight / "generations" / "generations.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["text_to_image", "image_to_text"]
    assert records[0]["images"] == 1 and (straight / "generations" / "text_to_image.png").exists()
    assert "checkpoints:" in out.stderr and "tensorboard" in out.stderr
    assert "checkpoint_manager.py" not in out.stderr  # no absl/Orbax INFO flood by default
    lines = metrics_lines(straight)
    assert [m["step"] for m in lines] == list(range(1, 101))
    first = np.mean([m["loss"] for m in lines[:10]])
    last = np.mean([m["loss"] for m in lines[-10:]])
    assert last < 0.8 * first, (first, last)
    assert os.listdir(straight / "tensorboard")



@pytest.mark.slow
def test_sigterm_checkpoints_and_the_run_continues(tmp_path):
    proc = cli(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=100000",
               wait=False)
    path = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    stopped = int(err.split("stopped at step ")[1].split(".")[0])
    assert stopped >= 3 and os.listdir(tmp_path / "checkpoints") == [str(stopped)]
    out = cli(tmp_path, "--config.total_steps=100000", f"--config.stop_at_step={stopped + 2}",
              "--verbosity=0")
    assert out.returncode == 0 and f"resumed from {tmp_path}/checkpoints/{stopped}" in out.stderr
    assert "checkpoint_manager.py" in out.stderr  # --verbosity brings the INFO lines back
    assert [m["step"] for m in metrics_lines(tmp_path)][-3:] == [stopped, stopped + 1, stopped + 2]


@pytest.mark.parametrize("args,message", [
    (["--config.model.dimm=3"], "unknown key 'dimm'"),
    (["--config.model.dim=abc"], "--config.model.dim=abc"),
    (["--config.data.batch_size=3"], "data.batch_size=3"),
])
@pytest.mark.slow
def test_bad_overrides_fail_at_start_naming_the_key(tmp_path, args, message):
    out = cli(tmp_path, *args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_every_cli_module_imports_into_one_process():
    """Flags are defined when a program starts, not on import (absl rejects duplicates)."""
    import importlib

    from absl import flags
    importlib.import_module("absl.app")  # absl.app defines its own flags on import
    before = set(flags.FLAGS)
    for name in ("train", "train_autoencoder", "generate", "evaluate", "precompute"):
        module = importlib.import_module(f"transfusion_jax.{name}")
        assert callable(module.main), name
    assert set(flags.FLAGS) == before  # importing defined no flag
