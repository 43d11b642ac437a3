"""The train state and its sharded creation (DESIGN.md, "Sharding").

The state is built twice from the same function: once under `jax.eval_shape` with the logical
axis boxes kept, to read every leaf's PartitionSpec, and once for real under
`jit(..., out_shardings=...)`, unboxed, so each device allocates only its own shards.
"""
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from transfusion_jax import optim, sharding
from transfusion_jax.model import Transfusion, patches_per_image


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array        # int32 scalar: steps taken
    params: Any
    opt_state: Any
    ema_params: Any        # None when config.ema_decay == 0
    rng: jax.Array         # uint32 key data; the step's key is fold_in(rng, step)


def example_inputs(cfg, length: int, max_images: int):
    """Shape-only model inputs (batch of 1) for init: params do not depend on the batch."""
    p = patches_per_image(cfg)
    batch = {k: jax.ShapeDtypeStruct((1, length), jnp.int32) for k in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")}
    batch["patch_positions"] = jax.ShapeDtypeStruct((1, max_images, p), jnp.int32)
    size, ch = cfg.latent_size, cfg.latent_channels
    return (batch, jax.ShapeDtypeStruct((1, max_images, size, size, ch), jnp.float32),
            jax.ShapeDtypeStruct((1, max_images), jnp.int32))


def _create(config, model, tx: optax.GradientTransformation, inputs, rng):
    """The boxed state (params carry logical axis names)."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
    params = model.init(rng, *zeros)["params"]
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=ema, rng=jax.random.key_data(rng))


def state_shardings(config, model, tx, inputs, mesh):
    """NamedShardings of every state leaf, from the logical axis names of the params."""
    boxed = jax.eval_shape(lambda: _create(config, model, tx, inputs, jax.random.key(0)))
    return sharding.logical_shardings(boxed, mesh, config.sharding_rules)


def abstract_state(config, model, tx, inputs, mesh):
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    shardings = state_shardings(config, model, tx, inputs, mesh)
    shapes = jax.eval_shape(lambda: nn.unbox(_create(config, model, tx, inputs, jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_state(config, model, tx, inputs, mesh, seed: int):
    """The sharded initial state; each device computes only its own shards."""
    shardings = state_shardings(config, model, tx, inputs, mesh)
    create = jax.jit(lambda key: nn.unbox(_create(config, model, tx, inputs, key)),
                     out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.sharding_rules)):
        return create(jax.random.key(seed))


def model_and_optimizer(config):
    model = Transfusion(config.model)
    return model, optim.make_optimizer(config.optimizer, config.total_steps)
