"""The frozen autoencoder between pixels and the latents the transformer diffuses (paper 4.1).

config.autoencoder of a Transfusion run:
    kind         identity (the transformer sees pixels) | vae (a trained VAE, run frozen)
    checkpoint   the VAE's workdir (python -m transfusion_jax.train_autoencoder --workdir DIR)
    downsample   its downsampling factor, checked against the checkpoint's config

The transformer's x0 is the VAE posterior's mean, normalised with the statistics measured after
the VAE was trained (latent_stats.json): (mean - shift) * scale has about unit variance, which
the noise schedule assumes. Precomputed latents (transfusion_jax.precompute) are the same raw
means, normalised the same way in the step, so both paths give the transformer the same x0.

    codec = loader.load_codec(config.autoencoder)    # once, outside jit
    x0 = codec.normalize(codec.encode_mean(codec.variables, images))   # inside the step
    pixels = codec.decode(codec.variables, x0)
The weights travel as a step argument (`codec.variables`), not as constants baked into the jitted
program.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from transfusion_jax.models.autoencoder.model import Autoencoder

KINDS = ("identity", "vae")

@dataclasses.dataclass(frozen=True)
class Codec:
    kind: str
    model: Autoencoder | None  # None for identity
    shift: float = 0.0
    scale: float = 1.0
    variables: Any = None      # the frozen weights ({} for identity)
    ae_config: Any = None      # the autoencoder's config.model (None for identity)

    def encode_mean(self, variables, images):
        """Pixels [..., H, W, 3] in [-1, 1] -> raw latents [..., h, w, C] (the posterior mean)."""
        if self.kind == "identity":
            return images
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        enc = self.model.apply(variables, flat, method=Autoencoder.encode)  # key None: the mean
        return enc.latents.reshape(*lead, *enc.latents.shape[1:])

    def normalize(self, raw):
        return raw if self.kind == "identity" else (raw - self.shift) * self.scale

    def encode(self, variables, images):
        """Pixels -> the transformer's x0."""
        return self.normalize(self.encode_mean(variables, images))

    def decode(self, variables, x0):
        """The transformer's x0 [..., h, w, C] -> pixels [..., H, W, 3] (float32, about [-1,1])."""
        if self.kind == "identity":
            return x0
        lead = x0.shape[:-3]
        z = x0.reshape(-1, *x0.shape[-3:]) / self.scale + self.shift
        pixels = self.model.apply(variables, z, method=Autoencoder.decode)
        return pixels.reshape(*lead, *pixels.shape[1:])

IDENTITY = Codec("identity", None, variables={})

def check_kind(ae_cfg) -> None:
    if ae_cfg.kind not in KINDS:
        hint = (" (the VQ-VAE's ids are the Chameleon baseline's image tokens: precompute them "
                "with transfusion_jax.precompute)" if ae_cfg.kind == "vq" else "")
        raise ValueError(f"autoencoder.kind={ae_cfg.kind!r}: expected one of {KINDS}{hint}")

def check(codec: Codec, model_cfg) -> None:
    """The transformer's latents must be the codec's: model.latent_channels, named on mismatch."""
    channels = 3 if codec.kind == "identity" else codec.ae_config.latent_channels
    if model_cfg.latent_channels != channels:
        raise ValueError(f"model.latent_channels={model_cfg.latent_channels}: the {codec.kind} "
                         f"autoencoder gives {channels}-channel latents")
