"""Autoencoder reconstruction on held-out shapes scenes (type "reconstruction").

Encodes the first `num` held-out images (default: config.data.heldout_images) to the posterior
mean (VAE) or code ids (VQ-VAE), decodes them, and reports:

    psnr             dB, against the originals
    objects          the fraction of true objects the shapes parser reads back exactly
    latent_mean/std  of the raw latents: the VAE's normalisation (latent_stats.json)
    codes_*          VQ-VAE: fraction of codes used, perplexity of their frequencies

Writes recon.png (originals above, reconstructions below) into evals/<step>/<name>/. With
several processes (`python -m transfusion_jax.evaluate` on every host; the autoencoder's trainer
runs as one process) each reconstructs its batches (evaluators/common.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from transfusion_jax.core import distributed
from transfusion_jax.data.shapes import world
from transfusion_jax.models.autoencoder.losses import psnr
from transfusion_jax.models.autoencoder.model import Autoencoder


class Evaluator:
    def __init__(self, context, num: int = 0, batch_size: int = 0):
        config = context.config
        num = num or config.data.heldout_images
        self.config, self.batch_size = config, batch_size or config.data.batch_size
        self.heldout = world.scene_batch(config.seed, "heldout", 0, num, config.data.image_size)
        model = Autoencoder(config.model)

        @jax.jit
        def reconstruct(variables, x):
            enc = model.apply(variables, x, method=Autoencoder.encode)
            recon = model.apply(variables, enc.latents, method=Autoencoder.decode)
            return recon, enc.latents, enc.ids
        self.reconstruct = reconstruct

    def run(self, variables, out_dir: str) -> dict:
        scores, recon = evaluate_heldout(self.config.model, self.reconstruct, variables,
                                         self.heldout, self.batch_size)
        if out_dir:
            write_grid(os.path.join(out_dir, "recon.png"), self.heldout[0], recon)
        return scores


def evaluate_heldout(model_cfg, reconstruct, variables, heldout, batch_size: int):
    """(scores, reconstructions) of the held-out (images, scenes) in batches; with several
    processes each reconstructs its batches (evaluators/common.py)."""
    x, scenes = heldout
    made = {}  # batch index -> (reconstructions, latents, code ids or None)
    for b, i in enumerate(range(0, len(x), batch_size)):
        if distributed.mine(b):
            made[b] = tuple(None if a is None else np.asarray(a)
                            for a in reconstruct(variables, jnp.asarray(x[i:i + batch_size])))
    recons, latents, ids = zip(*distributed.gather_batches(made))
    recon, latents = np.concatenate(recons), np.concatenate(latents)
    right = total = 0
    for image, scene in zip(recon, scenes):
        r, t = world.object_accuracy(list(scene.objects), world.parse_image(image))
        right, total = right + r, total + t
    out = {"psnr": float(np.mean(psnr(jnp.asarray(x), jnp.asarray(recon)))),
           "objects": right / max(total, 1),
           "latent_mean": float(latents.mean()), "latent_std": float(latents.std())}
    if ids[0] is not None:
        out.update(code_usage(np.concatenate(ids), model_cfg.codebook_size))
    return out, recon


def code_usage(ids, codebook_size: int) -> dict:
    """Fraction of codes used at least once, and the perplexity of their frequencies / K."""
    counts = np.bincount(ids.reshape(-1), minlength=codebook_size)
    p = counts / counts.sum()
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    return {"codes_used": float((counts > 0).mean()), "code_perplexity": perplexity,
            "code_perplexity_fraction": perplexity / codebook_size, "codes_seen": int(ids.size)}


def write_grid(path: str, x, recon, n: int = 8):
    rows = [np.concatenate(list(a[:n]), axis=1) for a in (x, recon)]
    grid = np.clip((np.concatenate(rows, axis=0) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)
