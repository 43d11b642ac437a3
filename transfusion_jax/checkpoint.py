"""Orbax checkpoints: the train state and the data iterator state, saved together per step.

Layout of a workdir:
    config.json                 the run's config
    checkpoints/<step>/state    TrainState (params, optimizer, EMA, step, RNG), sharded arrays
    checkpoints/<step>/data     the data pipeline's iterator state (JSON)
"""
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from transfusion_jax import sharding, train_state

ITEMS = ("state", "data")


def make_manager(workdir: str, every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=ITEMS)


def save(manager, step: int, state, data_state: bytes, force: bool = False) -> bool:
    """Async save (returns at once); `force` saves off the interval (preemption, last step)."""
    return manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(json.loads(data_state))))


def restore(manager, step: int, abstract_state):
    """(state placed as `abstract_state`'s shardings say, data iterator state bytes)."""
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, json.dumps(out.data).encode()


def write_config(workdir: str, config):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_for_inference(workdir: str, step: int | None = None):
    """(config, params) of the latest (or given) checkpoint, EMA params when the run kept them,
    replicated on the local devices."""
    config = read_config(workdir)
    manager = make_manager(workdir, every=1, keep=1)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    model, tx = train_state.model_and_optimizer(config)
    inputs = train_state.example_inputs(config.model, config.data.seq_len, 1)
    state, _ = restore(manager, step, train_state.abstract_state(config, model, tx, inputs, mesh))
    manager.close()
    return config, state.ema_params if state.ema_params is not None else state.params
