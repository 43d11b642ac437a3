"""The Transfusion objective, L = L_LM + lambda * L_DDPM (paper equation 4), as pure functions.

L_LM: cross-entropy of the next text token, averaged over elements with text_weights = 1.
L_DDPM: per-image mean squared error of the predicted noise, averaged over used image slots
(the paper computes the diffusion loss per image, not per patch). Sums and counts are returned
in the metrics too, so that microbatches can be combined exactly.
"""
import jax.numpy as jnp
import optax


def lm_loss_terms(logits, targets, weights):
    """(sum of weighted cross-entropy, sum of weights)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), jnp.sum(weights)


def ddpm_loss_terms(eps_hat, eps, image_mask):
    """(sum over used slots of per-image MSE, number of used slots)."""
    per_image = jnp.mean(jnp.square(eps_hat.astype(jnp.float32) - eps), axis=(-3, -2, -1))
    used = image_mask.astype(jnp.float32)
    return jnp.sum(per_image * used), jnp.sum(used)


def transfusion_loss(outputs, batch, noise, ddpm_weight: float = 5.0, normalizers=None):
    """Total loss and a metrics dict; `noise` is the eps that produced the noised latents.

    `normalizers` = (text tokens, images) of the whole batch when `batch` is one microbatch of
    it, so that the microbatch losses (and gradients) add up to the whole batch's exactly."""
    lm_sum, tokens = lm_loss_terms(outputs["logits"], batch["targets"], batch["text_weights"])
    ddpm_sum, images = ddpm_loss_terms(outputs["eps"], noise, batch["image_mask"])
    norm_tokens, norm_images = normalizers if normalizers is not None else (tokens, images)
    lm = lm_sum / jnp.maximum(norm_tokens, 1.0)
    ddpm = ddpm_sum / jnp.maximum(norm_images, 1.0)
    loss = lm + ddpm_weight * ddpm
    metrics = {"loss": loss, "lm_loss": lm, "diffusion_loss": ddpm,
               "lm_loss_sum": lm_sum, "diffusion_loss_sum": ddpm_sum,
               "text_tokens": tokens, "images": images}
    return loss, metrics
