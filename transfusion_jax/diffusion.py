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
