"""U-Net patch encoder (down blocks) and decoder (up blocks) for Transfusion.

Paper section 3: each noised latent x_t [H, W, C] becomes one transformer vector per k x k patch
through "up and down blocks of a U-Net [Nichol and Dhariwal 2021]", with the U-Net's AdaLayerNorm
replaced by regular normalisation (footnote 7). The transformer stands where the U-Net's middle
block would be:

    x_t -> UNetDown -> h [H/k, W/k, D] -> transformer -> UNetUp(h, skips) -> eps [H, W, C]

The blocks follow ADM (improved DDPM): ResBlocks of GroupNorm + SiLU + 3x3 conv, the timestep
embedding added (not scale-shift) after the first conv, a strided conv to go down a level,
nearest-neighbour upsampling + conv to go up, and every down-path activation concatenated onto
the matching up-path ResBlock. On the levels of `attention_levels` each ResBlock is followed by
an ADM self-attention block (GroupNorm, 1x1 q/k/v projection, multi-head softmax attention over
the image's positions, zero-initialised output projection, residual), in both halves, as the
improved-DDPM U-Net has at its 16x16 and 8x8 resolutions: an image's positions see each other
there whatever the transformer's image attention (model.image_attention). No dropout.

Levels: a patch size k = 2**n gives n + 1 resolution levels (H, H/2, ..., H/k), so
`channel_mult` has n + 1 entries; level i has base_channels * channel_mult[i] channels.
Each image is processed on its own (N is only a batch axis): no op mixes images.
"""
import math
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from transfusion_jax.models.layers import Dense, TimestepEmbedder, logical

Dtype = Any

CONV_AXES = ("conv_h", "conv_w", "channels_in", "channels")  # flax needs distinct names

# channel_mult is given for the deepest supported U-Net (k = 8: four levels); a model with patch
# size k uses the first log2(k) + 1 entries (see `unet_config`). attention_levels: the levels
# (0 = the latent's resolution, level i downsampled by 2^i) whose ResBlocks are followed by
# self-attention; a U-Net with fewer levels uses those it has. Improved DDPM attends at 16x16
# and 8x8 on 32x32 inputs (CIFAR-10): levels 1 and up here, so k = 1 (one level) has none.
# attention_head_channels: channels per attention head (ADM: 64). "paper" is sized so that at
# latent 32x32x8, k = 2 and D = 4096, encoder + decoder hold about the paper's 0.27B parameters.
UNET_PRESETS = {
    "tiny": dict(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                 attention_levels=(1, 2, 3), attention_head_channels=8),
    "paper": dict(base_channels=480, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
                  attention_levels=(1, 2, 3), attention_head_channels=64),
}


