"""Patch layers: noised latents <-> one transformer vector per k x k latent patch.

Both kinds share one interface so the model never branches on them:
    encoder(x_t [N, H, W, C], t [N]) -> (h [N, H/k, W/k, D], skips)
    decoder(h [N, H/k, W/k, D], skips, t [N]) -> eps [N, H, W, C]
`linear` (paper footnote 6: a timestep embedding is added to every patch vector before one
Dense) has no skips; `unet` (U-Net down/up blocks, see unet.py) passes its down activations.
"""
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from transfusion_jax.models import unet
from transfusion_jax.models.layers import Dense, TimestepEmbedder

PATCH_SIZES = (1, 2, 4, 8)


def patchify(x, k: int):
    """[N, H, W, C] -> [N, H/k, W/k, k*k*C], patches in raster order."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // k, w // k, k * k * c)


def unpatchify(x, k: int, channels: int):
    """Inverse of `patchify`: [N, H/k, W/k, k*k*C] -> [N, H, W, C]."""
    n, gh, gw, _ = x.shape
    x = x.reshape(n, gh, gw, k, k, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * k, gw * k, channels)


class LinearDown(nn.Module):
    dim: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t):
        p = patchify(x.astype(self.dtype), self.patch_size)
        p = p + TimestepEmbedder(p.shape[-1], out_axis="patch", dtype=self.dtype,
                                 name="time")(t)[:, None, None, :]
        return Dense(self.dim, ("patch", "embed"), use_bias=True, dtype=self.dtype,
                     name="proj")(p), ()


class LinearUp(nn.Module):
    out_channels: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, skips, t):
        del skips, t  # the linear decoder is one Dense, as in the paper
        p = Dense(self.patch_size ** 2 * self.out_channels, ("embed", "patch"), use_bias=True,
                  dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj")(h)
        return unpatchify(p, self.patch_size, self.out_channels)


def patch_layers(cfg) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for config.model; validates the patch fields."""
    k, size = cfg.patch_size, cfg.latent_size
    if k not in PATCH_SIZES:
        raise ValueError(f"model.patch_size={k}; expected one of {PATCH_SIZES}")
    if size % k:
        raise ValueError(f"model.latent_size={size} must be divisible by model.patch_size={k}")
    dtype = jnp.dtype(cfg.dtype)
    if cfg.patch == "linear":
        return (LinearDown(cfg.dim, k, dtype, name="patch_encoder"),
                LinearUp(cfg.latent_channels, k, dtype, name="patch_decoder"))
    if cfg.patch == "unet":
        # config.model.unet.channel_mult is given for k = 8; patch size k uses log2(k) + 1 levels,
        # and the attention_levels among them (configs written before the field: none).
        levels = unet.num_levels(k)
        mult = tuple(cfg.unet.channel_mult)[:levels]
        attention = tuple(a for a in cfg.unet.get("attention_levels", ()) if a < levels)
        u = dict(patch_size=k, base_channels=cfg.unet.base_channels, channel_mult=mult,
                 num_res_blocks=cfg.unet.num_res_blocks, dtype=dtype, attention_levels=attention,
                 attention_head_channels=cfg.unet.get("attention_head_channels", 64))
        return (unet.UNetDown(dim=cfg.dim, name="patch_encoder", **u),
                unet.UNetUp(out_channels=cfg.latent_channels, name="patch_decoder", **u))
    raise ValueError(f"model.patch={cfg.patch!r}; expected 'linear' or 'unet'")
