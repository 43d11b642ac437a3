"""Train the latent autoencoder (VAE for Transfusion, VQ-VAE for Chameleon) on the shapes world.

    python -m transfusion_jax.train_autoencoder --config experiments/autoencoder.py:kind=vae \
        --workdir DIR [--config.key=value ...]

A thin loop over core/: the mesh and logical shardings, the optimizer, the sharded state from an
init function, Orbax checkpoints, the metrics writer, preemption. Reads top to bottom: checks,
state, step, loop. Batch t is the shapes-world scenes t*B .. t*B+B-1 of the train split (a pure
function of (seed, t): nothing to checkpoint for the data). The evaluators of config.evals run
at their interval and at the end: the "heldout" reconstruction (evaluators/reconstruction.py)
writes evals/<step>.json and evals/<step>/heldout/recon.png (originals above, reconstructions
below). Writes metrics.jsonl and, for the VAE, latent_stats.json (the posterior means' mean and
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
import optax

from transfusion_jax.core import checkpoint, optim, sharding, train_state
from transfusion_jax.core.metrics import MetricsWriter
from transfusion_jax.core.preemption import Preemption
from transfusion_jax.core.validation import (check_fields, integer, non_negative_int,
                                             non_negative_number, positive_int)
from transfusion_jax.data.shapes import world
from transfusion_jax.evaluators import common as evaluators
from transfusion_jax.models.autoencoder import losses as ae_losses
from transfusion_jax.models.autoencoder import lpips
from transfusion_jax.models.autoencoder.model import Autoencoder, check_config as check_model

# ============================================================================ state

# Fields a resume may change freely: they change neither the model nor the batches.
RESUME_FREE = ("log_every", "checkpoint_every", "evals", "time_limit_s", "mesh",
               "sharding_rules", "preemption_grace_s")

# The evaluator (config.evals) whose held-out latent mean and std become latent_stats.json.
STATS_EVAL = "heldout"


class AEState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    vq: dict             # the quantiser's codebook state ({} for the VAE)
    opt_state: optax.OptState
    disc_params: dict
    disc_opt_state: optax.OptState
    rng: jax.Array       # key data; the step's key is fold_in(rng, step)


# Every field the trainer reads, with what it allows (core/validation.py); model.* is checked by
# models/autoencoder/model.py, evals.* by evaluators/common.py.
RULES = (
    ("seed", integer),
    ("total_steps", positive_int),
    ("log_every", positive_int),
    ("checkpoint_every", positive_int),
    ("time_limit_s", non_negative_number),
    ("preemption_grace_s", non_negative_number),
    ("data.image_size", positive_int),
    ("data.batch_size", positive_int),
    ("data.heldout_images", positive_int),
    *[(f"loss.{w}", non_negative_number) for w in ("l1", "lpips", "gan", "kl", "codebook")],
    ("loss.gan_start_step", non_negative_int),
    ("loss.disc_channels", positive_int),
    ("loss.disc_layers", positive_int),
    *optim.RULES,
)


def check_config(config, num_devices: int) -> None:
    """The run's one validation pass, after overrides and before anything is written."""
    check_fields(config, RULES)
    check_model(config.model)
    if config.model.kind == "identity":
        raise ValueError("model.kind: got 'identity', which has nothing to train; expected vae or vq")
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    shards = mesh["data"] * mesh["fsdp"]
    if config.data.batch_size % shards:
        raise ValueError(f"data.batch_size: got {config.data.batch_size}, expected a multiple of "
                         f"the {shards} data-parallel shards of the mesh")
    optim.learning_rate(config.optimizer, config.total_steps)  # checks warmup_steps
    evaluators.check_config(config.evals)
    if config.model.kind == "vae" and config.evals.get(STATS_EVAL, {}).get("type") != \
            "reconstruction":
        raise ValueError(f"evals.{STATS_EVAL}: a VAE run needs a 'reconstruction' evaluator "
                         "of that name: its held-out latents give latent_stats.json, which "
                         "normalises the latents the transformer diffuses")


