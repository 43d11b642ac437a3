"""Train the latent autoencoder (VAE for Transfusion, VQ-VAE for Chameleon) on the shapes world.

    python -m transfusion_jax.train_autoencoder --config experiments/autoencoder.py:kind=vae \
        --workdir DIR [--config.key=value ...]

Built on the trainer's pieces: the mesh and logical shardings (`sharding`), the optimizer
(`optim`), Orbax checkpoints (`checkpoint`) and the metrics writer (`metrics`). Reads top to
bottom: state, step, evaluation, loop. Batch t is the shapes-world scenes t*B .. t*B+B-1 of the
train split (a pure function of (seed, t): nothing to checkpoint for the data); evaluation uses
the held-out split. Writes metrics.jsonl, reconstruction grids (recon_<step>.png: originals
above, reconstructions below) and, for the VAE, latent_stats.json (the posterior means' mean and
std on held-out images: latents (z - shift) * scale have about unit variance).
"""
import json
import os
import sys
import time

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from transfusion_jax import autoencoder_losses as L
from transfusion_jax import checkpoint, cli, lpips, optim, sharding
from transfusion_jax.data import shapes
from transfusion_jax.metrics import MetricsWriter
from transfusion_jax.model.autoencoder import Autoencoder, check_config
from transfusion_jax.train import Preemption

# ============================================================================ state


class AEState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    vq: dict             # the quantiser's codebook state ({} for the VAE)
    opt_state: optax.OptState
    disc_params: dict
    disc_opt_state: optax.OptState
    rng: jax.Array       # key data; the step's key is fold_in(rng, step)


def build(config):
    check_config(config.model)
    if config.model.kind == "identity":
        raise ValueError("model.kind: got 'identity', which has nothing to train; expected vae or vq")
    model = Autoencoder(config.model)
    disc = L.PatchDiscriminator(config.loss.disc_channels, config.loss.disc_layers)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    return model, disc, tx, optim.make_optimizer(config.optimizer, config.total_steps)


def _create(config, model, disc, tx, dtx, rng):
    size = config.data.image_size
    x = jnp.zeros((1, size, size, config.model.image_channels), jnp.float32)
    k_model, k_disc = jax.random.split(rng)
    variables = dict(model.init(k_model, x))
    params = variables.pop("params")
    disc_params = disc.init(k_disc, x)["params"]
    return AEState(step=jnp.zeros((), jnp.int32), params=params, vq=variables,
                   opt_state=tx.init(params), disc_params=disc_params,
                   disc_opt_state=dtx.init(disc_params), rng=jax.random.key_data(rng))


def abstract_state(config, parts, mesh):
    """The state's shapes, dtypes and shardings (for init, resume and loading)."""
    create = lambda: _create(config, *parts, jax.random.key(0))  # noqa: E731
    shardings = sharding.logical_shardings(jax.eval_shape(create), mesh, config.sharding_rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(lambda: nn.unbox(create())), shardings)


def init_state(config, parts, mesh):
    shardings = jax.tree.map(lambda s: s.sharding, abstract_state(config, parts, mesh))
    create = jax.jit(lambda key: nn.unbox(_create(config, *parts, key)), out_shardings=shardings)
    return create(jax.random.key(config.seed))


def init_or_restore(config, parts, mesh, manager):
    """(state, step): the latest checkpoint's when the workdir has one, else a fresh state."""
    start = manager.latest_step()
    if start is None:
        return init_state(config, parts, mesh), 0
    state, _ = checkpoint.restore(manager, start, abstract_state(config, parts, mesh))
    print(f"resumed from {manager.directory}/{start}", file=sys.stderr, flush=True)
    return state, start

# ============================================================================ step


