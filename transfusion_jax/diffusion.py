"""DDPM noise schedule and forward process (Ho et al. 2020; cosine schedule of Nichol &
Dhariwal 2021, s = 0.008, T = 1000), as the paper trains (section 2.2, 4.1).

Timesteps are indices t in [0, T): x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps, where
abar[t] = prod_{i<=t} (1 - beta_i) and beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999),
f(u) = cos((u + s) / (1 + s) * pi / 2)^2. Samplers (generation) share this schedule.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transfusion_jax.core.validation import choice


class Schedule(NamedTuple):
    betas: jax.Array           # [T] float32
    alphas_cumprod: jax.Array  # [T] float32, abar[t]

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def cosine_alpha_bar(u, s: float = 0.008):
    """f(u) / f(0) for u = t / T in [0, 1] (the closed form the betas are derived from)."""
    f = lambda x: np.cos((x + s) / (1 + s) * np.pi / 2) ** 2
    return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
                    snr_shift: float = 1.0):
    """The cosine schedule; `snr_shift` > 1 divides every step's signal-to-noise ratio by
    snr_shift^2 (Hoogeboom et al. 2023, "simple diffusion"; SD3's resolution shift): more of
    the T steps at noise where the image is not yet readable from x_t, so where the caption
    decides. 1 is the paper's schedule."""
    if num_timesteps < 1:
        raise ValueError(f"diffusion.timesteps={num_timesteps}; expected a positive integer")
    if not snr_shift > 0:
        raise ValueError(f"diffusion.snr_shift={snr_shift}; expected a number > 0 (1: off)")
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = cosine_alpha_bar(u, s)
    if snr_shift != 1.0:
        abar = abar / (abar + snr_shift ** 2 * (1.0 - abar))  # SNR' = SNR / shift^2
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)  # float64, then cast once
    return Schedule(jnp.asarray(betas, jnp.float32),
                    jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def make_schedule(name: str, num_timesteps: int, snr_shift: float = 1.0) -> Schedule:
    if name != "cosine":
        raise ValueError(f"diffusion.schedule={name!r}; expected 'cosine'")
    return cosine_schedule(num_timesteps, snr_shift=snr_shift)


def schedule_from_config(diffusion_config) -> Schedule:
    """The schedule of a run's config.diffusion (snr_shift absent: 1, the paper's)."""
    return make_schedule(diffusion_config.schedule, diffusion_config.timesteps,
                         diffusion_config.get("snr_shift", 1.0))


def sample_timesteps(key, max_timestep):
    """One t per image, uniform in [0, max_timestep) (T/2 caps noise on image-first docs)."""
    return jax.random.randint(key, max_timestep.shape, 0, max_timestep, dtype=jnp.int32)


def _alpha_sigma(schedule: Schedule, t):
    """(sqrt(abar_t), sqrt(1 - abar_t)) for timesteps t [...], broadcastable to [..., H, W, C]."""
    abar = schedule.alphas_cumprod[t][..., None, None, None]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def q_sample(schedule: Schedule, x0, t, noise):
    """x_t for latents x0 [B, M, H, W, C], timesteps t [B, M] and noise like x0."""
    alpha, sigma = _alpha_sigma(schedule, t)
    return alpha * x0 + sigma * noise


# ---------------------------------------------------------------------------------------------
# What the diffusion head predicts (config.diffusion.prediction). The paper predicts the noise
# (eps, equation 3). eps-prediction implies x0 = (x_t - sigma eps) / alpha, which multiplies the
# head's error by sigma / alpha: 1 / 5e-5 at t = 999 of the cosine schedule, so a small model's
# first sampling steps land far off (issue 19). v = alpha eps - sigma x0 (Salimans & Ho 2022)
# and x0-prediction keep the implied x0's error bounded at every t. The loss is always taken
# on the predicted quantity; `loss_weights` can re-weight it over t.

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")


def prediction_of(diffusion_cfg) -> str:
    """config.diffusion.prediction (runs saved before the field predicted eps)."""
    return choice(diffusion_cfg, "diffusion", "prediction", "eps", PREDICTIONS)


def prediction_target(schedule: Schedule, x0, t, noise, prediction: str):
    """What the head should output for x_t = q_sample(x0, t, noise)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        alpha, sigma = _alpha_sigma(schedule, t)
        return alpha * noise - sigma * x0
    raise ValueError(f"diffusion.prediction={prediction!r}; expected one of {PREDICTIONS}")


def from_prediction(output, x_t, alpha, sigma, prediction: str):
    """(eps, x0) that the head's `output` at x_t implies, with alpha = sqrt(abar_t) and
    sigma = sqrt(1 - abar_t) broadcastable to x_t."""
    output = output.astype(jnp.float32)
    if prediction == "eps":
        return output, (x_t - sigma * output) / alpha
    if prediction == "v":  # x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v
        return sigma * x_t + alpha * output, alpha * x_t - sigma * output
    if prediction == "x0":
        return (x_t - alpha * output) / sigma, output
    raise ValueError(f"diffusion.prediction={prediction!r}; expected one of {PREDICTIONS}")


def eps_and_x0(output, x_t, t, schedule: Schedule, prediction: str):
    """from_prediction at integer timesteps t [...] of `schedule` (x_t [..., H, W, C])."""
    alpha, sigma = _alpha_sigma(schedule, t)
    return from_prediction(output, x_t, alpha, sigma, prediction)


def loss_weights(schedule: Schedule, t, prediction: str, weighting: str, gamma: float = 5.0):
    """Per-image weights of the MSE over t [...]. "none": 1 (the paper). "min_snr": Min-SNR-gamma
    (Hang et al. 2023), min(SNR, gamma) as an x0-loss weight, expressed for the predicted
    quantity: / SNR for eps, / (SNR + 1) for v, as is for x0."""
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"diffusion.loss_weighting={weighting!r}; expected one of "
                         f"{LOSS_WEIGHTINGS}")
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1.0 - abar)
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "v": clipped / (snr + 1.0), "x0": clipped}[prediction]


# ---------------------------------------------------------------------------------------------
# Samplers. All three run on a respaced schedule (improved-diffusion's `space_timesteps`: K of
# the T training timesteps, evenly spaced, 0 and T-1 included), call the model at those original
# timesteps, and end on the clean sample (the last step goes to abar = 1). The per-step
# coefficients are computed once in float64 numpy; the loop is one lax.fori_loop.

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("even", "quadratic")
# Few-step DPM-Solver++ spends its steps better at low noise (DDIM paper, appendix D.2);
# measured on Gaussian data (tests/test_samplers.py) its 20-step variance error drops ~5x.
DEFAULT_SPACING = {"ddpm": "even", "ddim": "even", "dpm++2m": "quadratic"}


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "even") -> np.ndarray:
    """The K = num_steps timesteps kept of T, ascending, 0 and T-1 included.

    "even": improved-diffusion's space_timesteps(T, [K]) (round(i (T-1)/(K-1))).
    "quadratic": round(i^2 (T-1)/(K-1)^2) (Song et al. 2021), bumped to stay distinct."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps}; expected 1..{num_timesteps} (the schedule's T)")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r}; expected one of {SPACINGS}")
    if num_steps == 1:
        return np.asarray([num_timesteps - 1], np.int32)
    u = np.arange(num_steps) / (num_steps - 1)
    t = np.asarray([round(x) for x in (u if spacing == "even" else u * u) * (num_timesteps - 1)])
    for i in range(1, num_steps):  # small i collide under "quadratic"
        t[i] = max(t[i], t[i - 1] + 1)
    return t.astype(np.int32)


