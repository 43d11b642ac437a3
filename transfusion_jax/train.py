"""The Transfusion trainer.

    python -m transfusion_jax.train --config experiments/transfusion.py:tiny --workdir DIR \
        [--config.key=value ...]

Reads top to bottom: config checks, the step (pixels -> frozen autoencoder -> noise -> model ->
loss -> AdamW), then the loop (mesh, data, state or resume, compile once, steps, metrics one step
late, checkpoints, preemption). Batch t is a function of (seed, t): the data order comes from the
pipeline's seeded, checkpointed iterator and the step's noise from fold_in(seed key, t), so a
resumed run continues bit for bit.

Multi-host: the same command runs as one process per host (transfusion_jax/distributed.py,
launch/). Every process runs this program on the global mesh and feeds its rows of each batch
(host_data.py); process 0 alone writes the config, logs and metrics; all save and restore the
checkpoints together.
"""
import os
import signal
import sys
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from transfusion_jax import (checkpoint, cli, demo_report, diffusion, distributed, flops,
                             generate_cli, latents, losses, optim, sharding, train_state)
from transfusion_jax.data import latent_records
from transfusion_jax.data.config import check_fits
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.host_data import HostData, process_rows
from transfusion_jax.metrics import MetricsWriter
from transfusion_jax.model import patches_per_image

# ============================================================================ config checks


def check_config(config, num_devices: int):
    """Impossible combinations fail at start, naming the fields and the allowed values."""
    m, d = config.model, config.data
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    data_parallel = mesh["data"] * mesh["fsdp"]
    if d.batch_size % (data_parallel * config.grad_accum):
        raise ValueError(
            f"data.batch_size={d.batch_size} must be divisible by mesh data*fsdp={data_parallel} "
            f"times grad_accum={config.grad_accum}")
    for field in ("heads", "mlp_dim", "vocab_size"):
        if m[field] % mesh["tensor"]:
            raise ValueError(f"model.{field}={m[field]} must be divisible by mesh.tensor="
                             f"{mesh['tensor']}")
    patch_dim = m.patch_size ** 2 * m.latent_channels
    if m.patch == "linear" and patch_dim > m.dim:
        raise ValueError(
            f"model.patch_size={m.patch_size} with model.latent_channels={m.latent_channels} "
            f"makes {patch_dim}-dim patches, wider than model.dim={m.dim}: a linear patch layer "
            f"cannot carry them (the noise prediction error cannot fall below about "
            f"{1 - m.dim / patch_dim:.2f}); use a smaller patch_size, a larger dim or patch=unet")
    if m.dim % m.heads:
        raise ValueError(f"model.dim={m.dim} must be divisible by model.heads={m.heads}")
    check_fits(d, patches_per_image(m))  # an image plus BOI and EOI must fit in a row
    ae = config.autoencoder
    latents.check_kind(ae)  # the latent channels are checked against the loaded autoencoder
    if d.image_size != m.latent_size * ae.downsample:
        raise ValueError(f"data.image_size={d.image_size} must equal model.latent_size="
                         f"{m.latent_size} * autoencoder.downsample={ae.downsample}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay={config.ema_decay}: expected 0 (off) or in (0, 1)")
    if config.grad_accum < 1:
        raise ValueError(f"grad_accum={config.grad_accum}: expected an integer >= 1")
    optim.learning_rate(config.optimizer, config.total_steps)  # checks warmup_steps


# ============================================================================ the step


