"""What the patch layers spend on unused image slots: one JSON line per (Table 2 size, patch kind),
after one line of measured slot usage.

    .venv/bin/python benchmarks/patch_slots.py [--sizes 0.16b 0.76b 7b] [--patches linear unet]
        [--rows 128]

The model runs its patch encoder and decoder on every one of a row's M image slots (static
shapes: models/transfusion.py, `_embed` and `_outputs`), used or not. At the paper's layout
(rows of 4096, 32x32x8 latents in 2x2 patches: P = 256, M = 4096 // (P + 2) = 15) this measures
what share of a train step that costs:

  * slot usage: rows from the data pipeline itself at the paper presets' data config (seq_len
    4096, text_to_patch_ratio 1.0, pack_split_text), the shapes world standing in for the paper's
    sources (image_size 256 = 32 latents * 8; the pixels do not change the layout) with a
    tokenizer trained on its text. Reported three ways: the preset's mix (30% of image documents
    interleaved, 2-3 images each), image-caption pairs only (the paper's image data, section
    4.1), and benchmarks/paper_rows.py's synthetic paper mix (captions of 8-64 tokens, text
    documents of 64-1024). The preset's mix gives `mean_used_slots` of the size lines.
  * FLOPs: XLA's cost analysis of lowered, never compiled or run, functions on
    jax.ShapeDtypeStruct inputs (nothing is allocated, 7b included): the trainer's own train
    step (make_train_step: noise, forward, backward, AdamW) with `latents` in the batch, and
    the patch encoder + decoder alone (forward, backward to their parameters and to the
    transformer's output, as in the step) on M slots and on the used count. The transformer's
    layer scan is unrolled for the count (XLA counts a loop body once); attention is "dense"
    (the full L x L scores, core/flops.py's convention; the fused kernels skip masked blocks,
    which would make the waste's share larger); remat as the preset ("full": the blocks'
    forward runs twice). The step is lowered at 1 and 2 rows: per row and per step (the
    optimizer) parts, summed for the preset's batch of 512 rows.

Fields (FLOPs of one step of the preset's batch): step_flops; patch_flops_all_slots (patch layers
on all M slots), patch_flops_used_slots (on the mean used count: lowered at the nearest whole
count, scaled linearly; a conv is linear in its batch), wasted_share = (all - used) / step.
Cross-checks: slot_flops_step_delta, the step's own FLOPs per slot (step lowered at M and at the
nearest used count, differenced: includes the per-slot noise and loss); core/flops.py's analytic
transformer FLOPs (plus the remat recompute) against step - patch layers; an analytic count of
the linear layers' matmuls (flops.py leaves patch layers out). Beside them:
wasted_share_attention_halved (attention counted at half, as the block-skipping kernels run it
at least) and vae_wasted_share: a step whose batch carries pixels (not precomputed latents,
data.image_source "latents") runs the frozen VAE encoder (experiments/autoencoder.py:paper,
forward only) on every slot as well, models/autoencoder/codec.py.

With --budget K [--budget_rows R] (data.image_budget, trainers/image_budget.py: the fix) the
pipeline is also measured at that budget (used slots, padding, rows the budget closed) and each
size line adds step_flops_budget (the step lowered on groups of R rows, K images each),
budget_saved_share = (step - budgeted step) / step, and budget_wasted_share /
budget_vae_wasted_share: what the budget's slack (K / R over the rows' mean use) still spends.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_rows  # noqa: E402
from transfusion_jax.core import flops, sharding, train_state  # noqa: E402
from transfusion_jax.core.config import load_config  # noqa: E402
from transfusion_jax.data.config import resolve_max_images  # noqa: E402
from transfusion_jax.data.pipeline import make_pipeline  # noqa: E402
from transfusion_jax.data.tokenizer import get_tokenizer  # noqa: E402
from transfusion_jax.models import example_inputs, patches_per_image  # noqa: E402
from transfusion_jax.models.patching import patch_layers  # noqa: E402
from transfusion_jax.trainers import transfusion as trainer  # noqa: E402

EXPERIMENT = "experiments/transfusion.py"


# ---------------------------------------------------------------------------- slot usage

def pipeline_usage(data, patches: int, rows: int, tokenizer, **overrides) -> dict:
    """Mean used slots per row of the first `rows` rows of the pipeline at `data` (+ overrides)."""
    data = data.copy_and_resolve_references()
    data.batch_size = max(16, overrides.get("image_budget_rows", 1))
    for key, value in overrides.items():
        data[key] = value
    pipeline = make_pipeline(data, patches_per_image=patches, tokenizer=tokenizer,
                             shard_index=0, shard_count=1)
    used = []
    while len(used) < rows:
        used += list(next(pipeline)["image_mask"].sum(axis=1))
    metrics = pipeline.metrics()
    pipeline.close()
    used = np.asarray(used[:rows], np.float64)
    return {"mean": float(used.mean()), "min": int(used.min()), "max": int(used.max()),
            "padding_fraction": round(metrics["padding_fraction"], 4),
            "budget_closed_rows": metrics["budget_closed_rows"],
            "text_to_patch_ratio": round(metrics["text_to_patch_ratio"], 3)}


def paper_rows_usage(length: int, patches: int, rows: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([sum(p == ("image",) for d in paper_rows.documents(rng, length, patches)
                              for p in d) for _ in range(rows)]))


def slot_usage(rows: int, budget: int = 0, budget_rows: int = 1) -> dict:
    config = load_config(f"{EXPERIMENT}:0.16b")  # every Table 2 size has this data config
    data, p = config.data, patches_per_image(config.model)
    m = resolve_max_images(data, p)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = get_tokenizer(data.copy_and_resolve_references(), workdir)
    preset = pipeline_usage(data, p, rows, tokenizer)
    pairs = pipeline_usage(data, p, rows, tokenizer, shapes_interleaved_fraction=0.0)
    synthetic = paper_rows_usage(data.seq_len, p, rows)
    budgeted = (pipeline_usage(data, p, rows, tokenizer, image_budget=budget,
                               image_budget_rows=budget_rows) if budget else None)
    return {"benchmark": "patch_slots", "kind": "slot_usage", "seq_len": data.seq_len,
            "patches_per_image": p, "max_images": m, "image_size": data.image_size,
            "text_to_patch_ratio": data.text_to_patch_ratio, "rows": rows,
            "tokenizer": f"shapes sentencepiece, vocab {data.tokenizer_vocab_size}",
            "mean_used_slots": round(preset["mean"], 3),
            "used_min_max": [preset["min"], preset["max"]],
            "used_share": round(preset["mean"] / m, 4),
            "measured_text_to_patch_ratio": preset["text_to_patch_ratio"],
            "padding_fraction": preset["padding_fraction"],
            "mean_used_slots_pairs_only": round(pairs["mean"], 3),
            "mean_used_slots_paper_rows": round(synthetic, 3),
            **({"image_budget": budget, "image_budget_rows": budget_rows,
                "budget_mean_used_slots": round(budgeted["mean"], 3),
                "budget_padding_fraction": budgeted["padding_fraction"],
                "budget_closed_rows": budgeted["budget_closed_rows"]} if budget else {}),
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------- FLOPs

@contextlib.contextmanager
def unrolled_layers():
    """nn.scan with every iteration unrolled, so that XLA's cost analysis counts all layers."""
    scan = nn.scan

    def unrolled(target, **kwargs):
        return scan(target, unroll=kwargs["length"], **kwargs)

    nn.scan = unrolled
    try:
        yield
    finally:
        nn.scan = scan