class SamplerTables(NamedTuple):
    """Per step i = 0..K-1 (noisiest first): the model timestep and the update coefficients."""
    name: str
    timesteps: np.ndarray  # int32 [K], descending
    alpha: np.ndarray      # float32 [K], sqrt(abar_t): x0 = (x_t - sigma eps) / alpha
    sigma: np.ndarray      # float32 [K], sqrt(1 - abar_t)
    coefs: dict            # sampler-specific float32 [K] arrays, see `_COEFS`
    clip_x0: float = 0.0   # > 0: clip the predicted x0 to [-clip_x0, clip_x0] (bounded data)
    prediction: str = "eps"  # what the model function returns: eps, v or x0 (PREDICTIONS)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def _ddpm_coefs(abar, abar_next, eta):
    """Ancestral DDPM (Ho et al. eq. 6-7) on the respaced betas, posterior variance beta_tilde."""
    beta = 1 - abar / abar_next
    return {"mean_x0": np.sqrt(abar_next) * beta / (1 - abar),
            "mean_xt": np.sqrt(1 - beta) * (1 - abar_next) / (1 - abar),
            "std": np.sqrt(beta * (1 - abar_next) / (1 - abar))}


def _ddim_coefs(abar, abar_next, eta):
    """DDIM (Song et al. eq. 12, 16); eta = 1 is the DDPM posterior variance, 0 deterministic."""
    std = eta * np.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
    return {"alpha_next": np.sqrt(abar_next), "dir": np.sqrt(np.maximum(1 - abar_next - std ** 2, 0.0)),
            "std": std}


