"""Fused flash attention for NVIDIA GPUs (Pallas on Triton) under a key-range mask.

What it computes: for every row b, head h and query i,

    out[b, i, h] = softmax_j(q[b, i, h] . k[b, j, h] * Dh**-0.5) @ v[b, :, h]

over exactly the keys j with k_start[b, i] <= j < k_end[b, i]; the softmax is in float32 and a
query whose range is empty (padding) outputs zeros and gets zero gradients.

Why ranges: the Transfusion mask (Zhou et al. 2024, section 3; `attention.py` here) is causal over
text, bidirectional among the patches of one image, and never crosses packed documents. For every
query that set of keys is one contiguous range, [doc_start(q), mask_pos[q]], so two int vectors
describe the whole [L, L] mask. Better still, they bound which key blocks can hold any allowed key
for a block of queries (from the block's smallest k_start to its largest k_end), so whole blocks
outside every range, such as earlier documents or the causal upper triangle, are never loaded.
The same holds the other way round for the backward dk/dv pass, which walks query blocks per key
block: q_start/q_end give, for each key, the queries that can see it.

Structure follows JAX's `jax/experimental/pallas/ops/gpu/attention.py` (FlashAttention-2):

- forward: grid (query blocks, B, H); online softmax over the key blocks in range, in base 2
  (exp2 is cheaper than exp on the GPU; logits carry a factor log2(e)). It also writes the
  log-sum-exp (base 2) per query, the only residual the backward pass needs besides q, k, v, out.
- backward: delta = rowsum(dO * O) (plain XLA, memory bound), then two kernels that recompute the
  probabilities block by block from the log-sum-exp: dk/dv with grid (key blocks, B, H) looping
  over query blocks, and dq with grid (query blocks, B, H) looping over key blocks.

Inside a visited block the exact mask is always rebuilt from k_start/k_end.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
# Finite, so a row whose keys in one block are all masked gives max = _MASKED instead of -inf and
# exp2(-inf - -inf) = NaN never happens. Masked probabilities are zeroed explicitly anyway.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel settings (hashable: it is a non-differentiable argument of the custom VJP)."""
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: object  # bool, or a Pallas interpret-params object

    def call(self, kernel, grid, in_specs, out_specs, out_shape, name):
        return pl.pallas_call(
            kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=self.num_warps,
                                                 num_stages=self.num_stages),
            interpret=self.interpret, name=name)


def range_attention(q, k, v, k_start, k_end, q_start, q_end, *, block_q=64, block_k=64,
                    num_warps=4, num_stages=2, interpret=False):
    """q [B, Lq, H, Dh], k, v [B, Lk, H, Dh] -> [B, Lq, H, Dh].

    Query i of row b sees exactly the keys j with k_start[b, i] <= j < k_end[b, i] (int32 [B, Lq]).
    q_start/q_end (int32 [B, Lk]): for key j, every query that sees it lies in
    [q_start[b, j], q_end[b, j]); the backward dk/dv pass uses them only to bound its loop over
    query blocks (the exact mask inside a block always comes from k_start/k_end). They must be
    consistent with k_start/k_end, or dk/dv miss contributions.

    Lq and Lk must be multiples of block_q and block_k; blocks and Dh powers of two >= 16 (Triton
    tiles). Lq may differ from Lk (queries attending to a longer cache), also under grad.
    `interpret=True` runs the kernels in Pallas' interpreter (any backend; for tests).
    """
    _check_args(q, k, v, k_start, k_end, q_start, q_end, block_q, block_k)
    cfg = _Config(block_q, block_k, num_warps, num_stages, interpret)
    ranges = [x.astype(jnp.int32) for x in (k_start, k_end, q_start, q_end)]
    return _range_attention(cfg, q, k, v, *ranges)