def unet_config(preset: str, patch_size: int) -> dict:
    """The U-Net fields of a preset for patch size k: channel_mult cut to log2(k) + 1 levels."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unet preset: got {preset!r}, expected one of {sorted(UNET_PRESETS)}")
    cfg = dict(UNET_PRESETS[preset])
    levels = num_levels(patch_size)
    if levels > len(cfg["channel_mult"]):
        raise ValueError(f"patch_size: got {patch_size}, preset {preset!r} supports at most "
                         f"{2 ** (len(cfg['channel_mult']) - 1)}")
    cfg["channel_mult"] = tuple(cfg["channel_mult"][:levels])
    cfg["attention_levels"] = tuple(a for a in cfg["attention_levels"] if a < levels)
    return cfg


def num_levels(patch_size: int) -> int:
    """log2(k) + 1 resolution levels for a patch size k that is a power of two."""
    if not isinstance(patch_size, int) or patch_size < 1 or patch_size & (patch_size - 1):
        raise ValueError(f"patch_size: got {patch_size!r}, expected a power of two (1, 2, 4, 8)")
    return int(math.log2(patch_size)) + 1


def _check_fields(patch_size, base_channels, channel_mult, num_res_blocks, attention_levels=(),
                  attention_head_channels=64):
    levels = num_levels(patch_size)
    if len(channel_mult) != levels:
        raise ValueError(f"channel_mult: got {tuple(channel_mult)} ({len(channel_mult)} levels), "
                         f"expected log2(patch_size)+1 = {levels} entries for patch_size "
                         f"{patch_size}")
    if not all(isinstance(v, int) and v >= 1 for v in (base_channels, *channel_mult)):
        raise ValueError(f"base_channels/channel_mult: got {base_channels}, {tuple(channel_mult)}; "
                         "expected positive integers")
    if num_res_blocks < 0:
        raise ValueError(f"num_res_blocks: got {num_res_blocks}, expected >= 0")
    if not all(isinstance(a, int) and 0 <= a < levels for a in attention_levels):
        raise ValueError(f"attention_levels: got {tuple(attention_levels)}, expected levels in "
                         f"[0, {levels}) for patch_size {patch_size}")
    for level in attention_levels:
        width = base_channels * channel_mult[level]
        if not isinstance(attention_head_channels, int) or attention_head_channels < 1 \
                or width % attention_head_channels:
            raise ValueError(f"attention_head_channels: got {attention_head_channels!r}, "
                             f"expected a positive divisor of level {level}'s {width} channels")


def _check_spatial(shape, patch_size, field):
    if len(shape) != 4 or shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(f"{field}: got shape {tuple(shape)}, expected [N, H, W, C] with H and W "
                         f"divisible by patch_size {patch_size}")


def _time_dim(base_channels: int) -> int:
    return 4 * base_channels  # ADM's timestep-embedding width


def conv(features, name, dtype, kernel=3, stride=1, zero=False):
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   kernel_init=logical(init, CONV_AXES),
                   bias_init=logical(nn.initializers.zeros, ("channels",)))


def group_norm(channels, name, dtype):
    # 32 groups as in ADM, fewer when the width is small (tiny presets); stats are float32.
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name,
                        scale_init=logical(nn.initializers.ones, ("channels",)),
                        bias_init=logical(nn.initializers.zeros, ("channels",)))


class ResBlock(nn.Module):
    """ADM ResBlock; the timestep enters as an added bias, not through the norm (paper fn. 7)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        h = nn.silu(group_norm(x.shape[-1], "norm1", self.dtype)(x))
        h = conv(self.features, "conv1", self.dtype)(h)
        t = Dense(self.features, ("channels_in", "channels"), use_bias=True, dtype=self.dtype,
                  name="time")(nn.silu(emb))
        h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.features, "norm2", self.dtype)(h))
        # Zero-init (ADM) so each block starts as the identity on its residual path.
        h = conv(self.features, "conv2", self.dtype, zero=True)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, "shortcut", self.dtype, kernel=1)(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """ADM's self-attention block over the H*W positions of each image (images apart):
    x + proj(attention(qkv(GroupNorm(x)))); the output projection starts at zero (ADM), so
    the block starts as the identity. Softmax in float32."""

    head_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        heads = c // self.head_channels
        y = group_norm(c, "norm", self.dtype)(x).reshape(n, h * w, c)
        qkv = Dense(3 * c, ("channels_in", "channels"), use_bias=True, dtype=self.dtype,
                    name="qkv")(y)
        q, k, v = jnp.split(qkv.reshape(n, h * w, 3 * heads, self.head_channels), 3, axis=2)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
        p = nn.softmax(scores * self.head_channels ** -0.5, axis=-1).astype(self.dtype)
        o = jnp.einsum("nhqk,nkhd->nqhd", p, v).reshape(n, h * w, c)
        o = Dense(c, ("channels_in", "channels"), use_bias=True, dtype=self.dtype,
                  kernel_init=nn.initializers.zeros, name="proj")(o)
        return x.astype(self.dtype) + o.reshape(n, h, w, c)


class UNetDown(nn.Module):
    """x_t [N,H,W,C], t [N] -> (h [N,H/k,W/k,dim], skips for UNetUp)."""

    dim: int
    patch_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    dtype: Dtype = jnp.float32
    attention_levels: tuple[int, ...] = ()
    attention_head_channels: int = 64

    @nn.compact
    def __call__(self, x, t):
        _check_fields(self.patch_size, self.base_channels, self.channel_mult, self.num_res_blocks,
                      self.attention_levels, self.attention_head_channels)
        _check_spatial(x.shape, self.patch_size, "x")
        emb = TimestepEmbedder(_time_dim(self.base_channels), out_axis="channels",
                               dtype=self.dtype, name="time_embed")(t)
        h = conv(self.base_channels, "conv_in", self.dtype)(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(self.base_channels * mult, self.dtype,
                             name=f"down{level}_res{i}")(h, emb)
                if level in self.attention_levels:
                    h = AttentionBlock(self.attention_head_channels, self.dtype,
                                       name=f"down{level}_attn{i}")(h)
                skips.append(h)
            if level < len(self.channel_mult) - 1:
                h = conv(h.shape[-1], f"down{level}_downsample", self.dtype, stride=2)(h)
                skips.append(h)
        # Normalised so the transformer sees inputs of a fixed scale whatever the U-Net width.
        h = nn.silu(group_norm(h.shape[-1], "norm_out", self.dtype)(h))
        h = Dense(self.dim, ("channels", "embed"), use_bias=True, dtype=self.dtype,
                  name="proj_out")(h)
        return h, tuple(skips)


class UNetUp(nn.Module):
    """h [N,H/k,W/k,dim] (transformer outputs), skips from UNetDown, t [N] -> eps [N,H,W,C]."""

    out_channels: int
    patch_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    dtype: Dtype = jnp.float32
    attention_levels: tuple[int, ...] = ()
    attention_head_channels: int = 64

    @nn.compact
    def __call__(self, h, skips, t):
        _check_fields(self.patch_size, self.base_channels, self.channel_mult, self.num_res_blocks,
                      self.attention_levels, self.attention_head_channels)
        levels = len(self.channel_mult)
        expected = levels * (self.num_res_blocks + 1)
        if len(skips) != expected:
            raise ValueError(f"skips: got {len(skips)} arrays, expected {expected} "
                             f"(levels * (num_res_blocks + 1)) from a matching UNetDown")
        emb = TimestepEmbedder(_time_dim(self.base_channels), out_axis="channels",
                               dtype=self.dtype, name="time_embed")(t)
        h = Dense(self.base_channels * self.channel_mult[-1], ("embed", "channels"),
                  use_bias=True, dtype=self.dtype, name="proj_in")(h)
        if h.shape[1:3] != skips[-1].shape[1:3]:
            raise ValueError(f"h: got shape {tuple(h.shape)}, expected the grid "
                             f"{tuple(skips[-1].shape[1:3])} of the deepest skip")
        skips = list(skips)
        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(self.dtype)], axis=-1)
                h = ResBlock(self.base_channels * self.channel_mult[level], self.dtype,
                             name=f"up{level}_res{i}")(h, emb)
                if level in self.attention_levels:
                    h = AttentionBlock(self.attention_head_channels, self.dtype,
                                       name=f"up{level}_attn{i}")(h)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
                h = conv(h.shape[-1], f"up{level}_upsample", self.dtype)(h)
        h = nn.silu(group_norm(h.shape[-1], "norm_out", self.dtype)(h))
        # Zero-init (ADM): the first prediction is eps = 0, whatever the transformer says.
        return conv(self.out_channels, "conv_out", self.dtype, zero=True)(h)