def build(config):
    """(autoencoder, discriminator, its optimizer, the discriminator's optimizer)."""
    model = Autoencoder(config.model)
    disc = ae_losses.PatchDiscriminator(config.loss.disc_channels, config.loss.disc_layers)
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    return model, disc, tx, optim.make_optimizer(config.optimizer, config.total_steps)


def make_init_fn(config, model, disc, tx, disc_tx):
    """init_fn(rng) -> the boxed AEState, for core's sharded creation (core/train_state.py)."""
    def init_fn(rng):
        size = config.data.image_size
        x = jnp.zeros((1, size, size, config.model.image_channels), jnp.float32)
        k_model, k_disc = jax.random.split(rng)
        variables = dict(model.init(k_model, x))
        params = variables.pop("params")
        disc_params = disc.init(k_disc, x)["params"]
        return AEState(step=jnp.zeros((), jnp.int32), params=params, vq=variables,
                       opt_state=tx.init(params), disc_params=disc_params,
                       disc_opt_state=disc_tx.init(disc_params), rng=jax.random.key_data(rng))
    return init_fn


def init_or_restore(config, parts, mesh, manager, workdir):
    """(state, step): the newest checkpoint that restores when the workdir has one (damaged
    newer ones are set aside, core/checkpoint.py), else a fresh state."""
    init_fn = make_init_fn(config, *parts)
    start = checkpoint.newest_readable_step(manager)
    if not start:
        return train_state.create_state(init_fn, mesh, config.sharding_rules, config.seed), 0
    abstract = train_state.abstract_state(init_fn, mesh, config.sharding_rules)
    start, state, _ = checkpoint.restore_newest_good(manager, start, abstract, [0], 1)
    checkpoint.write_config(workdir, config)  # only now: a failed resume leaves it as it was
    print(f"resumed from {manager.directory}/{start}", file=sys.stderr, flush=True)
    return state, start

# ============================================================================ step


def make_train_step(config, model, disc, tx, disc_tx, gan: bool):
    """One jitted step; `gan` (static) adds the discriminator, from loss.gan_start_step on."""
    loss_cfg = config.loss

    def step_fn(state, x, lpips_params):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_sample, k_vq = jax.random.split(key)

        def gen_loss(params):
            (recon, enc), new_vq = model.apply(
                {"params": params, **state.vq}, x, k_sample if config.model.kind == "vae" else k_vq,
                True, mutable=["vq"])
            terms = ae_losses.reconstruction_terms(x, recon, enc, lpips_params)
            fake = disc.apply({"params": state.disc_params}, recon) if gan else None
            total, metrics = ae_losses.generator_loss(loss_cfg, terms, fake, state.step)
            return total, (metrics, new_vq, recon)

        grads, (metrics, new_vq, recon) = jax.grad(gen_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, vq=dict(new_vq) if new_vq else state.vq)
        if gan:
            new, d_metrics = _disc_update(loss_cfg, disc, disc_tx, new, x, recon)
            metrics.update(d_metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["psnr"] = jnp.mean(ae_losses.psnr(x, recon))
        # A non-finite loss, gradient or update changes nothing (the loop then stops): no
        # checkpoint holds a non-finite value. lax.cond, not a where per leaf: the wheres made
        # this step's XLA CPU compile 5x slower.
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                  & train_state.all_finite(new))
        new = jax.lax.cond(finite, lambda: new, lambda: state)
        metrics["finite"] = finite.astype(jnp.float32)
        return new.replace(step=state.step + 1), metrics

    return step_fn


def _disc_update(loss_cfg, disc, disc_tx, state, x, recon):
    def d_loss(dparams):
        both = disc.apply({"params": dparams}, jnp.concatenate([x, jax.lax.stop_gradient(recon)]))
        return ae_losses.discriminator_loss(loss_cfg, both[: x.shape[0]], both[x.shape[0]:], state.step)

    grads, metrics = jax.grad(d_loss, has_aux=True)(state.disc_params)
    updates, dopt = disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    return state.replace(disc_params=optax.apply_updates(state.disc_params, updates),
                         disc_opt_state=dopt), metrics

# ============================================================================ loop


