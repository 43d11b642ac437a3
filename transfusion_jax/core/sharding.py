"""The device mesh and the table from logical axis names to mesh axes.

Parameters and activations carry logical names (batch, length, embed, mlp, heads, kv,
vocab, patch, ...). The mesh has three axes: `data` (pure data parallel), `fsdp` (data
parallel with sharded parameters and optimizer state) and `tensor` (Megatron-style model
parallel). Flax resolves each logical name to the first rule whose mesh axis is still free in
that array, so `embed` shards parameters over `fsdp` but stays unsharded in activations whose
batch already took `fsdp`.
"""
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# config.mesh presets; -1 takes the remaining devices. Override sizes with --config.mesh.tensor=8.
MESH_PRESETS = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},           # replicated params, split batch
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},         # params and optimizer state split too
    "fsdp_tensor": {"data": 1, "fsdp": -1, "tensor": 2},  # plus Megatron-style model parallel
}

# (logical name, mesh axis or axes or None), tried in order.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("patch", None),
    ("image", None),
    ("latent", None),
    ("conv_h", None),
    ("conv_w", None),
    ("channels_in", None),
    ("channels", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve {data, fsdp, tensor} sizes (one may be -1) against the device count."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of {MESH_AXES} may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def evaluation_mesh(mesh_config: Mapping[str, int],
                    devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's mesh over `devices` when it fits them; else all of them on fsdp (params
    sharded, batch split over them): evaluating a pod run on one host (`python -m
    transfusion_jax.evaluate`, process 0 of a multi-process run)."""
    devices = list(jax.devices() if devices is None else devices)
    try:
        return make_mesh(mesh_config, devices)
    except ValueError:
        return make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)


def rules_from_config(rules) -> tuple[tuple[str, object], ...]:
    """config.sharding_rules (lists, for ml_collections) -> flax's tuple-of-pairs form."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of logically-partitioned values (e.g. eval_shape of init)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_from_config(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Every batch array is split along its leading axis over the data-parallel mesh axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
