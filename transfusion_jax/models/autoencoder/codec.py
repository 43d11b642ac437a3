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

KINDS = ("identity", "vae", "vq")
# autoencoder.kind each model family takes (model.family): Transfusion diffuses continuous
# latents (or pixels), Chameleon models the VQ-VAE's code ids as tokens.
FAMILY_KINDS = {"transfusion": ("identity", "vae"), "chameleon": ("vq",)}

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

    def encode_ids(self, variables, images):
        """VQ-VAE: pixels [..., H, W, 3] -> code ids int32 [..., h, w] (Chameleon's image
        tokens, before the offset past the text vocabulary)."""
        self._need_vq("encode_ids")
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        ids = self.model.apply(variables, flat, method=Autoencoder.encode).ids
        return ids.reshape(*lead, *ids.shape[1:])

    def decode_ids(self, variables, ids):
        """VQ-VAE: code ids int32 [..., h, w] -> pixels [..., H, W, 3] (float32, about [-1,1])."""
        self._need_vq("decode_ids")
        lead = ids.shape[:-2]
        pixels = self.model.apply(variables, ids.reshape(-1, *ids.shape[-2:]),
                                  method=Autoencoder.decode_ids)
        return pixels.reshape(*lead, *pixels.shape[1:])

    def _need_vq(self, what):
        if self.kind != "vq":
            raise ValueError(f"Codec.{what}: the {self.kind!r} autoencoder has no code ids "
                             "(autoencoder.kind='vq' has)")

    def decode(self, variables, x0):
        """The transformer's x0 [..., h, w, C] -> pixels [..., H, W, 3] (float32, about [-1,1])."""
        if self.kind == "identity":
            return x0
        lead = x0.shape[:-3]
        z = x0.reshape(-1, *x0.shape[-3:]) / self.scale + self.shift
        pixels = self.model.apply(variables, z, method=Autoencoder.decode)
        return pixels.reshape(*lead, *pixels.shape[1:])

IDENTITY = Codec("identity", None, variables={})

def check_kind(ae_cfg, family: str = "transfusion") -> None:
    """autoencoder.kind must be one that model.family takes (FAMILY_KINDS)."""
    allowed = FAMILY_KINDS[family]
    if ae_cfg.kind not in allowed:
        hint = {"vq": " (the VQ-VAE's ids are the Chameleon baseline's image tokens: "
                      "--config experiments/chameleon.py)",
                "vae": " (the Chameleon baseline reads images as VQ-VAE code ids)"}
        raise ValueError(f"autoencoder.kind={ae_cfg.kind!r}: model.family={family!r} takes one "
                         f"of {allowed}{hint.get(ae_cfg.kind, '')}")

def check(codec: Codec, model_cfg) -> None:
    """The transformer's latents must be the codec's: model.latent_channels, named on mismatch."""
    if codec.kind == "vq":  # Chameleon: the codebook is the image vocabulary
        codes = codec.ae_config.codebook_size
        if model_cfg.image_vocab_size != codes:
            raise ValueError(f"model.image_vocab_size={model_cfg.image_vocab_size}: the VQ-VAE "
                             f"has {codes} codes")
        return
    channels = 3 if codec.kind == "identity" else codec.ae_config.latent_channels
    if model_cfg.latent_channels != channels:
        raise ValueError(f"model.latent_channels={model_cfg.latent_channels}: the {codec.kind} "
                         f"autoencoder gives {channels}-channel latents")
