"""Autoencoder training losses (paper appendix A, after Esser et al. 2021):

    L_VAE    = L1 + LPIPS + 0.5 GAN + 0.2 ID + 1e-6 KL
    L_VQ-VAE = L1 + LPIPS + 0.5 GAN + 0.2 ID + 1.0 codebook (commitment, beta 0.25)

Weights come from config.loss. The GAN term starts at loss.gan_start_step (50k in the paper):
before it neither the generator's adversarial term nor the discriminator update count. The
discriminator is taming-transformers' PatchGAN with hinge losses, with GroupNorm in place of
BatchNorm (per-image statistics: no running averages to carry or to all-reduce across the mesh).
The fixed GAN weight is the paper's; taming's adaptive (gradient-norm) weight is not used.
The ID term (MoCo-v2 features) is not implemented: no such weights are available here.
LPIPS is `transfusion_jax.models.autoencoder.lpips`, off when no weight files are configured.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfusion_jax.models.autoencoder import lpips as lpips_lib
from transfusion_jax.models.layers import logical
from transfusion_jax.models.unet import CONV_AXES


class PatchDiscriminator(nn.Module):
    """x [N,H,W,C] -> real/fake logits per overlapping patch [N,h,w,1] (pix2pix's NLayer)."""

    channels: int = 64
    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        def conv(features, stride, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           name=name, kernel_init=logical(nn.initializers.normal(0.02), CONV_AXES),
                           bias_init=logical(nn.initializers.zeros, ("channels",)))

        def norm(h, name):
            return nn.GroupNorm(num_groups=min(32, h.shape[-1] // 4), name=name,
                                scale_init=logical(nn.initializers.ones, ("channels",)),
                                bias_init=logical(nn.initializers.zeros, ("channels",)))(h)

        h = nn.leaky_relu(conv(self.channels, 2, "conv0")(x), 0.2)
        for i in range(1, self.num_layers + 1):
            stride = 2 if i < self.num_layers else 1
            h = conv(self.channels * min(2 ** i, 8), stride, f"conv{i}")(h)
            h = nn.leaky_relu(norm(h, f"norm{i}"), 0.2)
        return conv(1, 1, "conv_out")(h)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_g_loss(fake_logits):
    return -jnp.mean(fake_logits)


def gan_active(step, start_step: int):
    """1.0 from loss.gan_start_step on, else 0.0 (traceable: step may be a jax scalar)."""
    return (jnp.asarray(step) >= start_step).astype(jnp.float32)


def reconstruction_terms(x, recon, enc, lpips_params=None) -> dict[str, Any]:
    """Unweighted batch means: l1 (per pixel value), lpips (per image, 0 without weights), and
    the bottleneck's regulariser: kl (nats per image, summed over latent dims) or codebook.

    kl_per_pixel (kl / pixel values per image) is what loss.kl weighs. Esser et al. and latent
    diffusion's VAE loss sum the L1 over an image's pixel values and add 1e-6 x its summed KL;
    with our mean L1, dividing the KL by the same count keeps their balance. Weighing the raw KL
    instead makes it H x W x 3 times heavier (7e3 x at 48x48): noisy latents, blurred shapes.
    """
    terms = {"l1": jnp.mean(jnp.abs(x - recon))}
    terms["lpips"] = (jnp.mean(lpips_lib.lpips(lpips_params, x, recon))
                      if lpips_params is not None else jnp.zeros(()))
    for name, value in enc.aux.items():
        terms[name] = jnp.mean(value)
    if "kl" in terms:
        terms["kl_per_pixel"] = terms["kl"] / (x.shape[1] * x.shape[2] * x.shape[3])
    return terms


def generator_loss(loss_cfg, terms: dict, fake_logits, step):
    """Weighted total for the autoencoder; `fake_logits` = D(recon), None when there is no GAN."""
    total = loss_cfg.l1 * terms["l1"] + loss_cfg.lpips * terms["lpips"]
    total += (loss_cfg.kl * terms.get("kl_per_pixel", 0.0)
              + loss_cfg.codebook * terms.get("codebook", 0.0))
    metrics = dict(terms)
    if fake_logits is not None:
        g = hinge_g_loss(fake_logits)
        total += loss_cfg.gan * gan_active(step, loss_cfg.gan_start_step) * g
        metrics["gan_g"] = g
    metrics["loss"] = total
    return total, metrics


def discriminator_loss(loss_cfg, real_logits, fake_logits, step):
    """Hinge loss, zero before loss.gan_start_step (so the discriminator waits too)."""
    d = hinge_d_loss(real_logits, fake_logits)
    return gan_active(step, loss_cfg.gan_start_step) * d, {"gan_d": d}


def psnr(x, y, axis=(1, 2, 3)):
    """Per-image PSNR in dB for images in [-1,1] (peak-to-peak 2)."""
    mse = jnp.mean((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) ** 2, axis=axis)
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
