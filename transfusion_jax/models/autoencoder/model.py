"""Latent autoencoders: pixels <-> latents for Transfusion (VAE) and Chameleon (VQ-VAE).

Paper section 4.1 and appendix A: a CNN encoder/decoder of the latent-diffusion kind (Esser et
al. 2021; Rombach et al. 2022) that maps 256x256 pixels to 32x32x8 latents (8x downsampling,
8 channels). The two autoencoders share the encoder and decoder; only the bottleneck differs:

    vae       encoder -> quant_conv -> (mean, logvar) -> sample or mean -> post_quant_conv -> decoder
    vq        encoder -> quant_conv (projection to 8 dims) -> quantiser -> post_quant_conv -> decoder
    identity  pixels pass unchanged (lets the Transfusion trainer run before an autoencoder exists)

    model = Autoencoder(config.model)
    enc = model.apply(variables, x, key, method=Autoencoder.encode)   # -> Encoding
    x_hat = model.apply(variables, enc.latents, method=Autoencoder.decode)

The layout (ResBlocks without timestep, a stride-2 conv per level, mid block with one attention,
GroupNorm eps 1e-6) is the one of Stable Diffusion's AutoencoderKL, so its weights import exactly
(`transfusion_jax.models.autoencoder.sd_import`). `channels[i]` is the width of level i; there are
len(channels) levels, so the downsampling factor is 2 ** (len(channels) - 1).

The quantiser keeps its codebook out of the gradient: l2-normalised codes (cosine lookup, Yu et
al. 2021, which spreads usage) updated by an exponential moving average of the encoder outputs
assigned to them, and codes unused for `vq_restart_after` training steps restarted on encoder
outputs of the current batch. Its state is the `vq` variable collection: apply with
mutable=["vq"] and train=True to update it. The codebook loss is then the commitment term
beta * ||z - sg(e)||^2 alone (the EMA replaces the codebook term of van den Oord et al. 2017).
"""
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from transfusion_jax.models.layers import Dense, logical
from transfusion_jax.models.unet import conv

KINDS = ("identity", "vae", "vq")
LOGVAR_RANGE = (-30.0, 20.0)  # latent diffusion's clamp: keeps exp(logvar) finite


@flax.struct.dataclass
class Encoding:
    """What `Autoencoder.encode` returns. latents [N,h,w,C] go to the decoder / the transformer.

    mean, logvar: the VAE's diagonal Gaussian (None otherwise). ids int32 [N,h,w]: the VQ code
    of each latent pixel (None otherwise). aux: per-image regularisers [N] ({"kl"} for the VAE,
    {"codebook"} for the VQ-VAE, {} for identity), unweighted.
    """

    latents: jax.Array
    mean: jax.Array | None = None
    logvar: jax.Array | None = None
    ids: jax.Array | None = None
    aux: dict = flax.struct.field(default_factory=dict)


def check_config(cfg) -> None:
    """Raise a ValueError naming the field for a config.model that cannot build an autoencoder."""
    if cfg.kind not in KINDS:
        raise ValueError(f"model.kind: got {cfg.kind!r}, expected one of {KINDS}")
    if cfg.kind == "identity":
        return
    channels = tuple(cfg.channels)
    if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
        raise ValueError(f"model.channels: got {channels}, expected positive integers, one per level")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks: got {cfg.num_res_blocks}, expected >= 1")
    if cfg.latent_channels < 1:
        raise ValueError(f"model.latent_channels: got {cfg.latent_channels}, expected >= 1")
    if cfg.kind == "vq" and cfg.codebook_size < 2:
        raise ValueError(f"model.codebook_size: got {cfg.codebook_size}, expected >= 2")


def downsample_factor(cfg) -> int:
    return 1 if cfg.kind == "identity" else 2 ** (len(cfg.channels) - 1)


def latent_shape(cfg, image_size: int) -> tuple[int, int, int]:
    """(h, w, C) of the latents of an image_size x image_size image."""
    f = downsample_factor(cfg)
    if image_size % f:
        raise ValueError(f"image_size: got {image_size}, expected a multiple of the "
                         f"downsampling factor {f}")
    ch = cfg.image_channels if cfg.kind == "identity" else cfg.latent_channels
    return image_size // f, image_size // f, ch


