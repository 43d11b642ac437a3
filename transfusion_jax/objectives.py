"""The Transfusion objective, L = L_LM + lambda * L_DDPM (paper equation 4), and the Chameleon
baseline's, L = L_LM (over text and image tokens) + z-loss, as pure functions.

L_LM: cross-entropy of the next text token, averaged over elements with text_weights = 1.
L_DDPM: per-image mean squared error of the predicted noise, averaged over used image slots
(the paper computes the diffusion loss per image, not per patch). Sums and counts are returned
in the metrics too, so that microbatches can be combined exactly.

With `logits_chunk` (config.model.logits_chunk) the logits' terms (Transfusion's LM term;
Chameleon's LM term, its text/image split and its z-loss) are computed from the final hidden
states chunk by chunk of the sequence (`chunked_sums`, one helper for both families): the
float32 [B, L, vocab] logits, and their gradient, exist one [B, chunk, vocab] slice at a time.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


def lm_loss_terms(logits, targets, weights):
    """(sum of weighted cross-entropy, sum of weights)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), jnp.sum(weights)


def chunked_sums(hidden, lm_head, sums_fn, arrays, chunk: int):
    """sums_fn(lm_head(hidden), *arrays) without the whole logits, for a `sums_fn` that is a
    sum over the sequence (a pytree of scalar sums of per-element terms).

    hidden [B, L, D]; lm_head maps [B, c, D] -> [B, c, V]; `arrays` are per-element inputs
    [B, L, ...] (targets, weights) cut like `hidden`. The sequence is cut into chunks of `chunk`
    elements (a remainder of L % chunk is one more, shorter chunk); each chunk's sums are
    computed under `jax.checkpoint`, so the backward pass recomputes that chunk's logits instead
    of keeping them. Equal to the unchunked sums up to float rounding."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"model.logits_chunk={chunk!r}: expected an integer >= 1 here")
    b, length = hidden.shape[:2]
    arrays = tuple(arrays)
    sums = jax.checkpoint(lambda h, *xs: sums_fn(lm_head(h), *xs), prevent_cse=False)
    whole, rest = divmod(length, chunk)

    def chunks(x):  # [B, L, ...] -> [L // chunk, B, chunk, ...] (the remainder left out)
        x = x[:, :whole * chunk]
        return jnp.moveaxis(x.reshape(b, whole, chunk, *x.shape[2:]), 1, 0)

    total = None
    if whole:
        mapped = jax.lax.map(lambda args: sums(*args), tuple(chunks(x) for x in (hidden, *arrays)))
        total = jax.tree.map(lambda x: jnp.sum(x, axis=0), mapped)
    if rest or total is None:
        tail = sums(*(x[:, whole * chunk:] for x in (hidden, *arrays)))
        total = tail if total is None else jax.tree.map(jnp.add, total, tail)
    return total


def chunked_lm_loss_terms(hidden, lm_head, targets, weights, chunk: int):
    """lm_loss_terms(lm_head(hidden), targets, weights) without the whole logits
    (`chunked_sums`). Equal to the unchunked terms up to float rounding."""
    ce_sum = lambda logits, y, w: lm_loss_terms(logits, y, w)[0]
    return chunked_sums(hidden, lm_head, ce_sum, (targets, weights), chunk), jnp.sum(weights)


def ddpm_loss_terms(prediction, target, image_mask, image_weights=None):
    """(sum over used slots of per-image MSE, times `image_weights` [B, M] when given (a
    weighting over t, diffusion.loss_weights), number of used slots)."""
    per_image = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(-3, -2, -1))
    used = image_mask.astype(jnp.float32)
    if image_weights is not None:
        per_image = per_image * image_weights
    return jnp.sum(per_image * used), jnp.sum(used)


def transfusion_loss(outputs, batch, target, ddpm_weight: float = 5.0, normalizers=None,
                     lm_head=None, logits_chunk: int = 0, image_weights=None):
    """Total loss and a metrics dict; `target` is what the diffusion head should predict: the
    eps that produced the noised latents (the paper), or v or x0 (diffusion.prediction_target).

    `outputs` holds "prediction" and either "logits" [B, L, V] or, with `lm_head` (hidden -> logits)
    and `logits_chunk` >= 1, the final hidden states "hidden" [B, L, D] (chunked LM terms).
    `normalizers` = (text tokens, images) of the whole batch when `batch` is one microbatch of
    it, so that the microbatch losses (and gradients) add up to the whole batch's exactly."""
    if "logits" in outputs:
        lm_sum, tokens = lm_loss_terms(outputs["logits"], batch["targets"], batch["text_weights"])
    elif lm_head is not None and logits_chunk:
        lm_sum, tokens = chunked_lm_loss_terms(outputs["hidden"], lm_head, batch["targets"],
                                               batch["text_weights"], logits_chunk)
    else:
        raise ValueError("transfusion_loss: outputs have no 'logits'; chunked LM terms need "
                         "'hidden', lm_head and logits_chunk >= 1")
    ddpm_sum, images = ddpm_loss_terms(outputs["prediction"], target, batch["image_mask"],
                                       image_weights)
    norm_tokens, norm_images = normalizers if normalizers is not None else (tokens, images)
    lm = lm_sum / jnp.maximum(norm_tokens, 1.0)
    ddpm = ddpm_sum / jnp.maximum(norm_images, 1.0)
    loss = lm + ddpm_weight * ddpm
    metrics = {"loss": loss, "lm_loss": lm, "diffusion_loss": ddpm,
               "lm_loss_sum": lm_sum, "diffusion_loss_sum": ddpm_sum,
               "text_tokens": tokens, "images": images}
    return loss, metrics


