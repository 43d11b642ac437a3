"""Samplers on a closed form: Gaussian data, where the exact eps of every x_t is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfusion_jax import diffusion

MEAN = np.array([1.5, -0.5, 0.0, 0.8], np.float32)
STD = np.array([0.5, 0.3, 1.0, 0.8], np.float32)
N = 20000


def exact_eps(schedule):
    """E[eps | x_t] for x0 ~ N(MEAN, STD^2) per dimension: x_t = sqrt(a) x0 + sqrt(1-a) eps is
    jointly Gaussian with eps, so E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) MEAN) / (a STD^2 + 1-a)."""
    def eps_fn(x, t):
        a = schedule.alphas_cumprod[t]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MEAN) / (a * STD ** 2 + 1 - a)
    return eps_fn


def run(name, steps, eta=0.0, seed=0):
    schedule = diffusion.cosine_schedule(1000)
    tables = diffusion.sampler_tables(schedule, name, steps, eta)
    key_t, key_s = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(key_t, (N, MEAN.size))
    return np.asarray(jax.jit(lambda x, k: diffusion.sample(exact_eps(schedule), x, k, tables))(
        x_T, key_s), np.float64)


def assert_mean_within_sampling_error(x):
    """|mean - MEAN| < 4 standard errors (std / sqrt(N))."""
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), 4 * STD / np.sqrt(N))


@pytest.mark.parametrize("name,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 500, 0.0),
                                            ("ddim", 500, 1.0), ("dpm++2m", 100, 0.0)])
def test_samplers_converge_to_the_data_mean_and_variance(name, steps, eta):
    """With enough steps the discretisation error is below the sampling error of N draws."""
    x = run(name, steps, eta)
    assert_mean_within_sampling_error(x)
    var_se = STD ** 2 * np.sqrt(2 / N)  # standard error of the sample variance
    np.testing.assert_array_less(np.abs(x.var(0) - STD ** 2), 4 * var_se)


@pytest.mark.parametrize("name,steps", [("ddpm", 250), ("ddim", 50), ("dpm++2m", 20)])
def test_default_step_counts_match_the_data(name, steps):
    """The paper's DDPM-250 and the few-step samplers: the mean within sampling error; the
    variance within 10% (measured: DDPM-250 -1.3..-4.6%, DDIM-50 -4.4..-7.4%, first-order ODE
    error; DPM-Solver++-20 -3.5..+4.8%)."""
    x = run(name, steps)
    assert_mean_within_sampling_error(x)
    np.testing.assert_array_less(np.abs(x.var(0) / STD ** 2 - 1), 0.10)


def test_ddim_on_standard_normal_data_is_its_closed_form_contraction():
    """For x0 ~ N(0, 1) every x_t is N(0, 1) and eps = sqrt(1-a) x, so one DDIM step multiplies
    x by sqrt(a a') + sqrt((1-a)(1-a')): the whole run is a known scalar times x_T."""
    schedule = diffusion.cosine_schedule(1000)
    tables = diffusion.sampler_tables(schedule, "ddim", 50)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[tables.timesteps]
    abar_next = np.append(abar[1:], 1.0)
    factor = np.prod(np.sqrt(abar * abar_next) + np.sqrt((1 - abar) * (1 - abar_next)))
    eps_fn = lambda x, t: jnp.sqrt(1 - schedule.alphas_cumprod[t]) * x
    x_T = jax.random.normal(jax.random.key(0), (64,))
    out = diffusion.sample(eps_fn, x_T, jax.random.key(1), tables)
    np.testing.assert_allclose(out, factor * x_T, rtol=1e-4, atol=1e-5)


def test_ddpm_is_ddim_with_eta_one():
    np.testing.assert_allclose(run("ddpm", 50), run("ddim", 50, eta=1.0), atol=2e-4)


def test_respacing_follows_improved_diffusion():
    t = diffusion.respaced_timesteps(1000, 250)
    assert len(t) == 250 and t[0] == 0 and t[-1] == 999
    assert np.all(np.diff(t) >= 4) and np.all(np.diff(t) <= 5)
    np.testing.assert_array_equal(diffusion.respaced_timesteps(1000, 1000), np.arange(1000))
    quad = diffusion.respaced_timesteps(1000, 250, "quadratic")
    assert len(np.unique(quad)) == 250 and quad[0] == 0 and quad[-1] == 999
    tables = diffusion.sampler_tables(diffusion.cosine_schedule(1000), "ddpm", 250)
    assert tables.timesteps[0] == 999 and tables.timesteps[-1] == 0


def test_same_key_same_samples():
    np.testing.assert_array_equal(run("ddpm", 20, seed=3), run("ddpm", 20, seed=3))
    assert not np.allclose(run("ddpm", 20, seed=3), run("ddpm", 20, seed=4))


def test_bad_arguments_name_the_field():
    schedule = diffusion.cosine_schedule(1000)
    with pytest.raises(ValueError, match="sampler='euler'"):
        diffusion.sampler_tables(schedule, "euler", 10)
    with pytest.raises(ValueError, match="num_steps=0"):
        diffusion.sampler_tables(schedule, "ddim", 0)
    with pytest.raises(ValueError, match="eta=2"):
        diffusion.sampler_tables(schedule, "ddim", 10, eta=2.0)


@pytest.mark.parametrize("name,steps", [("ddim", 50), ("dpm++2m", 20), ("ddpm", 50)])
def test_clip_x0_keeps_bounded_data_bounded_when_eps_is_wrong(name, steps):
    """An eps that is 10% off divides into a huge x0 at t = 999 (sqrt(abar) ~ 5e-5); clipping
    x0 to the data range keeps the sample in it, while unclipped samplers leave it."""
    from transfusion_jax import diffusion
    schedule = diffusion.cosine_schedule(1000)
    eps_fn = lambda x, t: 0.9 * x  # noqa: E731
    x_T = jax.random.normal(jax.random.key(0), (256, 4))
    off = diffusion.sample(eps_fn, x_T, jax.random.key(1),
                           diffusion.sampler_tables(schedule, name, steps))
    on = diffusion.sample(eps_fn, x_T, jax.random.key(1),
                          diffusion.sampler_tables(schedule, name, steps, clip_x0=1.0))
    assert float(jnp.abs(off).max()) > 2
    assert float(jnp.abs(on).max()) <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="clip_x0=-1"):
        diffusion.sampler_tables(schedule, name, steps, clip_x0=-1.0)