def group_norm(channels, name, cfg):
    # Stable Diffusion: 32 groups, eps 1e-6; fewer groups when a tiny preset is narrower.
    return nn.GroupNorm(num_groups=math.gcd(cfg.norm_groups, channels), epsilon=cfg.norm_eps,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, name=name,
                        scale_init=logical(nn.initializers.ones, ("channels",)),
                        bias_init=logical(nn.initializers.zeros, ("channels",)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, 1x1 shortcut when the width changes (no timestep input)."""

    features: int
    cfg: Any

    @nn.compact
    def __call__(self, x):
        dtype = jnp.dtype(self.cfg.dtype)
        h = conv(self.features, "conv1", dtype)(nn.silu(group_norm(x.shape[-1], "norm1", self.cfg)(x)))
        h = nn.silu(group_norm(self.features, "norm2", self.cfg)(h))
        h = conv(self.features, "conv2", dtype, zero=True)(h)  # block starts as the identity
        if x.shape[-1] != self.features:
            x = conv(self.features, "shortcut", dtype, kernel=1)(x)
        return x.astype(dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the latent pixels of each image (the mid block's)."""

    cfg: Any

    @nn.compact
    def __call__(self, x):
        n, hh, ww, c = x.shape
        dtype = jnp.dtype(self.cfg.dtype)
        h = group_norm(c, "norm", self.cfg)(x).reshape(n, hh * ww, c)
        dense = lambda name, zero=False: Dense(  # noqa: E731
            c, ("channels_in", "channels"), use_bias=True, dtype=dtype, name=name,
            **({"kernel_init": nn.initializers.zeros} if zero else {}))
        q, k, v = dense("q")(h), dense("k")(h), dense("v")(h)
        logits = jnp.einsum("nqc,nkc->nqk", q, k).astype(jnp.float32) / math.sqrt(c)
        h = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(dtype), v)
        return x.astype(dtype) + dense("proj_out", zero=True)(h).reshape(n, hh, ww, c)


def mid_block(h, cfg):
    """ResBlock, optional attention, ResBlock at the lowest resolution (names shared by both)."""
    h = ResBlock(h.shape[-1], cfg, name="mid_res0")(h)
    if cfg.mid_attention:
        h = AttnBlock(cfg, name="mid_attn")(h)
    return ResBlock(h.shape[-1], cfg, name="mid_res1")(h)


class Encoder(nn.Module):
    """x [N,H,W,C] -> [N,H/f,W/f,out_channels]."""

    cfg: Any
    out_channels: int

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        channels = tuple(cfg.channels)
        h = conv(channels[0], "conv_in", dtype)(x.astype(dtype))
        for level, width in enumerate(channels):
            for i in range(cfg.num_res_blocks):
                h = ResBlock(width, cfg, name=f"down{level}_res{i}")(h)
            if level < len(channels) - 1:
                # SAME padding of a stride-2 3x3 conv on an even size pads (0, 1): SD's Downsample.
                h = conv(width, f"down{level}_downsample", dtype, stride=2)(h)
        h = mid_block(h, cfg)
        h = nn.silu(group_norm(h.shape[-1], "norm_out", cfg)(h))
        return conv(self.out_channels, "conv_out", dtype)(h)


class Decoder(nn.Module):
    """z [N,h,w,latent] -> x [N,h*f,w*f,image_channels]."""

    cfg: Any

    @nn.compact
    def __call__(self, z):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        channels = tuple(cfg.channels)
        h = conv(channels[-1], "conv_in", dtype)(z.astype(dtype))
        h = mid_block(h, cfg)
        for level in reversed(range(len(channels))):
            for i in range(cfg.num_res_blocks + 1):
                h = ResBlock(channels[level], cfg, name=f"up{level}_res{i}")(h)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
                h = conv(channels[level], f"up{level}_upsample", dtype)(h)
        h = nn.silu(group_norm(h.shape[-1], "norm_out", cfg)(h))
        return conv(cfg.image_channels, "conv_out", dtype)(h).astype(jnp.float32)


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class Quantizer(nn.Module):
    """Cosine-lookup quantiser with an EMA codebook and dead-code restarts (see module doc).

    z [N,h,w,D] -> (quantised latents [N,h,w,D] with a straight-through gradient to z,
    ids int32 [N,h,w], commitment loss per image [N]).
    """

    cfg: Any

    @nn.compact
    def __call__(self, z, key=None, train=False):
        cfg = self.cfg
        k, d = cfg.codebook_size, z.shape[-1]
        axes = (None, "latent")
        init = lambda rng, shape: l2_normalize(jax.random.normal(rng, shape))  # noqa: E731
        codebook = self.variable("vq", "codebook", logical(init, axes),
                                 self.make_rng("params") if self.is_initializing() else None,
                                 (k, d))
        embed_sum = self.variable("vq", "embed_sum", logical(lambda s: jnp.zeros(s), axes), (k, d))
        # Starts "dead": the first training step sets every code to an encoder output.
        unused = self.variable("vq", "unused_steps", logical(
            lambda s: jnp.full(s, cfg.vq_restart_after, jnp.int32), (None,)), (k,))

        flat = l2_normalize(z.reshape(-1, d))
        ids = jnp.argmax(flat @ codebook.value.T, axis=-1).astype(jnp.int32)
        q = jnp.take(codebook.value, ids, axis=0)
        commit = jnp.sum((flat - jax.lax.stop_gradient(q)) ** 2, axis=-1)
        n = z.shape[0]
        commit = cfg.vq_beta * commit.reshape(n, -1).mean(axis=-1)
        # Straight-through: the decoder's gradient flows to the (normalised) encoder output.
        q_st = flat + jax.lax.stop_gradient(q - flat)
        if train and self.is_mutable_collection("vq") and not self.is_initializing():
            if key is None:
                raise ValueError("key: got None, expected a PRNG key to restart dead codes "
                                 "when training the vq quantiser")
            self._update(codebook, embed_sum, unused, jax.lax.stop_gradient(flat), ids, key)
        return q_st.reshape(z.shape).astype(z.dtype), ids.reshape(z.shape[:-1]), commit

    def _update(self, codebook, embed_sum, unused, flat, ids, key):
        cfg = self.cfg
        k = cfg.codebook_size
        counts = jnp.zeros((k,), jnp.float32).at[ids].add(1.0)
        sums = jnp.zeros_like(embed_sum.value).at[ids].add(flat)
        decay = cfg.vq_decay
        new_sum = decay * embed_sum.value + (1 - decay) * sums
        used = counts > 0
        new_code = jnp.where(used[:, None], l2_normalize(new_sum), codebook.value)
        steps = jnp.where(used, 0, unused.value + 1)
        # Restart codes unused for vq_restart_after steps on random encoder outputs of this
        # batch (with a little noise so that two restarts on one output do not coincide).
        dead = steps >= cfg.vq_restart_after
        kpick, knoise = jax.random.split(key)
        pick = jax.random.randint(kpick, (k,), 0, flat.shape[0])
        fresh = l2_normalize(flat[pick] + 0.01 * jax.random.normal(knoise, (k, flat.shape[1])))
        codebook.value = jnp.where(dead[:, None], fresh, new_code)
        embed_sum.value = jnp.where(dead[:, None], (1 - decay) * fresh, new_sum)
        unused.value = jnp.where(dead, 0, steps).astype(jnp.int32)


class Autoencoder(nn.Module):
    """The autoencoder of config.model (`kind` identity | vae | vq); see the module doc."""

    cfg: Any

    def setup(self):
        cfg = self.cfg
        check_config(cfg)
        if cfg.kind == "identity":
            return
        z = cfg.latent_channels
        moments = 2 * z if cfg.kind == "vae" else z
        self.encoder = Encoder(cfg, moments)
        self.decoder = Decoder(cfg)
        dtype = jnp.dtype(cfg.dtype)
        # 1x1 convs around the bottleneck (SD has them; some of its descendants drop them).
        identity = lambda h: h  # noqa: E731
        self.quant_conv = (conv(moments, "quant_conv", dtype, kernel=1)
                           if cfg.get("use_quant_conv", True) else identity)
        self.post_quant_conv = (conv(z, "post_quant_conv", dtype, kernel=1)
                                if cfg.get("use_post_quant_conv", True) else identity)
        if cfg.kind == "vq":
            self.quantizer = Quantizer(cfg)

    def __call__(self, x, key=None, train=False):
        """x [N,H,W,C] in [-1,1] -> (reconstruction, Encoding)."""
        enc = self.encode(x, key, train)
        return self.decode(enc.latents), enc

    def encode(self, x, key=None, train=False) -> Encoding:
        """VAE: a posterior sample with `key`, its mean with key=None. VQ: the quantised latents,
        ids and commitment loss; `key` restarts dead codes when training (mutable=["vq"])."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[-1] != cfg.image_channels:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected [N, H, W, "
                             f"{cfg.image_channels}]")
        if cfg.kind == "identity":
            return Encoding(latents=x)
        f = downsample_factor(cfg)
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"x: got shape {tuple(x.shape)}, expected H and W divisible by the "
                             f"downsampling factor {f}")
        h = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        if cfg.kind == "vae":
            mean, logvar = jnp.split(h, 2, axis=-1)
            logvar = jnp.clip(logvar, *LOGVAR_RANGE)
            z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
            return Encoding(latents=z, mean=mean, logvar=logvar, aux={"kl": kl})
        q, ids, commit = self.quantizer(h, key, train)
        return Encoding(latents=q, ids=ids, aux={"codebook": commit})

    def decode(self, z):
        """latents [N,h,w,C] -> pixels [N,h*f,w*f,image_channels] (float32)."""
        if self.cfg.kind == "identity":
            return z
        return self.decoder(self.post_quant_conv(z))

    def decode_ids(self, ids):
        """VQ ids [N,h,w] -> pixels: the Chameleon baseline's image tokens back to images."""
        if self.cfg.kind != "vq":
            raise ValueError(f"model.kind: got {self.cfg.kind!r}, decode_ids needs 'vq'")
        codebook = nn.unbox(self.quantizer.get_variable("vq", "codebook"))
        return self.decode(jnp.take(codebook, ids, axis=0))
