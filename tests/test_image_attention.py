"""model.image_attention (paper Table 5): "bidirectional" (the default) and "causal" patches,
against brute-force masks, in every attention implementation and on the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from transfusion_jax.core.config import load_config
from transfusion_jax.inference import generation as gen
from transfusion_jax.models import Transfusion, attention, attention_ranges, patches_per_image
from transfusion_jax.models.kv_cache import init_cache
from transfusion_jax.models.transfusion import attention_mask_pos
from rows import BOI, brute_force_mask, build_rows, random_docs


def tiny(**overrides):
    cfg = load_config("experiments/transfusion.py:tiny").model
    cfg.update(overrides)
    return cfg


def brute_force_causal(info):
    """bool [B, L, L]: same document and the key no later than the query, patches included."""
    doc = info["doc"]
    length = doc.shape[1]
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] != 0)
    return same_doc & np.tril(np.ones((length, length), bool))[None]


def random_rows(seed, cfg, b=3, length=128, m=3):
    p = patches_per_image(cfg)
    rng = np.random.default_rng(seed)
    batch, info = build_rows([random_docs(rng, length, m, p) for _ in range(b)], length, m, p)
    return {k: jnp.asarray(v) for k, v in batch.items()}, info


def _range_mask(start, end, length):
    cols = np.arange(length)
    return (np.asarray(start)[..., None] <= cols) & (cols < np.asarray(end)[..., None])


@pytest.mark.parametrize("seed", range(3))
def test_mask_and_kernel_ranges_equal_the_brute_force_masks(seed):
    """causal: the plain causal mask within documents; bidirectional: the batch's mask_pos as
    it is. The fused kernels' key and query ranges (attention_ranges.py) follow too."""
    cfg = tiny(image_attention="causal")
    batch, info = random_rows(seed, cfg)
    assert np.any(info["image"] >= 0)
    seg = batch["segment_ids"]
    pos = attention_mask_pos(cfg, batch)
    want = brute_force_causal(info)
    np.testing.assert_array_equal(np.asarray(attention.transfusion_mask(seg, pos)), want)
    k_start, k_end, q_start, q_end = attention_ranges.self_ranges(seg, pos)
    length = seg.shape[1]
    np.testing.assert_array_equal(_range_mask(k_start, k_end, length), want)
    np.testing.assert_array_equal(_range_mask(q_start, q_end, length), want.transpose(0, 2, 1))
    bidirectional = tiny()
    assert bidirectional.image_attention == "bidirectional"  # the paper's default
    same = attention_mask_pos(bidirectional, batch)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(batch["mask_pos"]))
    np.testing.assert_array_equal(np.asarray(attention.transfusion_mask(seg, same)),
                                  brute_force_mask(info))


