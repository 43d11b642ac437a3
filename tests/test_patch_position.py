"""model.patch_position: "none" (the paper's, the default) or a learned table of per-cell
vectors added to the patch vectors (the demo recipe's)."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from transfusion_jax.core import optim
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, example_inputs, patches_per_image


def cfg_with(**overrides):
    cfg = load_config("experiments/transfusion.py:tiny").model
    cfg.update(overrides)
    return cfg


def zeros(cfg):
    """Concrete zero model inputs of example_inputs' shapes (a row of 8, one image slot)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_inputs(cfg, 8, 1))


def embedded(cfg, params, latents):
    """The sequence inputs of one row holding one image: [P, D] (its patches, raster order)."""
    p = patches_per_image(cfg)
    batch, _, _ = example_inputs(cfg, p + 2, 1)
    row = {k: jnp.zeros(s.shape, s.dtype) for k, s in batch.items()}
    row["patch_index"] = jnp.where(jnp.arange(p + 2) < p, jnp.arange(p + 2), -1)[None]
    model = Transfusion(cfg)
    x, _ = model.apply(params, row, latents, jnp.full((1, 1), 999, jnp.int32),
                       method=lambda m, *a: m._embed(*a))
    return np.asarray(x[0, :p])


def test_learned_table_tells_identical_patches_apart():
    """An image whose patches are all alike (noise at t near T carries no place): without the
    table every patch enters the transformer as the same vector; with it, each cell differs by
    exactly its row of the table."""
    size, ch = 16, 3
    latents = jnp.ones((1, 1, size, size, ch))  # every 4x4 patch the same
    none, learned = cfg_with(), cfg_with(patch_position="learned")
    assert none.patch_position == "none"  # the paper's default
    inputs = zeros(none)
    params = nn.unbox(Transfusion(learned).init(jax.random.key(0), *inputs))
    assert params["params"]["patch_position"].shape == (4, 4, learned.dim)
    assert "patch_position" not in Transfusion(none).init(jax.random.key(0), *inputs)["params"]
    plain = {"params": {k: v for k, v in params["params"].items() if k != "patch_position"}}

    x_none = embedded(none, plain, latents)
    np.testing.assert_allclose(x_none, np.broadcast_to(x_none[:1], x_none.shape), atol=1e-6)
    x_learned = embedded(learned, params, latents)
    table = np.asarray(params["params"]["patch_position"]).reshape(-1, learned.dim)
    np.testing.assert_allclose(x_learned - table, x_none, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in x_learned}) == len(x_learned)


def test_table_is_not_weight_decayed_and_bad_values_name_the_field():
    learned = cfg_with(patch_position="learned")
    shapes = jax.eval_shape(Transfusion(learned).init, jax.random.key(0),
                            *example_inputs(learned, 8, 1))["params"]
    mask = optim.decay_mask(nn.unbox(shapes))
    assert mask["patch_position"] is False and mask["embed"] is True
    with pytest.raises(ValueError, match="model.patch_position.*'sinusoid'.*none.*learned"):
        Transfusion(cfg_with(patch_position="sinusoid")).init(jax.random.key(0), *zeros(learned))
