"""Seconds per generated image: denoising against the KV-cached prefix vs recomputing the whole
sequence (prefix + noisy image) at every step, for DDPM-250, DDIM-50 and DPM-Solver++-20.

    python benchmarks/generate.py [--config experiments/transfusion.py:demo] [--prefix 192]
                                  [--batch 1] [--guidance 0]

Prints one JSON line per (sampler, mode), then one with the speed-ups. Random weights: the cost of
a step does not depend on their values. Timings exclude compilation (one warm-up call first).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from transfusion_jax import diffusion
from transfusion_jax.inference import generation as gen
from transfusion_jax.core.config import load_config
from transfusion_jax.models import Transfusion, patches_per_image
from transfusion_jax.models.kv_cache import init_cache

SAMPLERS = (("ddpm", 250), ("ddim", 50), ("dpm++2m", 20))


def full_sequence_eps(model, params, prompt: gen.Prompt):
    """eps_fn(x_t, t) that runs prompt + noisy image through the whole model (no cache)."""
    p = patches_per_image(model.cfg)
    b, lp = prompt.lengths.shape[0], prompt.chunk["tokens"].shape[1]
    chunk = gen.image_chunk(prompt.lengths, jnp.ones(b, bool), p)
    batch = {k: jnp.concatenate([prompt.chunk[k], chunk[k]], 1)
             for k in ("tokens", "segment_ids", "positions", "mask_pos")}
    batch["patch_index"] = jnp.concatenate([jnp.full((b, lp), -1, jnp.int32),
                                            chunk["patch_index"]], 1)
    batch["patch_positions"] = jnp.broadcast_to(lp + jnp.arange(p), (b, 1, p))

    def eps_fn(x_t, t):
        timesteps = jnp.full((b, 1), t, jnp.int32)
        return model.apply(params, batch, x_t[:, None], timesteps)["prediction"][:, 0]
    return eps_fn


def make_runs(model, params, prompt, uncond, tables, guidance):
    cfg = model.cfg
    b = prompt.lengths.shape[0]
    both = gen.concat_prompts(prompt, uncond) if guidance else prompt
    rows = both.lengths.shape[0]
    capacity = both.chunk["tokens"].shape[1] + patches_per_image(cfg) + 1

    @jax.jit
    def cached(key):
        cache, _ = gen.prefill(model, params, init_cache(cfg, rows, capacity), both)
        x0 = gen.sample_image(model, params, cache, key, jnp.ones(rows, bool), tables,
                              guidance or None)
        rep = (lambda x: jnp.concatenate([x, x])) if guidance else (lambda x: x)
        cache, logits = gen.commit_image(model, params, cache, rep(x0), jnp.ones(rows, bool), 4)
        return x0, logits

    @jax.jit
    def full(key):
        eps_c = full_sequence_eps(model, params, prompt)
        eps_u = full_sequence_eps(model, params, uncond) if guidance else None
        eps_fn = eps_c if not guidance else (
            lambda x, t: gen.guided(eps_c(x, t), eps_u(x, t), guidance))
        key_noise, key_sampler = jax.random.split(key)
        shape = (b, cfg.latent_size, cfg.latent_size, cfg.latent_channels)
        return diffusion.sample(eps_fn, jax.random.normal(key_noise, shape), key_sampler, tables)

    return {"cached": cached, "full_recompute": full}


def timed(fn, key, repeats):
    jax.block_until_ready(fn(key))  # compile
    best = float("inf")
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(key, i)))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/transfusion.py:demo")
    ap.add_argument("--prefix", type=int, default=192, help="text tokens before BOI")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=0.0, help="CFG scale; 0: no CFG rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samplers", default=",".join(f"{n}:{s}" for n, s in SAMPLERS))
    args = ap.parse_args()

    cfg = load_config(args.config).model
    model = Transfusion(cfg)
    rng = np.random.default_rng(0)
    prompt = gen.build_prompt([[rng.integers(5, cfg.vocab_size, args.prefix), [3]]] * args.batch,
                              cfg)
    uncond = gen.build_prompt([[[3]]] * args.batch, cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), prompt.chunk, jnp.zeros(
        (args.batch, 1, cfg.latent_size, cfg.latent_size, cfg.latent_channels)),
        jnp.zeros((args.batch, 1), jnp.int32)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    shape = dict(config=args.config, depth=cfg.depth, dim=cfg.dim, heads=cfg.heads,
                 patch=cfg.patch, patches_per_image=patches_per_image(cfg), params=int(n_params),
                 prefix_elements=int(prompt.lengths[0]), batch=args.batch,
                 guidance=args.guidance, device=jax.devices()[0].device_kind)
    schedule = diffusion.make_schedule("cosine", 1000)
    speedups = {}
    for item in args.samplers.split(","):
        name, steps = item.split(":")
        tables = diffusion.sampler_tables(schedule, name, int(steps))
        runs = make_runs(model, params, prompt, uncond, tables, args.guidance)
        seconds = {}
        for mode, fn in runs.items():
            seconds[mode] = timed(fn, jax.random.key(1), args.repeats) / args.batch
            print(json.dumps(dict(sampler=name, steps=int(steps), mode=mode,
                                  seconds_per_image=round(seconds[mode], 4), **shape)), flush=True)
        speedups[f"{name}-{steps}"] = round(seconds["full_recompute"] / seconds["cached"], 2)
    print(json.dumps(dict(speedup_cached_vs_full=speedups, **shape)), flush=True)


if __name__ == "__main__":
    main()