def z_loss_terms(logits, weights):
    """(sum of weighted log(Z)^2, Z the softmax denominator): Chameleon's "z-loss" (Chameleon
    Team 2024, 2.3; PaLM's auxiliary loss), which keeps the logits' normaliser near 1."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(log_z) * weights)


def chameleon_sums(logits, targets, weights, image_weights):
    """(sum of weighted cross-entropy, its image tokens' part, sum of weighted log(Z)^2) of
    logits [B, L, V]: the Chameleon loss's terms, each a sum over elements (so chunkable)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), jnp.sum(ce * image_weights), z_loss_terms(logits, weights)


def chameleon_loss(outputs, batch, z_loss: float = 1e-5, normalizers=None, lm_head=None,
                   logits_chunk: int = 0):
    """Total loss and metrics of the Chameleon baseline: next-token cross-entropy over every
    token (text and image ids, batch from models/chameleon.py: token_batch) plus `z_loss` times
    the mean log(Z)^2. Metrics split the LM loss into its text and image parts (`lm_loss_text`
    compares with Transfusion's `lm_loss`). `normalizers` = (tokens,) of the whole batch when
    `batch` is a microbatch, as in transfusion_loss.

    `outputs`: the logits [B, L, V], or the model's outputs holding "logits" or, with `lm_head`
    (hidden -> logits) and `logits_chunk` >= 1, the final hidden states "hidden" [B, L, D]: then
    the cross-entropy, its split and the z-loss (log Z = logsumexp of each chunk's logits) come
    from the same chunked logits (`chunked_sums`)."""
    if not isinstance(outputs, Mapping):
        outputs = {"logits": outputs}
    weights, image_weights = batch["text_weights"], batch["image_weights"]
    terms = (batch["targets"], weights, image_weights)
    if "logits" in outputs:
        lm_sum, image_sum, z_sum = chameleon_sums(outputs["logits"], *terms)
    elif lm_head is not None and logits_chunk:
        lm_sum, image_sum, z_sum = chunked_sums(outputs["hidden"], lm_head, chameleon_sums,
                                                terms, logits_chunk)
    else:
        raise ValueError("chameleon_loss: outputs have no 'logits'; chunked terms need "
                         "'hidden', lm_head and logits_chunk >= 1")
    tokens, image_tokens = jnp.sum(weights), jnp.sum(image_weights)
    norm = normalizers[0] if normalizers is not None else tokens
    lm = lm_sum / jnp.maximum(norm, 1.0)
    z = z_sum / jnp.maximum(norm, 1.0)
    loss = lm + z_loss * z
    text_tokens = tokens - image_tokens
    metrics = {"loss": loss, "lm_loss": lm, "z_loss": z, "lm_loss_sum": lm_sum,
               "lm_loss_text_sum": lm_sum - image_sum, "lm_loss_image_sum": image_sum,
               "text_tokens": text_tokens, "image_tokens": image_tokens}
    return loss, metrics
