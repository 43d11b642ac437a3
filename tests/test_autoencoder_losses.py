"""Autoencoder losses (appendix A): hinge GAN terms, the delayed start, the weighted total,
PSNR, and the PatchGAN discriminator's shapes and axes, against hand-computed values."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transfusion_jax.models.autoencoder import losses as L
from transfusion_jax.models.autoencoder.model import Encoding
from transfusion_jax.core.sharding import DEFAULT_RULES


def loss_cfg(**kw):
    base = dict(l1=1.0, lpips=1.0, gan=0.5, kl=1e-6, codebook=1.0, gan_start_step=10)
    return ml_collections.ConfigDict({**base, **kw})


def test_hinge_losses():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.5])
    # D: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3; mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3.
    np.testing.assert_allclose(L.hinge_d_loss(real, fake), 0.5 * (2.5 / 3 + 3.5 / 3), rtol=1e-6)
    np.testing.assert_allclose(L.hinge_g_loss(fake), 0.5 / 3, rtol=1e-6)  # -mean(fake)


def test_gan_waits_for_its_start_step():
    assert [float(L.gan_active(s, 10)) for s in (0, 9, 10, 11)] == [0, 0, 1, 1]
    real, fake = jnp.ones((2, 3, 3, 1)), jnp.ones((2, 3, 3, 1))
    before, m = L.discriminator_loss(loss_cfg(), real, fake, jnp.int32(9))
    after, _ = L.discriminator_loss(loss_cfg(), real, fake, jnp.int32(10))
    assert float(before) == 0.0 and float(after) == float(m["gan_d"]) == 1.0


def test_weighted_total():
    x = jnp.zeros((2, 4, 4, 3))
    recon = x.at[0].set(0.5)
    enc = Encoding(latents=None, aux={"kl": jnp.array([100.0, 300.0])})
    terms = L.reconstruction_terms(x, recon, enc)
    np.testing.assert_allclose(terms["l1"], 0.25)
    assert float(terms["lpips"]) == 0.0 and float(terms["kl"]) == 200.0
    fake = jnp.full((2, 3, 3, 1), -0.8)
    total_before, _ = L.generator_loss(loss_cfg(), terms, fake, jnp.int32(0))
    total_after, m = L.generator_loss(loss_cfg(), terms, fake, jnp.int32(10))
    kl = 1e-6 * 200 / (4 * 4 * 3)  # the KL per pixel value
    np.testing.assert_allclose(total_before, 0.25 + kl, rtol=1e-6)
    np.testing.assert_allclose(total_after, 0.25 + kl + 0.5 * 0.8, rtol=1e-6)
    assert float(m["gan_g"]) == pytest.approx(0.8)
    vq_terms = L.reconstruction_terms(x, recon, Encoding(latents=None,
                                                         aux={"codebook": jnp.array([0.1, 0.3])}))
    total, _ = L.generator_loss(loss_cfg(), vq_terms, None, jnp.int32(0))
    np.testing.assert_allclose(total, 0.25 + 0.2, rtol=1e-6)


def test_vae_loss_keeps_latent_diffusions_balance():
    """Latent diffusion's VAE loss (ldm/modules/losses/contperceptual.py, GAN off, LPIPS off,
    logvar 0) sums |x - recon| over each image and adds 1e-6 x the summed KL, averaged over the
    batch. Ours, times the pixel values per image, must be that same number."""
    rng = np.random.default_rng(0)
    x, recon = rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(2, 6, 5, 3))
    kl = np.array([37.0, 4.0])
    ldm = np.abs(x - recon).reshape(2, -1).sum(-1).mean() + 1e-6 * kl.mean()
    terms = L.reconstruction_terms(jnp.asarray(x), jnp.asarray(recon),
                                   Encoding(latents=None, aux={"kl": jnp.asarray(kl)}))
    total, _ = L.generator_loss(loss_cfg(lpips=0.0), terms, None, jnp.int32(0))
    np.testing.assert_allclose(float(total) * 6 * 5 * 3, ldm, rtol=1e-5)


def test_psnr():
    x = jnp.zeros((1, 8, 8, 3))
    # mse 0.04 on a peak-to-peak range of 2: 10 log10(4 / 0.04) = 20 dB.
    np.testing.assert_allclose(L.psnr(x, x + 0.2), [20.0], rtol=1e-5)


def test_patch_discriminator_shapes_and_axes():
    disc = L.PatchDiscriminator(channels=8, num_layers=3)
    x = jnp.zeros((2, 64, 64, 3))
    abstract = jax.eval_shape(disc.init, jax.random.key(0), x)
    # Three stride-2 4x4 convs (64 -> 8), then two stride-1 ones with padding 1 (8 -> 7 -> 6).
    out = jax.eval_shape(disc.apply, nn.unbox(abstract), x)
    assert out.shape == (2, 6, 6, 1)
    names = {n for n, _ in DEFAULT_RULES}
    for leaf in jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned) and set(leaf.names) <= names
