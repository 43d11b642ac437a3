"""The Pallas range-attention kernel (models/attention_gpu.py) against dense attention.

On CPU the kernels run in Pallas' interpreter (float32, tight tolerances); the compiled Triton
kernel is checked in bf16 by `test_compiled_kernel_bf16`, on a GPU only:
`TRANSFUSION_TEST_BACKEND=gpu pytest tests/test_attention_gpu.py` (conftest.py otherwise forces the
CPU backend), or `python tests/test_attention_gpu.py`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.models import attention
from transfusion_jax.models.attention_gpu import range_attention


def transfusion_ranges(rng, batch, length, patches=8, max_docs=4):
    """Rows of packed documents (text, one image of `patches` patches, text), then padding.

    Returns numpy int32 (k_start, k_end [B, L], q_start, q_end [B, L], segment_ids, mask_pos):
    query q sees keys [doc_start(q), mask_pos[q]]; key j is seen by queries
    [j or its image's first patch, doc_end(j)). Padding has empty ranges and segment id 0.
    """
    k_start, k_end, q_start, q_end, seg, mask_pos = (
        np.zeros((batch, length), np.int32) for _ in range(6))
    for r in range(batch):
        i = 0
        for d in range(1, max_docs + 1):
            before, after = rng.integers(1, 12, size=2)
            size = before + patches + after
            if i + size > length:
                break
            first_patch, last_patch = i + before, i + before + patches - 1
            for j in range(i, i + size):
                is_patch = first_patch <= j <= last_patch
                mask_pos[r, j] = last_patch if is_patch else j
                seg[r, j] = d
                k_start[r, j], k_end[r, j] = i, mask_pos[r, j] + 1
                q_start[r, j], q_end[r, j] = (first_patch if is_patch else j), i + size
            i += size
    return k_start, k_end, q_start, q_end, seg, mask_pos


def causal_ranges(batch, length):
    idx = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return np.zeros_like(idx), idx + 1, idx, np.full_like(idx, length)


def reference(q, k, v, k_start, k_end):
    """Dense softmax attention in float32 under the range mask; rows with no key -> zeros."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision="highest") * q.shape[-1] ** -0.5
    j = jnp.arange(k.shape[1])
    allowed = ((k_start[:, :, None] <= j) & (j < k_end[:, :, None]))[:, None]
    p = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1) * allowed
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision="highest")


def _qkvw(seed, b, lq, lk, h, dh, dtype=jnp.float32):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, lq, h, dh), dtype)
    k = jax.random.normal(kk, (b, lk, h, dh), dtype)
    v = jax.random.normal(kv, (b, lk, h, dh), dtype)
    return q, k, v, jax.random.normal(kw, (b, lq, h, dh), jnp.float32)


