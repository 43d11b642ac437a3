"""The Transfusion model: one transformer over text embeddings and image-latent patches.

    model.apply(variables, batch, noised_images, timesteps) -> {"logits", "prediction"}
    model.apply(variables, batch, noised_images, timesteps, logits=False) -> {"hidden", "prediction"}
    model.apply(variables, hidden, method=Transfusion.logits_of) -> logits

The second form leaves the LM head to the loss: with config.model.logits_chunk it applies
`logits_of` to one chunk of the sequence at a time (objectives.py), so the float32 [B, L, vocab]
logits are never whole.

`batch` follows the batch contract (DESIGN.md); `noised_images` are latents x_t
[B, M, H, W, C] (H = W = config.model.latent_size), `timesteps` int32 [B, M]. Every image slot
is encoded (static shapes); `patch_index` picks, per sequence element, its patch vector instead
of the token embedding, and `patch_positions` gathers the transformer outputs back per slot.
Gathers, not scatters: both directions are plain indexing that shards along the batch axis.

Image attention (`model.image_attention`, paper Table 5): "bidirectional" (the paper's
default) runs the batch's mask as it is, the patches of one image seeing each other;
"causal" gives every patch its own index as mask_pos (`attention_mask_pos`), so patches attend
causally like text. The data, the batch contract and the decoding chunks stay the same: the
model rewrites mask_pos before the transformer, so every attention implementation (and the
kernels' ranges, attention_ranges.py) and the KV cache (which stores the rewritten vectors)
follow it.

Vocabulary: `model.vocab_size` is the count of real token ids (the tokenizer's vocab_size at
most; the Llama 2 tokenizer with PAD, BOI, EOI: 32003). The embedding and the LM head have
`padded_vocab_size` rows (a multiple of 128: 32128), so that the vocab axis tiles and splits
over a tensor axis; `logits_of` sets the padded columns to PADDED_LOGIT, so the loss, every
sampler and every evaluator see a probability of zero there.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfusion_jax.core.validation import choice
from transfusion_jax.models.layers import Dense, constrain, logical
from transfusion_jax.models.patching import patch_layers
from transfusion_jax.models.transformer import Transformer


IMAGE_ATTENTION = ("bidirectional", "causal")  # model.image_attention; the paper's default first
PATCH_POSITION = ("none", "learned")  # model.patch_position; the paper's first
VOCAB_MULTIPLE = 128  # the embedding's and LM head's vocab axis is padded to a multiple of this
PADDED_LOGIT = -1e30  # the logit of a padded id: finite, so differences of logits stay finite


def padded_vocab_size(cfg) -> int:
    """Rows of the embedding, columns of the LM head: model.vocab_size rounded up to a multiple
    of VOCAB_MULTIPLE (32003 -> 32128; 512 and 32000 stay)."""
    return -(-cfg.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def vocab_logits(head_out, cfg):
    """The LM head's output [..., L, V] -> float32 logits with the padded columns (from
    model.vocab_size on) at PADDED_LOGIT, constrained to the vocab sharding. Both families'."""
    logits = head_out.astype(jnp.float32)
    vocab, padded = cfg.vocab_size, logits.shape[-1]
    if padded > vocab:
        logits = jnp.where(jnp.arange(padded) < vocab, logits, PADDED_LOGIT)
    return constrain(logits, ("batch", "length", "vocab"))


def image_attention(cfg) -> str:
    """model.image_attention (configs written before the field: "bidirectional")."""
    return choice(cfg, "model", "image_attention", "bidirectional", IMAGE_ATTENTION)


def patch_position(cfg) -> str:
    """model.patch_position (configs written before the field: "none").

    "none" (the paper's): a patch vector carries its image position only through RoPE over
    the 1D sequence. "learned": a learned [H/k, W/k, dim] table is added to the patch vectors
    (as ViT and DiT do), so a patch knows its cell from its input even at t near T, where its
    latent is noise; the demo recipe measured it (README, "The demo recipe")."""
    return choice(cfg, "model", "patch_position", "none", PATCH_POSITION)


def attention_mask_pos(cfg, batch):
    """The mask_pos the attention runs on, int32 [B, L].

    "bidirectional": the batch's (a patch: its image's last patch index). "causal": each
    patch's own index, which is that minus (P - 1 - j) for patch j of its image
    (j = patch_index % P, the patches of an image being consecutive in raster order); text and
    padding keep theirs. The rule reads only the batch's own vectors, so it holds in any
    coordinates: row indices in training, cache indices in decoding (kv_cache.py)."""
    mask_pos = batch["mask_pos"]
    if image_attention(cfg) == "bidirectional":
        return mask_pos
    p, index = patches_per_image(cfg), batch["patch_index"]
    return jnp.where(index >= 0, mask_pos - (p - 1 - index % p), mask_pos)


