"""The trainer of both model families: Transfusion and the Chameleon baseline (model.family).

    python -m transfusion_jax.train --config experiments/transfusion.py:tiny --workdir DIR \
        [--config.key=value ...]            (the entry point: transfusion_jax/train.py)

Reads top to bottom: config checks, the step (pixels -> frozen autoencoder -> noise -> model ->
loss -> AdamW; for Chameleon: pixels -> frozen VQ-VAE code ids -> tokens -> model -> LM loss +
z-loss -> AdamW), then the loop (shared by both) (mesh, data, state or resume, compile once, steps, metrics one step
late, checkpoints, evaluators of config.evals at their interval, preemption). Batch t is a
function of (seed, t): the data order comes from the pipeline's seeded, checkpointed iterator
and the step's noise from fold_in(seed key, t), so a resumed run continues bit for bit.

Multi-host: the same command runs as one process per host (core/distributed.py,
launch/). Every process runs this program on the global mesh and feeds its rows of each batch
(data/host_data.py); process 0 alone writes the config, logs and metrics; all save and restore the
checkpoints together. At an evaluation every process evaluates its share of the batches on its
own devices (evaluators/common.py).
"""
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from transfusion_jax import diffusion, objectives
from transfusion_jax.core import checkpoint, distributed, flops, optim, sharding, train_state
from transfusion_jax.core.validation import (boolean, check_fields, fraction, integer,
                                             non_negative_int, non_negative_number, one_of,
                                             positive_int, positive_number)
from transfusion_jax.core.metrics import MetricsWriter
from transfusion_jax.core.preemption import Preemption
from transfusion_jax.data import latent_records, mixture
from transfusion_jax.data.config import check_fits, validate_data_config
from transfusion_jax.data.host_data import HostData, process_rows
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import common as evaluators
from transfusion_jax.models import (FAMILIES, Transfusion, build_model, chameleon,
                                    example_inputs, family, patches_per_image)
from transfusion_jax.models.attention import IMPLEMENTATIONS
from transfusion_jax.models.patching import PATCH_SIZES
from transfusion_jax.models.transfusion import IMAGE_ATTENTION, padded_vocab_size
from transfusion_jax.models.transformer import REMAT_EXPECTED, remat_name
from transfusion_jax.models.autoencoder import codec as codec_lib
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.trainers import image_budget

# ============================================================================ config checks

def _is_remat(value) -> bool:
    try:
        return bool(remat_name(value))
    except ValueError:
        return False


# Every field the trainer reads, with what it allows (core/validation.py); data.* is checked by
# data/config.py, evals.* by evaluators/common.py, cross-field rules below.
RULES = (
    ("seed", integer),
    ("total_steps", positive_int),
    ("stop_at_step", non_negative_int),
    ("preemption_grace_s", non_negative_number),
    ("grad_accum", positive_int),
    ("ema_decay", fraction()),
    ("log_every", positive_int),
    ("checkpoint_every", positive_int),
    ("keep_checkpoints", positive_int),
    ("model.family", one_of(*FAMILIES)),
    ("model.vocab_size", positive_int),
    ("model.dim", positive_int),
    ("model.depth", positive_int),
    ("model.heads", positive_int),
    ("model.mlp_dim", positive_int),
    ("model.rope_theta", positive_number),
    ("model.norm_eps", positive_number),
    ("model.qk_norm", boolean),
    ("model.norm_reorder", boolean),
    ("model.image_attention", one_of(*IMAGE_ATTENTION)),
    ("model.attention", one_of(*IMPLEMENTATIONS)),
    ("model.attention_block", positive_int),
    ("model.latent_size", positive_int),
    ("model.latent_channels", positive_int),
    ("model.patch", one_of("linear", "unet")),
    ("model.patch_size", one_of(*PATCH_SIZES)),
    ("model.dtype", one_of("float32", "bfloat16", "float16")),
    ("model.remat", (_is_remat, REMAT_EXPECTED)),  # a policy name; true/false = "full"/"none"
    ("model.logits_chunk", non_negative_int),  # 0: the whole [B, L, vocab] logits at once
    ("autoencoder.downsample", positive_int),
    ("diffusion.schedule", one_of("cosine")),
    ("diffusion.timesteps", positive_int),
    ("diffusion.ddpm_weight", non_negative_number),
    ("diffusion.clip_x0", non_negative_number),
    ("diffusion.snr_shift", positive_number),
    ("diffusion.prediction", one_of(*diffusion.PREDICTIONS)),
    ("diffusion.loss_weighting", one_of(*diffusion.LOSS_WEIGHTINGS)),
    *optim.RULES,
)
# The Chameleon baseline's own fields (models/chameleon.py, experiments/chameleon.py).
CHAMELEON_RULES = (
    ("model.image_vocab_size", positive_int),
    ("z_loss", non_negative_number),
)


