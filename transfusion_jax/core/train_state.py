"""Train states and their sharded creation from an init function (DESIGN.md, "Sharding").

A trainer gives `init_fn(rng) -> state`, whose params still carry Flax's logical axis boxes. The
state is then built twice from that one function: once under `jax.eval_shape`, boxes kept, to
read every leaf's PartitionSpec, and once for real under `jit(..., out_shardings=...)`, unboxed,
so each device allocates only its own shards. Both trainers (Transfusion, autoencoder) go
through here; the restore target of a checkpoint is `abstract_state` of the same function.
"""
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from transfusion_jax.core import sharding

InitFn = Callable[[jax.Array], Any]  # PRNG key -> boxed state


class TrainState(flax.struct.PyTreeNode):
    """One model trained with one optimizer (the Transfusion trainer's state)."""
    step: jax.Array        # int32 scalar: steps taken
    params: Any
    opt_state: Any
    ema_params: Any        # None when config.ema_decay == 0
    rng: jax.Array         # uint32 key data; the step's key is fold_in(rng, step)


def state_shardings(init_fn: InitFn, mesh, rules):
    """NamedShardings of every state leaf, from the logical axis names of the params."""
    boxed = jax.eval_shape(lambda: init_fn(jax.random.key(0)))
    return sharding.logical_shardings(boxed, mesh, rules)


def abstract_state(init_fn: InitFn, mesh, rules):
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint."""
    shardings = state_shardings(init_fn, mesh, rules)
    shapes = jax.eval_shape(lambda: nn.unbox(init_fn(jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def create_state(init_fn: InitFn, mesh, rules, seed: int):
    """The sharded initial state from `jax.random.key(seed)`; each device computes only its own
    shards."""
    shardings = state_shardings(init_fn, mesh, rules)
    create = jax.jit(lambda key: nn.unbox(init_fn(key)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(rules)):
        return create(jax.random.key(seed))


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a scalar bool): trainers keep
    the old state when an update is not, so no checkpoint holds a non-finite value."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