def cost(lowered) -> float:
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def abstract_batch(config, rows: int, slots: int):
    length, model, p = config.data.seq_len, config.model, patches_per_image(config.model)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = {k: ints(rows, length) for k in ("tokens", "segment_ids", "positions", "mask_pos",
                                             "patch_index", "targets")}
    batch["text_weights"] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
    batch["patch_positions"] = ints(rows, slots, p)
    batch["latents"] = jax.ShapeDtypeStruct(
        (rows, slots, model.latent_size, model.latent_size, model.latent_channels), jnp.float32)
    batch["image_mask"] = jax.ShapeDtypeStruct((rows, slots), jnp.bool_)
    batch["max_timestep"] = ints(rows, slots)
    return batch


def step_flops(config, rows: int, slots: int) -> float:
    """FLOPs of the trainer's step lowered on `rows` rows of `slots` slots."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, tx = trainer.model_and_optimizer(config)
    inputs = example_inputs(config.model, config.data.seq_len, slots)
    state = train_state.abstract_state(trainer.make_init_fn(config, model, tx, inputs), mesh,
                                       config.sharding_rules)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), state)
    step = jax.jit(trainer.make_train_step(config, model, tx))
    rules = sharding.rules_from_config(config.sharding_rules)
    with unrolled_layers(), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step.lower(state, abstract_batch(config, rows, slots))
    return cost(lowered)


class PatchLayers(nn.Module):
    """The model's patch encoder and decoder as the model wires them: the transformer's output
    `h` [N, H/k, W/k, D] stands in for the encoder's grid coming back through the transformer."""
    cfg: object

    @nn.compact
    def __call__(self, xt, t, h):
        encoder, decoder = patch_layers(self.cfg)
        grid, skips = encoder(xt, t)
        return decoder(grid.astype(h.dtype) + h, skips, t).astype(jnp.float32)


