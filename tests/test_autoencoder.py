"""Latent autoencoders: shapes per kind, logical axes, the VAE posterior and KL, per-image
independence, and the VQ quantiser (lookup, straight-through gradient, EMA update, dead-code
restarts) against numpy references."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.models.autoencoder.model import Autoencoder, latent_shape
from transfusion_jax.core.sharding import DEFAULT_RULES

N, S = 3, 16


@functools.lru_cache(maxsize=None)
def config(kind, **overrides):
    cfg = load_config(f"experiments/autoencoder.py:tiny,kind={kind}")
    for k, v in overrides.items():
        cfg.model[k] = v
    return cfg.model


def images(seed=0, n=N):
    return jax.random.uniform(jax.random.key(seed), (n, S, S, 3), minval=-1, maxval=1)


@functools.lru_cache(maxsize=None)
def variables(kind, seed=0, **overrides):
    """Boxed shapes from eval_shape, filled with numpy draws: every leaf non-zero (no zero-init
    conv hides a path) and no RNG init to compile."""
    model = Autoencoder(config(kind, **overrides))
    abstract = jax.eval_shape(model.init, jax.random.key(0), images())
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 25.0
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    out = jax.tree.map(draw, nn.unbox(abstract))
    if "vq" in out:  # a valid quantiser state: unit codes, none dead yet
        q = out["vq"]["quantizer"]
        cb = np.asarray(q["codebook"])
        q["codebook"] = jnp.asarray(cb / np.linalg.norm(cb, axis=-1, keepdims=True))
        q["unused_steps"] = jnp.zeros_like(q["unused_steps"], jnp.int32)
    return model, out, abstract


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["identity", "vae", "vq"])
def test_shapes(kind):
    model, v, _ = variables(kind)
    x = images()
    recon, enc = model.apply(v, x)
    h, w, c = latent_shape(config(kind), S)
    assert enc.latents.shape == (N, h, w, c) and recon.shape == x.shape
    if kind == "identity":
        assert h == S and np.array_equal(enc.latents, x) and np.array_equal(recon, x)
    else:
        assert (h, c) == (S // 2, 8)
    if kind == "vq":
        assert enc.ids.shape == (N, h, w) and enc.aux["codebook"].shape == (N,)


def test_logical_axes_from_the_rules():
    names = {name for name, _ in DEFAULT_RULES}
    for kind in ("vae", "vq"):
        _, _, abstract = variables(kind)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
                abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
            assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
            axes = [a for a in leaf.names if a is not None]
            assert set(axes) <= names and len(axes) == len(set(axes)), (path, leaf.names)


def test_vae_posterior_and_kl():
    model, v, _ = variables("vae")
    x = images(1)
    mean_enc = model.apply(v, x, method=Autoencoder.encode)
    np.testing.assert_array_equal(mean_enc.latents, mean_enc.mean)
    enc = model.apply(v, x, jax.random.key(5), method=Autoencoder.encode)
    eps = (enc.latents - enc.mean) / np.exp(0.5 * np.asarray(enc.logvar))
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1
    m, lv = np.asarray(enc.mean, np.float64), np.asarray(enc.logvar, np.float64)
    kl = 0.5 * (m ** 2 + np.exp(lv) - 1 - lv).reshape(N, -1).sum(-1)
    np.testing.assert_allclose(enc.aux["kl"], kl, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_images_do_not_mix(kind):
    model, v, _ = variables(kind)
    x = images(2)
    y = x.at[1:].set(images(3)[1:])
    a, b = model.apply(v, x)[0], model.apply(v, y)[0]
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-3


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)


def test_vq_lookup_commitment_and_straight_through():
    model, v, _ = variables("vq")
    cfg = config("vq")
    x = images(4)
    z = model.apply(v, x, method=lambda m, x: m.quant_conv(m.encoder(x)))
    enc = model.apply(v, x, method=Autoencoder.encode)
    codebook = np.asarray(v["vq"]["quantizer"]["codebook"], np.float64)
    flat = _unit(z).reshape(-1, z.shape[-1])
    ids = np.argmax(flat @ codebook.T, axis=-1)
    np.testing.assert_array_equal(enc.ids.reshape(-1), ids)
    np.testing.assert_allclose(enc.latents.reshape(-1, z.shape[-1]), codebook[ids], atol=1e-5)
    commit = cfg.vq_beta * ((flat - codebook[ids]) ** 2).sum(-1).reshape(N, -1).mean(-1)
    np.testing.assert_allclose(enc.aux["codebook"], commit, rtol=1e-4)
    # Straight-through: the gradient reaches the encoder output as if q were normalize(z).
    w = jax.random.normal(jax.random.key(9), z.shape)
    quantizer = lambda z: model.apply(v, z, method=lambda m, z: m.quantizer(z)[0])  # noqa: E731
    g = jax.grad(lambda z: jnp.sum(quantizer(z) * w))(z)
    g_ref = jax.grad(lambda z: jnp.sum(z * jax.lax.rsqrt(
        jnp.sum(z * z, -1, keepdims=True) + 1e-6) * w))(z)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vq_ema_update_and_dead_code_restart():
    cfg = config("vq")
    model, v, _ = variables("vq")
    x = images(6, n=1)  # 64 vectors for 64 codes: some codes go unused
    q0 = jax.tree.map(np.array, v["vq"]["quantizer"])
    q0["unused_steps"][:32] = cfg.vq_restart_after - 1  # these restart unless used this step
    v = {**v, "vq": {"quantizer": jax.tree.map(jnp.asarray, q0)}}
    z = model.apply(v, x, method=lambda m, x: m.quant_conv(m.encoder(x)))
    (_, enc), new = model.apply(v, x, jax.random.key(0), True, mutable=["vq"])
    q1 = jax.tree.map(np.asarray, new["vq"]["quantizer"])
    flat, ids = _unit(z).reshape(-1, z.shape[-1]), np.asarray(enc.ids).reshape(-1)
    k, d = cfg.codebook_size, cfg.vq_decay
    counts = np.bincount(ids, minlength=k)
    sums = np.zeros_like(q0["embed_sum"], np.float64)
    np.add.at(sums, ids, flat)
    used, dead = counts > 0, (counts == 0) & (q0["unused_steps"] + 1 >= cfg.vq_restart_after)
    new_sum = d * q0["embed_sum"] + (1 - d) * sums
    np.testing.assert_allclose(q1["codebook"][used], _unit(new_sum)[used], atol=1e-5)
    keep = ~used & ~dead
    np.testing.assert_array_equal(q1["codebook"][keep], q0["codebook"][keep])
    np.testing.assert_array_equal(q1["unused_steps"], np.where(used | dead, 0, q0["unused_steps"] + 1))
    assert dead.any() and keep.any()
    # A restarted code sits next to one of this batch's encoder outputs.
    assert (q1["codebook"][dead] @ flat.T).max(-1).min() > 0.99


def test_vq_restart_needs_a_key():
    model, v, _ = variables("vq")
    with pytest.raises(ValueError, match="key"):
        model.apply(v, images(), None, True, mutable=["vq"])


def test_decode_ids_matches_decode():
    model, v, _ = variables("vq")
    recon, enc = model.apply(v, images(7))
    np.testing.assert_allclose(model.apply(v, enc.ids, method=Autoencoder.decode_ids), recon,
                               atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("kind", "vqgan", "model.kind"),
    ("channels", (8, 0), "model.channels"),
    ("num_res_blocks", 0, "model.num_res_blocks"),
    ("codebook_size", 1, "model.codebook_size"),
])
def test_config_errors_name_the_field(field, value, match):
    cfg = load_config("experiments/autoencoder.py:tiny,kind=vq").model
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), images())


def test_input_errors():
    model, v, _ = variables("vae")
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        model.apply(v, jnp.zeros((1, 15, 15, 3)))
    with pytest.raises(ValueError, match=r"expected \[N, H, W, 3\]"):
        model.apply(v, jnp.zeros((1, 16, 16, 1)))


def test_paper_preset_size():
    """Appendix A: an 86M-parameter VAE, 256x256 -> 32x32x8 (ours: SD's layout, 83.7M)."""
    cfg = load_config("experiments/autoencoder.py:paper,kind=vae").model
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    v = jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), x)
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(nn.unbox(v["params"])))
    assert 80e6 < n < 90e6, n
    enc = jax.eval_shape(lambda v, x: Autoencoder(cfg).apply(v, x, method=Autoencoder.encode),
                         nn.unbox(v), x)
    assert enc.latents.shape == (1, 32, 32, 8)
