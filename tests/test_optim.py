"""AdamW's weight decay mask: by parameter role (name), not by rank."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from transfusion_jax.core import optim
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, example_inputs


def param_shapes(spec):
    cfg = load_config(spec)
    return cfg, jax.eval_shape(Transfusion(cfg.model).init, jax.random.key(0),
                               *example_inputs(cfg.model, 8, 1))["params"]


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_scanned_norm_scales_and_biases_are_not_decayed():
    """nn.scan stacks each layer's RMSNorm scale to [depth, dim]: a rank rule decays it."""
    _, boxed = param_shapes("experiments/transfusion.py:tiny,patch=unet")
    params = nn.unbox(boxed)
    assert params["transformer"]["blocks"]["attn_norm"]["scale"].ndim == 2  # [depth, dim]
    mask = flat(optim.decay_mask(params))
    shapes = flat(params)
    for path, decayed in mask.items():
        name = path.rsplit("['", 1)[1].rstrip("']")
        assert decayed == (name not in ("scale", "bias")), (path, shapes[path].shape)
    assert mask["['transformer']['blocks']['attn_norm']['scale']"] is False
    assert mask["['transformer']['blocks']['mlp_norm']['scale']"] is False
    assert mask["['transformer']['blocks']['attn']['query']"] is True
    assert mask["['embed']"] is True and mask["['lm_head']['kernel']"] is True
    assert mask["['patch_encoder']['down0_res0']['norm1']['scale']"] is False  # GroupNorm
    assert mask["['patch_encoder']['down0_res0']['conv1']['bias']"] is False
    assert mask["['patch_encoder']['down0_res0']['conv1']['kernel']"] is True
    # Boxed params (the trainer's init passes them to tx.init) get the same mask.
    assert flat(nn.unbox(optim.decay_mask(boxed))) == mask


def test_an_update_decays_kernels_only():
    cfg, boxed = param_shapes("experiments/transfusion.py:tiny")
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), nn.unbox(boxed))
    opt = cfg.optimizer
    opt.update(lr=0.1, warmup_steps=0, weight_decay=0.5)
    tx = optim.make_optimizer(opt, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    moved = flat(jax.tree.map(lambda u: bool(np.any(np.asarray(u))), updates))
    assert not moved["['transformer']['blocks']['attn_norm']['scale']"]
    assert not moved["['transformer']['final_norm']['scale']"]
    assert moved["['transformer']['blocks']['mlp']['up']['kernel']"] and moved["['embed']"]


def test_an_unknown_parameter_name_is_refused():
    with pytest.raises(ValueError, match=r"\['blocks'\]\['gain'\].*'gain'"):
        optim.decay_mask({"blocks": {"gain": jnp.ones((2, 4))}})
