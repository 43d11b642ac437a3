"""Denoiser diagnostics (type "denoising"): where a model stands, before any sampler runs.

On held-out caption-image pairs, each image is noised to fixed timesteps (the same noise for
every variant) and denoised in one model call, teacher-forced in the training layout
`BOS caption BOI image EOI EOS`:

  conditioning gain   eps MSE with the scene's own caption against another scene's caption:
                      cond/gain_t<t> = 1 - mse_right / mse_wrong (> 0: the caption helps;
                      0: the denoiser ignores the text, the failure of issue 19).
  x0 quality          the x0 that the prediction implies, against the clean latent
                      (x0/latent_mse_t<t>), decoded and read back by the shapes image parser
                      (x0/object_t<t>: true objects found exactly, as the shapes scores count).

Options: num (held-out pairs), timesteps (of the gain), quality_timesteps (of x0 quality),
seed (of the noise: the same for every timestep). A timestep is one batch, its model calls over
all the pairs: with several processes the timesteps are dealt over them (evaluators/common.py).
Writes x0_vs_t.png (a row per scene: the clean image, then the decoded x0 at each quality
timestep) and returns the scalars above plus cond/eps_mse_{right,wrong}_t<t>.

Transfusion only: it measures the diffusion head, which the Chameleon baseline has not
(model.family "chameleon" is refused, naming the field).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax import diffusion
from transfusion_jax.core import distributed
from transfusion_jax.data.packing import assemble_row
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.data.shapes.world import parse_image
from transfusion_jax.evaluators import shapes_scores
from transfusion_jax.inference.tasks import save_grid, to_uint8
from transfusion_jax.models import family
from transfusion_jax.models.transfusion import Transfusion, patches_per_image


class Evaluator:
    def __init__(self, context, num: int = 32, timesteps=(300, 600, 900),
                 quality_timesteps=(50, 300, 600, 900, 990), seed: int = 0):
        config = context.config
        if family(config.model) != "transfusion":
            raise ValueError(f"type 'denoising' measures a diffusion head; model.family="
                             f"{family(config.model)!r} has none: expected 'transfusion' (drop "
                             "this evaluator from config.evals)")
        if config.data.image_source != "shapes":
            raise ValueError(f"type 'denoising' reads held-out shapes scenes; data.image_source="
                             f"{config.data.image_source!r}")
        if num < 2:
            raise ValueError(f"num={num}: expected an integer >= 2 (a wrong caption is another "
                             "scene's)")
        T = config.diffusion.timesteps
        for name, ts in (("timesteps", timesteps), ("quality_timesteps", quality_timesteps)):
            if not ts or any(not 0 <= int(t) < T for t in ts):
                raise ValueError(f"{name}={list(ts)}: expected timesteps in [0, {T})")
        self.context, self.seed = context, seed
        self.timesteps = tuple(int(t) for t in timesteps)
        self.quality = tuple(int(t) for t in quality_timesteps)
        captions, images, self.truths = heldout_scenes(config.data.shapes_seed, num,
                                                       config.data.image_size)
        self.pixels = np.stack(images).astype(np.float32) / 127.5 - 1.0
        wrong = captions[1:] + captions[:1]  # another scene's caption
        self.right = self._rows(captions)
        self.wrong = self._rows(wrong)
        self.schedule = diffusion.schedule_from_config(config.diffusion)
        self.prediction = diffusion.prediction_of(config.diffusion)
        model, codec = Transfusion(config.model), context.codec

        def denoise(variables, rows, x0, t, noise):
            tt = jnp.full((x0.shape[0], 1), t, jnp.int32)
            xt = diffusion.q_sample(self.schedule, x0[:, None], tt, noise[:, None])
            out = model.apply(variables, rows, xt, tt, logits=False)["prediction"][:, 0]
            return diffusion.eps_and_x0(out, xt[:, 0], tt[:, 0], self.schedule, self.prediction)

        self._denoise = jax.jit(denoise)
        self._encode = jax.jit(lambda x: codec.encode(codec.variables, x))
        self._decode = jax.jit(lambda z: jnp.clip(codec.decode(codec.variables, z), -1, 1))

    def _rows(self, captions) -> dict:
        """One row per caption: BOS caption BOI image EOI EOS, the training layout."""
        config, tok = self.context.config, self.context.tokenizer
        p = patches_per_image(config.model)
        docs = []
        for text in captions:
            tokens = [tok.bos_id, *tok.encode(text), tok.boi_id, *[tok.pad_id] * p, tok.eoi_id,
                      tok.eos_id]
            docs.append({"tokens": np.asarray(tokens, np.int32),
                         "boi": np.asarray([tokens.index(tok.boi_id)], np.int32),
                         "images": np.zeros((1, 1, 1, 3), np.float32),
                         "max_timestep": np.asarray([config.diffusion.timesteps], np.int32)})
        length = -(-max(len(d["tokens"]) for d in docs) // 8) * 8
        rows = [assemble_row([(d, 0, len(d["tokens"]))], L=length, M=1, P=p, image_size=1,
                             pad_id=tok.pad_id, boi_id=tok.boi_id,
                             num_timesteps=config.diffusion.timesteps) for d in docs]
        keep = ("tokens", "segment_ids", "positions", "mask_pos", "patch_index",
                "patch_positions")
        return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in keep}

    def run(self, variables, out_dir: str) -> dict:
        x0 = self._encode(jnp.asarray(self.pixels))
        noise = jax.random.normal(jax.random.key(self.seed), x0.shape, jnp.float32)
        # A batch is one timestep (its calls over all the pairs): dealt over processes.
        made = {i: self._at(variables, x0, noise, t)
                for i, t in enumerate(sorted(set(self.timesteps) | set(self.quality)))
                if distributed.mine(i)}
        scores, grid = {}, [[to_uint8(p)] for p in self.pixels[:8]]
        for at_t, column in distributed.gather_batches(made):
            scores.update(at_t)
            for row, image in zip(grid, column):
                row.append(image)
        scores["x0/data_latent_std"] = float(jnp.std(x0))
        if out_dir:
            save_grid(os.path.join(out_dir, "x0_vs_t.png"), grid)
        return scores

    def _at(self, variables, x0, noise, t: int):
        """(scores at timestep t, the first 8 scenes' decoded x0 when t is a quality step)."""
        scores, column = {}, []
        eps_r, x0_r = self._denoise(variables, self.right, x0, t, noise)
        if t in self.timesteps:
            eps_w, _ = self._denoise(variables, self.wrong, x0, t, noise)
            right = float(jnp.mean(jnp.square(eps_r - noise)))
            wrong = float(jnp.mean(jnp.square(eps_w - noise)))
            scores[f"cond/eps_mse_right_t{t}"] = right
            scores[f"cond/eps_mse_wrong_t{t}"] = wrong
            scores[f"cond/gain_t{t}"] = 1.0 - right / max(wrong, 1e-12)
        if t in self.quality:
            scores[f"x0/latent_mse_t{t}"] = float(jnp.mean(jnp.square(x0_r - x0)))
            pixels = np.asarray(self._decode(x0_r))
            found = [parse_image(p) for p in pixels]
            scores[f"x0/object_t{t}"] = shapes_scores.score_objects(found, self.truths)["object"]
            column = [to_uint8(p) for p in pixels[:8]]
        return scores, column