def _check_args(q, k, v, k_start, k_end, q_start, q_end, block_q, block_k):
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"want q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    (b, lq, h, dh), lk = q.shape, k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, dh):
        raise ValueError(f"q {q.shape} and k/v {k.shape} differ in batch, heads or head dim")
    for name, x, want in (("k_start", k_start, (b, lq)), ("k_end", k_end, (b, lq)),
                          ("q_start", q_start, (b, lk)), ("q_end", q_end, (b, lk))):
        if x.shape != want or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array of shape {want}, got {x.dtype}{x.shape}")
    for name, n in (("head dim Dh", dh), ("block_q", block_q), ("block_k", block_k)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name}={n} must be a power of two >= 16 (Triton tile sizes)")
    if lq % block_q or lk % block_k:
        raise ValueError(f"query length Lq={lq} must be a multiple of block_q={block_q} and key "
                         f"length Lk={lk} a multiple of block_k={block_k}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _range_attention(cfg, q, k, v, k_start, k_end, q_start, q_end):
    return _forward(cfg, q, k, v, k_start, k_end)[0]


def _range_attention_fwd(cfg, q, k, v, k_start, k_end, q_start, q_end):
    out, lse = _forward(cfg, q, k, v, k_start, k_end)
    return out, (q, k, v, k_start, k_end, q_start, q_end, out, lse)


def _range_attention_bwd(cfg, res, d_out):
    q, k, v, k_start, k_end, q_start, q_end, out, lse = res
    # delta_i = sum_d dO_i * O_i = sum_j P_ij dP_ij: the softmax-backward correction, per query.
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1))  # [B, H, Lq], like lse
    dk, dv = _backward_dkdv(cfg, q, k, v, d_out, lse, delta, k_start, k_end, q_start, q_end)
    dq = _backward_dq(cfg, q, k, v, d_out, lse, delta, k_start, k_end)
    return dq, dk, dv, None, None, None, None  # the int ranges have no gradient


_range_attention.defvjp(_range_attention_fwd, _range_attention_bwd)


# ----------------------------------------------------------------------------------------------
# Shared pieces of the kernels.


def _block_loop_bounds(starts, ends, block, length):
    """[lo, hi) of the `block`-sized blocks holding any index in some range [starts[i], ends[i]).

    Empty ranges (padding) are left out, so a block of only padding gets lo > hi: no iteration.
    Clipped to [0, length / block) so a bad range cannot read outside the array.
    """
    nonempty = starts < ends
    first = jnp.min(jnp.where(nonempty, starts, length))
    last = jnp.max(jnp.where(nonempty, ends, 0))
    # lax.div is C division, equal to floor division here as both operands are >= 0.
    lo = lax.div(jnp.maximum(first, 0), block)
    hi = lax.div(jnp.minimum(last, length) + block - 1, block)
    return lo, hi


def _range_mask(k_start, k_end, key_offset, block_k):
    """bool [block_q, block_k]: which of the keys key_offset + [0, block_k) each query sees."""
    keys = key_offset + jnp.arange(block_k, dtype=jnp.int32)
    return (k_start[:, None] <= keys[None, :]) & (keys[None, :] < k_end[:, None])


def _logits2(q, k, scale):
    """Scaled logits in base 2: q k^T * scale * log2(e), float32 [block_q, block_k]."""
    return plgpu.dot(q, k.T) * (scale * _LOG2E)


def _probs(q, k, lse, mask, scale):
    """Softmax probabilities of one block, recomputed from the saved base-2 log-sum-exp."""
    # `where` rather than a masked logit: empty rows store lse = 0, and their p must be exactly 0.
    return jnp.where(mask, jnp.exp2(_logits2(q, k, scale) - lse[:, None]), 0.0)


def _seq_block(block, dh):
    """BlockSpec: one block of a [B, L, H, Dh] array for grid point (block i, row b, head h)."""
    return pl.BlockSpec((None, block, None, dh), lambda i, b, h: (b, i, h, 0))


def _seq_full(length, dh):
    """BlockSpec: the whole sequence of a [B, L, H, Dh] array, for the kernel's own inner loop."""
    return pl.BlockSpec((None, length, None, dh), lambda i, b, h: (b, 0, h, 0))


def _vec_block(block):
    return pl.BlockSpec((None, block), lambda i, b, h: (b, i))  # int [B, L] ranges


def _vec_full(length):
    return pl.BlockSpec((None, length), lambda i, b, h: (b, 0))


def _stat_block(block):
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))  # f32 [B, H, L] lse, delta


def _stat_full(length):
    return pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))


# ----------------------------------------------------------------------------------------------
# Forward.


def _forward_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref, *, block_k, scale):
    block_q, dh = q_ref.shape
    q, k_start, k_end = q_ref[...], ks_ref[...], ke_ref[...]
    lo, hi = _block_loop_bounds(k_start, k_end, block_k, k_ref.shape[0])

    def visit_key_block(j, carry):
        acc, m, l = carry  # unnormalised output, running max (base 2), running sum of exp2
        keys = pl.ds(j * block_k, block_k)
        mask = _range_mask(k_start, k_end, j * block_k, block_k)
        s = jnp.where(mask, _logits2(q, k_ref[keys, :], scale), _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        rescale = jnp.exp2(m - m_new)  # earlier blocks were summed against the older max
        v = v_ref[keys, :]
        acc = rescale[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, rescale * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_q, dh), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, visit_key_block, init)
    # Empty rows have l = 0: output zeros, and store lse = 0 (unused: their p is masked to 0).
    nonempty = k_start < k_end
    l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(l), 0.0)


