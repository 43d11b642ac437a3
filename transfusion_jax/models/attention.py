"""Attention under the Transfusion mask.

The mask is a function of two int vectors per row (DESIGN.md, "The Transfusion mask"):

    allowed(q, k) = segment_ids[q] == segment_ids[k] != 0  and  mask_pos[k] <= mask_pos[q]

`mask_pos` is the element's own index for text and, for every patch, the index of its image's
last patch. So text is causal, the patches of one image see each other, and nothing crosses
packed documents. Two implementations take (q, k, v, segment_ids, mask_pos) and must agree:

- `dense_attention`: the reference; materialises [B, H, L, L] scores.
- `blockwise_attention`: flash-style online softmax over key blocks with a custom VJP that
  recomputes the probabilities block by block from the saved log-sum-exp, so neither the forward
  nor the backward pass holds more than [B, H, L, block] scores.

Rows with no allowed key (padding) output zeros, with zero gradient.

Decoding (generate.py) attends a chunk of new queries to a key-value cache: the keys then carry
their own mask vectors (`kv_segment_ids`, `kv_mask_pos`, in the same coordinates as the queries'),
and the same rule decides which keys each query may see. Without them the keys are the queries'
own elements (training).
"""
import functools

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite, so fully masked rows give exp(_NEG - _NEG) = 1, not NaN; zeroed later


def transfusion_mask(segment_ids, mask_pos):
    """bool [B, L, L]: may query q attend to key k. For tests and small sequences only."""
    return _allowed(segment_ids, mask_pos, segment_ids, mask_pos)


def _allowed(seg_q, pos_q, seg_k, pos_k):
    """bool [B, Lq, Lk] from the mask vectors of a query range and a key range."""
    same_doc = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
    return same_doc & (pos_k[:, None, :] <= pos_q[:, :, None])


def _key_vectors(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos):
    """The keys' mask vectors: their own when given (a cache), else the queries' (self-attention)."""
    if (kv_segment_ids is None) != (kv_mask_pos is None):
        raise ValueError("kv_segment_ids and kv_mask_pos: give both (cached keys) or neither")
    if kv_segment_ids is None:
        return segment_ids, mask_pos
    return kv_segment_ids, kv_mask_pos


def dense_attention(q, k, v, segment_ids, mask_pos, kv_segment_ids=None, kv_mask_pos=None):
    """q [B, Lq, H, Dh], k, v [B, Lk, H, Dh] -> [B, Lq, H, Dh]; softmax in float32."""
    seg_k, pos_k = _key_vectors(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    allowed = _allowed(segment_ids, mask_pos, seg_k, pos_k)[:, None]
    s = jnp.where(allowed, s, _NEG)
    p = jax.nn.softmax(s, axis=-1) * allowed  # zero rows that had nothing allowed
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)


def blockwise_attention(q, k, v, segment_ids, mask_pos, block_size: int = 512,
                        kv_segment_ids=None, kv_mask_pos=None):
    """Same result as `dense_attention`, in key blocks of `block_size` (it must divide the key
    length, or be at least as large)."""
    seg_k, pos_k = _key_vectors(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)
    length = k.shape[1]
    block = min(block_size, length)
    if length % block:
        raise ValueError(f"model.attention_block={block_size} must divide the key length "
                         f"{length} (or be at least as large)")
    return _flash(q, k, v, segment_ids, mask_pos, seg_k, pos_k, block)


def _key_blocks(x, block):
    """[B, L, ...] -> [L/block, B, block, ...] for lax.scan over key blocks."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // block, block, *x.shape[2:]), 1, 0)


def _block_scores(q, k_blk, seg, pos, seg_blk, pos_blk):
    """Scaled, masked float32 scores [B, H, L, block] and the bool mask [B, 1, L, block]."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_blk, preferred_element_type=jnp.float32) * scale
    allowed = _allowed(seg, pos, seg_blk, pos_blk)[:, None]
    return jnp.where(allowed, s, _NEG), allowed


def _flash_forward(q, k, v, seg, pos, seg_k, pos_k, block):
    b, length, h, d = q.shape
    init = (jnp.full((b, h, length), _NEG, jnp.float32),      # running max
            jnp.zeros((b, h, length), jnp.float32),           # running denominator
            jnp.zeros((b, h, length, d), jnp.float32))        # running numerator

    def step(carry, blk):
        m, l, acc = carry
        k_blk, v_blk, seg_blk, pos_blk = blk
        s, allowed = _block_scores(q, k_blk, seg, pos, seg_blk, pos_blk)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None]) * allowed
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p, v_blk.astype(jnp.float32))
        return (m_new, l * corr + p.sum(-1), acc), None

    blocks = tuple(_key_blocks(x, block) for x in (k, v, seg_k, pos_k))
    (m, l, acc), _ = jax.lax.scan(step, init, blocks)
    has_key = l > 0
    out = acc / jnp.where(has_key, l, 1.0)[..., None]
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), jnp.inf)  # exp(s-inf)=0
    return jnp.moveaxis(out, 1, 2).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, seg, pos, seg_k, pos_k, block):
    return _flash_forward(q, k, v, seg, pos, seg_k, pos_k, block)[0]


def _flash_fwd(q, k, v, seg, pos, seg_k, pos_k, block):
    out, lse = _flash_forward(q, k, v, seg, pos, seg_k, pos_k, block)
    return out, (q, k, v, seg, pos, seg_k, pos_k, out, lse)


def _flash_bwd(block, res, d_out):
    q, k, v, seg, pos, seg_k, pos_k, out, lse = res
    scale = q.shape[-1] ** -0.5
    do = d_out.astype(jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", do, out.astype(jnp.float32))

    def step(dq, blk):
        k_blk, v_blk, seg_blk, pos_blk = blk
        s, _ = _block_scores(q, k_blk, seg, pos, seg_blk, pos_blk)
        p = jnp.exp(s - lse[..., None])  # masked entries: exp(-1e30 - lse) = 0
        dv_blk = jnp.einsum("bhqk,bqhd->bkhd", p, do)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do, v_blk.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_blk.astype(jnp.float32))
        dk_blk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32))
        return dq, (dk_blk, dv_blk)

    blocks = tuple(_key_blocks(x, block) for x in (k, v, seg_k, pos_k))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), blocks)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
    return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

IMPLEMENTATIONS = ("dense", "blockwise")


def attend(impl: str, q, k, v, segment_ids, mask_pos, block_size: int = 512,
           kv_segment_ids=None, kv_mask_pos=None):
    """Dispatch on `model.attention`; the only entry point the transformer uses."""
    if impl == "dense":
        return dense_attention(q, k, v, segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, mask_pos, block_size, kv_segment_ids,
                                   kv_mask_pos)
    raise ValueError(f"model.attention={impl!r}; expected one of {IMPLEMENTATIONS}")