@pytest.mark.parametrize("impl", ["dense", "blockwise", "pallas_gpu"])
def test_implementations_equal_attention_under_the_brute_force_mask(impl):
    """Through `attend` as the model calls it (the Pallas kernel in its interpreter on CPU;
    splash takes the same key ranges, checked above), against softmax under the mask."""
    cfg = tiny(image_attention="causal")
    batch, info = random_rows(7, cfg, b=2)
    seg, pos = batch["segment_ids"], attention_mask_pos(cfg, batch)
    q, k, v = [jax.random.normal(key, (2, 128, 2, 16)) for key in
               jax.random.split(jax.random.key(1), 3)]
    mask = jnp.asarray(brute_force_causal(info))[:, None]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    p = jnp.where(mask.any(-1, keepdims=True), p, 0.0)  # padding rows: zeros
    want = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    got = attention.attend(impl, q, k, v, seg, pos, block_size=64)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _model(cfg, rows, length, slots, seed=0):
    p = patches_per_image(cfg)
    batch, info = build_rows(rows, length, slots, p)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shape = (len(rows), slots, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x = jax.random.normal(jax.random.key(seed), shape)
    model = Transfusion(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(2), batch, x,
                            jnp.zeros(shape[:2], jnp.int32))
    # Random params drawn with numpy, none zero (the model's own init compiles slowly on CPU
    # and zero-initialises its output layers).
    rng = np.random.default_rng(seed)
    draw = lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(max(a.shape[-2:-1] or [4])),
                                 jnp.float32)
    return model, jax.tree.map(draw, nn.unbox(shapes)), batch, info, x


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_patches_see_only_earlier_patches_when_causal():
    """Moving the latent under an image's last patch changes that image's earlier patches'
    predictions only with bidirectional attention; under its first patch, every later patch's
    either way."""
    for mode in ("bidirectional", "causal"):
        cfg = tiny(image_attention=mode)
        p = patches_per_image(cfg)
        model, params, batch, info, x = _model(cfg, [[[3, "image", 2]]], 48, 1)
        batch = {key: jnp.repeat(value, 3, axis=0) for key, value in batch.items()}
        k, grid = cfg.patch_size, cfg.latent_size // cfg.patch_size
        x = jnp.stack([x[0], x[0].at[0, -k:, -k:].add(1.0),  # the last patch in raster order
                       x[0].at[0, :k, :k].add(1.0)])  # the first
        out = model.apply(params, batch, x, jnp.full((3, 1), 300, jnp.int32))["prediction"]
        base, last, first = out[:, 0]
        per_patch = lambda y: np.abs(np.asarray(y - base)).reshape(
            grid, k, grid, k, -1).max(axis=(1, 3, 4)).reshape(p)
        moved_by_last, moved_by_first = per_patch(last), per_patch(first)
        assert np.all(moved_by_first > 1e-6), mode
        if mode == "causal":
            assert np.all(moved_by_last[:-1] < 1e-6)
        else:
            assert np.all(moved_by_last[:-1] > 1e-6)


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_causal_blockwise_equals_dense_and_the_cache_equals_the_full_forward():
    """A causal model: blockwise attention gives dense's outputs; on the KV cache, prefill,
    a denoising step and commit_image give the full forward's prediction and logits (the cache
    keeps the causal mask vectors the model wrote)."""
    cfg = tiny(image_attention="causal")
    p = patches_per_image(cfg)
    length = 3 * p + 16
    model, params, batch, info, images = _model(cfg, [[[2, "image", 3, "image", 2]]], length, 2)
    blockwise = Transfusion(tiny(image_attention="causal", attention="blockwise",
                                 attention_block=16))
    t_noisy = jnp.array([[0, 537]], jnp.int32)
    clean = jnp.zeros((1, 2), jnp.int32)
    boi = int(np.flatnonzero(np.asarray(batch["tokens"][0]) == BOI)[1])
    eoi = boi + p + 1

    @jax.jit
    def run():
        full = lambda m, t: m.apply(params, batch, images, t)
        keys = ("tokens", "segment_ids", "positions", "mask_pos", "patch_index",
                "patch_positions")
        chunk = {k: batch[k] for k in keys}
        chunk["segment_ids"] = jnp.where(jnp.arange(length) < boi + 1, batch["segment_ids"], 0)
        prompt = gen.Prompt(chunk, images, jnp.array([boi + 1], jnp.int32))
        cache, _ = gen.prefill(model, params, init_cache(cfg, 1, length), prompt)
        active = jnp.ones(1, bool)
        denoised = gen.denoise(model, params, cache, images[:, 1], t_noisy[:, 1], active)
        cache, after_eoi = gen.commit_image(model, params, cache, images[:, 1], active, 4)
        _, after_next = gen.decode_text(model, params, cache, batch["tokens"][:, eoi + 1],
                                        active)
        return (full(model, t_noisy), full(blockwise, t_noisy), full(model, clean), denoised,
                after_eoi, after_next)

    noisy, noisy_blockwise, clean_out, denoised, after_eoi, after_next = run()
    for key in ("logits", "prediction"):
        np.testing.assert_allclose(noisy_blockwise[key], noisy[key], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(denoised, noisy["prediction"][:, 1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(after_eoi, clean_out["logits"][:, eoi], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(after_next, clean_out["logits"][:, eoi + 1], atol=1e-5, rtol=1e-5)


def test_bad_value_names_the_field():
    cfg = tiny(image_attention="sideways")
    with pytest.raises(ValueError, match="model.image_attention='sideways'"):
        _model(cfg, [[[3]]], 8, 1)