def patch_flops(config, images: int) -> float:
    """Forward + backward (to the parameters and to h) of the patch layers on `images` slots."""
    c = config.model
    size, k = c.latent_size, c.patch_size
    module = PatchLayers(c)
    xt = jax.ShapeDtypeStruct((images, size, size, c.latent_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((images,), jnp.int32)
    h = jax.ShapeDtypeStruct((images, size // k, size // k, c.dim), jnp.dtype(c.dtype))
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), jnp.zeros(xt.shape),
                                                         jnp.zeros(t.shape, jnp.int32),
                                                         jnp.zeros(h.shape, h.dtype))))

    def loss(params, h, xt, t, target):
        return jnp.mean((module.apply(params, xt, t, h) - target) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return cost(grad.lower(params, h, xt, t, xt)), sum(
        x.size for x in jax.tree.leaves(params))


def attention_flops(config, rows: int) -> float:
    """Score and value products over the full L x L (core/flops.py), with remat's recompute."""
    m, length = config.model, config.data.seq_len
    return (12.0 + (4.0 if m.remat != "none" else 0.0)) * m.depth * rows * length ** 2 * m.dim


def analytic_transformer(config, rows: int) -> float:
    """core/flops.py's model FLOPs plus the forward pass that remat="full" runs again: every
    matmul of a block but its last (the SwiGLU down projection, whose output the backward pass
    does not need), and the attention products."""
    m, length = config.model, config.data.seq_len
    model = flops.flops_per_step(m, rows, length)
    if m.remat == "none":
        return model
    per_layer = 2.0 * (4 * m.dim * m.dim + 2 * m.dim * m.mlp_dim) + 4.0 * length * m.dim
    return model + m.depth * rows * length * per_layer


def vae_encoder_flops(images: int) -> float:
    """Forward FLOPs of the paper's frozen VAE encoder (experiments/autoencoder.py:paper) on
    `images` 256x256 pixel slots: what a step on pixels (not precomputed latents) runs per slot."""
    from transfusion_jax.models.autoencoder.codec import Codec
    from transfusion_jax.models.autoencoder.model import Autoencoder
    cfg = load_config("experiments/autoencoder.py:paper")
    codec = Codec("vae", Autoencoder(cfg.model), ae_config=cfg.model)
    size = cfg.data.image_size  # 256: 32x32x8 latents
    pixels = jax.ShapeDtypeStruct((images, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: nn.unbox(codec.model.init(
        jax.random.key(0), jnp.zeros(pixels.shape), method=Autoencoder.encode)))
    return cost(jax.jit(codec.encode_mean).lower(variables, pixels))


def analytic_linear_patch(config, slots: int) -> float:
    """Matmuls of the linear patch layers per row: encoder forward + weight grad (4 FLOPs per
    weight per patch), decoder forward + weight and input grads (6)."""
    m = config.model
    return 10.0 * m.patch_size ** 2 * m.latent_channels * m.dim * patches_per_image(m) * slots


def budget_step_flops(config, usage: dict) -> float:
    """The step of the preset's batch with data.image_budget: lowered on one and two groups of
    image_budget_rows rows, whose K images (not rows * M) reach the VAE and patch layers."""
    config = config.copy_and_resolve_references()
    rows = usage["image_budget_rows"]
    config.data.image_budget, config.data.image_budget_rows = usage["image_budget"], rows
    one = step_flops(config, rows, usage["max_images"])
    two = step_flops(config, 2 * rows, usage["max_images"])
    return (2 * one - two) + config.data.batch_size // rows * (two - one)


def measure(size: str, patch: str, usage: dict, vae_per_slot: float) -> dict:
    config = load_config(f"{EXPERIMENT}:{size},patch={patch}")
    config.model.attention = "dense"  # the full L x L scores, as core/flops.py counts them
    batch, m = config.data.batch_size, usage["max_images"]
    used = usage["mean_used_slots"]
    near = round(used)
    start = time.perf_counter()
    one, two = step_flops(config, 1, m), step_flops(config, 2, m)
    one_near = step_flops(config, 1, near)
    per_row, fixed = two - one, 2 * one - two
    step = fixed + batch * per_row
    slot_step = (one - one_near) / (m - near)  # step FLOPs per slot per row
    patch_all, patch_params = patch_flops(config, m)
    patch_near, _ = patch_flops(config, near)
    patch_used = patch_near * used / near
    wasted = batch * (patch_all - patch_used)
    transformer_xla = step - batch * patch_all
    analytic = analytic_transformer(config, batch)
    out = {"benchmark": "patch_slots", "preset": size, "patch": patch,
           "patch_params_m": round(patch_params / 1e6, 1),
           "batch_rows": batch, "seq_len": config.data.seq_len,
           "remat": config.model.remat, "attention_counted": "dense",
           "max_images": m, "mean_used_slots": used,
           "step_flops": step, "patch_flops_all_slots": batch * patch_all,
           "patch_flops_used_slots": batch * patch_used,
           "wasted_flops": wasted, "wasted_share": round(wasted / step, 5),
           "patch_share_all_slots": round(batch * patch_all / step, 5),
           "slot_flops_step_delta": batch * slot_step,
           "slot_flops_patch_alone": batch * patch_all / m,
           "wasted_share_step_delta": round(batch * slot_step * (m - used) / step, 5),
           # The fused kernels skip masked blocks: with attention counted at half (MaxText's
           # causal convention; packed documents skip more) the waste is a larger share.
           "wasted_share_attention_halved": round(
               wasted / (step - attention_flops(config, batch) / 2), 5),
           # With pixels in the batch (not precomputed latents) the frozen VAE encoder runs on
           # every slot too (forward only): its share on the unused ones, of that pixel step.
           "vae_wasted_share": round(batch * vae_per_slot * (m - used)
                                     / (step + batch * vae_per_slot * m), 5),
           "optimizer_flops": fixed,
           "analytic_transformer_flops": analytic,
           "xla_over_analytic_transformer": round(transformer_xla / analytic, 4),
           "lower_s": round(time.perf_counter() - start, 1)}
    if "image_budget" in usage:  # the fix: K images per group of R rows reach the patch layers
        budgeted = budget_step_flops(config, usage)
        k, r = usage["image_budget"], usage["image_budget_rows"]
        used = usage["budget_mean_used_slots"]  # the budget's packing holds fewer a row
        out.update(image_budget=k, image_budget_rows=r, step_flops_budget=budgeted,
                   budget_saved_share=round((step - budgeted) / step, 5),
                   # what the budget's slack (K over the rows' mean use) still spends
                   budget_wasted_share=round(batch * (patch_all / m) * (k / r - used)
                                             / budgeted, 5),
                   budget_vae_wasted_share=round(batch * vae_per_slot * (k / r - used)
                                                 / (budgeted + batch * vae_per_slot * k / r), 5))
        out["lower_s"] = round(time.perf_counter() - start, 1)
    if patch == "linear":
        out["linear_patch_xla_over_analytic_matmuls"] = round(
            patch_all / analytic_linear_patch(config, m), 4)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["0.16b", "0.37b", "0.76b", "1.4b", "7b"])
    ap.add_argument("--patches", nargs="+", default=["linear", "unet"])
    ap.add_argument("--rows", type=int, default=128, help="pipeline rows for the slot usage")
    ap.add_argument("--budget", type=int, default=0,
                    help="also measure data.image_budget K (0: not)")
    ap.add_argument("--budget_rows", type=int, default=16, help="data.image_budget_rows R")
    args = ap.parse_args()
    usage = slot_usage(args.rows, args.budget, args.budget_rows)
    vae_per_slot = vae_encoder_flops(1)
    usage["vae_encoder_flops_per_slot"] = vae_per_slot
    print(json.dumps(usage), flush=True)
    for size in args.sizes:
        for patch in args.patches:
            print(json.dumps(measure(size, patch, usage, vae_per_slot)), flush=True)


if __name__ == "__main__":
    main()
