"""The Transfusion mask and the attention implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.models import attention, attention_ranges
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


# --- key ranges, the kernels' form of the mask -------------------------------------------------

def _range_mask(start, end, length):
    cols = np.arange(length)
    return (np.asarray(start)[..., None] <= cols) & (cols < np.asarray(end)[..., None])


@pytest.mark.parametrize("seed", range(8))
def test_self_ranges_equal_the_brute_force_mask(seed):
    batch, info = _random_rows(seed, b=4, length=96, m=4, p=4)
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    k_start, k_end, q_start, q_end = attention_ranges.self_ranges(seg, pos)
    mask = brute_force_mask(info)
    np.testing.assert_array_equal(_range_mask(k_start, k_end, 96), mask)  # keys of each query
    np.testing.assert_array_equal(_range_mask(q_start, q_end, 96), mask.transpose(0, 2, 1))


def test_cache_ranges_equal_the_mask_against_a_longer_cache():
    """A prompt written at the start of a cache with empty slots after it (prefill)."""
    batch, info = _random_rows(11, b=3, length=64)
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 32)))
    k_start, k_end = attention_ranges.cache_ranges(seg, pos, pad(seg), pad(pos))
    want = np.pad(brute_force_mask(info), ((0, 0), (0, 0), (0, 32)))
    np.testing.assert_array_equal(_range_mask(k_start, k_end, 96), want)


def test_auto_picks_the_backends_kernel():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "pallas_gpu"
    assert attention.resolve("auto", "cpu") == "blockwise"
    assert attention.resolve("dense", "tpu") == "dense"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.resolve("flash")


def _loss_and_grads(fn, seg, pos, q, k, v):
    weights = jax.random.normal(jax.random.key(2), q.shape)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg, pos) * weights)
    return fn(q, k, v, seg, pos), jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", [pytest.param("splash", marks=pytest.mark.slow), "pallas_gpu",
                                  "blockwise"])
def test_kernels_equal_dense_in_values_and_gradients(impl):
    """Through `attend`, as the model calls them (Pallas interpreter off their backends)."""
    batch, _ = _random_rows(5, b=2, length=256, m=4, p=16)
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    q, k, v = _qkv(jax.random.key(4), 2, 256, h=2, d=16)
    fn = lambda *a: attention.attend(impl, *a, block_size=128)  # splash: lanes of 128
    out, grads = _loss_and_grads(fn, seg, pos, q, k, v)
    want, want_grads = _loss_and_grads(attention.dense_attention, seg, pos, q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu", "blockwise"])
def test_kernels_run_per_shard_under_a_mesh(impl):
    """Pallas calls are opaque to XLA's partitioner: under a mesh they run in shard_map over
    the batch axes of the logical rules, and still equal the dense reference."""
    import flax.linen as nn
    from transfusion_jax.core import sharding
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    batch, _ = _random_rows(6, b=4, length=128, m=3, p=16)
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    q, k, v = _qkv(jax.random.key(5), 4, 128, h=2, d=16)
    fn = jax.jit(lambda *a: attention.attend(impl, *a, block_size=128))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = fn(q, k, v, seg, pos)
        text = fn.lower(q, k, v, seg, pos).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text or "custom_call" in text
    np.testing.assert_allclose(out, attention.dense_attention(q, k, v, seg, pos), atol=2e-5,
                               rtol=2e-5)


def test_a_decoding_chunk_the_kernels_cannot_tile_runs_blockwise():
    """One new element against a cache: same answer as dense for every implementation."""
    batch, _ = _random_rows(8, b=2, length=64)
    seg, pos = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["mask_pos"])
    q, k, v = _qkv(jax.random.key(6), 2, 64)
    last = lambda x: x[:, 40:41]
    want = attention.dense_attention(last(q), k, v, last(seg), last(pos), seg, pos)
    for impl in ("blockwise", "splash", "pallas_gpu", "auto"):
        got = attention.attend(impl, last(q), k, v, last(seg), last(pos), 16, seg, pos)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)