def make_train_step(config, model, disc, tx, dtx, gan: bool):
    """One jitted step; `gan` (static) adds the discriminator, from loss.gan_start_step on."""
    loss_cfg = config.loss

    def step_fn(state, x, lpips_params):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_sample, k_vq = jax.random.split(key)

        def gen_loss(params):
            (recon, enc), new_vq = model.apply(
                {"params": params, **state.vq}, x, k_sample if config.model.kind == "vae" else k_vq,
                True, mutable=["vq"])
            terms = L.reconstruction_terms(x, recon, enc, lpips_params)
            fake = disc.apply({"params": state.disc_params}, recon) if gan else None
            total, metrics = L.generator_loss(loss_cfg, terms, fake, state.step)
            return total, (metrics, new_vq, recon)

        grads, (metrics, new_vq, recon) = jax.grad(gen_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, vq=dict(new_vq) if new_vq else state.vq)
        if gan:
            state, d_metrics = _disc_update(loss_cfg, disc, dtx, state, x, recon)
            metrics.update(d_metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["psnr"] = jnp.mean(L.psnr(x, recon))
        return state.replace(step=state.step + 1), metrics

    return step_fn


def _disc_update(loss_cfg, disc, dtx, state, x, recon):
    def d_loss(dparams):
        both = disc.apply({"params": dparams}, jnp.concatenate([x, jax.lax.stop_gradient(recon)]))
        return L.discriminator_loss(loss_cfg, both[: x.shape[0]], both[x.shape[0]:], state.step)

    grads, metrics = jax.grad(d_loss, has_aux=True)(state.disc_params)
    updates, dopt = dtx.update(grads, state.disc_opt_state, state.disc_params)
    return state.replace(disc_params=optax.apply_updates(state.disc_params, updates),
                         disc_opt_state=dopt), metrics

# ============================================================================ data and evaluation


def scene_batch(seed: int, split: str, start: int, n: int, size: int):
    """(images float32 [n,size,size,3] in [-1,1], scenes) of items start .. start+n-1."""
    scenes = [shapes.sample_scene(shapes.scene_rng(seed, split, i)) for i in range(start, start + n)]
    pixels = np.stack([shapes.render_scene(s, size) for s in scenes])
    return pixels.astype(np.float32) / 127.5 - 1.0, scenes


def make_eval(model):
    @jax.jit
    def evaluate(variables, x):
        enc = model.apply(variables, x, method=Autoencoder.encode)
        recon = model.apply(variables, enc.latents, method=Autoencoder.decode)
        return recon, enc.latents, enc.ids
    return evaluate


def evaluate_heldout(config, evaluate, variables, heldout):
    """PSNR, shapes-parser recovery, and latent statistics (VAE) or code usage (VQ)."""
    x, scenes = heldout
    recons, latents, ids = [], [], []
    for i in range(0, len(x), config.data.batch_size):
        r, z, c = evaluate(variables, jnp.asarray(x[i:i + config.data.batch_size]))
        recons.append(np.asarray(r)), latents.append(np.asarray(z))
        if c is not None:
            ids.append(np.asarray(c))
    recon, latents = np.concatenate(recons), np.concatenate(latents)
    right = total = 0
    for image, scene in zip(recon, scenes):
        r, t = shapes.object_accuracy(list(scene.objects), shapes.parse_image(image))
        right, total = right + r, total + t
    out = {"heldout_psnr": float(np.mean(L.psnr(jnp.asarray(x), jnp.asarray(recon)))),
           "heldout_objects": right / max(total, 1),
           "latent_mean": float(latents.mean()), "latent_std": float(latents.std())}
    if ids:
        out.update(code_usage(np.concatenate(ids), config.model.codebook_size))
    return out, recon


def code_usage(ids, codebook_size: int) -> dict:
    """Fraction of codes used at least once, and the perplexity of their frequencies / K."""
    counts = np.bincount(ids.reshape(-1), minlength=codebook_size)
    p = counts / counts.sum()
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    return {"codes_used": float((counts > 0).mean()), "code_perplexity": perplexity,
            "code_perplexity_fraction": perplexity / codebook_size, "codes_seen": int(ids.size)}


def write_grid(path: str, x, recon, n: int = 8):
    rows = [np.concatenate(list(a[:n]), axis=1) for a in (x, recon)]
    grid = np.clip((np.concatenate(rows, axis=0) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)

# ============================================================================ loop


def train(config, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_config(workdir, config)
    model, disc, tx, dtx = parts = build(config)
    mesh = sharding.make_mesh(config.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % shards:
        raise ValueError(f"data.batch_size: got {config.data.batch_size}, expected a multiple of "
                         f"the {shards} data-parallel shards of the mesh")
    lpips_params = lpips.from_config(config.loss)
    manager = checkpoint.make_manager(workdir, every=config.checkpoint_every, keep=2)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(
                sharding.rules_from_config(config.sharding_rules)):
            state, start = init_or_restore(config, parts, mesh, manager)
            steps = {gan: jax.jit(make_train_step(config, *parts, gan=gan), donate_argnums=0)
                     for gan in (False, True)}
            return _loop(config, workdir, model, steps, state, start, mesh, lpips_params, manager)
    finally:
        manager.wait_until_finished(), manager.close()


def _loop(config, workdir, model, steps, state, step, mesh, lpips_params, manager):
    """Steps from `step` to total_steps (or the time limit, or SIGTERM/SIGINT), then the
    held-out evaluation, the checkpoint and, for the VAE, latent_stats.json."""
    d, start = config.data, time.time()
    heldout = scene_batch(config.seed, "heldout", 0, d.heldout_images, d.image_size)
    evaluate = make_eval(model)
    writer = MetricsWriter(workdir, config.total_steps, resume_step=step)
    preemption, limit, results = Preemption(), config.get("time_limit_s", 0), {}
    save = lambda: checkpoint.save(manager, step, state, json.dumps({"step": step}).encode(),  # noqa: E731
                                   force=True)
    while step < config.total_steps and not (limit and time.time() - start > limit):
        x, _ = scene_batch(config.seed, "train", step * d.batch_size, d.batch_size, d.image_size)
        x = jax.device_put(x, sharding.batch_sharding(mesh))
        state, metrics = steps[step >= config.loss.gan_start_step](state, x, lpips_params)
        step += 1
        if step % config.log_every == 0 or step == config.total_steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            writer.write(step, {**metrics, "wall_s": time.time() - start})
            writer.progress(step, metrics)
        if step % config.checkpoint_every == 0 or preemption.requested:
            save()
        if preemption.requested:
            writer.close()
            return {"step": step, "preempted": True}
        if step % config.eval_every == 0:
            results = _eval_and_log(config, workdir, evaluate, state, heldout, writer, step, start)
    if not results or results["step"] != step:
        results = _eval_and_log(config, workdir, evaluate, state, heldout, writer, step, start)
    if manager.latest_step() != step:
        save()
    writer.close()
    if config.model.kind == "vae":  # the Transfusion trainer's normalisation (latents.py)
        with open(os.path.join(workdir, "latent_stats.json"), "w") as f:
            json.dump({"shift": results["latent_mean"], "scale": 1.0 / results["latent_std"],
                       "step": step}, f)
    return results


def _eval_and_log(config, workdir, evaluate, state, heldout, writer, step, start):
    variables = {"params": state.params, **state.vq}
    results, recon = evaluate_heldout(config, evaluate, variables, heldout)
    results["wall_s"] = time.time() - start
    results["step"] = step
    writer.write(step, results)
    print(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in results.items()),
          file=sys.stderr, flush=True)
    write_grid(os.path.join(workdir, f"recon_{step}.png"), heldout[0], recon)
    return results

# ============================================================================ loading


def load_frozen(workdir: str, step: int | None = None):
    """(config, {"params", "vq"?} variables, latent stats or None) of a trained autoencoder, for
    running it frozen (Transfusion trainer, precompute); placed on the first local device."""
    config = checkpoint.read_config(workdir)
    parts = build(config)
    manager = checkpoint.make_manager(workdir, every=1, keep=2)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    state, _ = checkpoint.restore(manager, step, abstract_state(config, parts, mesh))
    manager.close()
    stats_path = os.path.join(workdir, "latent_stats.json")
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else None
    return config, {"params": state.params, **state.vq}, stats

# ============================================================================ CLI


def main():
    cli.run(lambda config, workdir, _: train(config, workdir), "experiments/autoencoder.py[:arg]")


if __name__ == "__main__":
    main()