def check_config(config, num_devices: int):
    """The run's one validation pass, after command-line overrides and before anything is
    written: impossible combinations fail naming the fields and the allowed values. (The frozen
    autoencoder's channels are checked once it is loaded, `codec.check`.)"""
    check_fields(config, RULES)
    model, data = config.model, config.data
    if family(model) == "chameleon":
        check_fields(config, CHAMELEON_RULES)
        if model.image_vocab_size >= model.vocab_size:
            raise ValueError(f"model.image_vocab_size={model.image_vocab_size} must be below "
                             f"model.vocab_size={model.vocab_size}, which counts text and image "
                             "ids together")
        if model.patch_size != 1:
            raise ValueError(f"model.patch_size={model.patch_size}: a Chameleon image element is "
                             "one code id; expected 1")
    validate_data_config(data)
    mixture.check_real_data(data)  # Table 2 presets: real sources and tokenizer, or stop here
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    data_parallel = mesh["data"] * mesh["fsdp"]
    if data.batch_size % (data_parallel * config.grad_accum):
        raise ValueError(
            f"data.batch_size={data.batch_size} must be divisible by mesh data*fsdp={data_parallel} "
            f"times grad_accum={config.grad_accum}")
    if data.get("image_budget", 0) and data.batch_size % (
            data_parallel * config.grad_accum * data.image_budget_rows):
        raise ValueError(  # a group of rows shares its images: it must not straddle devices
            f"data.image_budget_rows={data.image_budget_rows}: data.batch_size="
            f"{data.batch_size} must be divisible by mesh data*fsdp={data_parallel} times "
            f"grad_accum={config.grad_accum} times image_budget_rows")
    for field in ("heads", "mlp_dim"):
        if model[field] % mesh["tensor"]:
            raise ValueError(f"model.{field}={model[field]} must be divisible by mesh.tensor="
                             f"{mesh['tensor']}")
    if padded_vocab_size(model) % mesh["tensor"]:  # the embedding and head are padded (to 128s)
        raise ValueError(f"model.vocab_size={model.vocab_size} (padded to "
                         f"{padded_vocab_size(model)}) must be divisible by mesh.tensor="
                         f"{mesh['tensor']}")
    patch_dim = model.patch_size ** 2 * model.latent_channels
    if model.patch == "linear" and patch_dim > model.dim:
        raise ValueError(
            f"model.patch_size={model.patch_size} with model.latent_channels={model.latent_channels} "
            f"makes {patch_dim}-dim patches, wider than model.dim={model.dim}: a linear patch layer "
            f"cannot carry them (the noise prediction error cannot fall below about "
            f"{1 - model.dim / patch_dim:.2f}); use a smaller patch_size, a larger dim or patch=unet")
    if model.dim % model.heads:
        raise ValueError(f"model.dim={model.dim} must be divisible by model.heads={model.heads}")
    check_fits(data, patches_per_image(model))  # an image plus BOI and EOI must fit in a row
    autoencoder = config.autoencoder
    codec_lib.check_kind(autoencoder, family(model))
    if data.image_size != model.latent_size * autoencoder.downsample:
        raise ValueError(f"data.image_size={data.image_size} must equal model.latent_size="
                         f"{model.latent_size} * autoencoder.downsample={autoencoder.downsample}")
    optim.learning_rate(config.optimizer, config.total_steps)  # checks warmup_steps
    evaluators.check_config(config.get("evals"))


