"""The diffusion head's targets (eps, v, x0) and the loss weighting over t, on closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax import diffusion
from test_samplers import MEAN, STD, N, exact_eps, assert_mean_within_sampling_error

SCHEDULE = diffusion.cosine_schedule(1000)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_the_target_gives_back_eps_and_x0(prediction):
    """from_prediction inverts prediction_target: the exact output implies the true eps, x0."""
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, (2, 3, 4, 4, 2))
    noise = jax.random.normal(k1, x0.shape)
    t = jnp.array([[0, 10, 500], [900, 990, 999]], jnp.int32)
    xt = diffusion.q_sample(SCHEDULE, x0, t, noise)
    target = diffusion.prediction_target(SCHEDULE, x0, t, noise, prediction)
    eps, x0_hat = diffusion.eps_and_x0(target, xt, t, SCHEDULE, prediction)
    np.testing.assert_allclose(eps, noise, atol=2e-3)
    # At t = 999 x0 from eps divides by alpha ~ 5e-5 (float32 cancellation): compare below it.
    np.testing.assert_allclose(x0_hat[:, :2], x0[:, :2], atol=2e-3)
    if prediction != "eps":  # v and x0 recover x0 everywhere, the point of predicting them
        np.testing.assert_allclose(x0_hat, x0, atol=2e-3)


def test_v_is_alpha_eps_minus_sigma_x0():
    t = jnp.array([[300]])
    a = float(SCHEDULE.alphas_cumprod[300])
    x0, eps = jnp.full((1, 1, 1, 1, 1), 2.0), jnp.full((1, 1, 1, 1, 1), -1.0)
    v = diffusion.prediction_target(SCHEDULE, x0, t, eps, "v")
    np.testing.assert_allclose(v, np.sqrt(a) * -1.0 - np.sqrt(1 - a) * 2.0, rtol=1e-6)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_min_snr_is_the_same_x0_weight_for_every_target(prediction):
    """Min-SNR-5: an error d in x0 at t costs min(SNR, 5) d^2 whatever the head predicts. At a
    fixed x_t an x0 error d is an eps error -(alpha/sigma) d and a v error -d/sigma; 'none' is 1."""
    t = jnp.arange(0, 1000, 37)
    abar = np.asarray(SCHEDULE.alphas_cumprod)[np.asarray(t)].astype(np.float64)
    snr = abar / (1 - abar)
    w = np.asarray(diffusion.loss_weights(SCHEDULE, t, prediction, "min_snr"), np.float64)
    # Squared error of the target per unit squared x0 error, at fixed x_t.
    per_x0 = {"eps": snr, "v": 1 / (1 - abar), "x0": np.ones_like(snr)}[prediction]
    np.testing.assert_allclose(w * per_x0, np.minimum(snr, 5.0), rtol=1e-4)
    assert np.all(np.asarray(diffusion.loss_weights(SCHEDULE, t, prediction, "none")) == 1)


def exact_output(prediction):
    """The exact model of Gaussian data (test_samplers.exact_eps) in `prediction`'s terms."""
    eps_fn = exact_eps(SCHEDULE)

    def fn(x, t):
        a = SCHEDULE.alphas_cumprod[t]
        eps = eps_fn(x, t)
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]
    return fn


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_samplers_take_v_and_x0_models(prediction):
    tables = diffusion.sampler_tables(SCHEDULE, "dpm++2m", 20, prediction=prediction)
    key_t, key_s = jax.random.split(jax.random.key(0))
    x_T = jax.random.normal(key_t, (N, MEAN.size))
    x = np.asarray(jax.jit(lambda x, k: diffusion.sample(exact_output(prediction), x, k, tables))(
        x_T, key_s), np.float64)
    assert_mean_within_sampling_error(x)
    np.testing.assert_array_less(np.abs(x.var(0) / STD ** 2 - 1), 0.10)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="prediction"):
        diffusion.sampler_tables(SCHEDULE, "ddim", 10, prediction="noise")
    with pytest.raises(ValueError, match="loss_weighting"):
        diffusion.loss_weights(SCHEDULE, jnp.zeros(2, jnp.int32), "eps", "snr")


def test_snr_shift_divides_the_snr_by_its_square():
    base = np.asarray(diffusion.cosine_alpha_bar(np.arange(1, 1000) / 1000), np.float64)
    shifted = np.asarray(diffusion.cosine_schedule(1000, snr_shift=2.0).alphas_cumprod,
                         np.float64)[:-1]
    snr = lambda a: a / (1 - a)
    np.testing.assert_allclose(snr(shifted)[50:900], snr(base)[50:900] / 4.0, rtol=1e-3)
    assert np.array_equal(diffusion.cosine_schedule(1000, snr_shift=1.0).alphas_cumprod,
                          SCHEDULE.alphas_cumprod)
    with pytest.raises(ValueError, match="snr_shift"):
        diffusion.cosine_schedule(1000, snr_shift=0.0)
