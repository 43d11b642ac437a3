"""Diffusion schedule, loss weighting and an end-to-end overfitting check."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from transfusion_jax import diffusion, objectives
from transfusion_jax.core import optim
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, patches_per_image
from rows import BOI, build_rows


def test_cosine_schedule_matches_closed_form():
    s = diffusion.cosine_schedule(1000)
    t = np.arange(1000)
    closed = np.cos(((t + 1) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(
        0.008 / 1.008 * np.pi / 2) ** 2
    unclipped = np.asarray(s.betas) < 0.999  # only the last steps hit max_beta
    assert unclipped[:990].all()
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[unclipped], closed[unclipped],
                               rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0) and s.alphas_cumprod[-1] < 1e-4


def test_q_sample_moments():
    s = diffusion.cosine_schedule(1000)
    x0 = jnp.full((20000, 1, 1, 1, 1), 2.0)
    t = jnp.full((20000, 1), 300)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = np.asarray(diffusion.q_sample(s, x0, t, noise)).ravel()
    abar = float(s.alphas_cumprod[300])
    assert abs(xt.mean() - 2 * np.sqrt(abar)) < 0.02
    assert abs(xt.var() - (1 - abar)) < 0.02


def test_timesteps_honour_max_timestep():
    max_t = jnp.asarray(np.tile([1000, 500], (4000, 1)), jnp.int32)
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), max_t))
    assert t[:, 0].min() == 0 and t[:, 0].max() == 999 and t[:, 0].max() >= 990
    assert t[:, 1].max() == 499 and t[:, 1].min() == 0  # image-first: noise limited to T/2


@pytest.mark.slow
def test_loss_ignores_boi_inputs_patches_padding_and_empty_slots():
    p = 4
    batch, info = build_rows([[[2, "image", 1]]], 16, 2, p)  # BOS a b BOI p p p p EOI c EOS pad..
    tokens = batch["tokens"][0]
    assert list(batch["text_weights"][0, :11]) == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    logits = jax.random.normal(jax.random.key(0), (1, 16, 512))
    eps_hat = jax.random.normal(jax.random.key(1), (1, 2, 2, 2, 4))
    noise = jnp.zeros_like(eps_hat)

    def total(logits, eps_hat):
        return objectives.transfusion_loss({"logits": logits, "prediction": eps_hat}, batch, noise)[0]

    g_logits, g_eps = jax.grad(total, (0, 1))(logits, eps_hat)
    touched = np.abs(np.asarray(g_logits[0])).sum(-1) > 0
    is_boi = tokens == BOI
    is_patch = info["image"][0] >= 0
    is_pad = info["doc"][0] == 0
    assert not touched[is_boi | is_patch | is_pad].any()
    assert touched[:3].all() and touched[8:10].all()
    assert np.abs(np.asarray(g_eps[0, 1])).sum() == 0  # slot 1 unused
    _, metrics = objectives.transfusion_loss({"logits": logits, "prediction": eps_hat}, batch, noise)
    assert metrics["text_tokens"] == 5 and metrics["images"] == 1
    per_image = float(jnp.mean(eps_hat[0, 0] ** 2))
    np.testing.assert_allclose(metrics["diffusion_loss"], per_image, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["lm_loss"] + 5 * per_image, rtol=1e-6)


@pytest.mark.slow
def test_adamw_overfits_one_batch():
    """100 AdamW steps on one fixed batch (fixed noise and timesteps) cut both losses 5x."""
    config = load_config("experiments/transfusion.py:tiny")
    cfg = config.model
    p = patches_per_image(cfg)
    batch, _ = build_rows([[[6, "image", 5], [4, "image"]], [["image", 8], [12]]], 64, 2, p)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    shape = (2, 2, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
    x0 = jax.random.normal(jax.random.key(0), shape)
    noise = jax.random.normal(jax.random.key(1), shape)
    t = jnp.asarray([[100, 600], [300, 900]], jnp.int32)
    xt = diffusion.q_sample(diffusion.cosine_schedule(), x0, t, noise)
    model = Transfusion(cfg)
    params = nn.unbox(model.init(jax.random.key(2), batch, xt, t))
    opt = config.optimizer
    opt.update(lr=3e-3, warmup_steps=10, final_lr=3e-4)
    tx = optim.make_optimizer(opt, total_steps=100)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(params):
            return objectives.transfusion_loss(model.apply(params, batch, xt, t), batch, noise)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(lambda a, u: a + u, params, updates), state, metrics

    history = []
    for _ in range(100):
        params, state, metrics = step(params, state)
        history.append({k: float(metrics[k]) for k in ("lm_loss", "diffusion_loss")})
    first, last = history[0], history[-1]
    print(f"overfit: {first} -> {last}")
    assert last["lm_loss"] * 5 <= first["lm_loss"]
    assert last["diffusion_loss"] * 5 <= first["diffusion_loss"]