# Fields added after runs were saved without them, with the value that behaves as before.
ADDED_FIELDS = {"model.family": "transfusion", "model.norm_reorder": False,
                "data.mix_patches_per_image": 0, "diffusion.snr_shift": 1.0, "diffusion.prediction": "eps", "diffusion.loss_weighting": "none",
                "model.image_attention": "bidirectional", "data.noise_limit": True,
                "data.pack_split_text": False, "data.mixture": [], "data.require_real_data": False,
                "data.image_budget": 0, "data.image_budget_rows": 1}
# Fields a resume may change freely: they change neither the model nor the batches. (remat,
# logits_chunk and the attention implementation change how the step computes the same function:
# the losses agree to rounding; a run moves between GPU, TPU and CPU kernels this way.)
RESUME_FREE = ("stop_at_step", "preemption_grace_s", "log_every", "checkpoint_every", "keep_checkpoints", "evals",
               "mesh", "sharding_rules", "model.remat", "model.logits_chunk", "model.attention",
               "model.attention_block")


# ============================================================================ the step


def make_train_step(config, model, tx, codec: codec_lib.Codec = codec_lib.IDENTITY):
    """train_step(state, batch, ae_variables) -> (state, metrics); pure, for jit with donation.

    The frozen autoencoder's weights come in as `ae_variables` (no gradient flows to them).
    A batch with `latents` (precomputed: raw VAE means, or VQ code ids;
    transfusion_jax.precompute) skips the encoder; a batch with `images` (pixels) is encoded
    here. The family's parts (_transfusion_parts, _chameleon_parts) turn the batch into the
    model's inputs and a loss; accumulation, the update, EMA and the finite guard are shared."""
    parts = _chameleon_parts if family(config.model) == "chameleon" else _transfusion_parts
    prepare, loss_fn, summarize = parts(config, model, codec)
    accum = config.grad_accum
    lr = optim.learning_rate(config.optimizer, config.total_steps)

    def micro(x):  # [B, ...] -> [A, B/A, ...]; microbatch i takes rows i, i+A, ... of every shard
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    def grads_and_metrics(params, inputs, normalizers):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:
            (_, metrics), grads = grad_fn(params, *inputs, normalizers)
            return grads, metrics

        def body(acc, mb):
            (_, metrics), grads = grad_fn(params, *mb, normalizers)
            return jax.tree.map(jnp.add, acc, (grads, metrics)), None

        zeros = jax.eval_shape(lambda: grad_fn(params, *jax.tree.map(lambda x: x[0],
                                                                     jax.tree.map(micro, inputs)),
                                               normalizers))
        acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, acc, jax.tree.map(micro, inputs))
        return grads, metrics

    def train_step(state, batch, ae_variables=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        inputs, normalizers, batch_metrics = prepare(batch, key, ae_variables)
        grads, metrics = grads_and_metrics(state.params, inputs, normalizers)
        metrics = dict(summarize(metrics), **batch_metrics)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p,
                               ema, params)
        # A non-finite step changes nothing: the loop stops and the last checkpoint stays good.
        # The update itself is checked too (a NaN learning rate or an overflow in Adam's moments
        # leaves loss and gradient finite), so no checkpoint ever holds a non-finite value.
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
                  & train_state.all_finite((params, opt_state, ema)))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state),
                                  ema_params=keep(ema, state.ema_params))
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr(state.step),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step


