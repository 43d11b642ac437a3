"""Small Linen building blocks shared by the transformer and the patch layers.

Every parameter is created through `param_with_axes`-style initialisers
(`nn.with_logical_partitioning`), so its logical axis names travel with it and
`transfusion_jax.core.sharding` can map them to mesh axes.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def logical(init, axes: Sequence[str | None]):
    """An initialiser whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x, axes: Sequence[str | None]):
    """Annotate an activation with logical axes (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


def default_init(scale: float = 1.0):
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nn.Module):
    """A bias-free (by default) Dense whose kernel carries logical axes (in_axis, out_axis)."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = default_init()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", logical(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama); statistics in float32 whatever the compute dtype."""

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of integer or real timesteps t [...] -> [..., dim] (float32)."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(freq_dim) -> Dense -> SiLU -> Dense(features)."""

    features: int
    freq_dim: int = 256
    out_axis: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = timestep_embedding(t, self.freq_dim).astype(self.dtype)
        h = Dense(self.features, (None, None), use_bias=True, dtype=self.dtype, name="fc1")(h)
        h = nn.silu(h)
        return Dense(self.features, (None, self.out_axis), use_bias=True, dtype=self.dtype,
                     name="fc2")(h)
