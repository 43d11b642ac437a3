"""The Transfusion mask and the attention implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.models import attention
from rows import brute_force_mask, build_rows, random_docs


def _random_rows(seed, b=3, length=64, m=3, p=4):
    rng = np.random.default_rng(seed)
    return build_rows([random_docs(rng, length, m, p) for _ in range(b)], length, m, p)


@pytest.mark.parametrize("seed", range(5))
def test_mask_equals_brute_force(seed):
    batch, info = _random_rows(seed)
    mask = attention.transfusion_mask(jnp.asarray(batch["segment_ids"]),
                                      jnp.asarray(batch["mask_pos"]))
    np.testing.assert_array_equal(np.asarray(mask), brute_force_mask(info))


def _qkv(key, b, length, h=2, d=8):
    return [jax.random.normal(k, (b, length, h, d)) for k in jax.random.split(key, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("block", [8, 16, 64])
def test_blockwise_equals_dense_values_and_gradients(block):
    batch, info = _random_rows(7)
    assert (info["image"] >= 0).sum(axis=1).max() >= 8, "want rows with several images"
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    q, k, v = _qkv(jax.random.key(1), *seg.shape)
    weights = jax.random.normal(jax.random.key(2), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, pos) * weights)

    dense = lambda *a: attention.dense_attention(*a)
    block_fn = lambda *a: attention.blockwise_attention(*a, block_size=block)
    np.testing.assert_allclose(block_fn(q, k, v, seg, pos), dense(q, k, v, seg, pos),
                               atol=1e-5, rtol=1e-5)
    g_dense = jax.grad(loss(dense), (0, 1, 2))(q, k, v)
    g_block = jax.jit(jax.grad(loss(block_fn), (0, 1, 2)))(q, k, v)
    for gd, gb in zip(g_dense, g_block):
        np.testing.assert_allclose(gb, gd, atol=1e-5, rtol=1e-5)


def test_padding_rows_output_zero():
    batch, info = build_rows([[[3]]], 16, 1, 4)  # 5 elements, 11 of padding
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    q, k, v = _qkv(jax.random.key(0), 1, 16)
    for out in (attention.dense_attention(q, k, v, seg, pos),
                attention.blockwise_attention(q, k, v, seg, pos, 4)):
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[0, 5:], 0.0)


def test_bad_choices_name_the_field():
    seg = jnp.ones((1, 12), jnp.int32)
    q = jnp.zeros((1, 12, 1, 4))
    with pytest.raises(ValueError, match="model.attention_block=8"):
        attention.blockwise_attention(q, q, q, seg, seg, block_size=8)
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.attend("flash", q, q, q, seg, seg)