def _transfusion_parts(config, model, codec):
    """(prepare, loss_fn, summarize) of Transfusion: noise each image to its own t (paper 3),
    L = L_LM + lambda L_DDPM."""
    schedule = diffusion.schedule_from_config(config.diffusion)
    chunk = config.model.get("logits_chunk", 0)  # 0: whole logits; else the LM head per chunk
    prediction = config.diffusion.prediction
    weighting = config.diffusion.loss_weighting
    budget = config.data.get("image_budget", 0)
    rows = config.data.get("image_budget_rows", 1)

    def prepare(batch, key, ae_variables):
        key_t, key_noise = jax.random.split(key)
        batch_metrics = {}
        if budget:  # the used slots only, K per group of R rows (trainers/image_budget.py)
            batch, dropped = image_budget.compact(batch, rows, budget, config.grad_accum)
            batch_metrics["images_dropped"] = dropped.astype(jnp.float32)
        if "latents" in batch:
            x0 = codec.normalize(batch["latents"])
        else:
            x0 = codec.encode(jax.lax.stop_gradient(ae_variables), batch["images"])
        t = diffusion.sample_timesteps(key_t, batch["max_timestep"])
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        xt = diffusion.q_sample(schedule, x0, t, noise)
        target = diffusion.prediction_target(schedule, x0, t, noise, prediction)
        model_batch = {key: value for key, value in batch.items()
                       if key not in ("images", "latents")}
        normalizers = (batch["text_weights"].sum(), batch["image_mask"].sum().astype(jnp.float32))
        return (model_batch, xt, t, target), normalizers, batch_metrics

    def loss_fn(params, batch, xt, t, target, normalizers):
        variables = {"params": params}
        out = model.apply(variables, batch, xt, t, logits=not chunk)
        lm_head = functools.partial(model.apply, variables, method=Transfusion.logits_of)
        weights = (None if weighting == "none" else
                   diffusion.loss_weights(schedule, t, prediction, weighting))
        return objectives.transfusion_loss(out, batch, target, config.diffusion.ddpm_weight,
                                           normalizers, lm_head, chunk, weights)

    return prepare, loss_fn, lambda metrics: metrics


def _chameleon_parts(config, model, codec):
    """(prepare, loss_fn, summarize) of the Chameleon baseline: images -> VQ code ids -> tokens
    (models/chameleon.py: token_batch), one LM loss over every token plus the z-loss. With
    model.logits_chunk the model returns its hidden states and the loss applies the LM head per
    chunk (objectives.chunked_sums), as Transfusion's."""
    chunk = config.model.get("logits_chunk", 0)  # 0: whole logits; else the LM head per chunk
    budget = config.data.get("image_budget", 0)
    rows = config.data.get("image_budget_rows", 1)

    def prepare(batch, key, ae_variables):
        batch_metrics = {}
        if "latents" in batch:  # precomputed code ids
            ids = batch["latents"].astype(jnp.int32)
        elif budget:  # the VQ encoder on K used slots per group of R rows, then back in place
            grouped, dropped = image_budget.compact(batch, rows, budget, config.grad_accum)
            ids = image_budget.expand(
                codec.encode_ids(jax.lax.stop_gradient(ae_variables), grouped["images"]),
                batch["image_mask"], rows, budget, config.grad_accum)
            batch_metrics["images_dropped"] = dropped.astype(jnp.float32)
        else:
            ids = codec.encode_ids(jax.lax.stop_gradient(ae_variables), batch["images"])
        tokens = chameleon.token_batch(batch, ids, config.model, pad_id=0)
        return (tokens,), (tokens["text_weights"].sum(),), batch_metrics

    def loss_fn(params, tokens, normalizers):
        variables = {"params": params}
        out = model.apply(variables, tokens, logits=not chunk)
        lm_head = functools.partial(model.apply, variables, method=chameleon.Chameleon.logits_of)
        return objectives.chameleon_loss(out, tokens, config.z_loss, normalizers, lm_head, chunk)

    def summarize(m):  # per-token means of the text and image parts, from the summed terms
        return dict(m, lm_loss_text=m["lm_loss_text_sum"] / jnp.maximum(m["text_tokens"], 1.0),
                    lm_loss_image=m["lm_loss_image_sum"] / jnp.maximum(m["image_tokens"], 1.0))

    return prepare, loss_fn, summarize


