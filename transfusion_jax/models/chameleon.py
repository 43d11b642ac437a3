"""The Chameleon baseline (paper section 4.2; Chameleon Team 2024): images as discrete tokens.

An image is the frozen VQ-VAE's code ids (16384 codes; 1024 per 256x256 image at 8x
downsampling), placed in the token stream between BOI and EOI with ids offset past the text
vocabulary, and one LM loss covers every token (paper Table 4: "LM loss on image tokens"). The
transformer is Transfusion's Llama transformer with Chameleon's stability changes, each a switch
of config.model: `qk_norm`, `norm_reorder` (transformer.Block); the z-loss is in objectives.py.

Vocabulary: `model.vocab_size` real ids = `text_vocab_size(cfg)` text ids, then
`model.image_vocab_size` image ids (image id = text_vocab_size + code). The embedding and head
are padded to a multiple of 128 like Transfusion's (padded logits PADDED_LOGIT).

    model.apply(variables, batch) -> {"logits"}       (batch: the token batch, below)
    model.apply(variables, batch, logits=False) -> {"hidden"}
    model.apply(variables, chunk, None, None, cache, method=Chameleon.extend)

The signatures match Transfusion's (noised images and timesteps must be None), so text-only
code (perplexity, ranked choices, text decoding) runs either family.

The data pipeline is shared with Transfusion: its rows hold each image as `P` = latent_size^2
placeholder elements (patch_index >= 0) and the pixels (or precomputed code ids) in their slot.
`token_batch` turns such a row into the Chameleon batch contract (DESIGN.md): code ids inside
`tokens`, patch_index all -1, mask_pos = index (plain causal), and next-token targets with weight
1 wherever the next element is in the same document (image tokens and EOI included).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfusion_jax.models.layers import Dense, constrain, logical
from transfusion_jax.models.transfusion import padded_vocab_size, vocab_logits
from transfusion_jax.models.transformer import Transformer


def text_vocab_size(cfg) -> int:
    """Ids below this are text; the image ids follow (offset of image code 0)."""
    return cfg.vocab_size - cfg.image_vocab_size


def tokens_per_image(cfg) -> int:
    """Image tokens of one image: the VQ grid, latent_size^2 (1024 at 256x256, 8x)."""
    return cfg.latent_size ** 2


def token_batch(batch, ids, cfg, pad_id: int):
    """A pipeline batch (images as placeholder elements) and the images' code ids
    int32 [B, M, h, w] -> the Chameleon batch (jnp; inside the jitted step).

    Keeps tokens, segment_ids, positions; returns them with `tokens` holding the image ids,
    mask_pos = index, patch_index = -1, and targets/text_weights the next element of the same
    document. Also "image_weights": 1 where that next element is an image token (the image share
    of the loss, for metrics)."""
    b, length = batch["tokens"].shape
    index = batch["patch_index"]
    image_ids = text_vocab_size(cfg) + ids.reshape(b, -1).astype(jnp.int32)
    from_image = jnp.take_along_axis(image_ids, jnp.maximum(index, 0), axis=1)
    tokens = jnp.where(index >= 0, from_image, batch["tokens"])
    seg = batch["segment_ids"]
    same = jnp.concatenate([(seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0),
                            jnp.zeros((b, 1), bool)], axis=1)
    targets = jnp.where(same, jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1), pad_id)
    next_is_image = same & jnp.concatenate([index[:, 1:] >= 0, jnp.zeros((b, 1), bool)], axis=1)
    arange = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return {"tokens": tokens, "segment_ids": seg, "positions": batch["positions"],
            "mask_pos": arange, "patch_index": jnp.full((b, length), -1, jnp.int32),
            "targets": targets, "text_weights": same.astype(jnp.float32),
            "image_weights": next_is_image.astype(jnp.float32)}


def example_inputs(cfg, length: int):
    """Shape-only model inputs (batch of 1) for init."""
    return ({key: jax.ShapeDtypeStruct((1, length), jnp.int32) for key in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")},)


class Chameleon(nn.Module):
    cfg: Any  # config.model

    def setup(self):
        c = self.cfg
        if not 0 < c.image_vocab_size < c.vocab_size:
            raise ValueError(f"model.image_vocab_size={c.image_vocab_size}: expected 1 .. "
                             f"model.vocab_size-1 ({c.vocab_size - 1}); vocab_size counts text "
                             "and image ids together")
        vocab = padded_vocab_size(c)
        self.embed = self.param("embed", logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                                (vocab, c.dim), jnp.float32)
        self.transformer = Transformer(c, name="transformer")
        self.lm_head = Dense(vocab, ("embed", "vocab"), dtype=jnp.dtype(c.dtype), name="lm_head")

    def __call__(self, batch, noised_images=None, timesteps=None, logits: bool = True):
        x = self._embed(batch, noised_images)
        h = self.transformer(x, batch["segment_ids"], batch["mask_pos"], batch["positions"])
        return {"logits": self.logits_of(h)} if logits else {"hidden": h}

    def logits_of(self, h):
        """[..., L, D] -> float32 logits [..., L, V] (padded columns PADDED_LOGIT)."""
        return vocab_logits(self.lm_head(h), self.cfg)

    def extend(self, chunk, noised_images, timesteps, cache, logits: bool = True):
        """Decoding against a KVCache, as Transfusion.extend (text chunks only)."""
        x = self._embed(chunk, noised_images)
        h, cache = self.transformer(x, chunk["segment_ids"], chunk["mask_pos"],
                                    chunk["positions"], cache)
        return ({"logits": self.logits_of(h)} if logits else {"hidden": h}), cache

    def _embed(self, batch, noised_images):
        if noised_images is not None:
            raise ValueError("Chameleon takes images as token ids inside `tokens` "
                             "(models/chameleon.py: token_batch), not as latents")
        x = jnp.take(self.embed, batch["tokens"], axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("batch", "length", "embed"))
