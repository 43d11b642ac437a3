"""The denoising evaluator measures what it says: its right-caption eps MSE equals the MSE of
the same noised images run one at a time through the training path (DocumentBuilder and the
packer's row), and its scalars are what the report promises."""
import jax
import pytest
import jax.numpy as jnp
import numpy as np

from transfusion_jax import diffusion
from transfusion_jax.core.config import load_config
from transfusion_jax.data.documents import DocumentBuilder
from transfusion_jax.data.packing import assemble_row
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import denoising
from transfusion_jax.evaluators.common import Context
from transfusion_jax.models import Transfusion, example_inputs, patches_per_image
from transfusion_jax.models.autoencoder.codec import IDENTITY

N, T = 3, 600


@pytest.mark.slow  # test-fast stays under 2 minutes
def test_gain_and_x0_scores_match_the_training_path(tmp_path):
    config = load_config("experiments/transfusion.py:tiny")
    tok = get_tokenizer(config.data, str(tmp_path))
    model = Transfusion(config.model)
    params = model.init(jax.random.key(1), *jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(config.model, 64, 1)))["params"]
    # The patch decoder starts at zero (the same output whatever the input): give it weights.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x if jnp.any(x) else 0.1 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    variables = {"params": params}
    evaluator = denoising.Evaluator(Context(config, tok, IDENTITY, str(tmp_path)), num=N,
                                    timesteps=(T,), quality_timesteps=(50, T))
    scores = evaluator.run(variables, str(tmp_path))
    assert (tmp_path / "x0_vs_t.png").exists()
    right, wrong = scores[f"cond/eps_mse_right_t{T}"], scores[f"cond/eps_mse_wrong_t{T}"]
    assert right != wrong  # the caption reaches the denoiser
    np.testing.assert_allclose(scores[f"cond/gain_t{T}"], 1 - right / wrong, rtol=1e-6)
    for t in (50, T):
        assert 0 <= scores[f"x0/object_t{t}"] <= 1 and scores[f"x0/latent_mse_t{t}"] > 0

    # Brute force: each scene as a training document (caption first, no dropout), its own row.
    captions, images, _ = heldout_scenes(config.data.shapes_seed, N, config.data.image_size)
    p = patches_per_image(config.model)
    builder = DocumentBuilder(tok, patches_per_image=p, image_size=config.data.image_size,
                              caption_first_prob=1.0, p_uncond=0.0, num_timesteps=1000)
    schedule = diffusion.schedule_from_config(config.diffusion)
    noise = jax.random.normal(jax.random.key(0), (N, *images[0].shape), jnp.float32)
    errors = []
    for i in range(N):
        doc = builder({"image": images[i], "caption": captions[i]}, np.random.default_rng(0))
        row = assemble_row([(doc, 0, len(doc["tokens"]))], L=len(doc["tokens"]), M=1, P=p,
                           image_size=config.data.image_size, pad_id=tok.pad_id,
                           boi_id=tok.boi_id, num_timesteps=1000)
        batch = {k: jnp.asarray(v[None]) for k, v in row.items()
                 if k not in ("images", "targets", "text_weights", "image_mask", "max_timestep")}
        t = jnp.full((1, 1), T, jnp.int32)
        xt = diffusion.q_sample(schedule, jnp.asarray(row["images"][None]), t, noise[i][None, None])
        eps = model.apply(variables, batch, xt, t)["prediction"][0, 0]
        errors.append(float(jnp.mean(jnp.square(eps - noise[i]))))
    np.testing.assert_allclose(right, np.mean(errors), rtol=1e-4)