# ============================================================================ the state


def model_and_optimizer(config):
    return build_model(config.model), optim.make_optimizer(config.optimizer, config.total_steps)


def init_inputs(config, max_images: int):
    """Shape-only inputs of the family's model for init."""
    if family(config.model) == "chameleon":
        return chameleon.example_inputs(config.model, config.data.seq_len)
    return example_inputs(config.model, config.data.seq_len, max_images)


def make_init_fn(config, model, tx, inputs):
    """init_fn(rng) -> the boxed TrainState (params carry logical axis names), for core's
    sharded creation (train_state.create_state / abstract_state)."""
    def init_fn(rng):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), inputs)
        params = model.init(rng, *zeros)["params"]
        ema = jax.tree.map(jnp.copy, params) if config.ema_decay else None
        return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                      opt_state=tx.init(params), ema_params=ema,
                                      rng=jax.random.key_data(rng))
    return init_fn


# ============================================================================ the loop


def place_for_evaluation(config, params, devices=None):
    """(mesh, params): `params` placed as training shards them, on the run's mesh over `devices`
    (default: this process's) or, when config.mesh does not fit them, on all of them along fsdp
    (core/sharding.py:evaluation_mesh). Call the evaluators under the mesh and the run's logical
    axis rules. `params`: host arrays, arrays placed anyhow, or arrays of a mesh that spans
    processes, which are first gathered to every host (a collective: every process calls
    this; each then evaluates on its own devices, evaluators/common.py)."""
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable
           for x in jax.tree.leaves(params)):
        params = multihost_utils.process_allgather(params, tiled=True)
    mesh = sharding.evaluation_mesh(config.mesh, devices or jax.local_devices())
    model, tx = model_and_optimizer(config)
    init_fn = make_init_fn(config, model, tx, init_inputs(config, 1))
    shardings = train_state.state_shardings(init_fn, mesh, config.sharding_rules).params
    return mesh, jax.device_put(params, shardings)