def _values_and_grads(fn, q, k, v, weights):
    """fn(q, k, v) and the gradients of sum(fn * weights) w.r.t. q, k, v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    return jax.jit(lambda q, k, v: (fn(q, k, v), *jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


def _check_against_reference(ranges, lq, lk, dh, block_q=32, block_k=32, h=2, seed=0):
    k_start, k_end, q_start, q_end = map(jnp.asarray, ranges)
    q, k, v, w = _qkvw(seed, k_start.shape[0], lq, lk, h, dh)
    kernel = functools.partial(range_attention, k_start=k_start, k_end=k_end, q_start=q_start,
                               q_end=q_end, block_q=block_q, block_k=block_k, interpret=True)
    got = _values_and_grads(kernel, q, k, v, w)
    want = _values_and_grads(lambda q, k, v: reference(q, k, v, k_start, k_end), q, k, v, w)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    return got


def test_transfusion_ranges_are_the_model_mask():
    """The test's ranges describe the model's Transfusion mask, and q ranges bound each key's
    queries (what the dk/dv pass relies on)."""
    k_start, k_end, q_start, q_end, seg, pos = transfusion_ranges(np.random.default_rng(0), 3, 128)
    j = np.arange(128)
    from_ranges = (k_start[:, :, None] <= j) & (j < k_end[:, :, None])
    model = attention.transfusion_mask(jnp.asarray(seg), jnp.asarray(pos))
    np.testing.assert_array_equal(from_ranges, np.asarray(model))
    row, query, key = np.nonzero(from_ranges)
    assert np.all((q_start[row, key] <= query) & (query < q_end[row, key]))
    assert (seg == 0).any(axis=1).all(), "want padding in every row"


@pytest.mark.parametrize("dh,block_q,block_k", [
    (16, 32, 32), pytest.param(32, 16, 32, marks=pytest.mark.slow),
    pytest.param(32, 32, 16, marks=pytest.mark.slow)])
def test_transfusion_values_and_gradients(dh, block_q, block_k):
    ranges = transfusion_ranges(np.random.default_rng(dh + block_q), 2, 128)[:4]
    _check_against_reference(ranges, 128, 128, dh, block_q, block_k)


def test_causal_values_and_gradients():
    _check_against_reference(causal_ranges(2, 128), 128, 128, dh=32)


def test_query_block_of_padding():
    """Rows end in a whole block of padding (32 queries/keys with empty ranges)."""
    ranges = [x.copy() for x in transfusion_ranges(np.random.default_rng(3), 2, 96)[:4]]
    ranges = [np.pad(x, ((0, 0), (0, 32))) for x in ranges]  # 128 long, last 32 empty
    out, dq, dk, dv = _check_against_reference(ranges, 128, 128, dh=16)
    for x in (out, dq, dk, dv):
        assert not np.asarray(x[:, 96:]).any()


def test_empty_ranges_give_exact_zeros():
    """Padding queries output exactly 0 with exactly 0 dq; keys nobody sees get 0 dk, dv."""
    k_start, k_end, q_start, q_end, seg, _ = transfusion_ranges(np.random.default_rng(5), 2, 128)
    out, dq, dk, dv = _check_against_reference((k_start, k_end, q_start, q_end), 128, 128, dh=16)
    pad = seg == 0
    assert pad.sum() >= 2
    for x in (out, dq, dk, dv):
        assert np.all(np.asarray(x)[pad] == 0.0)
        assert np.all(np.isfinite(np.asarray(x)))


def test_queries_against_a_longer_cache():
    """Lq != Lk (a prefill chunk against a cache): 64 queries at positions 64..127, causal."""
    b, lq, lk = 2, 64, 128
    pos = np.broadcast_to(np.arange(lk - lq, lk, dtype=np.int32), (b, lq))
    keys = np.broadcast_to(np.arange(lk, dtype=np.int32), (b, lk))
    q_start = np.maximum(keys - (lk - lq), 0)  # in query coordinates
    ranges = (np.zeros_like(pos), pos + 1, q_start, np.full_like(keys, lq))
    _check_against_reference(ranges, lq, lk, dh=16)


@pytest.mark.parametrize("shapes,blocks,match", [
    (((1, 100, 2, 16), (1, 128, 2, 16)), (32, 32), r"Lq=100.*block_q=32"),
    (((1, 128, 2, 16), (1, 96, 2, 16)), (32, 64), r"Lk=96.*block_k=64"),
    (((1, 128, 2, 16), (1, 128, 2, 16)), (24, 32), r"block_q=24"),
    (((1, 128, 2, 24), (1, 128, 2, 24)), (32, 32), r"Dh=24"),
])
def test_bad_shapes_raise(shapes, blocks, match):
    (b, lq, h, dh), (_, lk, _, _) = shapes
    q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
    ks, qs = jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32)
    with pytest.raises(ValueError, match=match):
        range_attention(q, k, k, ks, ks, qs, qs, block_q=blocks[0], block_k=blocks[1],
                        interpret=True)


def check_compiled_bf16(dh, length=1024, batch=2, heads=4):
    """The compiled Triton kernel in bf16 against the float32 reference (bf16 tolerances)."""
    rng = np.random.default_rng(dh)
    k_start, k_end, q_start, q_end = map(
        jnp.asarray, transfusion_ranges(rng, batch, length, patches=64, max_docs=12)[:4])
    q, k, v, w = _qkvw(dh, batch, length, length, heads, dh, jnp.bfloat16)
    kernel = functools.partial(range_attention, k_start=k_start, k_end=k_end, q_start=q_start,
                               q_end=q_end, num_warps=4 if dh <= 64 else 8)
    got = _values_and_grads(kernel, q, k, v, w)
    want = _values_and_grads(lambda q, k, v: reference(q, k, v, k_start, k_end), q, k, v, w)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.bfloat16, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err < 2e-2, f"{name}: max error {err:.3g} of max |ref|"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dh", [64, 128])
def test_compiled_kernel_bf16(dh):
    check_compiled_bf16(dh)


if __name__ == "__main__":
    assert jax.default_backend() == "gpu", jax.devices()
    for dh in (64, 128):
        check_compiled_bf16(dh)
        print(f"compiled kernel, bf16, Dh={dh}: ok")
