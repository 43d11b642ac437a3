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


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
    if num_timesteps < 1:
        raise ValueError(f"diffusion.timesteps={num_timesteps}; expected a positive integer")
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = cosine_alpha_bar(u, s)
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)  # float64, then cast once
    return Schedule(jnp.asarray(betas, jnp.float32),
                    jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def make_schedule(name: str, num_timesteps: int) -> Schedule:
    if name != "cosine":
        raise ValueError(f"diffusion.schedule={name!r}; expected 'cosine'")
    return cosine_schedule(num_timesteps)


def sample_timesteps(key, max_timestep):
    """One t per image, uniform in [0, max_timestep) (T/2 caps noise on image-first docs)."""
    return jax.random.randint(key, max_timestep.shape, 0, max_timestep, dtype=jnp.int32)


def q_sample(schedule: Schedule, x0, t, noise):
    """x_t for latents x0 [B, M, H, W, C], timesteps t [B, M] and noise like x0."""
    abar = schedule.alphas_cumprod[t][..., None, None, None]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


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
                   spacing: str | None = None, clip_x0: float = 0.0) -> SamplerTables:
    """Coefficients of sampler `name` ("ddpm", "ddim" with `eta`, "dpm++2m") in `num_steps`
    steps, spaced by `spacing` (None: DEFAULT_SPACING of the sampler).

    `clip_x0` > 0 clips each predicted x0 to that range (improved-diffusion's clip_denoised),
    for data known to be bounded, such as pixels in [-1, 1]. Without it, the first step's
    x0 = (x_T - sigma eps) / alpha divides the model's eps error by sqrt(abar_999) ~ 5e-5 with
    the cosine schedule, and a deterministic sampler never recovers from that x0."""
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
                         np.sqrt(1 - abar).astype(np.float32), coefs, float(clip_x0))


def _update(name, c, x, eps, x0, x0_prev, z):
    """One step from x_t to x_prev given the coefficients c of this step."""
    if name == "ddpm":
        return c["mean_x0"] * x0 + c["mean_xt"] * x + c["std"] * z
    if name == "ddim":
        return c["alpha_next"] * x0 + c["dir"] * eps + c["std"] * z
    d = x0 + c["w_prev"] * (x0 - x0_prev)
    return c["x_ratio"] * x - c["d"] * d


def sample(eps_fn, x_T, key, tables: SamplerTables):
    """Run a sampler from x_T (pure noise) to the clean sample.

    eps_fn(x, t) -> the predicted noise of x at int32 scalar timestep t (the model's, possibly
    with guidance). The ancestral noise of step i is normal(fold_in(key, i)): same key, same
    sample."""
    t_all = jnp.asarray(tables.timesteps)
    alpha, sigma = jnp.asarray(tables.alpha), jnp.asarray(tables.sigma)
    coefs = {k: jnp.asarray(v) for k, v in tables.coefs.items()}

    def body(i, carry):
        x, x0_prev = carry
        eps = eps_fn(x, t_all[i]).astype(jnp.float32)
        x0 = (x - sigma[i] * eps) / alpha[i]
        if tables.clip_x0:  # and the eps that the clipped x0 implies, as improved-diffusion does
            x0 = jnp.clip(x0, -tables.clip_x0, tables.clip_x0)
            eps = (x - alpha[i] * x0) / sigma[i]
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        c = {k: v[i] for k, v in coefs.items()}
        return _update(tables.name, c, x, eps, x0, x0_prev, z), x0

    x_T = x_T.astype(jnp.float32)
    x, _ = jax.lax.fori_loop(0, tables.num_steps, body, (x_T, jnp.zeros_like(x_T)))
    return x