def train(config, workdir: str, data_streams: int | None = None,
          allow_config_changes: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last step's metrics.

    `data_streams`: how many data streams make a batch (data/host_data.py); default: the
    process count of the run's first start. A resumed run reads it from the checkpoint.
    `allow_config_changes`: fields (or prefixes) a resume may change from the saved config."""
    check_config(config, jax.device_count())
    checkpoint.check_resume(workdir, config, RESUME_FREE, allow_config_changes, ADDED_FIELDS)
    codec = loader.load_codec(config.autoencoder, family(config.model))  # the frozen autoencoder (weights on one device)
    codec_lib.check(codec, config.model)
    resuming = checkpoint.has_checkpoints(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint.check_writable(workdir)
    if not resuming:  # a resume rewrites config.json once its checkpoint restored
        checkpoint.write_config(workdir, config)

    # --- mesh
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.sharding_rules)
    batch_sharding = sharding.batch_sharding(mesh)

    # --- data: process 0 trains the tokenizer into the workdir, the others then load it
    tokenizer = distributed.first_then_others("tokenizer",
                                              lambda: get_tokenizer(config.data, workdir))
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}")
    manager = checkpoint.make_manager(workdir, every=1, keep=config.keep_checkpoints)
    start = checkpoint.newest_readable_step(manager)  # damaged newer ones are set aside
    streams = _data_streams(manager, start, data_streams)
    model_cfg = config.model
    latents_dirs = mixture.latents_dirs(config.data)  # image_source "latents", or entries'
    precomputed = bool(latents_dirs)
    # Precomputed: the family's kind (VAE latents; Chameleon: VQ code ids, shape (h, w)) from
    # the autoencoder this run loads (its statistics normalise VAE latents).
    kind = latent_records.FAMILY_KINDS[family(model_cfg)]
    for latents_dir in latents_dirs:
        latent_records.check_autoencoder(latents_dir, config.autoencoder.checkpoint, kind)
    latent_shape = (model_cfg.latent_size,) * 2 + ((model_cfg.latent_channels,)
                                                   if kind == "vae" else ())
    pipeline = HostData(config.data, patches_per_image=patches_per_image(model_cfg),
                        tokenizer=tokenizer, num_streams=streams,
                        rows=process_rows(batch_sharding, config.data.batch_size),
                        latent_shape=latent_shape if precomputed else None,
                        total_steps=config.total_steps, grad_accum=config.grad_accum)

    # --- the frozen autoencoder, replicated: every device encodes its own rows' images
    replicated = NamedSharding(mesh, PartitionSpec())
    ae_variables = jax.tree.map(  # from host copies: works when the mesh spans processes
        lambda h: jax.make_array_from_callback(h.shape, replicated, lambda i: h[i]),
        jax.device_get(codec.variables))  # one copy to the host, not one per local device

    # --- model and state (restored when the workdir has a checkpoint)
    model, tx = model_and_optimizer(config)
    init_fn = make_init_fn(config, model, tx, init_inputs(config, pipeline.max_images))
    if start:
        abstract = train_state.abstract_state(init_fn, mesh, config.sharding_rules)
        start, state, data_states = checkpoint.restore_newest_good(
            manager, start, abstract, pipeline.streams, streams)
        pipeline.set_state(data_states)
        checkpoint.write_config(workdir, config)
        distributed.log(f"resumed from {workdir}/checkpoints/{start}")
    else:
        state = train_state.create_state(init_fn, mesh, config.sharding_rules, config.seed)
    shardings = jax.tree.map(lambda x: x.sharding, state)

    # --- compile once, log memory
    step_fn = jax.jit(make_train_step(config, model, tx, codec), donate_argnums=0,
                      in_shardings=(shardings, batch_sharding, None),
                      out_shardings=(shardings, None))

    def next_batch():
        local = next(pipeline)
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = next_batch()
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, ae_variables).compile()
        _log_compile(compiled, time.perf_counter() - t0)

    elements = config.data.batch_size * config.data.seq_len
    step_flops = flops.flops_per_step(config.model, config.data.batch_size, config.data.seq_len)
    peak, peak_source = flops.peak_flops()
    peak *= jax.device_count()
    writer = MetricsWriter(workdir, config.total_steps, resume_step=start)
    preemption = Preemption(config.get("preemption_grace_s", 0))
    stop_at = config.stop_at_step or config.total_steps

    def report(step, metrics, data_metrics, seconds):
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        logged.update({f"data/{k}": v for k, v in data_metrics.items()})
        logged.update(elements_per_s=elements / seconds, flops_per_s=step_flops / seconds,
                      mfu=step_flops / seconds / peak)
        writer.write(step, logged)
        if step % config.log_every == 0 or step == config.total_steps:
            writer.progress(step, logged)
        if not logged["finite"]:
            manager.wait_until_finished()
            raise FloatingPointError(
                f"loss, gradient or update not finite at step {step} (the state was left as it "
                f"was); stopping. Last good checkpoint: "
                f"{manager.latest_step()} in {workdir}/checkpoints")
        return logged

    # --- evaluators of config.evals, built once
    evals = evaluators.from_config(
        config.get("evals"), evaluators.Context(config, tokenizer, codec, workdir),
        scheduled_only=True)

    def evaluate(step, state):
        """The evaluators due at `step`, on the EMA params when kept; every process runs them
        (their gathers are collectives), process 0 writes evals/ and the TensorBoard scalars."""
        due = [e for e in evals if e.due(step, config.total_steps)]
        if not due:
            return
        params = state.ema_params if state.ema_params is not None else state.params
        if jax.process_count() == 1:  # on the run's mesh (the loop's), params as training shards them
            results = evaluators.run(due, {"params": params}, step, workdir, config)
        else:
            # Several processes: the params gathered to every host, and every process evaluates
            # on its own devices, each computing its share of every evaluator's batches
            # (evaluators/common.py); all return the same scalars, process 0 writes.
            mesh, placed = place_for_evaluation(config, params)
            with jax.set_mesh(mesh):
                results = evaluators.run(due, {"params": placed}, step, workdir, config)
        writer.add_scalars(step, {f"eval/{key}": value for key, value in results.items()})

    def save(step, state):  # every process, with the data streams it owns
        checkpoint.save(manager, step, state, pipeline.get_state(), force=True,
                        num_streams=streams)

    pending, last, step, failing = None, {}, start, True
    t_prev = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            last_step = min(stop_at, config.total_steps)
            for step in range(start + 1, last_step + 1):
                state, metrics = compiled(state, batch, ae_variables)
                data_metrics = pipeline.metrics()  # counters after this step's batch
                preempted = preemption.reached(step)
                if pending is not None:  # the previous step's metrics: logging never blocks
                    last = report(*pending)
                now = time.perf_counter()
                pending, t_prev = (step, metrics, data_metrics, now - t_prev), now
                # The last step is saved before its evaluation, which may be long (a signal
                # then would cost every step since the previous checkpoint).
                if step % config.checkpoint_every == 0 or preempted or step == last_step:
                    # This step's metrics line goes to disk before its checkpoint exists: a
                    # kill after the save cannot leave a restored step without its line.
                    last, pending = report(*pending), None
                    save(step, state)
                if not preempted and any(e.due(step, config.total_steps) for e in evals):
                    evaluate(step, state)
                    t_prev = time.perf_counter()  # evaluating is not the next step's time
                if preempted:
                    break
                # The run's last step (total_steps, or stop_at_step) reads no batch ahead: the
                # checkpoint saved after the loop must hold the data state of this step's batch,
                # or a resumed run would skip one.
                if step < last_step:
                    batch = next_batch()
            if pending is not None:
                last = report(*pending)
        if manager.latest_step() != step:
            save(step, state)
        failing = False
    finally:
        checkpoint.finish(manager, failing)  # StorageError when the last save failed
        writer.close()
        pipeline.close()
    distributed.log(f"stopped at step {step}. checkpoints: {workdir}/checkpoints  metrics: "
                    f"{workdir}/metrics.jsonl  tensorboard: {workdir}/tensorboard  "
                    f"(peak: {peak_source})")
    return last


def _data_streams(manager, start: int, requested: int | None) -> int:
    """The run's number of data streams: the checkpoint's when resuming, else `requested` or
    the process count."""
    if not start:
        if requested is not None and requested < 1:
            raise ValueError(f"--data_streams={requested}: expected an integer >= 1")
        return requested or jax.process_count()
    saved = checkpoint.data_streams(manager, start)
    if requested is not None and requested != saved:
        raise ValueError(f"--data_streams={requested}, but the checkpoint at step {start} was "
                         f"written with {saved} data streams: a run keeps its streams (drop "
                         "the flag to continue with them)")
    if saved != jax.process_count():
        distributed.log(f"{saved} data streams over {jax.process_count()} processes: each "
                        "process reads the streams of its rows (data/host_data.py)")
    return saved


def _log_compile(compiled, seconds: float):
    mem = compiled.memory_analysis()
    parts = [f"compiled the train step in {seconds:.1f}s"]
    if mem is not None:
        gib = lambda b: f"{b / 2**30:.3f} GiB"
        parts.append(f"per-device memory: arguments {gib(mem.argument_size_in_bytes)}, "
                     f"temporaries {gib(mem.temp_size_in_bytes)}, "
                     f"outputs {gib(mem.output_size_in_bytes)}")
    distributed.log("; ".join(parts))