def patches_per_image(cfg) -> int:
    """Sequence elements one image takes: (latent_size / patch_size)^2 (paper footnote 13)."""
    return (cfg.latent_size // cfg.patch_size) ** 2


def example_inputs(cfg, length: int, max_images: int):
    """Shape-only model inputs (batch of 1) for init: params do not depend on the batch."""
    p = patches_per_image(cfg)
    batch = {key: jax.ShapeDtypeStruct((1, length), jnp.int32) for key in
             ("tokens", "segment_ids", "positions", "mask_pos", "patch_index")}
    batch["patch_positions"] = jax.ShapeDtypeStruct((1, max_images, p), jnp.int32)
    size, channels = cfg.latent_size, cfg.latent_channels
    return (batch, jax.ShapeDtypeStruct((1, max_images, size, size, channels), jnp.float32),
            jax.ShapeDtypeStruct((1, max_images), jnp.int32))


class Transfusion(nn.Module):
    cfg: Any  # config.model

    def setup(self):
        c = self.cfg
        image_attention(c)  # fails early, naming the field
        vocab = padded_vocab_size(c)
        self.embed = self.param("embed", logical(nn.initializers.normal(1.0), ("vocab", "embed")),
                                (vocab, c.dim), jnp.float32)
        if patch_position(c) == "learned":
            # Initialised as the token embedding is: a cell as distinct as a token id.
            grid = c.latent_size // c.patch_size
            self.cell_embedding = self.param(
                "patch_position", logical(nn.initializers.normal(1.0), (None, None, "embed")),
                (grid, grid, c.dim), jnp.float32)
        self.patch_encoder, self.patch_decoder = patch_layers(c)
        self.transformer = Transformer(c, name="transformer")
        self.lm_head = Dense(vocab, ("embed", "vocab"), dtype=jnp.dtype(c.dtype), name="lm_head")

    def __call__(self, batch, noised_images, timesteps, logits: bool = True):
        """`logits=False`: the final-normed hidden states "hidden" [B, L, D] instead of the
        logits (for a loss that applies `logits_of` itself, chunk by chunk)."""
        x, images = self._embed(batch, noised_images, timesteps)
        h = self.transformer(x, batch["segment_ids"], attention_mask_pos(self.cfg, batch),
                             batch["positions"])
        return self._outputs(h, batch, images, logits)

    def logits_of(self, h):
        """The LM head: hidden states [..., L, D] -> float32 logits [..., L, V] (V =
        padded_vocab_size; the columns from model.vocab_size on are PADDED_LOGIT)."""
        return vocab_logits(self.lm_head(h), self.cfg)

    def extend(self, chunk, noised_images, timesteps, cache, logits: bool = True):
        """Decoding: run a chunk of elements against a KVCache (kv_cache.py) -> (outputs, cache
        with the chunk written; its `length` unchanged). `chunk` has the batch-contract keys
        except targets/weights, in cache coordinates (see kv_cache.py); `noised_images` may be
        None for a text-only chunk. `logits=False` skips the LM head (denoising steps)."""
        x, images = self._embed(chunk, noised_images, timesteps)
        h, cache = self.transformer(x, chunk["segment_ids"], attention_mask_pos(self.cfg, chunk),
                                    chunk["positions"], cache)
        return self._outputs(h, chunk, images, logits), cache

    def _embed(self, batch, noised_images, timesteps):
        """Sequence inputs [B, L, D] (token embeddings, patch vectors where patch_index >= 0) and
        what the outputs need of the images (None without images)."""
        c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        text = jnp.take(self.embed, batch["tokens"], axis=0).astype(dtype)
        if noised_images is None:
            return constrain(text, ("batch", "length", "embed")), None
        b, m, size, _, ch = noised_images.shape  # b: rows, or groups of rows (below)
        rows, length = batch["tokens"].shape
        if size != c.latent_size or ch != c.latent_channels or rows % b:
            raise ValueError(f"noised_images {noised_images.shape}: expected [G, M, "
                             f"{c.latent_size}, {c.latent_size}, {c.latent_channels}] "
                             "(model.latent_size, model.latent_channels; G a divisor of the "
                             f"batch's {rows} rows)")
        t = timesteps.reshape(b * m)
        grid, skips = self.patch_encoder(noised_images.reshape(b * m, size, size, ch), t)
        if patch_position(c) == "learned":
            grid = grid + self.cell_embedding.astype(grid.dtype)
        gh, gw = grid.shape[1:3]
        patches = grid.reshape(b, m * gh * gw, c.dim).astype(dtype)

        # Images in b groups of rows // b consecutive rows (trainers/image_budget.py: a group's
        # slots serve its rows laid end to end); the batch contract is b = rows, one row each.
        index = batch["patch_index"].reshape(b, rows // b * length)
        from_patch = jnp.take_along_axis(patches, jnp.maximum(index, 0)[..., None], axis=1)
        x = jnp.where((index >= 0)[..., None], from_patch, text.reshape(b, -1, c.dim))
        x = x.reshape(rows, length, c.dim)
        return constrain(x, ("batch", "length", "embed")), (t, skips, (b, m, gh, gw, size, ch))

    def _outputs(self, h, batch, images, logits: bool = True):
        """{"logits" [B, L, V] (when asked, else "hidden" [B, L, D]), "prediction"
        [B, M, H, W, C] (when there are images): the diffusion head's output, the noise eps as
        the paper predicts it, or v or x0 (config.diffusion.prediction, diffusion.py)}."""
        out = {"logits": self.logits_of(h)} if logits else {"hidden": h}
        if images is not None:
            t, skips, (b, m, gh, gw, size, ch) = images
            at = batch["patch_positions"].reshape(b, m * gh * gw, 1)  # in the group's rows
            per_patch = jnp.take_along_axis(h.reshape(b, -1, h.shape[-1]), at, axis=1)
            per_patch = per_patch.reshape(b * m, gh, gw, self.cfg.dim)
            pred = self.patch_decoder(per_patch, skips, t).astype(jnp.float32)
            out["prediction"] = pred.reshape(b, m, size, size, ch)
        return out
