"""The Llama transformer: pre-RMSNorm, SwiGLU, RoPE, no biases (paper section 3, Table 2).

The blocks are stacked with `nn.scan` (one compiled block, a leading "layers" axis on every
block parameter) so that compile time does not grow with depth; `remat` wraps the block in
activation checkpointing. Attention runs under the Transfusion mask (see attention.py).
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from transfusion_jax.model import attention
from transfusion_jax.model.layers import Dense, RMSNorm, constrain, default_init, logical

ACT = ("batch", "length", "embed")  # logical axes of the residual stream


def rope(x, positions, theta: float):
    """Rotary embedding (half-split form) of x [B, L, H, Dh] at int positions [B, L]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nn.Module):
    dim: int
    heads: int
    impl: str = "dense"
    block_size: int = 512
    rope_theta: float = 10000.0
    qk_norm: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids, mask_pos, positions):
        head_dim = self.dim // self.heads

        def proj(name):
            kernel = self.param(name, logical(default_init(), ("embed", "heads", "kv")),
                                (self.dim, self.heads, head_dim), jnp.float32)
            y = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))
            return constrain(y, ("batch", "length", "heads", "kv"))

        q, k, v = proj("query"), proj("key"), proj("value")
        if self.qk_norm:  # Chameleon's stability fix; off for Transfusion
            q = RMSNorm(self.norm_eps, "kv", self.dtype, name="q_norm")(q)
            k = RMSNorm(self.norm_eps, "kv", self.dtype, name="k_norm")(k)
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        o = attention.attend(self.impl, q, k, v, segment_ids, mask_pos, self.block_size)
        out = self.param("out", logical(default_init(), ("heads", "kv", "embed")),
                         (self.heads, head_dim, self.dim), jnp.float32)
        return jnp.einsum("blhk,hkd->bld", o, out.astype(self.dtype))


class SwiGLU(nn.Module):
    dim: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        up = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="down")(h)


class Block(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x)). Signature fits nn.scan: (carry, broadcast...)."""

    cfg: Any  # config.model

    @nn.compact
    def __call__(self, x, segment_ids, mask_pos, positions):
        c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = RMSNorm(c.norm_eps, dtype=dtype, name="attn_norm")(x)
        x = x + Attention(c.dim, c.heads, c.attention, c.attention_block, c.rope_theta,
                          c.qk_norm, c.norm_eps, dtype, name="attn")(h, segment_ids, mask_pos,
                                                                      positions)
        h = RMSNorm(c.norm_eps, dtype=dtype, name="mlp_norm")(x)
        x = constrain(x + SwiGLU(c.dim, c.mlp_dim, dtype, name="mlp")(h), ACT)
        return x, None


class Transformer(nn.Module):
    """[B, L, D] embeddings -> [B, L, D] final-normed hidden states."""

    cfg: Any

    @nn.compact
    def __call__(self, x, segment_ids, mask_pos, positions):
        block = Block
        if self.cfg.remat:
            block = nn.remat(block, prevent_cse=False,
                             policy=jax.checkpoint_policies.nothing_saveable)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                        length=self.cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(self.cfg, name="blocks")(constrain(x, ACT), segment_ids, mask_pos, positions)
        return RMSNorm(self.cfg.norm_eps, dtype=jnp.dtype(self.cfg.dtype), name="final_norm")(x)
