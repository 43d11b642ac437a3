"""A functional key-value cache for decoding (generate.py), one per batch row of a generation.

The cache holds, for every layer, the keys and values of the elements decoded so far, plus the
mask vectors of those elements (DESIGN.md, "The Transfusion mask"), so attention over the cache
uses the training mask rule unchanged. Coordinates: a row of the cache is one document that
starts at cache index 0, so an element's RoPE position is its cache index and `mask_pos` is that
index for text and the index of its image's last patch for a patch. Unwritten slots have
segment id 0 and are never attended to.

Shapes are static: `capacity` slots per row; `length` [B] says how many are in use, per row, and
where the next chunk goes. A chunk of C elements is written at [length, length + C) of its row.
Writing never changes `length`: the caller advances it (`advance`) only for chunks that stay,
which lets a denoising step write its noisy patches, use them, and leave them to be overwritten.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from transfusion_jax.models import attention


class KVCache(NamedTuple):
    k: jax.Array            # [depth, B, S, heads, head_dim]
    v: jax.Array            # [depth, B, S, heads, head_dim]
    segment_ids: jax.Array  # int32 [B, S]; 0 = empty slot
    mask_pos: jax.Array     # int32 [B, S]
    length: jax.Array       # int32 [B]: slots in use

    @property
    def capacity(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(cfg, batch_size: int, capacity: int) -> KVCache:
    """An empty cache for config.model. The capacity is rounded up to a multiple of
    model.attention_block for the blockwise and kernel paths (their key blocks must tile the
    cache), and below that to the kernel's tile (attention.kernel_tile)."""
    if capacity < 1 or batch_size < 1:
        raise ValueError(f"init_cache: batch_size={batch_size}, capacity={capacity}; "
                         "expected positive integers")
    impl, tile = attention.resolve(cfg.attention), attention.kernel_tile(cfg.attention)
    if impl != "dense" and capacity > cfg.attention_block:
        capacity = -(-capacity // cfg.attention_block) * cfg.attention_block
    elif tile:
        capacity = -(-capacity // tile) * tile
    shape = (cfg.depth, batch_size, capacity, cfg.heads, cfg.dim // cfg.heads)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    ints = jnp.zeros((batch_size, capacity), jnp.int32)
    return KVCache(zeros, zeros, ints, ints, jnp.zeros((batch_size,), jnp.int32))


def write_rows(buffer, chunk, start):
    """buffer [B, S, ...] with chunk [B, C, ...] written at [start[b], start[b] + C) of row b.

    The caller keeps start + C <= S (dynamic_update_slice would clamp the start silently)."""
    def one(buf, ch, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, ch.astype(buf.dtype), s, axis=0)
    return jax.vmap(one)(buffer, chunk, start)


def write_mask_vectors(cache: KVCache, segment_ids, mask_pos) -> KVCache:
    """The cache with a chunk's mask vectors [B, C] written at each row's `length`."""
    return cache._replace(segment_ids=write_rows(cache.segment_ids, segment_ids, cache.length),
                          mask_pos=write_rows(cache.mask_pos, mask_pos, cache.length))


def advance(cache: KVCache, count) -> KVCache:
    """Keep the last chunk: `count` (int or int [B]) more slots in use per row."""
    return cache._replace(length=cache.length + count)