def make_train_step(config, model, tx, codec: latents.Codec = latents.IDENTITY):
    """train_step(state, batch, ae_variables) -> (state, metrics); pure, for jit with donation.

    The frozen autoencoder's weights come in as `ae_variables` (no gradient flows to them).
    A batch with `latents` (precomputed raw means, transfusion_jax.precompute) skips the
    encoder; a batch with `images` (pixels) is encoded here."""
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    lr = optim.learning_rate(config.optimizer, config.total_steps)
    k = config.grad_accum

    def loss_fn(params, batch, xt, t, noise, normalizers):
        out = model.apply({"params": params}, batch, xt, t)
        return losses.transfusion_loss(out, batch, noise, config.diffusion.ddpm_weight,
                                       normalizers)

    def micro(x):  # [B, ...] -> [k, B/k, ...]; microbatch i takes rows i, i+k, ... of every shard
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def grads_and_metrics(params, inputs, normalizers):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
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
        key_t, key_noise = jax.random.split(key)
        if "latents" in batch:
            x0 = codec.normalize(batch["latents"])
        else:
            x0 = codec.encode(jax.lax.stop_gradient(ae_variables), batch["images"])
        t = diffusion.sample_timesteps(key_t, batch["max_timestep"])
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        xt = diffusion.q_sample(schedule, x0, t, noise)
        model_batch = {k_: v for k_, v in batch.items() if k_ not in ("images", "latents")}
        normalizers = (batch["text_weights"].sum(), batch["image_mask"].sum().astype(jnp.float32))
        grads, metrics = grads_and_metrics(state.params, (model_batch, xt, t, noise), normalizers)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p,
                               ema, params)
        # A non-finite step changes nothing: the loop stops and the last checkpoint stays good.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state),
                                  ema_params=keep(ema, state.ema_params))
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr(state.step),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step