def train(config, workdir: str, allow_config_changes: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) the autoencoder's training in `workdir`; returns the last evaluation.
    `allow_config_changes`: fields (or prefixes) a resume may change from the saved config."""
    check_config(config, jax.device_count())
    checkpoint.check_resume(workdir, config, RESUME_FREE, allow_config_changes)
    lpips_params = lpips.from_config(config.loss)
    resuming = checkpoint.has_checkpoints(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint.check_writable(workdir)
    if not resuming:  # a resume rewrites config.json once its checkpoint restored
        checkpoint.write_config(workdir, config)
    model, disc, tx, disc_tx = parts = build(config)
    mesh = sharding.make_mesh(config.mesh)
    manager = checkpoint.make_manager(workdir, every=config.checkpoint_every, keep=2)
    failing = True
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(
                sharding.rules_from_config(config.sharding_rules)):
            state, start = init_or_restore(config, parts, mesh, manager, workdir)
            steps = {gan: jax.jit(make_train_step(config, *parts, gan=gan), donate_argnums=0)
                     for gan in (False, True)}
            results = _loop(config, workdir, steps, state, start, mesh, lpips_params, manager)
        failing = False
        return results
    finally:
        checkpoint.finish(manager, failing)  # StorageError when the last save failed


def _loop(config, workdir, steps, state, step, mesh, lpips_params, manager):
    """Steps from `step` to total_steps (or the time limit, or SIGTERM/SIGINT), the evaluators
    of config.evals at their interval and at the end, the checkpoint and, for the VAE,
    latent_stats.json (from the held-out reconstruction's latents)."""
    d, start = config.data, time.time()
    evals = evaluators.from_config(config.evals, evaluators.Context(config, None, None, workdir))
    writer = MetricsWriter(workdir, config.total_steps, resume_step=step)
    preemption = Preemption(config.get("preemption_grace_s", 0))
    limit, results = config.get("time_limit_s", 0), {}
    save = lambda: checkpoint.save(manager, step, state, json.dumps({"step": step}).encode(),  # noqa: E731
                                   force=True)

    def evaluate(due):
        scores = evaluators.run(due, {"params": state.params, **state.vq}, step, workdir, config)
        writer.add_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
        return {"step": step, **scores}

    def out_of_time():
        return bool(limit) and time.time() - start > limit

    skipped = 0.0  # non-finite steps since the last log (on the device: no sync per step)
    while step < config.total_steps and not out_of_time():
        x, _ = world.scene_batch(config.seed, "train", step * d.batch_size, d.batch_size,
                                 d.image_size)
        x = jax.device_put(x, sharding.batch_sharding(mesh))
        state, metrics = steps[step >= config.loss.gan_start_step](state, x, lpips_params)
        step += 1
        skipped = skipped + (1 - metrics["finite"])
        if step % config.log_every == 0 or step == config.total_steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            writer.write(step, {**metrics, "wall_s": time.time() - start})
            writer.progress(step, metrics)
            if float(skipped):
                writer.close()
                manager.wait_until_finished()
                raise FloatingPointError(
                    f"loss, gradient or update not finite in {int(skipped)} of the steps up to "
                    f"{step} (their updates were not applied); stopping. Last good "
                    f"checkpoint: {manager.latest_step()} in {manager.directory}")
        # The last step is saved before its evaluation, which may be long (a signal then
        # would cost every step since the previous checkpoint).
        if (step % config.checkpoint_every == 0 or preemption.requested
                or step == config.total_steps or out_of_time()):
            save()
        if preemption.requested:
            writer.close()
            return {"step": step, "preempted": True}
        due = [e for e in evals if e.due(step, config.total_steps)]
        if due:
            results = evaluate(due)
    if manager.latest_step() != step:
        save()
    if results.get("step") != step:  # the end (also of a time-limited run): every evaluator
        results = evaluate(evals)
    writer.close()
    if config.model.kind == "vae":  # the Transfusion trainer's normalisation (codec.py)
        with open(os.path.join(workdir, "latent_stats.json"), "w") as f:
            json.dump({"shift": results[f"{STATS_EVAL}/latent_mean"],
                       "scale": 1.0 / results[f"{STATS_EVAL}/latent_std"], "step": step}, f)
    return results
