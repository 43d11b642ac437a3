"""Attention under the Transfusion mask.

The mask is a function of two int vectors per row (DESIGN.md, "The Transfusion mask"):

    allowed(q, k) = segment_ids[q] == segment_ids[k] != 0  and  mask_pos[k] <= mask_pos[q]

`mask_pos` is the element's own index for text and, for every patch, the index of its image's
last patch. So text is causal, the patches of one image see each other, and nothing crosses
packed documents. Every implementation takes (q, k, v, segment_ids, mask_pos) and must agree
with the dense reference in values and gradients (`model.attention`):

- `dense`: the reference; materialises [B, H, L, L] scores.
- `blockwise`: flash-style online softmax in query and key blocks, XLA code for any backend.
  Each query block visits only the key blocks inside its rows' key ranges
  (attention_ranges.py), so its cost follows the mask (causal text, bidirectional images,
  documents apart), not L^2; a custom VJP recomputes the probabilities block by block from the
  saved log-sum-exp in one pass.
- `splash` (TPU): JAX's Pallas splash attention with a per-row dynamic mask (attention_tpu.py).
- `pallas_gpu` (GPU): our Pallas Triton flash kernel over per-query key ranges
  (attention_gpu.py).
- `auto`: the backend's kernel (splash on TPU, pallas_gpu on GPU), blockwise elsewhere.

Rows with no allowed key (padding) output zeros, with zero gradient.

Decoding (generate.py) attends a chunk of new queries to a key-value cache: the keys then carry
their own mask vectors (`kv_segment_ids`, `kv_mask_pos`, in the same coordinates as the queries'),
and the same rule decides which keys each query may see. Without them the keys are the queries'
own elements (training).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfusion_jax.models import attention_gpu, attention_ranges, attention_tpu

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
    """Same result as `dense_attention`, in blocks of `block_size` queries and keys (it must
    divide the key length, or be at least as large; a query count it does not divide makes
    one query block). Only the key blocks inside a query block's ranges are computed
    (attention_ranges.py), so the cost follows the mask, not L^2."""
    length = k.shape[1]
    block = min(block_size, length)
    if length % block:
        raise ValueError(f"model.attention_block={block_size} must divide the key length "
                         f"{length} (or be at least as large)")
    q_block = block if q.shape[1] % block == 0 else q.shape[1]
    _key_vectors(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)  # both or neither
    k_start, k_end = _ranges(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)[:2]
    fn = lambda q, k, v, ks, ke: _ranged(q, k, v, ks, ke, q_block, block)
    return _per_shard(fn, q, k, v, k_start, k_end)


def _block_span(k_start, k_end, block):
    """Key blocks [lo, hi) that hold every key some query of this query block may see."""
    lo, hi = jnp.min(k_start) // block, -(-jnp.max(k_end) // block)
    return jnp.where(hi > lo, lo, 0), jnp.where(hi > lo, hi, 0)


def _scores(q_blk, k_blk, k_start, k_end, j, block):
    """Scaled, masked float32 scores [H, bq, bk] of key block j, and its bool mask [1, bq, bk]."""
    s = jnp.einsum("qhd,khd->hqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s * q_blk.shape[-1] ** -0.5
    cols = j * block + jnp.arange(block)
    allowed = ((k_start[:, None] <= cols) & (cols < k_end[:, None]))[None]
    return jnp.where(allowed, s, _NEG), allowed


def _row_forward(q, k, v, k_start, k_end, q_block, block):
    """One row: q [Lq, H, D] -> (out [Lq, H, D], lse [H, Lq]); online softmax over the key
    blocks of each query block's span."""
    heads, dim = q.shape[1:]

    def one_query_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * q_block, q_block)
        ks = jax.lax.dynamic_slice_in_dim(k_start, i * q_block, q_block)
        ke = jax.lax.dynamic_slice_in_dim(k_end, i * q_block, q_block)

        def step(j, carry):
            m, l, acc = carry
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * block, block)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * block, block).astype(jnp.float32)
            s, allowed = _scores(q_blk, k_blk, ks, ke, j, block)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None]) * allowed
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("hqk,khd->hqd", p, v_blk)
            return m_new, l * corr + p.sum(-1), acc

        init = (jnp.full((heads, q_block), _NEG, jnp.float32),
                jnp.zeros((heads, q_block), jnp.float32),
                jnp.zeros((heads, q_block, dim), jnp.float32))
        m, l, acc = jax.lax.fori_loop(*_block_span(ks, ke, block), step, init)
        has_key = l > 0
        out = acc / jnp.where(has_key, l, 1.0)[..., None]
        lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), jnp.inf)
        return jnp.moveaxis(out, 0, 1), lse  # exp(s - inf) = 0 in the backward pass

    out, lse = jax.lax.map(one_query_block, jnp.arange(q.shape[0] // q_block))
    return (out.reshape(q.shape).astype(q.dtype),
            jnp.moveaxis(lse, 0, 1).reshape(heads, q.shape[0]))


def _row_backward(q, k, v, k_start, k_end, out, lse, d_out, q_block, block):
    """One row's (dq, dk, dv): one pass over query blocks; each visits its span's key blocks
    once, adding into dk, dv in place (no second recomputation of the scores)."""
    scale = q.shape[-1] ** -0.5
    do = d_out.astype(jnp.float32)
    delta = jnp.einsum("qhd,qhd->hq", do, out.astype(jnp.float32))

    def one_query_block(i, grads):
        dq, dk, dv = grads
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * q_block, q_block)  # axis 0
        q_blk, do_blk = rows(q).astype(jnp.float32), rows(do)
        ks, ke = rows(k_start), rows(k_end)
        lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * q_block, q_block, axis=1)
        delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * q_block, q_block, axis=1)

        def step(j, carry):
            dq_blk, dk, dv = carry
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * block, block).astype(jnp.float32)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * block, block).astype(jnp.float32)
            s, _ = _scores(q_blk, k_blk, ks, ke, j, block)
            p = jnp.exp(s - lse_blk[..., None])  # masked: exp(-1e30 - lse) = 0
            dp = jnp.einsum("qhd,khd->hqk", do_blk, v_blk)
            ds = p * (dp - delta_blk[..., None]) * scale
            dq_blk = dq_blk + jnp.einsum("hqk,khd->qhd", ds, k_blk)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
                acc, jax.lax.dynamic_slice_in_dim(acc, j * block, block) + x, j * block, 0)
            dk = add(dk, jnp.einsum("hqk,qhd->khd", ds, q_blk))
            dv = add(dv, jnp.einsum("hqk,qhd->khd", p, do_blk))
            return dq_blk, dk, dv

        dq_blk, dk, dv = jax.lax.fori_loop(*_block_span(ks, ke, block), step,
                                           (jnp.zeros(q_blk.shape, jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * q_block, 0), dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, q.shape[0] // q_block, one_query_block,
                                   (zeros(q), zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ranged(q, k, v, k_start, k_end, q_block, block):
    return _ranged_fwd(q, k, v, k_start, k_end, q_block, block)[0]


# Rows run one after another (lax.map): each row's loops stop at its own spans, where vmap would
# run every row to the longest span and gather its blocks (1.6x slower on CPU at L=2048, B=2).
# Under a mesh each device maps over its own rows (_per_shard).

def _ranged_fwd(q, k, v, k_start, k_end, q_block, block):
    row = functools.partial(_row_forward, q_block=q_block, block=block)
    out, lse = jax.lax.map(lambda a: row(*a), (q, k, v, k_start, k_end))
    return out, (q, k, v, k_start, k_end, out, lse)


def _ranged_bwd(q_block, block, res, d_out):
    q, k, v, k_start, k_end, out, lse = res
    row = functools.partial(_row_backward, q_block=q_block, block=block)
    dq, dk, dv = jax.lax.map(lambda a: row(*a), (q, k, v, k_start, k_end, out, lse, d_out))
    return dq, dk, dv, None, None


_ranged.defvjp(_ranged_fwd, _ranged_bwd)

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "splash", "pallas_gpu")
KERNELS = {"tpu": "splash", "gpu": "pallas_gpu"}  # what "auto" picks; blockwise elsewhere


def target_platform() -> str:
    """The platform the step is built for: the devices of the mesh in context (so that an
    ahead-of-time compile for a TPU topology on a CPU host builds TPU kernels), else JAX's
    default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def resolve(impl: str, platform: str | None = None) -> str:
    """`model.attention` -> the implementation that runs on `platform` (default: the target's)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    return KERNELS.get(platform or target_platform(), "blockwise")


def attend(impl: str, q, k, v, segment_ids, mask_pos, block_size: int = 512,
           kv_segment_ids=None, kv_mask_pos=None):
    """Dispatch on `model.attention`; the only entry point the transformer uses.

    The fused kernels take the mask as key ranges (attention_ranges.py). A decoding chunk whose
    length a kernel's blocks do not tile (single elements, a short prompt; splash needs blocks
    of a multiple of 128 lanes) runs blockwise."""
    impl = resolve(impl)
    if impl == "dense":
        return dense_attention(q, k, v, segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, mask_pos, block_size, kv_segment_ids,
                                   kv_mask_pos)
    _key_vectors(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)  # both or neither
    lq, lk = q.shape[1], k.shape[1]
    block = _splash_block(block_size, lq, lk) if impl == "splash" else GPU_BLOCK
    if not block or lq % block or lk % block:
        return blockwise_attention(q, k, v, segment_ids, mask_pos, block_size, kv_segment_ids,
                                   kv_mask_pos)
    ranges = _ranges(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos)
    # Off its own backend a kernel runs in the Pallas interpreter: slow, exact (tests).
    interpret = target_platform() != ("tpu" if impl == "splash" else "gpu")
    if impl == "splash":
        fn = lambda q, k, v, ks, ke: attention_tpu.splash_attention(q, k, v, ks, ke, block=block,
                                                                    interpret=interpret)
        return _per_shard(fn, q, k, v, *ranges[:2])
    fn = lambda q, k, v, *r: attention_gpu.range_attention(q, k, v, *r, block_q=block,
                                                           block_k=block, interpret=interpret)
    return _per_shard(fn, q, k, v, *ranges)


GPU_BLOCK = 64  # query and key block of the Pallas GPU kernel (Triton tiles)
SPLASH_LANES = 128  # splash blocks are multiples of the TPU's 128 lanes


def _splash_block(block_size: int, lq: int, lk: int) -> int | None:
    """The largest multiple of 128 lanes, at most model.attention_block, that tiles both."""
    for block in range(min(block_size, lq, lk) // SPLASH_LANES * SPLASH_LANES, 0, -SPLASH_LANES):
        if lq % block == 0 and lk % block == 0:
            return block
    return None


def kernel_tile(impl: str) -> int | None:
    """The length a kernel's blocks need (decoding pads its prefill to it); None: any."""
    return {"pallas_gpu": GPU_BLOCK, "splash": SPLASH_LANES}.get(resolve(impl))


def _ranges(segment_ids, mask_pos, kv_segment_ids, kv_mask_pos):
    """(k_start, k_end, q_start, q_end). A cache gives no query ranges (no backward pass):
    empty ones stand in (unused ones cost nothing: XLA drops them)."""
    if kv_segment_ids is None:
        return attention_ranges.self_ranges(segment_ids, mask_pos)
    k_start, k_end = attention_ranges.cache_ranges(segment_ids, mask_pos, kv_segment_ids,
                                                   kv_mask_pos)
    none = jnp.zeros(kv_segment_ids.shape, jnp.int32)
    return k_start, k_end, none, none


def _per_shard(fn, q, k, v, *ranges):
    """Run a kernel on each device's shard. Pallas kernels are opaque to XLA's partitioner,
    which would gather their inputs onto every device (and a loop over rows would too); under a
    mesh they run in `shard_map` over the batch and head axes the logical rules give (the
    length axis must not be split)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, *ranges)
    qkv = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    vec = nn.logical_to_mesh_axes(("batch", "length"))
    if qkv[1] is not None:
        raise ValueError("sharding_rules map 'length' to a mesh axis; the blockwise and fused "
                         "attention paths need whole rows: use model.attention=dense")
    return jax.shard_map(fn, in_specs=(qkv,) * 3 + (vec,) * len(ranges), out_specs=qkv,
                         check_vma=False)(q, k, v, *ranges)