# ============================================================================ the loop


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop checkpoints after the current step and exits.

    With several processes, all must stop after the same step, so no local handler: JAX's
    preemption service (on with jax.distributed) catches SIGTERM on any host and agrees on a
    step with the others, which `reached(step)` then reports on every host."""

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        print(f"signal {signal.Signals(signum).name}: checkpointing after this step",
              file=sys.stderr, flush=True)
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi and not self.requested:
            try:
                self.requested = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # no preemption service (jax.distributed not started)
                distributed.log(f"preemption notices are off: {e}")
                self._multi = False
            if self.requested:
                distributed.log(f"preemption notice: all processes checkpoint after step {step}")
        return self.requested


def train(config, workdir: str, data_streams: int | None = None) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last step's metrics.

    `data_streams`: how many data streams make a batch (host_data.py); default: the process
    count of the run's first start. A resumed run reads it from the checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    check_config(config, jax.device_count())
    codec = latents.load(config.autoencoder)  # the frozen autoencoder (weights on one device)
    latents.check(codec, config.model)
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
    start = manager.latest_step() or 0
    streams = _data_streams(manager, start, data_streams)
    m = config.model
    precomputed = config.data.image_source == "latents"
    if precomputed:  # the latents must come from the VAE whose statistics normalise them
        latent_records.check_autoencoder(config.data.latents_dir, config.autoencoder.checkpoint)
    pipeline = HostData(config.data, patches_per_image=patches_per_image(m),
                        tokenizer=tokenizer, num_streams=streams,
                        rows=process_rows(batch_sharding, config.data.batch_size),
                        latent_shape=((m.latent_size, m.latent_size, m.latent_channels)
                                      if precomputed else None))

    # --- the frozen autoencoder, replicated: every device encodes its own rows' images
    replicated = NamedSharding(mesh, PartitionSpec())
    ae_variables = jax.tree.map(  # from host copies: works when the mesh spans processes
        lambda h: jax.make_array_from_callback(h.shape, replicated, lambda i: h[i]),
        jax.device_get(codec.variables))  # one copy to the host, not one per local device

    # --- model and state (restored when the workdir has a checkpoint)
    model, tx = train_state.model_and_optimizer(config)
    inputs = train_state.example_inputs(config.model, config.data.seq_len, pipeline.max_images)
    if start:
        abstract = train_state.abstract_state(config, model, tx, inputs, mesh)
        state, data_states = checkpoint.restore(manager, start, abstract, pipeline.streams)
        pipeline.set_state(data_states)
        distributed.log(f"resumed from {workdir}/checkpoints/{start}")
    else:
        state = train_state.init_state(config, model, tx, inputs, mesh, config.seed)
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
    preemption = Preemption()
    stop_at = config.stop_at_step or config.total_steps

    def report(step, metrics, data_metrics, seconds):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m.update({f"data/{k}": v for k, v in data_metrics.items()})
        m.update(elements_per_s=elements / seconds, flops_per_s=step_flops / seconds,
                 mfu=step_flops / seconds / peak)
        writer.write(step, m)
        if step % config.log_every == 0 or step == config.total_steps:
            writer.progress(step, m)
        if not m["finite"]:
            manager.wait_until_finished()
            raise FloatingPointError(
                f"loss or gradient not finite at step {step}; stopping. Last good checkpoint: "
                f"{manager.latest_step()} in {workdir}/checkpoints")
        return m

    def samples(step, state):
        """Images for fixed prompts into workdir/samples/<step>/ (single-process runs)."""
        variables = {"params": state.ema_params if state.ema_params is not None else state.params}
        out = os.path.join(workdir, "samples", str(step))
        generate_cli.text_to_image_samples(config, variables, tokenizer, sample_prompts, out,
                                           codec=codec)
        distributed.log(f"step {step}: samples in {out}")

    sample_prompts = list(config.sample_prompts) or (
        demo_report.heldout_scenes(config, 4)[0] if config.data.image_source == "shapes" else [])
    sample_every = config.sample_every if sample_prompts else 0
    if sample_every and jax.process_count() > 1:
        distributed.log("sample_every: sample grids are written by single-process runs only")
        sample_every = 0

    def save(step, state):  # every process, with the data streams it owns
        checkpoint.save(manager, step, state, pipeline.get_state(), force=True,
                        num_streams=streams)

    pending, last, step = None, {}, start
    t_prev = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start + 1, min(stop_at, config.total_steps) + 1):
                state, metrics = compiled(state, batch, ae_variables)
                data_metrics = pipeline.metrics()  # counters after this step's batch
                preempted = preemption.reached(step)
                if step % config.checkpoint_every == 0 or preempted:
                    save(step, state)
                if pending is not None:  # the previous step's metrics: logging never blocks
                    last = report(*pending)
                now = time.perf_counter()
                pending, t_prev = (step, metrics, data_metrics, now - t_prev), now
                if sample_every and step % sample_every == 0:
                    samples(step, state)
                    t_prev = time.perf_counter()  # sampling is not the next step's time
                if preempted:
                    break
                if step < config.total_steps:
                    batch = next_batch()
            if pending is not None:
                last = report(*pending)
        if manager.latest_step() != step:
            save(step, state)
    finally:
        manager.wait_until_finished()
        manager.close()
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
                        "process reads the streams of its rows (host_data.py)")
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


# ============================================================================ CLI


def _distributed_flags() -> dict:
    """Multi-host (distributed.py). Unset: auto-detected under a cluster (Cloud TPU, SLURM,
    Open MPI, JAX_COORDINATOR_ADDRESS); nothing on a plain machine."""
    return dict(
        mode=flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                               "start jax.distributed: auto (flags or a cluster), on, off"),
        coordinator=flags.DEFINE_string("coordinator_address", None,
                                        "host:port of process 0's coordinator (explicit multi-host)"),
        num_processes=flags.DEFINE_integer("num_processes", None, "processes in the job"),
        process_id=flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1"),
        data_streams=flags.DEFINE_integer(
            "data_streams", None, "data streams per batch (default: the first run's process "
            "count; kept by the checkpoint)"))


def _main(config, workdir, f):
    started = distributed.maybe_initialize(f["coordinator"], f["num_processes"],
                                           f["process_id"], f["mode"])
    if started:
        distributed.log(f"jax.distributed ({started}): {distributed.describe()}")
    train(config, workdir, data_streams=f["data_streams"])


def main():
    cli.run(_main, "experiments/transfusion.py[:arg]", _distributed_flags)


if __name__ == "__main__":
    main()