def _dpm_coefs(abar, abar_next, eta):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, lambda = log(alpha/sigma):
    x' = (sigma'/sigma) x - alpha' expm1(-h) D, D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h.
    First order at the first step and into the clean sample (h = inf there)."""
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    with np.errstate(divide="ignore"):
        lam_next = 0.5 * (np.log(abar_next) - np.log1p(-abar_next))  # inf at abar' = 1
    h = lam_next - lam
    w_prev = np.zeros_like(h)
    w_prev[1:-1] = h[1:-1] / (2 * h[:-2])  # 1 / (2 r)
    return {"x_ratio": np.sqrt((1 - abar_next) / (1 - abar)),
            "d": np.sqrt(abar_next) * np.expm1(-h), "w_prev": w_prev}


_COEFS = {"ddpm": _ddpm_coefs, "ddim": _ddim_coefs, "dpm++2m": _dpm_coefs}


def sampler_tables(schedule: Schedule, name: str, num_steps: int, eta: float = 0.0,
                   spacing: str | None = None, clip_x0: float = 0.0,
                   prediction: str = "eps") -> SamplerTables:
    """Coefficients of sampler `name` ("ddpm", "ddim" with `eta`, "dpm++2m") in `num_steps`
    steps, spaced by `spacing` (None: DEFAULT_SPACING of the sampler).

    `clip_x0` > 0 clips each predicted x0 to that range (improved-diffusion's clip_denoised),
    for data known to be bounded, such as pixels in [-1, 1]. Without it, the first step's
    x0 = (x_T - sigma eps) / alpha divides the model's eps error by sqrt(abar_999) ~ 5e-5 with
    the cosine schedule, and a deterministic sampler never recovers from that x0.
    `prediction`: what the model function of `sample` returns (config.diffusion.prediction)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; expected one of {PREDICTIONS}")
    if clip_x0 < 0:
        raise ValueError(f"clip_x0={clip_x0}; expected 0 (off) or a positive bound")
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}; expected one of {SAMPLERS}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta}; expected a value in [0, 1] (0: deterministic DDIM)")
    spacing = spacing or DEFAULT_SPACING[name]
    kept = respaced_timesteps(schedule.num_timesteps, num_steps, spacing)[::-1]  # noisiest first
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
    abar_next = np.append(abar[1:], 1.0)
    coefs = {k: np.asarray(v, np.float32) for k, v in _COEFS[name](abar, abar_next, eta).items()}
    return SamplerTables(name, kept.astype(np.int32), np.sqrt(abar).astype(np.float32),
                         np.sqrt(1 - abar).astype(np.float32), coefs, float(clip_x0),
                         prediction)


def _update(name, c, x, eps, x0, x0_prev, z):
    """One step from x_t to x_prev given the coefficients c of this step."""
    if name == "ddpm":
        return c["mean_x0"] * x0 + c["mean_xt"] * x + c["std"] * z
    if name == "ddim":
        return c["alpha_next"] * x0 + c["dir"] * eps + c["std"] * z
    d = x0 + c["w_prev"] * (x0 - x0_prev)
    return c["x_ratio"] * x - c["d"] * d


def sample(model_fn, x_T, key, tables: SamplerTables):
    """Run a sampler from x_T (pure noise) to the clean sample.

    model_fn(x, t) -> the model's output for x at int32 scalar timestep t (possibly with
    guidance): the noise, or v or x0 as `tables.prediction` says. The ancestral noise of step i
    is normal(fold_in(key, i)): same key, same sample."""
    t_all = jnp.asarray(tables.timesteps)
    alpha, sigma = jnp.asarray(tables.alpha), jnp.asarray(tables.sigma)
    coefs = {k: jnp.asarray(v) for k, v in tables.coefs.items()}

    def body(i, carry):
        x, x0_prev = carry
        eps, x0 = from_prediction(model_fn(x, t_all[i]), x, alpha[i], sigma[i],
                                  tables.prediction)
        if tables.clip_x0:  # and the eps that the clipped x0 implies, as improved-diffusion does
            x0 = jnp.clip(x0, -tables.clip_x0, tables.clip_x0)
            eps = (x - alpha[i] * x0) / sigma[i]
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        c = {k: v[i] for k, v in coefs.items()}
        return _update(tables.name, c, x, eps, x0, x0_prev, z), x0

    x_T = x_T.astype(jnp.float32)
    x, _ = jax.lax.fori_loop(0, tables.num_steps, body, (x_T, jnp.zeros_like(x_T)))
    return x
