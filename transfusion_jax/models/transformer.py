"""The Llama transformer: pre-RMSNorm, SwiGLU, RoPE, no biases (paper section 3, Table 2).

The blocks are stacked with `nn.scan` (one compiled block, a leading "layers" axis on every
block parameter) so that compile time does not grow with depth; `remat` wraps the block in
activation checkpointing under a named policy (REMAT_POLICIES, `remat_name`). Attention runs
under the Transfusion mask (see attention.py).

Decoding passes a `KVCache` (kv_cache.py): each layer writes its chunk's keys and values into its
slice of the cache and attends to the whole cache, under the same mask rule; the transformer
returns the written cache with its hidden states. Training passes no cache.
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from transfusion_jax.models import attention
from transfusion_jax.models.kv_cache import KVCache, write_mask_vectors, write_rows
from transfusion_jax.models.layers import Dense, RMSNorm, constrain, default_init, logical

ACT = ("batch", "length", "embed")  # logical axes of the residual stream

# config.model.remat: which of a block's intermediates the backward pass keeps (the rest it
# recomputes from the block's input). Booleans are aliases (older configs and config.json files):
# True = "full", False = "none".
REMAT_POLICIES = {
    "none": None,                                         # no checkpointing: everything kept
    "full": jax.checkpoint_policies.nothing_saveable,     # only each block's input kept
    "dots": jax.checkpoint_policies.dots_saveable,        # every matmul output kept
    # matmul outputs without batch dimensions kept (the projections, not attention's scores)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # those same outputs moved to pinned host memory in the forward pass, back for the backward
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
# true/false: a bool (Python configs, config.json) or its word (a --config.model.remat=true
# override of this str field arrives as a string).
REMAT_ALIASES = {"true": "full", "false": "none"}
REMAT_EXPECTED = f"one of {list(REMAT_POLICIES)}, or true/false (= 'full'/'none')"


def remat_name(value) -> str:
    """config.model.remat -> its policy name (aliases mapped); ValueError naming the field."""
    if isinstance(value, bool):
        return REMAT_ALIASES[str(value).lower()]
    if isinstance(value, str) and value in REMAT_POLICIES:
        return value
    if isinstance(value, str) and value.lower() in REMAT_ALIASES:
        return REMAT_ALIASES[value.lower()]
    raise ValueError(f"model.remat={value!r}: expected {REMAT_EXPECTED}")


def can_offload(device=None) -> bool:
    """Whether the device has the memory kinds the "offload" policy moves between."""
    device = device or jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    return {"device", "pinned_host"} <= kinds


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
    def __call__(self, x, segment_ids, mask_pos, positions, kv=None, kv_meta=None):
        """kv: this layer's cached (k, v) [B, S, H, Dh] or None; kv_meta: the cache's
        (segment_ids, mask_pos) with this chunk's written, and the chunk's start [B].
        Returns the output, and the cached (k, v) with the chunk's written (None without)."""
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
        if kv is None:
            o = attention.attend(self.impl, q, k, v, segment_ids, mask_pos, self.block_size)
        else:
            kv_segment_ids, kv_mask_pos, start = kv_meta
            kv = (write_rows(kv[0], k, start), write_rows(kv[1], v, start))
            o = attention.attend(self.impl, q, *kv, segment_ids, mask_pos, self.block_size,
                                 kv_segment_ids, kv_mask_pos)
        out = self.param("out", logical(default_init(), ("heads", "kv", "embed")),
                         (self.heads, head_dim, self.dim), jnp.float32)
        return jnp.einsum("blhk,hkd->bld", o, out.astype(self.dtype)), kv


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
    """x + attn(norm(x)); x + mlp(norm(x)): Llama's pre-norm. With model.norm_reorder
    (Chameleon's stability change, Chameleon Team 2024 section 2.3): x + norm(attn(x));
    x + norm(mlp(x)), the norm moved onto each branch's output (same parameters, same names).
    Signature fits nn.scan: (carry, broadcast...)."""

    cfg: Any  # config.model

    @nn.compact
    def __call__(self, x, segment_ids, mask_pos, positions, kv=None, kv_meta=None):
        c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        reorder = c.get("norm_reorder", False)
        attn_norm = RMSNorm(c.norm_eps, dtype=dtype, name="attn_norm")
        mlp_norm = RMSNorm(c.norm_eps, dtype=dtype, name="mlp_norm")
        a, kv = Attention(c.dim, c.heads, c.attention, c.attention_block, c.rope_theta,
                          c.qk_norm, c.norm_eps, dtype, name="attn")(
                              x if reorder else attn_norm(x), segment_ids, mask_pos, positions,
                              kv, kv_meta)
        x = x + (attn_norm(a) if reorder else a)
        mlp = SwiGLU(c.dim, c.mlp_dim, dtype, name="mlp")
        m = mlp_norm(mlp(x)) if reorder else mlp(mlp_norm(x))
        x = constrain(x + m, ACT)
        return x, kv


class Transformer(nn.Module):
    """[B, L, D] embeddings -> [B, L, D] final-normed hidden states.

    With a `cache` (decoding) the L elements are a chunk placed at each row's `cache.length`,
    in cache coordinates; returns (hidden states, the cache with the chunk written)."""

    cfg: Any

    @nn.compact
    def __call__(self, x, segment_ids, mask_pos, positions, cache: KVCache | None = None):
        block, name = Block, remat_name(self.cfg.remat)
        if name == "offload" and not can_offload():
            raise ValueError(f"model.remat='offload': the {jax.default_backend()} device has no "
                             "'pinned_host' memory to offload to; use 'dots_no_batch' (the same "
                             "outputs, kept on the device)")
        if name != "none":
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[name])
        # The cached (k, v) are scanned with the layers (leading depth axis); the rest broadcast.
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                        length=self.cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        kv = kv_meta = None
        if cache is not None:
            cache = write_mask_vectors(cache, segment_ids, mask_pos)
            kv, kv_meta = (cache.k, cache.v), (cache.segment_ids, cache.mask_pos, cache.length)
        x, kv = stack(self.cfg, name="blocks")(constrain(x, ACT), segment_ids, mask_pos,
                                               positions, kv, kv_meta)
        h = RMSNorm(self.cfg.norm_eps, dtype=jnp.dtype(self.cfg.dtype), name="final_norm")(x)
        return h if cache is None else (h, cache._replace(k=kv[0], v=kv[1]))