def _forward(cfg, q, k, v, k_start, k_end):
    """-> out [B, Lq, H, Dh] in q.dtype, lse float32 [B, H, Lq] (base 2)."""
    (b, lq, h, dh), lk = q.shape, k.shape[1]
    kernel = functools.partial(_forward_kernel, block_k=cfg.block_k, scale=dh ** -0.5)
    return cfg.call(
        kernel, grid=(lq // cfg.block_q, b, h),
        in_specs=[_seq_block(cfg.block_q, dh), _seq_full(lk, dh), _seq_full(lk, dh),
                  _vec_block(cfg.block_q), _vec_block(cfg.block_q)],
        out_specs=[_seq_block(cfg.block_q, dh), _stat_block(cfg.block_q)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        name="range_attention_forward",
    )(q, k, v, k_start, k_end)


# ----------------------------------------------------------------------------------------------
# Backward.


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, qs_ref, qe_ref,
                 dk_ref, dv_ref, *, block_q, scale):
    block_k, dh = k_ref.shape
    k, v = k_ref[...], v_ref[...]
    key_offset = pl.program_id(0) * block_k
    lo, hi = _block_loop_bounds(qs_ref[...], qe_ref[...], block_q, q_ref.shape[0])

    def visit_query_block(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, d_out = q_ref[rows, :], do_ref[rows, :]
        mask = _range_mask(ks_ref[rows], ke_ref[rows], key_offset, block_k)
        p = _probs(q, k, lse_ref[rows], mask, scale)
        dv = dv + plgpu.dot(p.astype(d_out.dtype).T, d_out)
        dp = plgpu.dot(d_out, v.T)
        ds = p * (dp - delta_ref[rows][:, None])  # d logits, up to the factor `scale`
        dk = dk + plgpu.dot(ds.astype(q.dtype).T, q)
        return dk, dv

    zeros = jnp.zeros((block_k, dh), jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, visit_query_block, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkdv(cfg, q, k, v, d_out, lse, delta, k_start, k_end, q_start, q_end):
    (b, lq, h, dh), lk = q.shape, k.shape[1]
    kernel = functools.partial(_dkdv_kernel, block_q=cfg.block_q, scale=dh ** -0.5)
    return cfg.call(
        kernel, grid=(lk // cfg.block_k, b, h),
        in_specs=[_seq_full(lq, dh), _seq_block(cfg.block_k, dh), _seq_block(cfg.block_k, dh),
                  _seq_full(lq, dh), _stat_full(lq), _stat_full(lq),
                  _vec_full(lq), _vec_full(lq), _vec_block(cfg.block_k), _vec_block(cfg.block_k)],
        out_specs=[_seq_block(cfg.block_k, dh), _seq_block(cfg.block_k, dh)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="range_attention_dkdv",
    )(q, k, v, d_out, lse, delta, k_start, k_end, q_start, q_end)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, dq_ref, *,
               block_k, scale):
    block_q, dh = q_ref.shape
    q, d_out, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    k_start, k_end = ks_ref[...], ke_ref[...]
    lo, hi = _block_loop_bounds(k_start, k_end, block_k, k_ref.shape[0])

    def visit_key_block(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = _range_mask(k_start, k_end, j * block_k, block_k)
        p = _probs(q, k, lse, mask, scale)
        ds = p * (plgpu.dot(d_out, v.T) - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, visit_key_block, jnp.zeros((block_q, dh), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, d_out, lse, delta, k_start, k_end):
    (b, lq, h, dh), lk = q.shape, k.shape[1]
    kernel = functools.partial(_dq_kernel, block_k=cfg.block_k, scale=dh ** -0.5)
    return cfg.call(
        kernel, grid=(lq // cfg.block_q, b, h),
        in_specs=[_seq_block(cfg.block_q, dh), _seq_full(lk, dh), _seq_full(lk, dh),
                  _seq_block(cfg.block_q, dh), _stat_block(cfg.block_q), _stat_block(cfg.block_q),
                  _vec_block(cfg.block_q), _vec_block(cfg.block_q)],
        out_specs=_seq_block(cfg.block_q, dh),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="range_attention_dq",
    )(q, k, v, d_out, lse, delta, k_start, k_end)
